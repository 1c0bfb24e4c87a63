"""The Recommender on real tiny shards: every fusion and objective trains, scores and interests behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import TrainConfig, load_config
from pretrain.model import Catalog, Recommender
from shards.stream import SequenceStream

TINY = Path(__file__).resolve().parents[2] / "launch/configs/tiny.toml"


def config(folders: list[str], *overrides: str) -> TrainConfig:
    base = [f"data.domains={json.dumps(folders)}", "data.stream.num_workers=0", "model.user.dropout=0.0"]
    return load_config(str(TINY), [*base, *overrides])


def first_batch(cfg: TrainConfig, split: str = "train"):
    cfg.data.stream.split = split
    return next(iter(SequenceStream(cfg.data.domains, cfg.data.stream, rank=0, world_size=1)))


def train_steps(model: Recommender, batch, steps: int = 6) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("kind", ["sum", "concat", "gated", "score", "qformer"])
def test_every_fusion_learns_a_batch(folders, kind: str) -> None:
    cfg = config(folders, f"model.fusion.kind={kind}")
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders))
    losses = train_steps(model, first_batch(cfg), steps=12)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.softmax=0", "loss.cpc=1.0"],
        ["loss.softmax=0", "loss.next_item_ce=1.0"],
        ["loss.softmax_positions=all", "loss.logq_correction=true"],
        ["model.user.id_embeddings=true", "loss.content_id=0.5"],
        ["loss.seq_seq=0.5"],
    ],
    ids=["cpc", "next_item_ce", "all_positions_logq", "hybrid_content_id", "seq_seq"],
)
def test_each_objective_trains_every_trainable_part(folders, overrides: list[str]) -> None:
    cfg = config(folders, *overrides)
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders))
    batch = first_batch(cfg)
    out = model(batch)
    out.loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # every loss reaches the user encoder and both item encoders (the sequences are made of encoded items)
    for part in ("user.", "text.", "image."):
        grads = [p.grad for n, p in named if n.startswith(part) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), (part, overrides)
    assert set(out.logs) >= {"total", "sequences", "positions", "items"}
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0], (overrides, losses)


def test_score_and_user_vectors_on_a_validation_batch(folders) -> None:
    cfg = config(folders)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders)).eval()
    batch = first_batch(cfg, "valid")
    with torch.no_grad():
        items = model.encode_items(batch)
        users = model.user_vectors(batch, items)
        scores = model.score(users, items)
    assert scores.shape == (len(batch), len(batch.item_index))
    assert scores.abs().max() <= 1.0 + 1e-5  # cosine
    # a user's vector depends only on its history: the same user alone gives the same vector
    assert batch.target is not None and bool((batch.target >= 0).all())


def test_interest_tokens_are_refreshed_and_used(folders) -> None:
    cfg = config(folders, "model.user.interest_tokens=4", "model.user.interest_knn=3", "loss.interest_diversity=0.1")
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders))
    batch = first_batch(cfg)
    before = model(batch).logs
    assert before["interest_diversity"] == 0.0  # not computed yet: no memory, nothing to regularise
    with torch.no_grad():
        model.refresh_interests(model.encode_items(batch))
    rows = model.domain_offset[batch.item_domain] + batch.item_index
    assert bool((model.prototype_of[rows] >= 0).all()) and int(model.prototype_of[rows].max()) < 4
    assert model.interests.abs().sum() > 0
    after = model(batch)
    assert after.logs["interest_diversity"] > 0 and torch.isfinite(after.loss)


def test_gather_hook_of_one_rank_equals_no_gather(folders) -> None:
    cfg = config(folders, "loss.gather_negatives=true")
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders))
    batch = first_batch(cfg)

    class OneRank:
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def offset(self, rows: int) -> int:
            return 0

    torch.manual_seed(1)
    plain = model(batch).loss
    torch.manual_seed(1)
    gathered = model(batch, OneRank()).loss
    torch.testing.assert_close(plain, gathered)


def test_catalog_round_trip(folders) -> None:
    catalog = Catalog.from_folders(folders)
    assert Catalog.from_dict(json.loads(json.dumps(catalog.to_dict()))) == catalog
    assert catalog.offsets == [0, catalog.n_items[0]]
