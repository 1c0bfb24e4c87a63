"""The scaling study's configuration: a ``[scaling]`` table in TOML files, ``scaling.field=value`` overrides.

The same rules as the training config (:func:`pretrain.configlib.load_config` with this schema as its root): later
files win, overrides win over files, unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pretrain.configlib import Section, check, load_config, to_dict

from ..config import FinetuneMode

SETTINGS = (
    "sources",
    "target",
    "mode",
    "control_mode",
    "id_baseline",
    "pretrain_config",
    "pretrain_overrides",
    "finetune_config",
    "finetune_overrides",
    "baseline_config",
    "baseline_overrides",
    "pretrain_seed",
    "pretrain_per_seed",
    "pretrain_epochs",
    "ranks",
)
"""The fields that define what a cell computes; a study folder refuses a re-run that changes them (the grid's
fractions and seeds may grow: the new cells run, the finished ones are kept)."""


@dataclass
class ScalingConfig(Section):
    """A grid of source-data fractions x target-data fractions x seeds (``python -m finetune.scaling``)."""

    PATH: ClassVar[str] = "scaling"

    sources: list[str] = field(default_factory=list)
    """Built source domain folders (python -m shards build), pooled for pretraining."""
    target: str = ""
    """The built target domain folder; every cell is tested on its whole test split."""
    source_fractions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    """Shares of each source domain's users that pretraining sees (nested subsets, shards.subset); 0: no
    pretraining (finetune --from none, the same architecture)."""
    target_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    """Shares of the target domain's users that finetuning trains on (nested for each seed; validation and test
    always use all target users)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One cell per seed: it draws the target subset and seeds finetuning (engine.seed, data.stream.seed)."""
    pretrain_epochs: float = 0.0
    """0: every source fraction pretrains for optim.max_steps of pretrain_config (the same compute for every data
    size); > 0: for this many passes over its users, optim.max_steps = ceil(pretrain_epochs x source users /
    (batch_size x grad_accum x ranks)), so compute grows with the data (TransRec's regime: train to the data)."""
    ranks: int = 1
    """Processes of each run under scaling.launcher (only for the step arithmetic of pretrain_epochs)."""
    pretrain_seed: int = 0
    """Seed of the source subsets and of pretraining (each source fraction is pretrained once, for all seeds)."""
    pretrain_per_seed: bool = False
    """true: every seed pretrains its own source models (source subsets and pretraining seeded with the cell's
    seed instead of pretrain_seed), so the spread over seeds includes pretraining's, at seeds x the pretraining
    cost; false: each source fraction is pretrained once (pretrain_seed) for all seeds."""

    def pretraining_seed(self, seed: int) -> int:
        """The seed of the source model that a cell of seed ``seed`` starts from."""
        return seed if self.pretrain_per_seed else self.pretrain_seed

    mode: FinetuneMode = "lora"
    """Finetuning mode of the pretrained cells (python -m finetune --mode)."""
    control_mode: FinetuneMode | None = None
    """Mode of the no-pretraining cells (source fraction 0, python -m finetune --from none). None: the same as
    ``mode`` (matched arms: the control trains exactly the parts the transfer arm trains, from the same
    initialisation of everything that is not pretrained, so the two differ only in their start); another mode
    (e.g. 'full': the model trained from scratch) is a different comparison, and every table and figure says so."""

    @property
    def control(self) -> FinetuneMode:
        """The control cells' mode."""
        return self.control_mode or self.mode

    id_baseline: bool = True
    """Also train the ID-based baseline (SASRec, baseline_config) on each target fraction and seed."""
    pretrain_config: list[str] = field(default_factory=lambda: ["launch/configs/small_cpu.toml"])
    """Config files of pretraining (the architecture; the --from none cells read them too)."""
    pretrain_overrides: list[str] = field(default_factory=list)
    """section.field=value overrides of pretraining (model.* ones apply to the --from none cells too)."""
    finetune_config: list[str] = field(default_factory=list)
    """Config files of finetuning (optim, run: steps, validation). Every content cell, pretrained or not, reads
    pretrain_config, then these, then the model.* pretrain_overrides, then finetune_overrides: the two arms share
    architecture, optimizer and stream settings and differ only in their start (python -m finetune --from)."""
    finetune_overrides: list[str] = field(default_factory=list)
    """section.field=value overrides of finetuning (every content cell, pretrained or not)."""
    baseline_config: list[str] = field(default_factory=lambda: ["launch/configs/sasrec_id.toml"])
    """Config files of the ID baseline (trained with python -m finetune --from none --mode full)."""
    baseline_overrides: list[str] = field(default_factory=list)
    """section.field=value overrides of the ID baseline."""
    launcher: list[str] = field(default_factory=list)
    """Command prefix that runs a module (the module name and its arguments follow): empty runs this Python
    ('python -m'); e.g. ['deepspeed', '--num_gpus', '8', '--module'] or ['torchrun', '--nproc-per-node', '2',
    '-m']."""
    out_dir: str = "runs/scaling"
    """Study folder: results.csv, scaling.png, scaling.md, tb/, and every subset, run and log."""
    retries: int = 1
    """Further attempts at a run that failed (it resumes from its last checkpoint when it has one); a run that
    exits 2 (a config or input error: trying again cannot help) is not tried again. A re-run of the study tries
    failed cells again."""
    force_unlock: bool = False
    """Take out_dir's lock even though another study holds it. A study holds out_dir/.lock while it runs, so a
    second study into the same folder is refused; the lock of a dead study on this host is taken over by itself,
    but one left by a study on another host cannot be checked from here: set this once you know it is dead."""

    def validate(self) -> None:
        for name, low_ok in (("source_fractions", True), ("target_fractions", False)):
            values = getattr(self, name)
            check(bool(values), f"scaling.{name}", "is empty")
            check(len(set(values)) == len(values), f"scaling.{name}", f"repeats a value: {values}")
            inside = all((0.0 <= v if low_ok else 0.0 < v) and v <= 1.0 for v in values)
            check(inside, f"scaling.{name}", f"must lie in {'[0, 1]' if low_ok else '(0, 1]'}, got {values}")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "scaling.seeds",
               f"must be distinct, at least one: {self.seeds}")  # fmt: skip
        check(self.pretrain_epochs >= 0, "scaling.pretrain_epochs", f"must be >= 0, got {self.pretrain_epochs}")
        check(self.ranks >= 1, "scaling.ranks", f"must be >= 1, got {self.ranks}")
        check(self.retries >= 0, "scaling.retries", f"must be >= 0, got {self.retries}")
        check(all(self.sources), "scaling.sources", f"holds an empty folder name: {self.sources}")

    def check_ready(self) -> None:
        """What a run needs beyond the schema (an empty config may still print its help)."""
        check(bool(self.target), "scaling.target", "is not set: name the built target domain folder")
        needs_sources = any(f > 0 for f in self.source_fractions)
        check(bool(self.sources) or not needs_sources, "scaling.sources",
               "is empty but source_fractions asks for pretraining")  # fmt: skip
        check(bool(self.pretrain_config), "scaling.pretrain_config", "is empty: the architecture comes from it")
        check(bool(self.baseline_config) or not self.id_baseline, "scaling.baseline_config",
               "is empty but id_baseline is true")  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {name: to_dict(getattr(self, name)) for name in SETTINGS}


@dataclass
class StudyConfig(Section):
    """The schema's root: a study file holds one ``[scaling]`` table."""

    PATH: ClassVar[str] = ""

    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """The grid, the data, and how each run is configured and launched."""


def load_study(paths: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> ScalingConfig:
    """The study's config from files and ``scaling.field=value`` overrides (raises ValueError on bad input)."""
    return load_config(StudyConfig, paths, overrides).scaling
