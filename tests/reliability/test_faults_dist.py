"""Faults in a 2-rank ``torchrun -m pretrain`` job (gloo on CPU), injected by tests/reliability/faults/sitecustomize.py.

* Crash and resume: a job SIGKILLed in the middle of training, resumed, then SIGKILLed in the middle of writing a
  checkpoint, resumed again, ends with the weights and losses of an uninterrupted run; the half-written checkpoint
  is never taken for the latest.
* Stuck ranks: when one rank dies or hangs, the other exits non-zero with a clear error within the process-group
  timeout (the two ranks run under two launchers, "nodes", so that no launcher tears the survivor down for us).

Every launcher has a wall-clock limit; a failure shows its output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reliability_support import dist_tests

pytestmark = pytest.mark.dist

deepspeed_comm_op = dist_tests.deepspeed_comm_op  # autouse: build DeepSpeed's comm op before any launcher
Launcher, finish, metrics, pretrain_args = (
    dist_tests.Launcher,
    dist_tests.finish,
    dist_tests.metrics,
    dist_tests.pretrain_args,
)
FAULTS = Path(__file__).resolve().parent / "faults"
TWO_RANKS = ["--standalone", "--nproc_per_node", "2"]
TIMEOUT_S = 10
"""The stuck-rank tests' process-group timeout."""


@pytest.fixture
def faults(monkeypatch):
    """``inject(spec)``: the next launchers run with MOMREC_FAULT=spec (None: no fault)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])))

    def inject(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv("MOMREC_FAULT", raising=False)
        else:
            monkeypatch.setenv("MOMREC_FAULT", spec)

    return inject


def fails(launcher: Launcher, timeout_s: float) -> str:
    """Wait for ``launcher`` to exit non-zero within ``timeout_s``; its output."""
    try:
        launcher.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        launcher.stop()
        pytest.fail(f"still running after {timeout_s:.0f} s:\n{launcher.tail()}")
    assert launcher.proc.returncode != 0, f"expected a failure:\n{launcher.tail()}"
    return launcher.log.read_text()


def latest(out_dir: Path) -> str:
    return (out_dir / "checkpoints" / "latest").read_text().strip()


# ---- crash and resume ------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_sigkill_mid_training_and_mid_checkpoint_then_resume_equals_uninterrupted(
    folders: list[str], tmp_path: Path, faults
) -> None:
    zero = ["--config", "launch/ds/zero2.toml"]
    common = ["optim.max_steps=6", "run.save_every=2", "data.valid_domains=[]"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    def launch(out: Path, log: str, *more: str) -> Launcher:
        return Launcher(TWO_RANKS, [*pretrain_args(folders, out, *zero), *common, *more], tmp_path / log)

    faults(None)
    finish(launch(a_dir, "a.log"))

    faults("kill:train:3:1")  # rank 1 SIGKILLed after step 3: the step-2 checkpoint is the last complete one
    fails(launch(b_dir, "b1.log"), dist_tests.LAUNCH_TIMEOUT_S)
    assert latest(b_dir) == "step00000002"

    faults("kill:checkpoint:4:0")  # resumed, then SIGKILLed while writing the step-4 checkpoint
    fails(launch(b_dir, "b2.log", "--resume"), dist_tests.LAUNCH_TIMEOUT_S)
    half = b_dir / "checkpoints" / "step00000004"
    assert any(half.glob("*.pt")) and not (half / "momrec.json").exists(), sorted(p.name for p in half.iterdir())
    assert latest(b_dir) == "step00000002", "a half-written checkpoint was taken for the latest"

    faults(None)
    finish(launch(b_dir, "b3.log", "--resume"))
    assert "resumed from step 2" in (tmp_path / "b3.log").read_text()
    assert latest(b_dir) == "step00000006" and (half / "momrec.json").is_file()  # rewritten whole
    a, b = metrics(a_dir), metrics(b_dir)  # the last row of each step: the run that went on from it
    for step in range(3, 7):
        for key in dist_tests.COMPARED:
            assert b[step][key] == a[step][key], (
                f"step {step} {key}: resumed {b[step][key]!r}, uninterrupted {a[step][key]!r}"
            )
    weights_a = safetensors.torch.load_file(str(a_dir / "model" / "model.safetensors"))
    weights_b = safetensors.torch.load_file(str(b_dir / "model" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    differ = [k for k in weights_a if not torch.allclose(weights_a[k], weights_b[k], rtol=1e-6, atol=1e-7)]
    assert not differ, f"the resumed run ends with other weights: {differ[:5]}"


# ---- stuck ranks -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_stuck_rank_makes_the_other_exit_within_the_timeout(
    folders: list[str], tmp_path: Path, faults, monkeypatch, fault: str
) -> None:
    """Rank 1 (node 1) is SIGKILLed, or SIGSTOPped, after step 2 of 50; rank 0 must stop with a clear error: at
    once when its peer's connection closes, within the process-group timeout when the peer just stops answering."""
    pidfile = tmp_path / "stuck.pid"
    monkeypatch.setenv("MOMREC_FAULT_PIDFILE", str(pidfile))
    faults(f"{fault}:train:2:1")
    args = pretrain_args(folders, tmp_path / "run", "optim.max_steps=50", "run.save_every=0", "data.valid_domains=[]")
    args.append(f"engine.process_group_timeout_s={TIMEOUT_S}")  # last: overrides pretrain_args' 60 s
    nodes = dist_tests.two_nodes(args, tmp_path)
    try:
        if fault == "hang":
            deadline = time.monotonic() + dist_tests.LAUNCH_TIMEOUT_S
            while not pidfile.exists() and time.monotonic() < deadline and nodes[0].proc.poll() is None:
                time.sleep(0.2)
            assert pidfile.exists(), nodes[1].tail()
            stuck_at = time.monotonic()
        output = fails(nodes[0], dist_tests.LAUNCH_TIMEOUT_S)
        if fault == "hang":
            waited = time.monotonic() - stuck_at
            assert waited < TIMEOUT_S + 30, f"rank 0 waited {waited:.0f} s for a stuck rank"
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        for node in nodes:
            node.stop()
    assert "error: rank 0: a collective failed: another rank died or stopped responding" in output, output[-3000:]
    assert "[rank0]: Traceback" not in output, output[-3000:]  # (torchrun's agent then prints its own report)


@pytest.mark.timeout(300)
def test_an_error_on_one_rank_ends_the_job_at_once_not_after_the_timeout(
    folders: list[str], tmp_path: Path, faults
) -> None:
    """Rank 1 raises after step 2 (an error only it meets): it must leave at once with its own error, not wait in a
    barrier for the process-group timeout (120 s here) while rank 0 waits in its next all-reduce."""
    faults("raise:train:2:1")
    args = pretrain_args(folders, tmp_path / "run", "optim.max_steps=50", "run.save_every=0", "data.valid_domains=[]")
    args.append("engine.process_group_timeout_s=120")
    nodes = dist_tests.two_nodes(args, tmp_path)
    try:
        failed = fails(nodes[1], dist_tests.LAUNCH_TIMEOUT_S)
        started = time.monotonic()
        output = fails(nodes[0], 60)
        assert time.monotonic() - started < 60
    finally:
        for node in nodes:
            node.stop()
    assert "injected fault on rank 1" in failed and "timed out" not in failed.lower(), failed[-3000:]
    assert "error: rank 0: a collective failed: another rank died or stopped responding" in output, output[-3000:]
