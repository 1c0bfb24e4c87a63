"""Running the grid: each source fraction pretrained once, each cell finetuned and tested, each in its own process.

Every run is a separate ``python -m pretrain`` / ``python -m finetune`` process (or one under
``scaling.launcher``: the deepspeed launcher, torchrun): a run that crashes, or leaves DeepSpeed's process group
in a bad state, takes no other cell with it. A cell is finished when its row is in results.csv; a pretraining
when its ``DONE.json`` is written. A run that fails is tried again (``scaling.retries``), from its last checkpoint
when it has one; a run that exits 2 (a config or input error) is not tried again. A re-run of the study skips what
finished and tries the rest. A study holds ``scaling.out_dir/.lock`` while it runs (:mod:`pretrain.lock`), so two
studies never write into one folder; each run holds its own run folder's lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pretrain import lock, paired
from shards.progress import bar

from . import results
from .config import ScalingConfig
from .grid import Cell, Layout, fraction_name, grid, sizes

log = logging.getLogger(__name__)

RunModule = Callable[[str, Sequence[str], Path], int]
"""Runs ``module`` with ``args``, its output appended to the log file; returns the exit code."""
DONE = "DONE.json"
STUDY = "study.json"
USER_ERROR = 2
"""The exit code of momrec's commands for a bad config or input (``error: ...``): the same run fails the same way,
so it is not tried again."""


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


class Study:
    """One study folder: :meth:`run` runs what is missing and returns the number of cells that failed."""

    def __init__(self, cfg: ScalingConfig, run_module: RunModule | None = None, progress: bool = True) -> None:
        cfg.check_ready()
        self.cfg, self.layout, self.progress = cfg, Layout(cfg), progress
        self.run_module = run_module or self._subprocess
        self.device = device_name()
        self.cells = grid(cfg)
        self.failed_pretraining: set[tuple[float, int]] = set()
        """(source fraction, pretraining seed) of the pretraining runs that failed in this invocation."""

    # ---- processes ------------------------------------------------------------------------------------

    def _subprocess(self, module: str, args: Sequence[str], log_file: Path) -> int:
        command = [*(self.cfg.launcher or [sys.executable, "-m"]), module, *args]
        with log_file.open("a", encoding="utf-8") as out:
            out.write(f"\n$ {' '.join(command)}\n")
            out.flush()
            return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ,
                                  "PYTHONUNBUFFERED": "1"}, check=False).returncode  # fmt: skip

    def _attempts(self, name: str, module: str, args: list[str], out_dir: Path) -> bool:
        """Run until it succeeds, at most 1 + retries times (once when it exits :data:`USER_ERROR`); resume when a
        checkpoint was written."""
        log_file = self.layout.log(name)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1 + self.cfg.retries):
            resume = (out_dir / "checkpoints" / "latest").is_file()
            if not resume and out_dir.exists():
                shutil.rmtree(out_dir)  # died before its first checkpoint: start over
            rc = self.run_module(module, [*args, *(["--resume"] if resume else [])], log_file)
            if rc == 0:
                return True
            if rc == USER_ERROR:
                log.error("%s: failed with a config or input error (exit %d), not tried again; log %s:\n%s", name, rc,
                          log_file, _tail(log_file))  # fmt: skip
                return False
            log.warning("%s: attempt %d of %d failed (exit %d); log %s:\n%s", name, attempt + 1, 1 + self.cfg.retries,
                        rc, log_file, _tail(log_file))  # fmt: skip
        return False

    # ---- pretraining ----------------------------------------------------------------------------------

    def pretrained(self, fraction: float, cell_seed: int) -> Path | None:
        """The export pretrained on ``fraction`` of the sources that cells of ``cell_seed`` start from (pretrained
        now if needed); None if that failed."""
        folder = self.layout.pretrain_dir(fraction, cell_seed)
        done = folder / DONE
        if done.is_file():
            return folder / "model"
        seed = self.cfg.pretraining_seed(cell_seed)
        if (fraction, seed) in self.failed_pretraining:
            return None
        domains = self.layout.sources(fraction, cell_seed)
        args = [*_configs(self.cfg.pretrain_config), *self.cfg.pretrain_overrides,
                f"data.domains={json.dumps(domains)}", f"run.out_dir={folder}", f"engine.seed={seed}",
                f"data.stream.seed={seed}"]  # fmt: skip
        users, interactions = sizes(domains)
        args += self._pretrain_steps(users)
        log.info("pretraining on %s of the sources, seed %d (%d users, %d interactions)", fraction, seed, users,
                 interactions)  # fmt: skip
        start = time.monotonic()
        if not self._attempts(folder.name, "pretrain", args, folder):
            self.failed_pretraining.add((fraction, seed))
            return None
        info = {"wall_s": time.monotonic() - start, "domains": domains, "users_interactions": [users, interactions]}
        done.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        return folder / "model"

    def _pretrain_steps(self, users: int) -> list[str]:
        """The optim.max_steps override of scaling.pretrain_epochs (none when it is 0)."""
        c = self.cfg
        if not c.pretrain_epochs:
            return []
        from pretrain.config import load_config

        pre = load_config(c.pretrain_config, c.pretrain_overrides)
        batch = pre.data.stream.batch_size * pre.optim.grad_accum * c.ranks
        return [f"optim.max_steps={max(1, math.ceil(c.pretrain_epochs * users / batch))}"]

    def pretrain_seconds(self, cell: Cell) -> float | None:
        """Wall time of the pretraining that ``cell`` started from (None: not pretrained)."""
        if not cell.source_fraction:
            return None
        done = self.layout.pretrain_dir(cell.source_fraction, cell.seed) / DONE
        return float(json.loads(done.read_text(encoding="utf-8"))["wall_s"])

    # ---- cells --------------------------------------------------------------------------------------

    def _cell_args(self, cell: Cell, target: str) -> list[str] | None:
        """The finetune command line of ``cell`` (None when its pretraining failed)."""
        c = self.cfg
        common = [f"run.out_dir={self.layout.cell_dir(cell)}", f"data.valid_domains={json.dumps([c.target])}",
                  f"engine.seed={cell.seed}", f"data.stream.seed={cell.seed}"]  # fmt: skip
        if cell.kind == "id":
            fit = self._fit_batch(cell, target, c.baseline_config, c.baseline_overrides)
            return ["--from", "none", "--data", target, "--mode", "full", *_configs(c.baseline_config),
                    *c.baseline_overrides, *fit, *common]  # fmt: skip
        # both arms get the same config layers (the pretraining's files and model.* overrides: architecture, optim
        # and stream alike), so a pretrained cell and its control differ only in --from and the mode
        architecture = [o for o in c.pretrain_overrides if o.startswith("model.")]
        files = [*c.pretrain_config, *c.finetune_config]
        overrides = [*architecture, *c.finetune_overrides]
        layers = [*_configs(files), *overrides, *self._fit_batch(cell, target, files, overrides)]
        if not cell.source_fraction:
            return ["--from", "none", "--data", target, "--mode", c.control, *layers, *common]
        model = self.pretrained(cell.source_fraction, cell.seed)
        if model is None:
            return None
        return ["--from", str(model), "--data", target, "--mode", c.mode, *layers, *common]

    def _fit_batch(self, cell: Cell, target: str, files: Sequence[str], overrides: Sequence[str]) -> list[str]:
        """A data.stream.batch_size override when the target subset holds fewer users than one global batch of the
        cell's config (the stream refuses that: e.g. SASRec's 128 on 1 % of a domain): the largest batch it fills,
        logged; none otherwise."""
        from finetune.config import load_config

        batch = load_config(files, overrides).data.stream.batch_size
        users = sizes([target])[0]
        if users >= batch * self.cfg.ranks:
            return []
        fitted = max(1, users // self.cfg.ranks)
        log.warning("%s: %d target users are fewer than one batch of %d x %d ranks: data.stream.batch_size=%d",
                    cell.name, users, batch, self.cfg.ranks, fitted)  # fmt: skip
        return [f"data.stream.batch_size={fitted}"]

    def run_cell(self, cell: Cell) -> dict[str, Any] | None:
        """Finetune and test ``cell``; its results.csv row, or None when it failed."""
        target = self.layout.target(cell.target_fraction, cell.seed)
        args = self._cell_args(cell, target)
        if args is None:
            log.warning("%s: skipped, its pretraining failed", cell.name)
            return None
        out_dir = self.layout.cell_dir(cell)
        summary_file = out_dir / "summary.json"
        start = time.monotonic()
        if not summary_file.is_file() and not self._attempts(cell.name, "finetune", args, out_dir):
            return None
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        fraction = cell.source_fraction
        source = sizes(self.layout.sources(fraction, cell.seed)) if fraction else (0, 0)
        mode = summary["mode"]
        row = results.row(cell, mode, summary, source, sizes([target]), self.pretrain_seconds(cell),
                          time.monotonic() - start, self.device)  # fmt: skip
        return {**row, **self.gains(cell)}

    def gains(self, cell: Cell) -> dict[str, float]:
        """A pretrained cell's paired gain over its control (the no-pretraining cell of the same target fraction
        and seed), per user of the target's test split, with bootstrap intervals (:mod:`pretrain.paired`); {}
        for other cells, or when either has no per-user results."""
        if cell.kind != "content" or not cell.source_fraction:
            return {}
        control = Cell("content", 0.0, cell.target_fraction, cell.seed)
        found = [_test_results(self.layout.cell_dir(c)) for c in (cell, control)]
        if not all(len(f) == 1 for f in found):
            log.warning("%s: no paired gain (per-user results: %s)", cell.name, found)
            return {}
        a, b = (paired.load_ranks(f[0]) for f in found)
        out = {}
        for metric in results.GAIN_METRICS:
            gain = paired.compare([a], [b], metric).gain
            out.update({f"gain_{metric}": gain.mean, f"gain_{metric}_low": gain.low, f"gain_{metric}_high": gain.high})
        return out

    def pooled_gains(self) -> list[dict[str, Any]]:
        """Per source fraction (> 0) and target fraction: the gain over the control pooled over the seeds whose
        pretrained cell and control both have per-user test results (two or more), each user's difference
        averaged over those seeds, bootstrapped over users (rows of results.POOLED_COLUMNS)."""
        finished = {results.key(r): r for r in results.read(self.layout.results)}
        groups: dict[tuple[float, float], list[int]] = {}
        for cell in self.cells:
            control = Cell("content", 0.0, cell.target_fraction, cell.seed)
            if cell.kind == "content" and cell.source_fraction and {cell.key, control.key} <= set(finished):
                groups.setdefault((cell.source_fraction, cell.target_fraction), []).append(cell.seed)
        out = []
        for (source, target), seeds in groups.items():
            if len(seeds) < 2:
                continue
            cells = [Cell("content", source, target, s) for s in seeds]
            controls = [Cell("content", 0.0, target, s) for s in seeds]
            found = [_test_results(self.layout.cell_dir(c)) for c in cells + controls]
            if not all(len(f) == 1 for f in found):
                log.warning("source %g, target %g: no pooled gain (per-user results: %s)", source, target, found)
                continue
            ranks = [paired.load_ranks(f[0]) for f in found]
            row: dict[str, Any] = {"source_fraction": fraction_name(source), "target_fraction": fraction_name(target),
                                   "seeds": " ".join(map(str, seeds)),
                                   "source_interactions": finished[cells[0].key]["source_interactions"]}  # fmt: skip
            for metric in results.GAIN_METRICS:
                comparison = paired.compare(ranks[: len(seeds)], ranks[len(seeds) :], metric)
                gain = comparison.gain
                row.update({"users": comparison.users, f"gain_{metric}": gain.mean, f"gain_{metric}_low": gain.low,
                            f"gain_{metric}_high": gain.high})  # fmt: skip
            out.append(row)
        return out

    # ---- the study ------------------------------------------------------------------------------------

    def _check_settings(self) -> None:
        """A study folder holds one set of settings: refuse a re-run that changes what its cells computed."""
        path = self.layout.root / STUDY
        settings = self.cfg.settings()
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            if changed:
                raise ValueError(f"{path}: this study was run with other settings ({', '.join(changed)} differ); "
                                 "use a new scaling.out_dir, or restore the settings")  # fmt: skip
            return
        self.layout.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")

    def pending(self) -> list[Cell]:
        finished = {results.key(r) for r in results.read(self.layout.results)}
        return [cell for cell in self.cells if cell.key not in finished]

    def locked(self) -> contextlib.AbstractContextManager[Path]:
        """The study folder's lock (:func:`pretrain.lock.locked`), held while a study writes into it."""
        return lock.locked(self.layout.root, force=self.cfg.force_unlock, what="scaling.out_dir")

    def run(self) -> int:
        """Run the cells that have not finished (holding the study folder's lock); the number that failed."""
        with self.locked():
            return self._run()

    def _run(self) -> int:
        self._check_settings()
        todo = self.pending()
        n = len(self.cells)
        log.info("%d cells, %d finished, %d to run (out_dir %s)", n, n - len(todo), len(todo),
                 self.layout.root)  # fmt: skip
        failed = []
        for cell in bar(todo, enabled=self.progress, desc="scaling cells", unit="cell"):
            log.info("cell %s", cell.name)
            row = self.run_cell(cell)
            if row is None:
                failed.append(cell.name)
                continue
            results.append(self.layout.results, row)
            log.info("cell %s: test ndcg@10 %s hr@10 %s", cell.name, row["ndcg@10"], row["hr@10"])
        if failed:
            log.error("%d cells failed (%s); run the study again to retry them", len(failed), ", ".join(failed))
        return len(failed)


def _test_results(run_dir: Path) -> list[Path]:
    """The finetuned model's per-user test results in a cell's run folder (not those of its start)."""
    return sorted(p for p in run_dir.glob("eval-*.json") if not p.name.startswith("eval-start-"))


def _configs(files: Sequence[str]) -> list[str]:
    return [arg for f in files for arg in ("--config", f)]


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])
