"""The study's cells and where everything of a study lives.

Layout of ``scaling.out_dir``::

    study.json                        the settings that define the cells (a re-run must not change them)
    data/source-<f>[-seed<s>]/<domain>/ source subsets (shards.subset; fraction 1 uses the source folders)
    data/target-seed<s>-<g>/<domain>/ target subsets of each seed
    pretrain/source-<f>/              the pretraining run of each source fraction (its model/ is the export);
                                      source-<f>-seed<s>/ for each seed with scaling.pretrain_per_seed
    runs/<cell>/                      each cell's finetuning run (summary.json holds its test metrics)
    logs/<run>.log                    each run's console output
    results.csv, pooled.csv, scaling.md, scaling.png, tb/
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shards.schema import load_manifest
from shards.subset import subset

from .config import ScalingConfig

Kind = Literal["content", "id"]


def fraction_name(f: float) -> str:
    return f"{f:g}"


@dataclass(frozen=True)
class Cell:
    """One finetuning run of the grid: a content model pretrained on ``source_fraction`` of the sources (0: not
    pretrained), or the ID baseline (``source_fraction`` None), trained on ``target_fraction`` of the target."""

    kind: Kind
    source_fraction: float | None
    target_fraction: float
    seed: int

    @property
    def name(self) -> str:
        source = "id" if self.kind == "id" else f"src{fraction_name(self.source_fraction or 0.0)}"
        return f"{source}-tgt{fraction_name(self.target_fraction)}-seed{self.seed}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The cell's identity in results.csv (as the CSV's strings)."""
        source = "" if self.source_fraction is None else fraction_name(self.source_fraction)
        return self.kind, source, fraction_name(self.target_fraction), str(self.seed)


def grid(cfg: ScalingConfig) -> list[Cell]:
    """Every cell, grouped by source fraction (so each pretraining is followed by the cells that use it), then
    the ID baselines."""
    cells = [
        Cell("content", s, t, seed)
        for s, t, seed in itertools.product(sorted(cfg.source_fractions), sorted(cfg.target_fractions), cfg.seeds)
    ]
    if cfg.id_baseline:
        cells += [Cell("id", None, t, seed) for t, seed in itertools.product(sorted(cfg.target_fractions), cfg.seeds)]
    return cells


class Layout:
    """Paths of a study folder; the subsets are written on first use (atomically: one that exists is whole)."""

    def __init__(self, cfg: ScalingConfig) -> None:
        self.cfg, self.root = cfg, Path(cfg.out_dir)
        names = [Path(s).name for s in cfg.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"scaling.sources: two source folders share a name ({names}): rename one")

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    @property
    def pooled(self) -> Path:
        """pooled.csv: the gains pooled over seeds (results.POOLED_COLUMNS)."""
        return self.root / "pooled.csv"

    def _source_group(self, fraction: float, seed: int) -> str:
        """``source-<f>``, or ``source-<f>-seed<s>`` when every seed pretrains its own model."""
        name = f"source-{fraction_name(fraction)}"
        return f"{name}-seed{self.cfg.pretraining_seed(seed)}" if self.cfg.pretrain_per_seed else name

    def pretrain_dir(self, fraction: float, seed: int) -> Path:
        """The pretraining run that cells of ``seed`` on ``fraction`` of the sources start from."""
        return self.root / "pretrain" / self._source_group(fraction, seed)

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / "runs" / cell.name

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def sources(self, fraction: float, seed: int) -> list[str]:
        """The source folders of ``fraction`` (> 0) for cells of ``seed``, subsets written if missing."""
        group, drawn = self._source_group(fraction, seed), self.cfg.pretraining_seed(seed)
        return [self._subset(s, fraction, drawn, group) for s in self.cfg.sources]

    def target(self, fraction: float, seed: int) -> str:
        """The target folder that ``fraction`` of the users of seed ``seed`` train on."""
        return self._subset(self.cfg.target, fraction, seed, f"target-seed{seed}-{fraction_name(fraction)}")

    def _subset(self, folder: str, fraction: float, seed: int, group: str) -> str:
        if fraction == 1.0:
            return folder
        out = self.root / "data" / group / Path(folder).name
        if not out.is_dir():
            subset(folder, out, fraction, seed, progress=False)
        return str(out)


def sizes(folders: list[str]) -> tuple[int, int]:
    """Users and interactions over ``folders`` (their manifests)."""
    manifests = [load_manifest(f) for f in folders]
    return sum(m.n_users for m in manifests), sum(m.n_interactions for m in manifests)
