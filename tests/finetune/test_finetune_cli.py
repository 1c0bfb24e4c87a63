"""The finetune command through the pretrain engine: early stopping keeps the best and resumes into the same
decision, the summary and its logs, the ZeRO-3 save that gathers the adapter, and command-line errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from finetune import run as finetune_run
from finetune.__main__ import main
from finetune.export import WEIGHTS, load_finetuned
from pretrain import validate
from pretrain.paired import load_ranks
from tests.testutil import hold_lock, other_process

REPO = Path(__file__).resolve().parents[2]


def argv(pretrained: Path, domains: dict, out: Path, mode: str, *more: str) -> list[str]:
    return ["--from", str(pretrained), "--data", *domains["target"], "--mode", mode, f"run.out_dir={out}",
            "data.stream.num_workers=0", "engine.process_group_timeout_s=60", "optim.warmup_steps=1",
            *more]  # fmt: skip


def trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def script_validation(monkeypatch, scores: list[float]) -> list[dict[str, torch.Tensor]]:
    """Validations return ``scores`` in turn; the returned list receives the trained weights at each one."""
    snapshots: list[dict[str, torch.Tensor]] = []
    left = iter(scores)

    def scripted_validation(engine, cfg, folders, dist, factory):
        snapshots.append(trained(engine.module))
        return {"valid/ndcg@10": next(left), "valid/hr@10": 0.5}

    monkeypatch.setattr(validate, "quick_validation", scripted_validation)
    return snapshots


def test_early_stopping_keeps_the_best_and_resumes_into_the_same_stop(
    pretrained, domains, tmp_path: Path, monkeypatch, lone_process, caplog
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # best at step 2, then two validations without improvement
    snapshots = script_validation(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.9])
    out = tmp_path / "run"
    args = argv(pretrained, domains, out, "lora", "optim.max_steps=10", "run.eval_every=1", "run.log_every=2",
                "run.early_stop_patience=2", "run.save_every=100", "run.eval_at_start=false")  # fmt: skip
    caplog.set_level(logging.INFO, logger="finetune.run")
    assert main(args) == 0
    pretrained_optim = json.loads((pretrained / "config.json").read_text())["config"]["optim"]
    optim_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("optim:"))
    assert optim_line.startswith("optim: lr 0.001, encoder_lr = lr (from this run's config")  # finetune's defaults
    assert f"the pretrained run used lr {pretrained_optim['lr']}," in optim_line and "not inherited" in optim_line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["early_stopped"] and summary["best"] == {"step": 2, "valid/ndcg@10": 0.3}
    assert (out / "checkpoints/latest").read_text().strip() == "step00000004"  # saved where it stopped

    best, _, _ = load_finetuned(out / "best", merge=False)
    last, _, _ = load_finetuned(out / "model", merge=False)
    params_best, params_last = dict(best.named_parameters()), dict(last.named_parameters())
    assert all(torch.equal(params_best[n], t) for n, t in snapshots[1].items())  # the step-2 model
    assert all(torch.equal(params_last[n], t) for n, t in snapshots[3].items())  # the step-4 model
    assert any(not torch.equal(snapshots[1][n], snapshots[3][n]) for n in snapshots[1])

    params = summary["params"]
    assert params["all"]["trainable"] == sum(t.numel() for t in snapshots[0].values())
    assert params["user"]["trainable"] == 8 * 2 * 8 * 32  # LoRA r=8 on q/k/v/o of 2 blocks of width 32
    assert summary["transfer"]["skipped"] == ["interests", "prototype_of"]
    assert summary["time"]["s_per_epoch"] > 0 and summary["memory"]["peak_rss_gb"] > 0
    assert summary["test"]["test/users"] > 0 and 0 <= summary["test"]["test/full/ndcg@10"] <= 1  # of the best
    evaluated = sorted(out.glob("eval-*.json"))  # with every test user's rank, for paired comparisons
    assert [p.name.startswith("eval-start-") for p in evaluated] == [False, True]
    assert all(len(load_ranks(p)) == summary["test"]["test/users"] for p in evaluated)
    assert summary["test_start"]["test/users"] == summary["test"]["test/users"]  # the start, tested too
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["finetune/trainable_params"] == params["all"]["trainable"]
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"finetune/trainable_params", "finetune/s_per_epoch", "valid/ndcg@10"} <= set(acc.Tags()["scalars"])

    # resumed: the validations up to the checkpoint say it has stopped, so it trains no further
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 4 and again["early_stopped"] and again["best"]["step"] == 2
    assert again["time"]["s_per_epoch"] is None  # no step timed in the resumed process
    assert len(snapshots) == 4


def test_the_start_is_validated_and_kept_as_best_when_training_only_hurts(
    pretrained, domains, tmp_path: Path, monkeypatch, lone_process
) -> None:
    # step 0 (the pretrained model with fresh adapters) beats every later validation
    snapshots = script_validation(monkeypatch, [0.4, 0.1, 0.2, 0.3])
    out = tmp_path / "run"
    args = argv(pretrained, domains, out, "lora", "optim.max_steps=10", "run.eval_every=1", "run.early_stop_patience=2")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["early_stopped"] and summary["best"] == {"step": 0, "valid/ndcg@10": 0.4}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "valid/ndcg@10" in r] == [0, 1, 2]
    best, _, _ = load_finetuned(out / "best", merge=False)
    params_best = dict(best.named_parameters())
    assert all(torch.equal(params_best[n], t) for n, t in snapshots[0].items())  # the untouched start
    start, _, _ = load_finetuned(out / "start", merge=False)  # exported before the first step, and tested
    assert all(torch.equal(dict(start.named_parameters())[n], t) for n, t in snapshots[0].items())
    assert summary["test_start"] == summary["test"]  # the best is the start: the same model, the same numbers
    assert any(not torch.equal(snapshots[0][n], snapshots[2][n]) for n in snapshots[0])  # training did move it


def test_zero3_saves_the_gathered_lora_weights(pretrained, domains, tmp_path: Path, lone_process) -> None:
    out = tmp_path / "run"
    # threshold 0: every parameter is partitioned (by default small ones stay whole on every rank, and a save that
    # forgot to gather would pass); saved without GatheredParameters, these tensors come out empty (checked)
    persistence = "engine.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
    # validation builds its full copy with finetune's model factory (LoRA layers and all), then the test evaluation
    more = ["--config", str(REPO / "launch/ds/zero3.toml"), "optim.max_steps=1", persistence]
    assert main(argv(pretrained, domains, out, "lora", *more)) == 0
    saved = safetensors.torch.load_file(str(out / "model" / WEIGHTS))
    lora_b = {n: t for n, t in saved.items() if ".lora_B." in n}
    assert len(lora_b) == 12 and all(t.shape == (32, 8) for t in lora_b.values())
    assert all(t.abs().sum() > 0 for t in lora_b.values())  # trained from zeros
    model, cfg, _ = load_finetuned(out / "model")
    assert cfg.engine.zero_stage == 3 and not model.training
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["step"] in (0, 1) and 0 <= summary["test"]["test/full/ndcg@10"] <= 1  # start validated
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "valid/ndcg@10" in r] == [0, 1]  # ZeRO-3's full copy before any step too
    assert summary["test"]["test/users"] > 0


def test_print_config_inherits_the_pretrained_model_and_applies_the_mode(pretrained, domains, capsys) -> None:
    args = ["--from", str(pretrained), "--data", *domains["target"], "model.user.dropout=0.3", "--mode", "top",
            "finetune.top_layers=1", "--print-config"]  # fmt: skip
    assert main(args) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["user"]["width"] == 32 and cfg["model"]["user"]["dropout"] == 0.3  # pretrained, then ours
    assert cfg["model"]["text"]["trainable"] == "top" and cfg["model"]["text"]["top_layers"] == 1
    assert cfg["data"]["domains"] == domains["target"] and cfg["data"]["valid_domains"] is None
    assert cfg["run"]["out_dir"] == "runs/finetune" and cfg["run"]["keep_best"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "finetune.from_path is not set: pass --from"),
        (["--from", "{tmp}/nowhere", "--data", "{target}"], "nowhere does not exist"),
        (["--from", "{tmp}", "--data", "{target}"], "not a momrec pretrained export"),
        (["--from", "{pretrained}"], "data.domains is empty: name the target domain folders with --data"),
        (["--from", "{pretrained}", "--data", "{target}", "finetune.lora_rank=0"], "finetune.lora_rank must be >= 1"),
        (["--from", "{pretrained}", "--data", "{target}", "finetune.mode=peft"], "finetune.mode must be one of"),
        (["--from", "{pretrained}", "--data", "{target}", "finetune.lora_rnk=4"], "did you mean finetune.lora_rank"),
        (["--from", "{pretrained}", "--data", "{target}", "run.early_stop_patience=2", "run.eval_every=0"],
         "run.early_stop_patience needs run.eval_every > 0"),
        (["--from", "{pretrained}", "--data", "{target}", "data.valid_domains=[]"],
         "run.keep_best needs validation: data.valid_domains is []"),
        (["--from", "{pretrained}", "--data", "{target}", "finetune.from_path=none"], "disagree: give one"),
    ],
)  # fmt: skip
def test_bad_command_lines_are_errors_not_tracebacks(
    pretrained, domains, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    fill = {"tmp": str(tmp_path), "target": domains["target"][0], "pretrained": str(pretrained)}
    assert main([a.format(**fill) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_a_lora_target_typo_stops_the_run_with_exit_2(pretrained, domains, tmp_path: Path, capsys, lone_process):
    args = argv(pretrained, domains, tmp_path / "run", "lora", "finetune.lora_user_targets=q_proj,qv_proj")
    assert main(args) == 2
    assert "finetune.lora_user_targets: 'qv_proj' matches no" in capsys.readouterr().err


def test_a_finetuning_holds_its_folder_until_its_summary_is_written(
    pretrained, domains, tmp_path: Path, capsys, monkeypatch, lone_process
) -> None:
    out = tmp_path / "run"
    args = argv(pretrained, domains, out, "adapter", "optim.max_steps=1", "run.eval_every=0", "run.eval_at_start=false")
    with other_process() as proc:  # another finetuning, alive, writes into the folder
        hold_lock(out, proc.pid)
        assert main(args) == 2
    assert f"error: run.out_dir {out} is held by another process (host " in capsys.readouterr().err
    hold_lock(out, 1, host="node-that-died")  # another host's: honoured, unless forced
    assert main(args) == 2 and "host node-that-died, pid 1" in capsys.readouterr().err

    holders = []
    write_summary = finetune_run._write_summary

    def watched(cfg, summary) -> None:
        holders.append(json.loads((out / ".lock").read_text())["pid"])
        write_summary(cfg, summary)

    monkeypatch.setattr(finetune_run, "_write_summary", watched)
    assert main([*args, "--force-unlock"]) == 0
    assert holders == [os.getpid()] and not (out / ".lock").exists()


def test_an_unknown_mode_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--mode", "peft"])
    assert exit_.value.code == 2 and "invalid choice: 'peft'" in capsys.readouterr().err


def test_the_mode_benchmark_times_every_mode_side_by_side(pretrained, domains, capsys, lone_process) -> None:
    from benchmarks.finetune_modes import main as bench

    argv = ["--from", str(pretrained), "--data", *domains["target"], "--steps", "2", "--modes", "full", "lora",
            "lora_top1", "adapter"]  # fmt: skip
    assert bench(argv) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["full", "lora", "lora_top1", "adapter"]
    trainable = {mode: int(row[1].replace(",", "")) for mode, row in rows.items()}
    assert trainable["full"] > trainable["lora"] > trainable["lora_top1"] > trainable["adapter"] > 0
    assert rows["full"][-1] == "1.00x"
    assert bench([*argv[:-4], "lora_topx"]) == 2
    assert "unknown mode 'lora_topx'" in capsys.readouterr().err


def test_the_benchmark_gives_overrides_after_data_back_to_the_overrides() -> None:
    from benchmarks.finetune_modes import parse_args

    args = parse_args(["--from", "none", "--data", "a", "b", "optim.lr=0.1", "--steps", "3"])
    assert args.data == ["a", "b"] and args.overrides == ["optim.lr=0.1"] and args.steps == 3
