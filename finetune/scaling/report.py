"""The study's curves, from results.csv alone (rewritten whole each time, so they always match the file).

- ``tb/cells/<cell>/``: one TensorBoard run per cell with its hyperparameters and test metrics (hparams plugin).
- ``tb/curves/``: ``<metric>/target_<g>`` = the mean over seeds against the source interactions as the step, one
  line per target fraction, ``<metric>/id_target_<g>`` the ID baseline's level, a custom-scalars layout that
  draws them together, and the figure.
- ``scaling.png``: the same curves with a log x axis (TensorBoard cannot draw one), mean and min-max over seeds,
  and a panel of each pretrained cell's paired gain over its control with its 95 % interval.
- ``tb/cells/<cell>/``'s hparams metrics include the gain and its interval (``test/gain_ndcg@10[_low|_high]``).
- ``scaling.md``: the numbers as Markdown tables.
"""

from __future__ import annotations

import shutil
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.paired import Interval

from .grid import fraction_name
from .results import BUCKET_METRICS, BUCKETS, GAIN_METRICS, number

CURVE_METRICS = ("ndcg@10", "hr@10")
GAIN_COLUMNS = tuple(f"gain_{m}{end}" for m in GAIN_METRICS for end in ("", "_low", "_high"))


@dataclass(frozen=True)
class Point:
    """One metric of one (source fraction, target fraction) over its seeds."""

    source_fraction: float
    source_interactions: int
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.values), max(self.values)

    def text(self) -> str:
        if len(self.values) == 1:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {statistics.stdev(self.values):.4f}"


def curves(rows: list[dict[str, str]], metric: str) -> dict[float, list[Point]]:
    """Content cells: target fraction -> points sorted by source fraction."""
    groups: dict[tuple[float, float], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if row["kind"] == "content" and number(row[metric]) is not None:
            groups[float(row["target_fraction"]), float(row["source_fraction"])].append(row)
    out: dict[float, list[Point]] = defaultdict(list)
    for (target, source), group in sorted(groups.items()):
        values = tuple(float(r[metric]) for r in group)
        out[target].append(Point(source, int(group[0]["source_interactions"]), values))
    return dict(out)


def baseline(rows: list[dict[str, str]], metric: str, kind: str = "id") -> dict[float, Point]:
    """Target fraction -> the ID baseline's point (``kind='pop'``: the popularity ranker's, from every row)."""
    groups: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        column = metric if kind == "id" else f"pop_{metric}"
        if (kind == "pop" or row["kind"] == "id") and number(row[column]) is not None:
            groups[float(row["target_fraction"])].append(float(row[column]))
    if kind == "pop":  # every cell of a target fraction ranks by the same popularity: one value, not n copies
        groups = {t: sorted(set(v)) for t, v in groups.items()}
    return {t: Point(0.0, 0, tuple(v)) for t, v in sorted(groups.items())}


# ---- TensorBoard --------------------------------------------------------------------------------------


def _hparams(row: dict[str, str]) -> tuple[dict[str, Any], dict[str, float]]:
    hp: dict[str, Any] = {"kind": row["kind"], "mode": row["mode"], "seed": int(row["seed"]),
                          "target_fraction": float(row["target_fraction"]),
                          "target_users": int(row["target_users"]),
                          "source_fraction": float(row["source_fraction"] or 0.0),
                          "source_interactions": int(row["source_interactions"]),
                          "trainable_params": int(row["trainable_params"])}  # fmt: skip
    metrics = {f"test/{m}": float(row[m]) for m in ("ndcg@10", "hr@10", "mrr@10") if number(row[m]) is not None}
    for name in GAIN_COLUMNS:  # a pretrained cell's paired gain over its control, and its 95 % interval
        if number(row.get(name, "")) is not None:
            metrics[f"test/{name}"] = float(row[name])
    metrics["wall_s"] = float(row["wall_s"])
    return hp, metrics


def write_tensorboard(
    rows: list[dict[str, str]], folder: Path, figure: Any | None = None, pooled: Sequence[Mapping[str, Any]] = ()
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        with SummaryWriter(str(folder / "cells" / row["cell"])) as writer:
            writer.add_hparams(*_hparams(row), run_name=".")
    with SummaryWriter(str(folder / "curves")) as writer:
        layout = {}
        for metric in CURVE_METRICS:
            ids = baseline(rows, metric)
            for target, points in curves(rows, metric).items():
                name = fraction_name(target)
                for p in points:
                    writer.add_scalar(f"{metric}/target_{name}", p.mean, p.source_interactions)
                    if target in ids:
                        writer.add_scalar(f"{metric}/id_target_{name}", ids[target].mean, p.source_interactions)
            title = f"test {metric.upper()} vs source interactions (one line per target fraction; id_: SASRec)"
            layout[title] = ["Multiline", [rf"^{metric}/"]]
            for row in pooled:  # the gain pooled over seeds, and its interval, against the source interactions
                name, step = f"gain_{metric}/pooled_target_{row['target_fraction']}", int(row["source_interactions"])
                for end in ("", "_low", "_high"):
                    writer.add_scalar(name + end, float(row[f"gain_{metric}{end}"]), step)
            if pooled:
                layout[f"gain over no pretraining, test {metric.upper()}, pooled over seeds"] = [
                    "Multiline", [rf"^gain_{metric}/"]]  # fmt: skip
        writer.add_custom_scalars({"scaling": layout})
        if figure is not None:
            writer.add_figure("scaling", figure, close=False)


# ---- figure and table -----------------------------------------------------------------------------------


def figure(rows: list[dict[str, str]], pooled: Sequence[Mapping[str, Any]] = ()) -> Any:
    """Matplotlib figure: one panel per metric, x = source interactions (log; 0 drawn left of the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = [r for r in rows if number(r.get("gain_ndcg@10", "")) is not None]
    panels = len(CURVE_METRICS) + bool(gains)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    sources = {int(r["source_interactions"]) for r in rows if r["kind"] == "content"}
    positive = [x for x in sources if x > 0]
    zero_x = min(positive) / 4 if positive else 1.0
    for ax, metric in zip(axes[0], CURVE_METRICS):
        ids, lines = baseline(rows, metric), curves(rows, metric)
        for i, (target, points) in enumerate(lines.items()):
            color = f"C{i}"
            xs = [p.source_interactions or zero_x for p in points]
            label = f"target {fraction_name(target)}"
            ax.plot(xs, [p.mean for p in points], "o-", color=color, label=label)
            ax.fill_between(xs, [p.spread[0] for p in points], [p.spread[1] for p in points], color=color, alpha=0.2)
            if target in ids:
                ax.axhline(ids[target].mean, color=color, linestyle="--", linewidth=1, label=f"{label}: ID (SASRec)")
        pop = [v for p in baseline(rows, metric, "pop").values() for v in p.values]
        if pop:
            ax.axhline(statistics.fmean(pop), color="gray", linestyle=":", linewidth=1, label="popularity")
        ax.set_xscale("log")
        ticks = sorted({p.source_interactions or zero_x for ps in lines.values() for p in ps})
        ax.set_xticks(ticks, [("0" if x == zero_x else f"{int(x):,}") for x in ticks], rotation=30)
        ax.minorticks_off()
        ax.set_xlabel("source interactions seen by pretraining (log; 0 = no pretraining)")
        ax.set_ylabel(f"test {metric.upper()} (full ranking)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if gains:
        _gain_panel(axes[0][-1], gains, pooled)
    fig.suptitle("momrec scaling study: mean over seeds, band = min..max\n" + arms(rows), fontsize=9)
    fig.tight_layout()
    return fig


def arms(rows: list[dict[str, str]]) -> str:
    """Which modes the transfer cells and their no-pretraining controls finetuned in, and whether they match."""
    pretrained = sorted({r["mode"] for r in rows if r["kind"] == "content" and number(r["source_fraction"])})
    control = sorted({r["mode"] for r in rows if r["kind"] == "content" and not number(r["source_fraction"])})
    if not pretrained or not control:
        return f"Finetuning mode: {', '.join(pretrained or control) or 'none'}."
    if pretrained == control:
        return (f"Pretrained cells and their no-pretraining controls finetune in the same mode ({', '.join(control)}):"
                " matched arms, which differ only in their start.")  # fmt: skip
    return (
        f"NOT matched arms: pretrained cells finetune in mode {', '.join(pretrained)}, the no-pretraining "
        f"controls in mode {', '.join(control)}, so their difference mixes pretraining with what trains."
    )


def gain_text(row: dict[str, str], metric: str) -> str:
    """``+0.0123 [-0.0020, +0.0251] gain`` (the verdict only where the interval excludes 0), or '' without one."""
    mean, low, high = (number(row.get(f"gain_{metric}{end}", "")) for end in ("", "_low", "_high"))
    if mean is None or low is None or high is None:
        return ""
    verdict = Interval(mean, low, high).verdict
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]" + (f" {verdict}" if verdict else "")


def gain_table(rows: list[dict[str, str]], metric: str, pooled: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Per target fraction and source fraction: each seed's paired gain over its control, with its interval, and
    the gain pooled over seeds where there are several (``pooled``: rows of results.POOLED_COLUMNS)."""
    cells: dict[tuple[float, float], list[str]] = defaultdict(list)
    for row in rows:
        text = gain_text(row, metric) if row["kind"] == "content" else ""
        if text:
            cells[float(row["target_fraction"]), float(row["source_fraction"])].append(f"s{row['seed']}: {text}")
    for row in pooled:
        text = gain_text({k: str(v) for k, v in row.items()}, metric)
        seeds = "+".join(f"s{s}" for s in str(row["seeds"]).split())
        cells[float(row["target_fraction"]), float(row["source_fraction"])].append(f"**pooled {seeds}: {text}**")
    if not cells:
        return []
    sources = sorted({s for _, s in cells})
    header = ["target", *(f"source {fraction_name(f)}" for f in sources)]
    lines = [f"## gain over no pretraining, test {metric.upper()}", "",
             "Per seed: mean per-user difference (pretrained - control) on the same test users and catalog, with a "
             "paired bootstrap 95 % interval; 'gain' / 'loss' only where the interval excludes 0. Pooled: each "
             "user's difference averaged over the seeds, then bootstrapped over users.", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]  # fmt: skip
    for target in sorted({t for t, _ in cells}):
        texts = ["<br>".join(cells.get((target, f), [])) for f in sources]
        lines.append(f"| {fraction_name(target)} | " + " | ".join(texts) + " |")
    return [*lines, ""]


def zero_shot_table(rows: list[dict[str, str]]) -> list[str]:
    """Each source fraction's start model on the target test split, before finetuning (0: the untrained one)."""
    groups: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["kind"] == "content":
            for metric in CURVE_METRICS:
                value = number(row.get(f"start_{metric}", ""))
                if value is not None:
                    groups[float(row["source_fraction"])][metric].append(value)
    if not groups:
        return []
    lines = ["## zero-shot: the start of finetuning on the target test split", "",
             "Source 0 is the untrained model (the controls' start); the others are the pretrained models, before "
             "any target data. Mean over the cells that start from it (their fresh heads differ by seed).", "",
             "| source | " + " | ".join(f"test {m.upper()}" for m in CURVE_METRICS) + " |",
             "|---" * (len(CURVE_METRICS) + 1) + "|"]  # fmt: skip
    for source, values in sorted(groups.items()):
        cells = [f"{statistics.fmean(values[m]):.4f}" if values[m] else "" for m in CURVE_METRICS]
        lines.append(f"| {fraction_name(source)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _gain_panel(ax: Any, rows: list[dict[str, str]], pooled: Sequence[Mapping[str, Any]] = ()) -> None:
    """Each pretrained cell's paired NDCG@10 gain over its control with its 95 % interval (error bar), one column
    per source size; one colour per target fraction, seeds side by side, the gain pooled over seeds (black
    diamond) to the right of them."""
    sources = sorted({int(r["source_interactions"]) for r in rows})
    targets = sorted({float(r["target_fraction"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    per_target = len(seeds) + bool(pooled)  # a slot per seed, and one for the pooled gain
    slots = len(targets) * per_target

    def offset(slot: int) -> float:
        return 0.6 * ((slot + 0.5) / slots - 0.5)

    for i, target in enumerate(targets):
        mine = [r for r in rows if float(r["target_fraction"]) == target]
        slot = [i * per_target + seeds.index(int(r["seed"])) for r in mine]
        xs = [sources.index(int(r["source_interactions"])) + offset(k) for r, k in zip(mine, slot)]
        ys = [float(r["gain_ndcg@10"]) for r in mine]
        low = [y - float(r["gain_ndcg@10_low"]) for y, r in zip(ys, mine)]
        high = [float(r["gain_ndcg@10_high"]) - y for y, r in zip(ys, mine)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o", color=f"C{i}", capsize=3,
                    label=f"target {fraction_name(target)}")  # fmt: skip
        for row in (p for p in pooled if float(p["target_fraction"]) == target):
            interactions = int(row["source_interactions"])
            if interactions not in sources:
                continue
            x = sources.index(interactions) + offset(i * per_target + len(seeds))
            y = float(row["gain_ndcg@10"])
            ax.errorbar([x], [y], yerr=[[y - float(row["gain_ndcg@10_low"])], [float(row["gain_ndcg@10_high"]) - y]],
                        fmt="D", color="black", markerfacecolor=f"C{i}", capsize=3)  # fmt: skip
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_xticks(range(len(sources)), [f"{x:,}" for x in sources], rotation=30)
    ax.set_xlim(-0.6, len(sources) - 0.4)
    ax.set_xlabel("source interactions (a point per seed; diamond: pooled)")
    ax.set_ylabel("gain over no pretraining, test NDCG@10")
    ax.set_title("paired per-user gain over the control, 95 % bootstrap interval", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def markdown(rows: list[dict[str, str]], pooled: Sequence[Mapping[str, Any]] = ()) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# Scaling study ({len(rows)} cells, seeds {', '.join(seeds)})", "",
             "Full-ranking test metrics on the whole target test split; mean ± standard deviation over seeds. "
             + arms(rows), ""]  # fmt: skip
    lines += zero_shot_table(rows)
    for metric in CURVE_METRICS:
        lines += gain_table(rows, metric, pooled)
    users = {float(r["target_fraction"]): r["target_users"] for r in rows}
    for metric in CURVE_METRICS:
        lines += metric_table(rows, metric, f"## test {metric.upper()}", users)
    for bucket in BUCKETS:
        column = f"{BUCKET_METRICS[0]}_{bucket}"
        title = (f"## test {BUCKET_METRICS[0].upper()}, {bucket} targets only ({BUCKET_TEXT[bucket]}; the number of "
                 "such test users in brackets, mean over seeds)")  # fmt: skip
        lines += metric_table(rows, column, title, _bucket_users(rows, bucket), popularity=False)
    return "\n".join(lines)


BUCKET_TEXT = {"cold": "items without a training interaction in the whole target domain", "tail": "items outside "
               "the target domain's most popular 20 % with at least one training interaction"}  # fmt: skip
"""The buckets follow the training popularity of the whole target domain (every cell is tested on it, whatever
share of its users trained), so they hold the same test users in every cell."""


def _bucket_users(rows: list[dict[str, str]], bucket: str) -> dict[float, str]:
    """Target fraction -> the mean number of test users whose target is in ``bucket``."""
    counts: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        if number(row.get(f"users_{bucket}", "")) is not None:
            counts[float(row["target_fraction"])].append(float(row[f"users_{bucket}"]))
    return {t: f"{statistics.fmean(c):,.0f}" for t, c in counts.items()}


def metric_table(
    rows: list[dict[str, str]], metric: str, title: str, users: Mapping[float, str], popularity: bool = True
) -> list[str]:
    """One row per target fraction (``users`` in brackets), one column per source fraction, then the ID baseline
    (and the popularity ranker): mean ± standard deviation over seeds of the results.csv column ``metric``."""
    table = curves(rows, metric)
    if not table:
        return []
    ids, pop = baseline(rows, metric), baseline(rows, metric, "pop") if popularity else {}
    sources = sorted({(p.source_fraction, p.source_interactions) for ps in table.values() for p in ps})
    head = [f"source {fraction_name(f)} ({n:,} int.)" for f, n in sources]
    header = ["target (users)", *head, "ID (SASRec)", *(["popularity"] if popularity else [])]
    lines = [title, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for target, points in table.items():
        by_source = {p.source_fraction: p.text() for p in points}
        cells = [*(by_source.get(f, "") for f, _ in sources), ids[target].text() if target in ids else ""]
        if popularity:
            cells.append(pop[target].text() if target in pop else "")
        lines.append(f"| {fraction_name(target)} ({users.get(target, '')}) | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_reports(rows: list[dict[str, str]], root: Path, pooled: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    """scaling.png, scaling.md and tb/ in ``root`` (``pooled``: the gains pooled over seeds); returns the paths
    written."""
    fig = figure(rows, pooled)
    png = root / "scaling.png"
    fig.savefig(png, dpi=120)
    md = root / "scaling.md"
    md.write_text(markdown(rows, pooled), encoding="utf-8")
    write_tensorboard(rows, root / "tb", fig, pooled)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [png, md, root / "tb"]
