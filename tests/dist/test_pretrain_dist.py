"""``python -m pretrain`` under real launchers: two ranks over gloo, as CI and users start it.

Every run is the real command in a subprocess (``torchrun``, i.e. ``python -m torch.distributed.run``) on a tiny
random-init model (launch/configs/tiny.toml) and two small synthetic domains, so the launcher environment, the
DeepSpeed engine, checkpoints and the export are exercised end to end:

* ZeRO-2 and ZeRO-3 on two local ranks: the loss falls, and resuming from a checkpoint gives exactly the losses,
  learning rates and final weights of the uninterrupted run.
* Two "nodes" of one rank each (two ``torchrun --nnodes 2 --node_rank i`` launchers on this machine): they train
  together, write one checkpoint holding both ranks' files, and an export that loads.

A hang cannot last: every collective has a 60 s process-group timeout and every launcher a wall-clock limit
(its process group is terminated); a failure shows the tail of the launcher's output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pretrain.export import load_pretrained
from shards.build import BuildOptions, build
from shards.synth import synthesize

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 150
"""Wall-clock limit of one launcher (runs take ~15-25 s here; DeepSpeed's op build is done beforehand)."""
TAIL = 4000
"""Characters of a failed launcher's output shown in the assertion message."""
MAX_STEPS, RESUME_AT = 8, 4
"""The resume test: an uninterrupted run of MAX_STEPS steps, and a run resumed from its step-RESUME_AT checkpoint
(mid-epoch: 60 sequences make 3 batches of 8 per rank and epoch on 2 ranks, so the runs also cross epochs)."""
COMPARED = ("loss/total", "loss/softmax", "train/lr", "train/grad_norm", "train/epoch")
"""Logged values that a resumed run must reproduce (throughput, memory and stream counters legitimately differ)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The launchers' environment: CPU (DeepSpeed's cpu accelerator, gloo) even where a GPU is present, one
    thread per rank (two ranks with full thread pools on two cores run several times slower), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    """Two built domains of 30 users each (as tests/pretrain/test_model.py builds them)."""
    root = tmp_path_factory.mktemp("pretrain_dist")
    out = []
    for src in synthesize(
        root / "src", domains=["books", "movies"], users_per_domain=30, items_per_domain=40, n_topics=4
    ):
        opts = BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=16)
        build(src, root / "shards" / src.name, opts, progress=False)
        out.append(str(root / "shards" / src.name))
    return out


@pytest.fixture(scope="module", autouse=True)
def deepspeed_comm_op() -> None:
    """Build (or load from ~/.cache/torch_extensions) DeepSpeed's C++ comm op once, before any launcher runs: on a
    clean machine the build takes ~2 min on 2 cores, which must not count against a launcher's time limit."""
    # through import_deepspeed: the same ninja as the runs use, so they find the op built (pretrain.engine)
    code = (
        "from pretrain.distributed import import_deepspeed; import_deepspeed(); "
        "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"DeepSpeed's comm op did not build:\n{(done.stdout + done.stderr)[-TAIL:]}"


# ---- launching ----------------------------------------------------------------------------------------


class Launcher:
    """One ``torchrun ... -m pretrain ...`` in its own process group, its output in a log file."""

    def __init__(self, launcher_args: list[str], pretrain_args: list[str], log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "pretrain", *pretrain_args]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        """SIGTERM (torchrun passes it on to its workers, which run in sessions of their own), then SIGKILL."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self) -> str:
        return f"--- {self.log.name} (exit {self.proc.returncode}), last lines ---\n" + self.log.read_text()[-TAIL:]


def finish(*launchers: Launcher, timeout_s: float = LAUNCH_TIMEOUT_S) -> None:
    """Wait for all; when one fails or time runs out, stop the others and fail with every launcher's output."""
    deadline = time.monotonic() + timeout_s
    problem = None
    try:
        while problem is None and None in (codes := [la.proc.poll() for la in launchers]):  # poll every one
            if any(code not in (None, 0) for code in codes):
                problem = "a launcher failed"
            elif time.monotonic() > deadline:
                problem = f"timed out after {timeout_s:.0f} s"
            else:
                time.sleep(0.2)
    finally:  # also when pytest-timeout or Ctrl-C interrupts the wait: leave no launcher behind
        for la in launchers:
            la.stop()
    if problem is None and any(la.proc.returncode != 0 for la in launchers):
        problem = "a launcher failed"
    assert problem is None, f"{problem}:\n" + "\n".join(la.tail() for la in launchers)


def two_nodes(args: list[str], log_dir: Path) -> list[Launcher]:
    """Two torchrun "nodes" of one rank each on this machine (static rendezvous on 127.0.0.1), logging to
    ``log_dir/node{0,1}.log``."""
    port = _free_port()
    return [
        Launcher(
            ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"]
            + ["--master_addr", "127.0.0.1", "--master_port", str(port)],
            args,
            log_dir / f"node{node}.log",
        )
        for node in range(2)
    ]


def pretrain_args(folders: list[str], out_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "launch/configs/tiny.toml",
        *extra,
        f"data.domains={json.dumps(folders)}",
        "data.stream.num_workers=0",
        f"run.out_dir={out_dir}",
        "run.log_every=1",
        "run.eval_every=0",  # 0: validate only at the end
        "optim.warmup_steps=2",
        "engine.process_group_timeout_s=60",
    ]


def metrics(out_dir: Path) -> dict[int, dict[str, float]]:
    """Rank 0's logged training metrics by step (validation lines, which hold no loss, left out)."""
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d for d in lines if "loss/total" in d}


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.mark.timeout(600)  # generous: a clean machine first builds DeepSpeed's comm op (~2 min on 2 cores)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_and_resumes_exactly(folders: list[str], tmp_path: Path, stage: int) -> None:
    """Run A trains MAX_STEPS steps uninterrupted, checkpointing at RESUME_AT. Run B is a fresh launch that resumes
    from a copy of that checkpoint, in a folder of its own (the state a run stopped after step RESUME_AT leaves:
    stopping earlier with the same schedule needs the same optim.max_steps, and no option stops a run before it).
    B must reproduce A's steps after RESUME_AT bit for bit (the same floats, not merely close), and its weights."""
    zero = ["--config", f"launch/ds/zero{stage}.toml"]
    common = [f"optim.max_steps={MAX_STEPS}", f"run.save_every={RESUME_AT}", "data.valid_domains=[]"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    two_ranks = ["--standalone", "--nproc_per_node", "2"]
    finish(Launcher(two_ranks, [*pretrain_args(folders, a_dir, *zero), *common], tmp_path / "a.log"))
    a = metrics(a_dir)
    assert sorted(a) == list(range(1, MAX_STEPS + 1))
    losses = [a[step]["loss/total"] for step in sorted(a)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], f"the loss did not fall: {losses}"

    tag = f"step{RESUME_AT:08d}"
    (b_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(a_dir / "checkpoints" / tag, b_dir / "checkpoints" / tag)
    (b_dir / "checkpoints" / "latest").write_text(tag + "\n")
    finish(Launcher(two_ranks, [*pretrain_args(folders, b_dir, *zero), *common, "--resume"], tmp_path / "b.log"))
    b = metrics(b_dir)
    assert sorted(b) == list(range(RESUME_AT + 1, MAX_STEPS + 1)), "B did not start after the checkpoint"
    for step in sorted(b):
        for key in COMPARED:
            assert key in a[step], f"step {step} logged no {key}"
            resumed, uninterrupted = b[step].get(key), a[step][key]
            assert resumed == uninterrupted, f"step {step} {key}: resumed {resumed!r}, uninterrupted {uninterrupted!r}"

    # the exports (gathered across ranks under ZeRO-3) load, and the resumed run ends with the same weights
    model, cfg, _ = load_pretrained(a_dir / "model")
    assert cfg.engine.zero_stage == stage
    weights_a = model.state_dict()
    weights_b = safetensors.torch.load_file(str(b_dir / "model" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    unequal = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not unequal, f"the resumed run ends with other weights: {unequal[:5]}"


@pytest.mark.timeout(600)
def test_two_nodes_train_and_checkpoint(folders: list[str], tmp_path: Path) -> None:
    """Multi-node, simulated here: two torchrun node launchers (one rank each, static rendezvous on 127.0.0.1)
    train together, validate, write one checkpoint with both ranks' files, and an export that loads."""
    out_dir, steps = tmp_path / "run", 3
    args = pretrain_args(folders, out_dir, f"optim.max_steps={steps}", "run.save_every=0", "run.eval_users=16")
    finish(*two_nodes(args, tmp_path))

    logged = metrics(out_dir)
    assert sorted(logged) == list(range(1, steps + 1))
    assert all(math.isfinite(d["loss/total"]) for d in logged.values())
    valid = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("valid/hr@10" in d for d in valid), "no validation at the end"

    ckpt = out_dir / "checkpoints"
    tag = f"step{steps:08d}"
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == [tag]
    assert (ckpt / "latest").read_text().strip() == tag
    files = {f.name for f in (ckpt / tag).iterdir()}
    expected = {"momrec.json"}
    expected |= {f"rank{rank:05d}.{ext}" for rank in range(2) for ext in ("json", "safetensors")}
    assert expected <= files, f"missing in {tag}: {sorted(expected - files)}"
    assert json.loads((ckpt / tag / "momrec.json").read_text())["world_size"] == 2

    model, cfg, catalog = load_pretrained(out_dir / "model")
    assert cfg.optim.max_steps == steps and len(catalog.domains) == 2
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())
