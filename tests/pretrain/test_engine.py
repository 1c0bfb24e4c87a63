"""The engine in one process: the real command end to end (TensorBoard, validation, checkpoints, export), exact
resume from a checkpoint written mid-run, the schedule and the optimizer groups, and clear errors.

Multi-process ZeRO-2/3 and the two-node launch are in tests/dist/test_pretrain_dist.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pretrain.__main__ import main
from pretrain.config import TrainConfig, load_config
from pretrain.engine import train
from pretrain.export import load_pretrained, new_model
from pretrain.model import Catalog, Recommender
from pretrain.optim import lr_factor, param_groups
from pretrain.parts import parameter_counts
from pretrain.runlog import Meter
from tests.testutil import REPO, TINY, hold_lock, other_process, tiny_overrides


@pytest.fixture(autouse=True)
def clean_dist_env(lone_process):
    """Every test here trains in this process."""
    yield


def config(folders: list[str], out_dir: Path, *more: str) -> TrainConfig:
    return load_config(str(TINY), tiny_overrides(folders, out_dir, *more))


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss/total from metrics.jsonl (exact floats)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def test_the_command_trains_logs_validates_checkpoints_and_exports(folders, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--config", str(TINY), *tiny_overrides(folders, out, "optim.max_steps=8", "optim.warmup_steps=3")]
    argv += ["run.log_every=2", "run.eval_every=8", "run.save_every=4", "run.eval_users=24"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 8 validation" in proc.stderr

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/softmax", "train/lr", "train/grad_norm", "perf/sequences_per_s"}
    expected |= {"perf/items_encoded_per_s", "perf/dedup_saved", "mem/rss_gb", "valid/hr@10", "valid/ndcg@10"}
    expected |= {"valid/pop_ndcg@10", "valid/books/ndcg@10", "valid/movies/ndcg@10"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("loss/total")] == [2, 4, 6, 8]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up (3 steps), then cosine decay
    saved = [e.value for e in acc.Scalars("perf/dedup_saved")]
    assert all(0 < s < 1 for s in saved)  # a batch's items repeat across its sequences
    valid = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert valid["valid/users"] == 48 and 0 <= valid["valid/ndcg@10"] <= valid["valid/hr@10"] <= 1

    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000008"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000004", "step00000008"]
    assert json.loads((out / "config.json").read_text())["optim"]["max_steps"] == 8

    model, cfg, catalog = load_pretrained(out / "model")
    assert cfg.optim.max_steps == 8 and catalog == Catalog.from_folders(folders)
    assert not model.training
    params = json.loads((out / "parameters.json").read_text())  # the table, logged at the start and saved
    assert params == parameter_counts(new_model(cfg, catalog)) and params["all"]["total"] > 0
    table = proc.stderr.split("parameters per part:\n", 1)[1].splitlines()[: len(params)]
    rows = [[part, "trainable", str(r["trainable"]), "of", str(r["total"]), "parameters"] for part, r in params.items()]
    assert [line.split()[-6:] for line in table] == rows


@pytest.mark.parametrize(
    "more",
    [
        ["engine.zero_stage=0"],
        ["engine.zero_stage=1", "engine.precision=bf16", "optim.grad_accum=2"],
        ["engine.zero_stage=2", "engine.precision=bf16"],
        ["engine.zero_stage=3", "engine.precision=bf16"],
        ["engine.zero_stage=0", "engine.precision=bf16"],
        ["engine.zero_stage=1"],
    ],
    ids=["zero0-fp32", "zero1-bf16-accum2", "zero2-bf16", "zero3-bf16", "zero0-bf16", "zero1-fp32"],
)
def test_resume_from_a_mid_run_checkpoint_gives_the_same_losses(folders, tmp_path: Path, more: list[str]) -> None:
    common = ["optim.max_steps=6", "optim.warmup_steps=2", "run.log_every=1", "run.eval_every=0"]
    common += ["run.save_every=3", "run.keep_checkpoints=0", *more]
    full = tmp_path / "full"
    train(config(folders, full, *common))
    expected = losses(full)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # a run stopped after its step-3 checkpoint: that checkpoint, as written mid-run, is all it has
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints/step00000003", cut / "checkpoints/step00000003")
    (cut / "checkpoints/latest").write_text("step00000003\n")
    train(config(folders, cut, *common, "run.resume=true"))
    resumed = losses(cut)
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {s: expected[s] for s in (4, 5, 6)}  # bit-identical, not merely close


def test_persistent_stream_workers_train_as_new_workers_every_epoch_do(folders, tmp_path: Path) -> None:
    common = ["optim.max_steps=13", "optim.warmup_steps=1", "run.log_every=1", "run.eval_every=0", "run.save_every=0"]
    common += ["data.stream.num_workers=2"]  # 10 batches an epoch: the run goes into its second
    runs = {}
    for persistent in ("true", "false"):
        out = tmp_path / persistent
        train(config(folders, out, *common, f"data.stream.persistent_workers={persistent}"))
        runs[persistent] = losses(out)
    assert sorted(runs["true"]) == list(range(1, 14))
    assert runs["true"] == runs["false"]  # bit-identical: the same batches, the same random choices


def test_export_equals_the_trained_weights(folders, tmp_path: Path) -> None:
    cfg = config(folders, tmp_path / "run", "optim.max_steps=2", "optim.warmup_steps=1", "run.eval_every=0")
    train(cfg)
    model, _, _ = load_pretrained(tmp_path / "run/model")
    state = safetensors.torch.load_file(str(tmp_path / "run/model/model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    fresh = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders), image_size=cfg.data.stream.image_size)
    changed = [n for n, t in fresh.state_dict().items() if not torch.equal(t, state[n])]
    assert any(n.startswith("user.") for n in changed) and any(n.startswith("text.") for n in changed)


def test_a_second_run_into_the_same_folder_is_refused(folders, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    (out / "checkpoints/step00000002").mkdir(parents=True)
    argv = ["--config", str(TINY), *tiny_overrides(folders, out)]
    assert main(argv) == 2
    assert "already holds checkpoints: pass --resume" in capsys.readouterr().err


def test_a_run_locks_its_folder_refuses_a_second_and_takes_over_a_dead_ones_lock(
    folders, tmp_path: Path, capsys, caplog
) -> None:
    out = tmp_path / "run"
    short = ["optim.max_steps=1", "optim.warmup_steps=0", "run.eval_every=0", "run.eval_at_start=false"]
    with other_process() as proc:  # another run, alive, holds the folder
        hold_lock(out, proc.pid)
        assert main(["--config", str(TINY), *tiny_overrides(folders, out, *short)]) == 2
        pid = proc.pid
    err = capsys.readouterr().err
    assert err.startswith(f"error: run.out_dir {out} is held by another process (host {socket.gethostname()}, pid "
                          f"{pid}, since 2025-01-02 03:04:05 +0000") and err.count("\n") == 1  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written

    held = []

    def broken(cfg: TrainConfig, catalog: Catalog) -> Recommender:
        held.append(json.loads((out / ".lock").read_text())["pid"])
        raise ValueError("broken model")

    # that run has died: its lock is taken over; a run that fails gives the lock back
    with caplog.at_level(logging.WARNING, logger="pretrain.lock"), pytest.raises(ValueError, match="broken model"):
        train(config(folders, out, *short), model_factory=broken)
    assert f"taking over the lock of a run that is no longer running (host {socket.gethostname()}, pid {pid}" in (
        caplog.text
    )
    assert held == [os.getpid()] and not (out / ".lock").exists()

    def watched(cfg: TrainConfig, catalog: Catalog) -> Recommender:
        held.append(json.loads((out / ".lock").read_text())["pid"])
        return new_model(cfg, catalog)

    train(config(folders, out, *short), model_factory=watched)  # a run that succeeds gives it back too
    assert held == [os.getpid()] * 2 and not (out / ".lock").exists()


def test_resume_refuses_a_changed_meaning_and_allows_a_longer_run(folders, tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "run"
    base = ["--config", str(TINY), *tiny_overrides(folders, out, "optim.max_steps=2", "optim.warmup_steps=1")]
    base += ["run.eval_every=0", "run.eval_at_start=false", "run.save_every=2"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "model.user.dropout=0.3", "loss.temperature=0.1", "run.eval_users=8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: {out}/checkpoints/step00000002 was saved with another config") and (
        err.count("\n") == 1
    )
    assert "loss.temperature 0.07 -> 0.1; model.user.dropout 0.1 -> 0.3; restore them" in err  # not run.eval_users

    with caplog.at_level(logging.INFO, logger="pretrain.engine"):
        assert main([*base, "optim.max_steps=3", "run.log_every=1", "run.eval_users=8", "--resume"]) == 0
    assert ("resuming with changed settings: optim.max_steps 2 -> 3; run.eval_users 64 -> 8; run.log_every 5 -> 1"
            in caplog.text)  # fmt: skip
    assert sorted(losses(out)) == [2, 3]
    # neither the AdamW kernel nor the frozen-bottom cache changes what the checkpoint means
    more = ["optim.max_steps=4", "optim.implementation=single", "model.text.cache_frozen=false", "--resume"]
    assert main([*base, *more]) == 0
    assert sorted(losses(out)) == [2, 3, 4]


def test_bad_command_lines_are_errors_not_tracebacks(folders, tmp_path: Path, capsys) -> None:
    assert main(["--config", str(TINY), "data.domains=[]"]) == 2
    assert "data.domains is empty" in capsys.readouterr().err
    assert main(["--config", str(TINY), "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["--config", str(TINY), f"data.domains=[{json.dumps(str(missing))}]", f"run.out_dir={missing}"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_throughput_meter_leaves_validation_and_checkpoint_time_out() -> None:
    meter = Meter()
    meter.start -= 10.0  # 10 s since the last log, of which a validation and a checkpoint took 4 and 1.5
    meter.exclude(4.0)
    meter.exclude(1.5)
    assert 4.5 <= meter.elapsed() < 5.0
    meter.restart()
    assert meter.excluded == 0.0 and meter.elapsed() < 1.0


def test_print_config_and_deepspeed(capsys) -> None:
    assert main(["--config", str(TINY), "--config", str(REPO / "launch/ds/zero3.toml"), "--print-deepspeed"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 8
    assert main(["--config", str(TINY), "optim.max_steps=7", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["max_steps"] == 7


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [lr_factor(s, warmup=4, max_steps=20, cosine=True, min_ratio=0.1) for s in range(25)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[20] == pytest.approx(0.1) and f[24] == pytest.approx(0.1)
    assert lr_factor(10, warmup=4, max_steps=20, cosine=False, min_ratio=0.1) == 1.0


def test_optimizer_groups(folders, tmp_path: Path) -> None:
    cfg = config(folders, tmp_path, "optim.encoder_lr=1e-5", "optim.weight_decay=0.05", "model.text.trainable=top")
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders), image_size=32)
    groups = param_groups(model, cfg.optim)
    name_of = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter once; frozen ones in none
    for g in groups:
        names = [name_of[id(p)] for p in g["params"]]
        if g["weight_decay"]:
            assert all(p.ndim >= 2 for p in g["params"]), names
            assert not any("position" in n or n.endswith("bias") for n in names), names
        if g["lr"] == 1e-5:
            assert all(n.startswith(("text.backbone", "image.backbone")) for n in names), names
    assert {g["lr"] for g in groups} == {1e-5, cfg.optim.lr}


@pytest.mark.parametrize("kind", ["score", "qformer"])
def test_fusions_with_their_own_parameters_train_under_deepspeed(folders, tmp_path: Path, kind: str) -> None:
    """Score fusion's temperature once was a 0-dim parameter, which DeepSpeed's initial broadcast refused."""
    more = [f"model.fusion.kind={kind}", "optim.max_steps=2", "optim.warmup_steps=1", "run.eval_every=0"]
    last = train(config(folders, tmp_path / kind, *more, "run.eval_users=8"))
    assert math.isfinite(last["loss/total"]) and "valid/ndcg@10" in last


def test_pretraining_validates_zero_shot_on_a_domain_it_does_not_train_on(folders, tmp_path: Path) -> None:
    """Trained on books, validated on movies only (not in the training stream): from step 0, so the best model is
    the one that transfers best, which may be the start."""
    out = tmp_path / "run"
    valid = f"data.valid_domains={json.dumps(folders[1:])}"
    cfg = config(folders[:1], out, "optim.max_steps=2", "optim.warmup_steps=1", valid, "run.eval_every=1",
                 "run.keep_best=true", "run.eval_users=0")  # fmt: skip
    summary = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = {r["step"]: r for r in rows if "valid/ndcg@10" in r}
    assert sorted(validations) == [0, 1, 2]
    assert {r["valid/users"] for r in validations.values()} == {30.0}  # movies' users, not books'
    best = max(validations, key=lambda s: (validations[s]["valid/ndcg@10"], -s))  # the first of equal scores
    assert summary["run/best_step"] == best and summary["run/best_score"] == validations[best]["valid/ndcg@10"]
    assert (out / "best" / "config.json").is_file()
