"""Fixtures of the reliability tests, borrowed from the test modules that own them (see reliability_support)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from reliability_support import evaluate_tests, pretrain_fixtures

import pretrain.export

folders = pretrain_fixtures.folders


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory) -> Path:
    """An untrained tiny model over ``folders``, exported as ``python -m pretrain.evaluate`` reads it."""
    cfg = evaluate_tests.tiny_config(folders)
    model = evaluate_tests.tiny_model(cfg, folders)
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    return pretrain.export.export(engine, cfg, model.catalog, tmp_path_factory.mktemp("export") / "model")
