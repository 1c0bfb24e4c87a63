"""Full-ranking evaluation (pretrain.ranking and .metrics, the command): ranks and metrics against hand-computed cases
(ties, masking, sampled negatives), popularity and modality buckets, chunk- and batch-size invariance, a
brute-force reference for score fusion, new domains, the quick validation as the same computation, and the
command end to end (one process and two gloo ranks) with its errors."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import pretrain.export
from pretrain import catalog, ranking
from pretrain.catalog import encode_catalog
from pretrain.config import TrainConfig, load_config
from pretrain.evaluate import main
from pretrain.metrics import BUCKETS, Tally, item_buckets, rank_targets, sample_negatives, tiebreak_order
from pretrain.model import Catalog, Recommender
from pretrain.paired import user_metric
from pretrain.ranking import EvalOptions, evaluate_domain, model_for_domain
from pretrain.validate import quick_validation
from shards import schema
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig
from tests.testutil import fork_two_ranks

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch/configs/tiny.toml"


def tiny_config(folders: list[str], *more: str) -> TrainConfig:
    return load_config(str(TINY), [f"data.domains={json.dumps(folders)}", "data.stream.num_workers=0", *more])


def tiny_model(cfg: TrainConfig, folders: list[str], seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders), image_size=cfg.data.stream.image_size)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(folders) -> tuple[TrainConfig, Recommender]:
    cfg = tiny_config(folders)
    return cfg, tiny_model(cfg, folders)


# ---- ranking and metrics by hand ---------------------------------------------------------------------------

SCORES = torch.tensor(
    [
        [0.5, 0.9, 0.5, 0.1, 0.5, 0.7],
        [0.2, 0.2, 0.2, 0.2, 0.9, 0.2],
        [math.nan, 0.3, 0.1, 0.2, 0.0, 0.4],
    ]
)
TIEBREAK = torch.tensor([3, 0, 1, 2, 5, 4])  # item c's place in the tie order
TARGET = torch.tensor([0, 3, 0])
SEEN = torch.tensor([[1, -1], [0, 3], [5, -1]])  # user 1 met its target before: it stays unmasked


def dense(rows: torch.Tensor | slice) -> torch.Tensor:
    return SCORES[:, rows]


@pytest.mark.parametrize("chunk", [1, 2, 4, 6, 100])
def test_ranks_count_higher_scores_then_ties_in_the_fixed_order_without_the_users_items(chunk: int) -> None:
    # user 0: item 5 (0.7) is higher, item 1 (0.9) is masked; of the ties at 0.5, item 2 comes before the target
    #   in the tie order (1 < 3), item 4 after (5 > 3): rank 2
    # user 1: item 4 is higher, item 0 is masked; ties at 0.2 before the target (place 2): items 1 and 2: rank 3
    # user 2: a NaN target scores as -inf: below the 4 unmasked items
    negatives = torch.tensor([[3, 4], [2, 5], [1, -1]])
    full, sampled = rank_targets(dense, 6, TARGET, SEEN, TIEBREAK, chunk, negatives)
    assert full.tolist() == [2, 3, 4]
    # among the negatives only: item 3 is lower and item 4 ties after the target; item 2 ties before; item 1 higher
    assert sampled.tolist() == [0, 1, 1]
    assert rank_targets(dense, 6, TARGET, SEEN, TIEBREAK, chunk)[1] is None


def test_all_equal_scores_rank_like_the_tie_order_not_first() -> None:
    def flat(rows: torch.Tensor | slice) -> torch.Tensor:
        return torch.zeros(2, 6)[:, rows]

    full, _ = rank_targets(flat, 6, torch.tensor([1, 4]), torch.full((2, 1), -1), TIEBREAK, 4)
    assert full.tolist() == [0, 5]  # places 0 and 5 of the tie order: a collapsed model is a random ranker


def test_metrics_from_ranks_by_hand() -> None:
    tally = Tally(["full", "full/pop"])
    ranks = torch.tensor([0, 2, 9, 10, 60])
    member = torch.zeros(5, len(BUCKETS), dtype=torch.bool)
    member[:, BUCKETS.index("all")] = True
    member[:2, BUCKETS.index("head")] = True
    tally.count(member)
    tally.add("full", ranks[:3], member[:3])  # in two batches: sums are per user
    tally.add("full", ranks[3:], member[3:])
    tally.add("full/pop", torch.full((5,), 100), member)
    m = tally.metrics("test")
    assert m["test/users"] == 5 and m["test/users/head"] == 2 and m["test/users/tail"] == 0
    assert m["test/full/hr@1"] == pytest.approx(1 / 5)
    assert m["test/full/hr@10"] == pytest.approx(3 / 5)
    assert m["test/full/hr@50"] == pytest.approx(4 / 5)
    assert m["test/full/ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 5)
    assert m["test/full/ndcg@20"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11) + 1 / math.log2(12)) / 5)
    assert m["test/full/mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 5)
    assert m["test/full/mrr@5"] == pytest.approx((1 + 1 / 3) / 5)
    assert m["test/full/ndcg@5/head"] == pytest.approx((1 + 0.5) / 2)
    assert m["test/full/pop/hr@50"] == 0.0
    assert "test/full/hr@10/tail" not in m  # no user: only the count
    both = tally + tally
    assert both.metrics("test")["test/full/ndcg@10"] == pytest.approx(m["test/full/ndcg@10"])


def test_popularity_buckets_head_tail_cold() -> None:
    popularity = [0, 1, 5, 9, 9, 2, 0, 3, 1, 4]
    modality = torch.tensor([0, 1, 2, 3, 0, 0, 1, 1, 0, 0])
    member, info = item_buckets(popularity, modality)
    column = {b: member[:, q].nonzero().squeeze(1).tolist() for q, b in enumerate(BUCKETS)}
    assert column["all"] == list(range(10))
    assert column["head"] == [3, 4]  # the top 20% (2 of 10 items)
    assert column["tail"] == [1, 2, 5, 7, 8, 9] and column["cold"] == [0, 6]
    assert column["text_image"] == [0, 4, 5, 8, 9] and column["text_only"] == [1, 6, 7]
    assert column["image_only"] == [2] and column["no_content"] == [3]
    assert info["head"]["min_popularity"] == 9 and info["tail"]["items"] == 6 and "definition" in info["cold"]

    member, info = item_buckets([5, 5, 5, 1, 0], torch.zeros(5, dtype=torch.long))
    assert member[:, BUCKETS.index("head")].tolist() == [True, True, True, False, False]  # ties at the mark: head
    member, _ = item_buckets([0, 0, 0], torch.zeros(3, dtype=torch.long))
    assert not member[:, BUCKETS.index("head")].any() and member[:, BUCKETS.index("cold")].all()


def test_sampled_negatives_are_distinct_unseen_and_fixed_per_user() -> None:
    drawn = sample_negatives(1000, 50, [1, 2, 3], [0, 7, 1, 42])
    assert len(set(drawn.tolist())) == 50 and not {1, 2, 3} & set(drawn.tolist())
    assert (drawn == sample_negatives(1000, 50, [3, 2, 1], [0, 7, 1, 42])).all()
    assert not (drawn == sample_negatives(1000, 50, [1, 2, 3], [0, 7, 1, 43])).all()
    assert sorted(sample_negatives(6, 100, [0, 5], [0])) == [1, 2, 3, 4]  # fewer when the catalog is small


# ---- on a model ------------------------------------------------------------------------------------------


def test_chunk_and_batch_sizes_do_not_change_the_metrics(folders, tiny) -> None:
    cfg, model = tiny
    base = evaluate_domain(model, folders[1], 1, cfg.data.stream, EvalOptions(sampled=10)).metrics()
    assert base["valid/users"] == base["test/users"] == 30
    for k in (1, 5, 10, 20, 50):
        assert 0 <= base[f"test/full/mrr@{k}"] <= base[f"test/full/ndcg@{k}"] <= base[f"test/full/hr@{k}"] <= 1
        assert base[f"test/full/hr@{k}"] <= base[f"test/sampled10/hr@{k}"]  # 10 negatives rank above fewer
    assert base["test/full/hr@50"] == 1.0  # 40 items
    buckets = sum(base[f"test/users/{b}"] for b in ("head", "tail", "cold"))
    assert buckets == sum(base[f"test/users/{b}"] for b in ("text_image", "text_only", "image_only", "no_content"))
    assert buckets == 30
    for batch_size, chunk, encode_chunk in [(1, 1, 7), (7, 3, 256), (30, 40, 40)]:
        opts = EvalOptions(sampled=10, batch_size=batch_size, chunk=chunk)
        assert evaluate_domain(model, folders[1], 1, cfg.data.stream, opts).metrics() == base, (batch_size, chunk)
    fewer = evaluate_domain(model, folders[1], 1, cfg.data.stream, EvalOptions(splits=("test",), users=7))
    assert fewer.metrics()["test/users"] == 7 and "valid/users" not in fewer.metrics()


def test_score_fusion_matches_a_brute_force_reference(folders) -> None:
    """Rank each user as directly as possible: the stream's batch, encode_items on it, model.score against the
    whole catalog at once, the history from the batch; the evaluation must give the same ranks."""
    cfg = tiny_config(folders, "model.fusion.kind=score", "model.user.max_seq_len=50", "data.stream.max_seq_len=50")
    model = tiny_model(cfg, folders, seed=1)
    folder, domain = folders[0], 0
    result = evaluate_domain(model, folder, domain, cfg.data.stream, EvalOptions(splits=("test",), chunk=9))

    catalog = encode_catalog(model, folder, domain, cfg.data.stream)
    manifest = schema.load_manifest(folder)
    tiebreak = tiebreak_order(manifest.n_items, manifest.domain)
    stream_cfg = StreamConfig(**{**vars(cfg.data.stream), "split": "test", "batch_size": 1, "num_workers": 0})
    reference = Tally(["full", "full/pop"])
    member, _ = item_buckets(manifest.popularity, torch.zeros(manifest.n_items, dtype=torch.long))
    with torch.no_grad():
        for batch in SequenceStream([folder], stream_cfg, rank=0, world_size=1):
            scores = model.score(model.user_vectors(batch), catalog)[0]
            target = int(batch.item_index[batch.target[0]])
            mask = torch.zeros(manifest.n_items, dtype=torch.bool)
            mask[batch.item_index[batch.seq[0][batch.seq_mask[0]]]] = True  # whole histories: max_seq_len 50
            mask[target] = True
            above = (scores > scores[target]) | ((scores == scores[target]) & (tiebreak < tiebreak[target]))
            rank = int((above & ~mask).sum())
            reference.count(member[[target]])
            reference.add("full", torch.tensor([rank]), member[[target]])
    assert int(reference.users[0]) == 30
    # users per rank (all ranks < 40), overall and by popularity (the reference has no modality buckets)
    assert torch.equal(result.tallies["test"].ranks[0, :4], reference.ranks[0, :4])


def test_a_new_domain_is_ranked_by_content_and_id_models_are_refused(folders) -> None:
    cfg = tiny_config(folders)
    both = tiny_model(cfg, folders)
    expected = evaluate_domain(both, folders[1], 1, cfg.data.stream, EvalOptions(splits=("test",))).metrics()

    books_only = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders[:1]), image_size=32).eval()
    state = both.state_dict()
    state["prototype_of"] = state["prototype_of"][:40]
    books_only.load_state_dict(state)
    manifest = schema.load_manifest(folders[1])
    grown, domain = model_for_domain(books_only, cfg, manifest)
    assert domain == 1 and grown.catalog.domains == ("books", "movies") and books_only.catalog.domains == ("books",)
    got = evaluate_domain(grown, folders[1], domain, cfg.data.stream, EvalOptions(splits=("test",))).metrics()
    assert got == expected  # the same weights rank the same, whatever index the domain has
    assert model_for_domain(both, cfg, manifest) == (both, 1)

    ids_cfg = tiny_config(folders[:1], "model.user.id_embeddings=true")
    with pytest.raises(ValueError, match="finetune on that domain first"):
        model_for_domain(tiny_model(ids_cfg, folders[:1]), ids_cfg, manifest)


def test_quick_validation_is_the_evaluation_of_the_valid_split(folders, tiny) -> None:
    cfg, model = tiny
    cfg = tiny_config(folders, "run.eval_users=0", "data.stream.batch_size=4")
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    quick = quick_validation(engine, cfg, folders, dist=None)
    assert quick["valid/users"] == 60 and quick["valid/books/users"] == 30
    total = 0.0
    for d, folder in enumerate(folders):
        full = evaluate_domain(model, folder, d, cfg.data.stream, EvalOptions(splits=("valid",))).metrics()
        name = Path(folder).name
        assert quick[f"valid/{name}/hr@10"] == full["valid/full/hr@10"]
        assert quick[f"valid/{name}/ndcg@10"] == full["valid/full/ndcg@10"]
        assert quick[f"valid/{name}/pop_ndcg@10"] == full["valid/full/pop/ndcg@10"]
        total += full["valid/full/ndcg@10"] * 30
    assert quick["valid/ndcg@10"] == pytest.approx(total / 60)
    assert not model.training


# ---- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(folders, tiny, tmp_path_factory) -> Path:
    """An export written by the engine's own export code (a model that has not trained: metrics need no skill)."""
    cfg, model = tiny
    folder = tmp_path_factory.mktemp("export") / "model"
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    return pretrain.export.export(engine, cfg, model.catalog, folder)


def test_the_command_writes_json_tensorboard_and_a_table(export, folders, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    argv = ["--model", str(export), "--data", *folders, "--sampled", "5", "--tb", str(tb), "--batch-size", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "books" in out and "movies" in out and "ndcg@10 by target" in out and "full/pop" in out
    doc = json.loads((export / "eval-books.json").read_text())
    assert doc["domain"] == "books" and doc["in_catalog"] and doc["items"] == 40
    assert doc["buckets"]["head"]["items"] >= 8 and doc["options"]["sampled"] == 5
    metrics = doc["metrics"]
    for name in ("test/full/ndcg@10", "valid/full/hr@20", "test/full/mrr@10", "test/full/pop/ndcg@10",
                 "test/sampled5/ndcg@10", "test/sampled5/pop/hr@1", "test/full/ndcg@10/tail", "test/users/text_only",
                 "valid/users"):  # fmt: skip
        assert name in metrics, name
    assert metrics["test/users"] == metrics["valid/users"] == 30
    for split in ("valid", "test"):  # the per-user records give back the aggregate metrics
        records = doc["per_user"][split]
        assert records["user"] == sorted(set(records["user"])) and len(records["user"]) == 30
        for ranked in ("full", "full/pop"):
            ndcg = user_metric(records[ranked], "ndcg@10").mean()
            assert ndcg == pytest.approx(metrics[f"{split}/{ranked}/ndcg@10"], abs=1e-12)
    assert (export / "eval-movies.json").is_file()
    acc = EventAccumulator(str(tb / "movies"))
    acc.Reload()
    assert {"test/full/ndcg@10", "test/full/pop/ndcg@10", "valid/users"} <= set(acc.Tags()["scalars"])

    # smaller blocks and batches: the same numbers
    again = tmp_path / "again-{domain}.json"
    assert main(["--model", str(export), "--data", *folders, "--sampled", "5", "--chunk", "3", "--batch-size",
                 "5", "--out", str(again)]) == 0  # fmt: skip
    assert json.loads((tmp_path / "again-books.json").read_text())["metrics"] == metrics


def _rank_main(rank: int, port: int, argv: list[str], log: Path) -> None:
    """A forked rank of the command (the parent's imports are inherited: no second start-up); ``log`` gets the
    world size it saw and the users and catalog chunks it took."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    taken: dict[str, int] = {"users": 0, "chunks": 0}
    users, tables = ranking.held_out_users, catalog.catalog_chunks

    def counted(what: str, source: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            taken["world"] = torch.distributed.get_world_size()
            for x in source(*args, **kwargs):
                taken[what] += 1
                yield x

        return wrapper

    ranking.held_out_users, catalog.catalog_chunks = counted("users", users), counted("chunks", tables)
    code = main(argv)
    log.write_text(json.dumps(taken))
    os._exit(code)


@pytest.mark.dist
def test_two_ranks_give_the_single_process_numbers(export, folders, tmp_path: Path) -> None:
    """The command on 2 gloo ranks: one encodes the whole catalog (a chunk of 64 > 40 items), the other nothing,
    and they split 11 users unevenly; the sums must equal one process's."""
    args = ["--model", str(export), "--data", folders[1], "--users", "11", "--sampled", "3", "--encode-chunk", "64"]
    args += ["--batch-size", "4", "--timeout-s", "60"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    argv = [*args, "--out", str(tmp_path / "two.json")]
    assert fork_two_ranks(_rank_main, lambda r: (argv, tmp_path / f"rank{r}.json")) == [0, 0]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("one", "two"))
    assert two == one and one["test/users"] == 11 and "test/sampled3/hr@1" in one
    per_user = [json.loads((tmp_path / f"{n}.json").read_text())["per_user"] for n in ("one", "two")]
    assert per_user[1] == per_user[0] and len(per_user[0]["test"]["user"]) == 11  # gathered from both ranks
    taken = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert taken == [{"world": 2, "users": 12, "chunks": 1}, {"world": 2, "users": 10, "chunks": 0}]  # 2 splits


def test_bad_input_is_an_error_not_a_traceback(export, folders, tmp_path: Path, capsys) -> None:
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "no such model folder" in error("--model", str(tmp_path / "nowhere"), "--data", folders[0])
    assert "not a momrec export" in error("--model", folders[0], "--data", folders[0])
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"format": "something else"}')
    (fake / "model.safetensors").write_bytes(b"")
    assert "not a momrec export" in error("--model", str(fake), "--data", folders[0])
    assert "no manifest" in error("--model", str(export), "--data", str(tmp_path / "missing-shards"))
    assert "{domain}" in error("--model", str(export), "--data", *folders, "--out", str(tmp_path / "x.json"))
    with pytest.raises(SystemExit):
        main(["--model", str(export), "--data", folders[0], "--chunk", "0"])


def _blank_second_header(shard: Path) -> None:
    """Zero the tar header of the shard's second member: tar reads a zero block as the end of the archive, so the
    rest of the shard is lost without an error (one flipped bit in a header does the same)."""
    data = bytearray(shard.read_bytes())
    size = int(data[124:136].rstrip(b"\0 ") or b"0", 8)
    second = 512 + (size + 511) // 512 * 512
    data[second : second + 512] = bytes(512)
    shard.write_bytes(bytes(data))


def test_fewer_users_than_the_manifest_promises_is_an_error_or_a_loud_partial_result(
    export, folders, tmp_path: Path, capsys, caplog
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(folders[0], damaged)
    manifest = schema.load_manifest(damaged)
    _blank_second_header(damaged / manifest.seq_shards[0].name)
    assert main(["--model", str(export), "--data", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"of the {manifest.n_users} users the manifest promises" in err and "samples missing" in err, err
    assert "--allow-partial" in err and "Traceback" not in err
    out = tmp_path / "partial.json"
    assert main(["--model", str(export), "--data", str(damaged), "--allow-partial", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["partial"] and doc["users_expected"] == manifest.n_users
    assert 0 < doc["metrics"]["test/users"] < manifest.n_users
    assert "PARTIAL RESULT" in caplog.text
