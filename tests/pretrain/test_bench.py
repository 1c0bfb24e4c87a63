"""benchmarks.step, benchmarks.dedup: the un-deduplicated batch is faithful (same loss, gradients, users; more rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.dedup import check_faithful, faithful, step_loss, undeduplicate
from benchmarks.step import main
from pretrain.config import load_config
from pretrain.model import Catalog, Recommender
from shards.collate import Batch
from shards.stream import SequenceStream

TINY = Path(__file__).resolve().parents[2] / "launch/configs/tiny.toml"


def model_and_batch(folders: list[str], *overrides: str, split: str = "train") -> tuple[Recommender, Batch]:
    """The tiny model (random init, seed 0) and the first batch of ``split`` of the two synthetic domains."""
    base = [f"data.domains={json.dumps(folders)}", "data.stream.num_workers=0", f"data.stream.split={split}"]
    cfg = load_config(str(TINY), [*base, *overrides])
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders), image_size=cfg.data.stream.image_size)
    return model, next(iter(SequenceStream(cfg.data.domains, cfg.data.stream, rank=0, world_size=1)))


def test_every_position_and_target_gets_its_own_row(folders) -> None:
    _, batch = model_and_batch(folders, split="valid")
    undedup = undeduplicate(batch)
    expanded, row_of_V = undedup.batch, undedup.row_of_V
    positions = int(batch.seq_mask.sum())
    assert len(expanded.item_index) == positions + len(batch) > len(batch.item_index)  # more rows than distinct items
    assert torch.equal(expanded.seq_mask, batch.seq_mask)
    assert sorted(expanded.seq[expanded.seq_mask].tolist() + expanded.target.tolist()) == list(range(len(row_of_V)))
    # each row holds the item its position (or target) held in the deduplicated table
    assert torch.equal(row_of_V[expanded.seq[batch.seq_mask]], batch.seq[batch.seq_mask])
    assert torch.equal(row_of_V[expanded.target], batch.target)
    for name in ("item_domain", "item_index", "input_ids", "attention_mask", "has_text", "has_image"):
        assert torch.equal(getattr(expanded, name), getattr(batch, name)[row_of_V]), name
    has_V = expanded.has_image
    assert len(expanded.pixel_values) == int(has_V.sum()) and has_V.any()
    assert torch.equal(expanded.pixel_values[expanded.image_row[has_V]],
                       batch.pixel_values[batch.image_row[row_of_V[has_V]]])  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["loss.softmax_positions=all", "loss.logq_correction=true", "loss.cpc=0.5", "loss.next_item_ce=0.5"],
        ["model.user.id_embeddings=true", "loss.content_id=0.5", "model.fusion.kind=qformer"],
    ],
    ids=["softmax", "all_objectives", "hybrid_qformer"],
)
def test_same_loss_gradients_and_users_without_deduplication(folders, overrides: list[str]) -> None:
    model, batch = model_and_batch(folders, *overrides)
    undedup = undeduplicate(batch)
    check = check_faithful(model, batch, undedup)
    assert faithful(check), check
    assert check["loss_undedup"] == pytest.approx(check["loss_dedup"], rel=1e-5)
    assert check["user_vectors_max_abs_diff"] < 1e-5
    # the expanded table fed as it is has duplicate candidates: a different objective (why collapse() exists)
    assert check["loss_expanded_as_is"] != pytest.approx(check["loss_dedup"], rel=1e-3)

    model.eval()  # no dropout: both paths compute the same function, so the same gradients reach every weight
    grads = []
    for arg in (None, undedup):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        step_loss(model, batch, arg).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_missing_domain_folder_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["--domains", str(tmp_path / "nope"), "--skip-memory"]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["--domains", str(tmp_path / "empty"), "--json", str(tmp_path / "out.json")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_memory_accounting_counts_each_byte_once() -> None:
    from benchmarks.zero_memory import _Spans

    flat = torch.zeros(100)  # 400 bytes, e.g. a flat parameter buffer
    views = [flat[:30], flat[20:60]]  # overlapping views of it: 60 floats
    spans = _Spans()
    assert spans.claim(views) == 60 * 4
    assert spans.claim([flat]) == 40 * 4  # only what the views did not cover
    assert spans.claim([flat[10:20]]) == 0 and spans.claim([torch.ones(3, dtype=torch.float64)]) == 24
