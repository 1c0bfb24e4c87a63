"""Paired comparison of two models on the same test users: the per-user difference and its bootstrap interval.

A gain is a claim about the users, so it is measured user by user: for every user both models were ranked for
(the same held-out targets over the same catalog), the difference of their per-user metric (NDCG@10 = [r < 10] /
log2(r + 2) of the target's 0-based rank r, HR@10, MRR@10); its mean is the gain, and a percentile bootstrap over
users (resampled with replacement, ``resamples`` times, seeded) gives its 95 % interval. With several seeds per
arm, each user's metric is first averaged over the arm's seeds (the seeds' noise then shrinks the per-user
differences instead of widening a seed-level interval); :attr:`Comparison.seed_gains` keeps each seed pair's gain
so that the spread across seeds stays visible. A gain is called a gain only where the interval excludes zero.

Inputs are the ``per_user`` records of ``python -m pretrain.evaluate``'s results (``eval-<domain>.json``) or of
``python -m finetune``'s test evaluation; the command::

    python -m pretrain.paired --a transfer/eval-office.json --b control/eval-office.json [--metric ndcg@10]

prints the gain of A over B with its interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shards.errors import InputError

from .metrics import METRICS, metric_weights

LEVEL = 0.95
RESAMPLES = 10_000


def user_metric(ranks: np.ndarray | Sequence[int], metric: str = "ndcg@10") -> np.ndarray:
    """Per-user value of ``metric`` (``ndcg@k``, ``hr@k`` or ``mrr@k``) from 0-based target ranks."""
    name, _, k_text = metric.partition("@")
    if name not in METRICS or not k_text.isdigit() or int(k_text) < 1:
        raise InputError(f"metric {metric!r}: expected ndcg@K, hr@K or mrr@K with K >= 1")
    k = int(k_text)
    weights = np.append(metric_weights(name, k).numpy(), 0.0)  # the evaluation's weights; rank >= k adds 0
    return weights[np.minimum(np.asarray(ranks, dtype=np.int64), k)]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str | None:
        """'gain' or 'loss' where the interval excludes 0 (the only places a difference is called one), else None."""
        return "gain" if self.low > 0 else "loss" if self.high < 0 else None


def bootstrap_mean(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of ``values`` with its percentile bootstrap interval (users resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("bootstrap_mean needs a non-empty 1-D array")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 2_000_000 // len(values))  # at most ~2M draws in memory at once
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(values.mean()), float(low), float(high))


@dataclass(frozen=True)
class Comparison:
    metric: str
    users: int
    a: float
    """Arm A's mean (over users, and seeds)."""
    b: float
    gain: Interval
    """Mean of A - B per user, with its bootstrap interval."""
    relative: float | None
    """gain / b (None when b is 0)."""
    seed_gains: tuple[float, ...]
    """A's seed i minus B's seed i (as many as the shorter arm has), to show the spread across seeds."""

    def as_dict(self) -> dict:
        return {**asdict(self), "gain": {**asdict(self.gain), "excludes_zero": self.gain.excludes_zero}}

    def line(self) -> str:
        verdict = f"a {self.gain.verdict}" if self.gain.verdict else "no difference shown"
        rel = "" if self.relative is None else f" ({self.relative:+.1%})"
        return (f"{self.metric}: A {self.a:.4f}  B {self.b:.4f}  A-B {self.gain.mean:+.4f}{rel}  "
                f"95% CI [{self.gain.low:+.4f}, {self.gain.high:+.4f}] over {self.users} users: {verdict}")  # fmt: skip


def compare(
    a_seeds: Sequence[Mapping[int, int]],
    b_seeds: Sequence[Mapping[int, int]],
    metric: str = "ndcg@10",
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """A against B, each a list (one per seed) of ``{user index: 0-based target rank}``; every run must rank the
    same users (else the pairing would be meaningless: an :class:`InputError`)."""
    if not a_seeds or not b_seeds:
        raise InputError("each arm needs at least one result")
    users = sorted(a_seeds[0])
    for run in (*a_seeds, *b_seeds):
        if set(run) != set(users):
            raise InputError(f"the results rank different users ({len(run)} vs {len(users)}): not a paired comparison")
    if not users:
        raise InputError("the results rank no user")

    def arm(seeds: Sequence[Mapping[int, int]]) -> np.ndarray:  # (seeds, users)
        return np.stack([user_metric([run[u] for u in users], metric) for run in seeds])

    a, b = arm(a_seeds), arm(b_seeds)
    gain = bootstrap_mean(a.mean(0) - b.mean(0), resamples, seed)
    b_mean = float(b.mean())
    per_seed = tuple(float(x - y) for x, y in zip(a.mean(1), b.mean(1)))
    return Comparison(metric, len(users), float(a.mean()), b_mean, gain,
                      gain.mean / b_mean if b_mean else None, per_seed)  # fmt: skip


def load_ranks(path: str | Path, split: str = "test", ranking: str = "full") -> dict[int, int]:
    """``{user index: rank}`` from an evaluation result's ``per_user`` records (an :class:`InputError` names what
    is missing)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        records = doc["per_user"][split]
        users, ranks = records["user"], records[ranking]
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    except (KeyError, TypeError):
        raise InputError(f"{path}: no per-user '{ranking}' ranks of split {split!r} (written by pretrain.evaluate "
                         "since per-user records exist; evaluate the model again)") from None  # fmt: skip
    if len(users) != len(ranks) or len(set(users)) != len(users):
        raise InputError(f"{path}: per_user.{split}: {len(users)} users, {len(ranks)} ranks, or a user twice")
    return dict(zip(users, ranks))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.paired",
        description="The per-user gain of A over B on the same test users, with a paired bootstrap 95% interval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--a", nargs="+", required=True, metavar="EVAL.json", help="arm A's results, one per seed")
    p.add_argument("--b", nargs="+", required=True, metavar="EVAL.json", help="arm B's results, one per seed")
    p.add_argument("--metric", nargs="+", default=["ndcg@10", "hr@10"], help="ndcg@K, hr@K or mrr@K")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--ranking", default="full", help="'full' (the model) or 'full/pop' (popularity)")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.resamples < 100:
            raise InputError("--resamples must be at least 100")
        a = [load_ranks(f, args.split, args.ranking) for f in args.a]
        b = [load_ranks(f, args.split, args.ranking) for f in args.b]
        results = [compare(a, b, m, args.resamples, args.seed) for m in args.metric]
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        for r in results:
            print(r.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
