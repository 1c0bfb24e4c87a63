"""``python -m benchmarks.step --profile``: where the seconds of a training step go, measured through the real engine
loop (:func:`pretrain.engine.loop`, DeepSpeed, one rank) over N steps after a warm-up.

The phases are timed by wrappers put around the real calls for the profile only (the loop itself carries no timing
code), and each phase's time is *exclusive* (a phase called inside another is taken out of the outer one), so the
buckets add up to the steps' wall time:

    data wait          the loop waiting for its next batch: reading and parsing samples, splitting, collating,
                       less the two phases below (and, per epoch, interest refreshes: model.user.interest_tokens)
    tokenize           the collator's item texts (Collator._texts: the token memo and the tokenizer)
    image decode       the collator's item images (Collator._images: JPEG decode, resize, crop, to a tensor)
    frozen forward     the item encoders' frozen bottoms (Backbone._bottom: cache look-ups, the items they miss)
    trainable forward  the rest of the engine's forward pass (trainable encoder tops, fusion, user encoder, loss)
    backward           engine.backward (with DeepSpeed's gradient reduction)
    optimizer          engine.step (gradient clipping, AdamW, the schedule, zeroing the gradients)
    logging/other      everything else of the loop: moving the batch, the meter, the train log (run.log_every)

Data is loaded in the training process (``data.stream.num_workers=0``, overridable) so that tokenizing and decoding
are on this clock: with W workers they run beside the step, and only the wait that is left shows (as data wait).
Validation and checkpoints are off; the loop is left right after the last timed step's optimizer step.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch

from pretrain.backbone import Backbone
from pretrain.config import TrainConfig, load_config
from shards.collate import Collator

BUCKETS = (
    "data wait",
    "tokenize",
    "image decode",
    "frozen forward",
    "trainable forward",
    "backward",
    "optimizer",
    "logging/other",
)
PROFILE_OVERRIDES = (
    "data.stream.num_workers=0",
    "run.eval_at_start=false",
    "run.eval_every=0",
    "run.save_every=0",
    "run.keep_start=false",
    "run.keep_best=false",
    "run.early_stop_patience=0",
)
"""Applied before the caller's overrides: data loaded in the training process, no validation, no checkpoint."""


class PhaseClock:
    """Exclusive seconds per bucket of the phases entered while the clock runs (between :meth:`start` and
    :meth:`stop`); a phase entered before the start is not counted."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.running = False
        self.started = self.wall = 0.0
        self._stack: list[list[float]] = []  # [start, seconds of the phases inside it]

    def start(self) -> None:
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.running, self.started = True, time.perf_counter()

    def stop(self) -> None:
        self.running, self.wall = False, time.perf_counter() - self.started
        self.seconds["logging/other"] = self.wall - sum(v for k, v in self.seconds.items() if k != "logging/other")

    @contextlib.contextmanager
    def phase(self, bucket: str) -> Iterator[None]:
        if not self.running:
            yield
            return
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[0]
            self.seconds[bucket] += total - frame[1]
            if self._stack:
                self._stack[-1][1] += total

    def wrap(self, fn: Callable, bucket: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(bucket):
                return fn(*args, **kwargs)

        return timed


class _Done(Exception):
    """Raised after the last timed step: leaves the training loop (no final validation or checkpoint)."""


class _Window:
    """Counts optimizer steps; starts the clock after ``warmup`` of them, stops it after ``steps`` more."""

    def __init__(self, clock: PhaseClock, warmup: int, steps: int) -> None:
        self.clock, self.warmup, self.steps, self.done = clock, warmup, steps, 0

    def stepped(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.clock.start()
        if self.done == self.warmup + self.steps:
            self.clock.stop()
            raise _Done


@contextlib.contextmanager
def instrumented(run: Any, clock: PhaseClock, window: _Window) -> Iterator[None]:
    """The run's engine, item encoders and collator, and the loop's batch source, timed into ``clock``."""
    from pretrain import engine as eng

    engine = run.engine
    backbones = [m for m in engine.module.modules() if isinstance(m, Backbone)]
    batches = eng._epoch_batches

    def timed_batches(r: Any) -> Iterator[Any]:
        with contextlib.closing(batches(r)) as source:
            while True:
                with clock.phase("data wait"):
                    batch = next(source)
                yield batch

    step = engine.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        boundary = engine.is_gradient_accumulation_boundary()
        with clock.phase("optimizer"):
            out = step(*args, **kwargs)
        if boundary:
            window.stepped()
        return out

    engine.forward = clock.wrap(engine.forward, "trainable forward")
    engine.backward = clock.wrap(engine.backward, "backward")
    engine.step = timed_step
    for backbone in backbones:
        backbone._bottom = clock.wrap(backbone._bottom, "frozen forward")
    try:
        with (
            mock.patch.object(eng, "_epoch_batches", timed_batches),
            mock.patch.object(Collator, "_texts", clock.wrap(Collator._texts, "tokenize")),
            mock.patch.object(Collator, "_images", clock.wrap(Collator._images, "image decode")),
        ):
            yield
    finally:
        for module in (engine, *backbones):
            for name in ("forward", "backward", "step", "_bottom"):
                module.__dict__.pop(name, None)


def profile_config(paths: list[str], overrides: list[str], steps: int, warmup: int, out_dir: str) -> TrainConfig:
    """The config to profile: ``paths`` and ``overrides`` after :data:`PROFILE_OVERRIDES`, writing into ``out_dir``,
    with optim.max_steps raised to cover the warm-up and the timed steps."""
    overrides = [*PROFILE_OVERRIDES, *overrides, f"run.out_dir={out_dir}"]
    cfg = load_config(paths, overrides)
    if cfg.optim.max_steps < warmup + steps:
        cfg = load_config(paths, [*overrides, f"optim.max_steps={warmup + steps}"])
    return cfg


def profile_steps(paths: list[str], overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup`` then ``steps`` optimizer steps of the config (:func:`profile_config`) through the engine loop
    on one rank (this process), run.out_dir a temporary folder; the seconds per step of each bucket and their
    shares of the step."""
    from pretrain import engine as eng
    from pretrain.distributed import init_distributed

    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    clock = PhaseClock()
    with tempfile.TemporaryDirectory(prefix="momrec-profile-") as out:
        cfg = profile_config(paths, overrides, steps, warmup, out)
        run = eng.build(cfg, init_distributed(cfg.engine.process_group_timeout_s))
        eng._open_writer(run, resumed=False)
        if warmup == 0:
            clock.start()
        try:
            with instrumented(run, clock, _Window(clock, warmup, steps)), contextlib.suppress(_Done):
                eng.loop(run)
        finally:
            run.writer.close()
    return {
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "batch_size": cfg.data.stream.batch_size,
        "grad_accum": cfg.optim.grad_accum,
        "num_workers": cfg.data.stream.num_workers,
        "zero_stage": cfg.engine.zero_stage,
        "precision": cfg.engine.precision,
        "optimizer": adamw_kind(run.engine),
        "step_seconds": clock.wall / steps,
        "seconds_per_step": {k: v / steps for k, v in clock.seconds.items()},
        "shares": {k: v / clock.wall for k, v in clock.seconds.items()},
    }


def adamw_kind(engine: Any) -> str:
    """'fused', 'foreach' or 'single': how the AdamW inside DeepSpeed's optimizer wrappers steps."""
    optimizer = engine.optimizer
    while optimizer is not None and not isinstance(optimizer, torch.optim.AdamW):
        optimizer = getattr(optimizer, "optimizer", None)
    if optimizer is None:
        return "?"
    return "fused" if optimizer.defaults["fused"] else "foreach" if optimizer.defaults["foreach"] else "single"


def report_profile(r: dict[str, Any]) -> str:
    workers = r["num_workers"]
    where = ("data loaded in the training process (data.stream.num_workers=0)" if workers == 0
             else f"data loaded by {workers} workers: their tokenizing and decoding are not on this clock")  # fmt: skip
    lines = [
        f"Step profile: {r['steps']} steps after {r['warmup']} warm-up, batch {r['batch_size']} x accumulation "
        f"{r['grad_accum']}, ZeRO-{r['zero_stage']} {r['precision']}, AdamW {r['optimizer']}, {r['threads']} threads,"
        f" 1 rank; {where}",
        f"  {'phase':<18} {'ms/step':>9} {'share':>7}",
    ]
    for bucket in BUCKETS:
        lines.append(f"  {bucket:<18} {r['seconds_per_step'][bucket] * 1e3:>9.1f} {r['shares'][bucket]:>7.1%}")
    lines.append(f"  {'step':<18} {r['step_seconds'] * 1e3:>9.1f} {sum(r['shares'].values()):>7.1%}")
    return "\n".join(lines)
