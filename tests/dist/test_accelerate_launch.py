"""``accelerate launch`` as a third launcher (beside ``deepspeed --module`` and ``torchrun -m``): pretraining and
finetuning on two CPU ranks, each the real command in a subprocess.

``accelerate launch --multi_gpu --num_processes N -m pretrain ...`` runs torchrun underneath, which sets the variables
:func:`pretrain.distributed.init_distributed` reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); on a
machine without GPUs the ranks use gloo like torchrun's. (``--cpu`` with several processes is accelerate's MPI
path: without ``--mpirun_hostfile`` it starts one process, so it is not the way to start ranks.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import test_pretrain_dist as launchers
from tests.dist.test_pretrain_dist import REPO, Launcher, _env, _free_port, finish, metrics, pretrain_args

pytestmark = pytest.mark.dist

folders = launchers.folders  # the fixtures: two built domains, and DeepSpeed's comm op built before any launcher
deepspeed_comm_op = launchers.deepspeed_comm_op


class Accelerate(Launcher):
    """``accelerate launch --multi_gpu --num_processes 2 -m MODULE ARGS`` in its own process group."""

    def __init__(self, module: str, args: list[str], log: Path) -> None:
        self.log = log
        launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", module, *args]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )


@pytest.mark.timeout(600)
def test_accelerate_launch_pretrains_and_finetunes_on_two_ranks(folders: list[str], tmp_path: Path) -> None:
    pre_dir, ft_dir, steps = tmp_path / "pre", tmp_path / "ft", 3
    args = pretrain_args(folders[:1], pre_dir, f"optim.max_steps={steps}", "run.save_every=0", "run.eval_users=16")
    finish(Accelerate("pretrain", args, tmp_path / "pretrain.log"))
    assert sorted(metrics(pre_dir)) == list(range(1, steps + 1))
    tag = f"step{steps:08d}"
    assert json.loads((pre_dir / "checkpoints" / tag / "momrec.json").read_text())["world_size"] == 2

    # --from none (tiny.toml's architecture, nothing loaded): the launcher is under test here, not the transfer
    ft = ["--from", "none", "--config", "launch/configs/tiny.toml", "--data", folders[1], "--mode", "lora",
          f"run.out_dir={ft_dir}", "data.stream.num_workers=0", "engine.process_group_timeout_s=60",
          "optim.max_steps=2", "optim.warmup_steps=1", "run.eval_every=0", "run.save_every=0",
          "run.eval_users=16"]  # fmt: skip
    finish(Accelerate("finetune", ft, tmp_path / "finetune.log"))
    summary = json.loads((ft_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["mode"] == "lora"
    assert json.loads((ft_dir / "checkpoints" / "step00000002" / "momrec.json").read_text())["world_size"] == 2
    assert all(math.isfinite(v) for v in summary["test"].values())
