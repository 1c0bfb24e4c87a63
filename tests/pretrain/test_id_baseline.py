"""The ID-only SASRec baseline (launch/configs/sasrec_id.toml): items are ID embeddings alone, no content encoder
is built and the stream neither tokenizes nor decodes; it trains under the engine, exports, and evaluates; the
config refuses what an ID-only model cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import TrainConfig, load_config
from pretrain.engine import train
from pretrain.export import load_pretrained
from pretrain.model import Catalog, Recommender
from pretrain.ranking import EvalOptions, evaluate_domain
from shards.stream import SequenceStream

REPO = Path(__file__).resolve().parents[2]
SASREC = REPO / "launch/configs/sasrec_id.toml"


pytestmark = pytest.mark.usefixtures("lone_process")


def sasrec(folders: list[str], *more: str) -> TrainConfig:
    tiny = ["data.stream.num_workers=0", "data.stream.batch_size=8", "data.stream.max_seq_len=20"]
    tiny += ["model.user.width=16", "model.user.dropout=0.1", "engine.process_group_timeout_s=60"]
    return load_config(str(SASREC), [f"data.domains={json.dumps(folders)}", *tiny, *more])


def test_the_id_only_model_has_no_content_parameters_and_batches_carry_no_content(folders) -> None:
    cfg = sasrec(folders)
    assert not cfg.model.text.enabled and not cfg.model.image.enabled and cfg.model.user.id_embeddings
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders))
    assert model.text is None and model.image is None
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"user", "ids"}
    assert model.ids.weight.shape == (80, 16)  # 40 items per domain

    batch = next(iter(SequenceStream(folders, cfg.data.stream)))
    assert batch.input_ids.shape[1] == 0 and not batch.has_text.any()
    assert batch.pixel_values.shape[0] == 0 and not batch.has_image.any()
    items = model.encode_items(batch)
    assert items.content_UD is None and items.text_UD is None and items.image_UD is None
    torch.testing.assert_close(items.items_UD, model.ids(items.rows_U))
    out = model(batch)
    assert torch.isfinite(out.loss) and out.logs["softmax"] > 0


def test_sasrec_trains_exports_and_evaluates(folders, tmp_path: Path) -> None:
    out = tmp_path / "sasrec"
    more = ["optim.max_steps=40", "optim.warmup_steps=2", "optim.lr=1e-2", "loss.next_item_ce=0.5"]
    more += ["run.log_every=1", "run.eval_every=0", "run.save_every=0", "run.eval_users=0", f"run.out_dir={out}"]
    train(sasrec(folders, *more))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    total = [r["loss/total"] for r in rows if "loss/total" in r]
    assert len(total) == 40 and all(r["loss/next_item_ce"] > 0 for r in rows if "loss/total" in r)
    first, last = sum(total[:5]) / 5, sum(total[-5:]) / 5
    assert last < 0.8 * first, (first, last)

    model, cfg, _ = load_pretrained(out / "model")
    assert model.text is None and model.image is None and not cfg.data.stream.item_content
    trained = evaluate_domain(model, folders[0], 0, cfg.data.stream, EvalOptions(splits=("test",))).metrics()
    torch.manual_seed(0)
    fresh = Recommender(cfg.model, cfg.loss, model.catalog).eval()
    untrained = evaluate_domain(fresh, folders[0], 0, cfg.data.stream, EvalOptions(splits=("test",))).metrics()
    assert trained["test/users"] == 30
    assert 0 <= trained["test/full/ndcg@10"] <= trained["test/full/hr@10"] <= 1
    assert trained["test/full/hr@10"] > untrained["test/full/hr@10"], (trained, untrained)


@pytest.mark.parametrize(
    ("more", "field", "says"),
    [
        (["model.user.id_embeddings=false"], "model.text.enabled", "model.user.id_embeddings for an ID-only"),
        (["loss.content_id=0.1"], "loss.content_id", "needs a content encoder"),
        (["model.fusion.kind=qformer"], "model.fusion.kind", "nothing to fuse"),
        (["model.text.enabled=true"], "data.stream.item_content", "is false"),
    ],
)
def test_what_an_id_only_model_cannot_do_is_refused(folders, more: list[str], field: str, says: str) -> None:
    with pytest.raises(ValueError, match=field) as err:
        sasrec(folders, *more)
    assert says in str(err.value)
