"""Fixtures of every test folder: one torch thread, a feature cache of the session's own, and the environment of a
lone in-process run."""

from __future__ import annotations

import os

import pytest
import torch

from tests.testutil import lone_env


@pytest.fixture(autouse=True, scope="session")
def own_feature_cache(tmp_path_factory):
    """MOMREC_CACHE in a folder of this session (commands the tests start inherit it): the suite never reads or
    writes the real ~/.cache/momrec, so it stays hermetic and deterministic."""
    before = os.environ.get("MOMREC_CACHE")
    os.environ["MOMREC_CACHE"] = str(tmp_path_factory.mktemp("momrec-cache"))
    yield
    if before is None:
        os.environ.pop("MOMREC_CACHE", None)
    else:
        os.environ["MOMREC_CACHE"] = before


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine run far faster on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def warnings_not_yet_given():
    """The stream's once-per-process warnings (shards.collate.warn_once) start unsaid in every test: a test that
    checks one is logged does not depend on which tests met the same (domain, item) before it."""
    from shards.collate import _logged

    _logged.clear()


@pytest.fixture
def lone_process(monkeypatch):
    """No launcher variables, DeepSpeed on the CPU, offline; the process group shut down afterwards."""
    from pretrain.distributed import shutdown

    lone_env(monkeypatch)
    yield
    shutdown()
