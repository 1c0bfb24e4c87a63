"""Fixtures of the serve tests: finetune's session shards and tiny pretrained export (shared code, built once per
session here), a LoRA model finetuned on the target domain for one step (no engine: the cheapest finetuned folder),
and helpers that rank users both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.finetune.conftest import domains, pretrained  # noqa: F401  (the fixtures, registered here too)


@pytest.fixture(scope="session")
def finetuned(pretrained, domains, tmp_path_factory) -> Path:  # noqa: F811
    """A finetuned folder: LoRA on the target domain (fashion), one SGD step on one batch, saved."""
    from finetune.export import save_finetuned
    from finetune.run import resolve_config
    from finetune.transfer import Source, prepare_model
    from pretrain.model import Catalog
    from shards.stream import SequenceStream

    cfg = resolve_config(str(pretrained), domains["target"], "lora", [], ["data.stream.num_workers=0"])
    source = Source.open(pretrained)
    catalog = Catalog.from_folders(cfg.data.domains)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = prepare_model(cfg, catalog, source)
        batch = next(iter(SequenceStream(cfg.data.domains, cfg.data.stream)))
        model.train()
        model(batch).loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    return save_finetuned(model, cfg, catalog, source, tmp_path_factory.mktemp("finetuned") / "model")
