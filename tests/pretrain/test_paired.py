"""The paired comparison: per-user metrics from ranks, the bootstrap interval on known differences, the pairing
rules and the command on evaluation-result files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.paired import bootstrap_mean, compare, load_ranks, main, user_metric
from shards.errors import InputError


def test_user_metric_from_ranks() -> None:
    ranks = [0, 1, 9, 10, 100]
    assert user_metric(ranks, "hr@10").tolist() == [1, 1, 1, 0, 0]
    assert np.allclose(user_metric(ranks, "ndcg@10"), [1, 1 / np.log2(3), 1 / np.log2(11), 0, 0])
    assert np.allclose(user_metric(ranks, "mrr@10"), [1, 0.5, 0.1, 0, 0])
    with pytest.raises(InputError, match="ndcg@K"):
        user_metric(ranks, "recall@10")


def test_a_known_difference_gives_the_known_interval() -> None:
    rng = np.random.default_rng(1)
    n, sd = 4000, 0.2
    diff = 0.05 + sd * rng.standard_normal(n)
    interval = bootstrap_mean(diff, resamples=4000, seed=0)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(n)  # the normal-theory 95 % half-width the bootstrap must match
    assert interval.mean == pytest.approx(diff.mean())
    assert interval.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert interval.high == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert interval.excludes_zero


def test_identical_arms_give_zero_and_a_shifted_arm_its_shift() -> None:
    rng = np.random.default_rng(2)
    ranks = {u: int(r) for u, r in enumerate(rng.integers(0, 30, 500))}
    same = compare([ranks], [dict(ranks)], resamples=500)
    assert same.gain.mean == same.gain.low == same.gain.high == 0 and not same.gain.excludes_zero
    better = {u: max(0, r - 5) for u, r in ranks.items()}  # every target 5 places higher: never worse
    gain = compare([better], [ranks], "hr@10", resamples=500)
    assert gain.gain.low > 0 and gain.a > gain.b and gain.gain.mean == pytest.approx(gain.a - gain.b)
    noise = {u: int(r) for u, r in enumerate(rng.integers(0, 30, 500))}  # an unrelated arm of the same quality
    null = compare([noise], [ranks], resamples=1000)
    assert null.gain.low < 0 < null.gain.high


def test_seeds_are_averaged_per_user_and_kept_per_pair() -> None:
    a1, a2 = {0: 0, 1: 20}, {0: 20, 1: 0}
    b1, b2 = {0: 20, 1: 20}, {0: 20, 1: 20}
    result = compare([a1, a2], [b1, b2], "hr@10", resamples=200)
    assert result.a == 0.5 and result.b == 0 and result.seed_gains == (0.5, 0.5)
    assert result.gain.low == result.gain.high == 0.5  # each user's seed mean is 0.5: no user-level spread


def test_different_users_are_not_paired() -> None:
    with pytest.raises(InputError, match="different users"):
        compare([{0: 1, 1: 2}], [{0: 1, 2: 2}])


def write_eval(path: Path, ranks: dict[int, int]) -> Path:
    users = sorted(ranks)
    doc = {"per_user": {"test": {"user": users, "full": [ranks[u] for u in users], "full/pop": [5] * len(users)}}}
    path.write_text(json.dumps(doc))
    return path


def test_the_command_reads_evaluation_results(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(3)
    base = {u: int(r) for u, r in enumerate(rng.integers(0, 40, 300))}
    a = write_eval(tmp_path / "a.json", {u: r // 4 for u, r in base.items()})
    b = write_eval(tmp_path / "b.json", base)
    assert load_ranks(a)[1] == base[1] // 4
    assert main(["--a", str(a), "--b", str(b), "--metric", "ndcg@10", "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ndcg@10: A ") and out.strip().endswith("over 300 users: a gain")
    assert main(["--a", str(a), "--b", str(b), "--json", "--resamples", "500"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["metric"] for d in doc] == ["ndcg@10", "hr@10"] and doc[0]["gain"]["excludes_zero"] is True
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    assert main(["--a", str(a), "--b", str(tmp_path / "old.json")]) == 2
    assert "no per-user 'full' ranks" in capsys.readouterr().err
