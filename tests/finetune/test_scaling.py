"""The scaling study: the grid, its config, and one real sweep on tiny shards (every run a real subprocess of
python -m pretrain / python -m finetune), re-run to show that finished cells are skipped and failed ones retried,
with the figure and the TensorBoard events read back."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.scaling import ScalingConfig, Study, grid, load_study
from finetune.scaling import __main__ as cli
from finetune.scaling.grid import Cell, Layout
from finetune.scaling.results import COLUMNS, read
from pretrain.config import to_dict
from shards.schema import load_manifest
from tests.testutil import hold_lock, other_process

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch/configs/tiny.toml"
FAULTS = REPO / "tests/reliability/faults"
SMALL = ["data.stream.num_workers=0", "data.stream.batch_size=6", "engine.process_group_timeout_s=60"]


def study_config(domains: dict[str, list[str]], out: Path, **more) -> ScalingConfig:
    fields = dict(
        sources=domains["source"],
        target=domains["target"][0],
        source_fractions=[0.0, 1.0],
        target_fractions=[0.5],
        seeds=[0],
        mode="adapter",
        control_mode="full",
        pretrain_config=[str(TINY)],
        pretrain_overrides=[*SMALL, "optim.max_steps=2", "optim.warmup_steps=1", "run.eval_every=0"],
        finetune_overrides=[
            *SMALL,
            "optim.max_steps=2",
            "optim.warmup_steps=1",
            "run.eval_every=0",
            "run.eval_users=8",
        ],  # fmt: skip
        baseline_config=[str(REPO / "launch/configs/sasrec_id.toml")],
        baseline_overrides=[*SMALL, "optim.max_steps=3", "optim.warmup_steps=1", "run.eval_every=0"],
        out_dir=str(out),
        retries=0,
    )
    fields.update(more)
    return ScalingConfig(**fields)


# ---- config and grid ------------------------------------------------------------------------------------


def test_grid_groups_cells_by_source_fraction_then_the_id_baselines() -> None:
    cfg = ScalingConfig(source_fractions=[1.0, 0.0], target_fractions=[0.5, 0.25], seeds=[3, 4])
    cells = grid(cfg)
    assert len(cells) == 2 * 2 * 2 + 2 * 2
    assert [c.source_fraction for c in cells[:8]] == [0.0] * 4 + [1.0] * 4
    assert cells[0] == Cell("content", 0.0, 0.25, 3) and cells[0].name == "src0-tgt0.25-seed3"
    assert {c.kind for c in cells[8:]} == {"id"} and cells[8].name == "id-tgt0.25-seed3"
    assert len(grid(ScalingConfig(id_baseline=False))) == 4 * 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scaling.target_fractions=[0.0, 1.0]", r"target_fractions.*\(0, 1\]"),
        ("scaling.source_fractions=[0.5, 0.5]", "repeats a value"),
        ("scaling.seeds=[]", "scaling.seeds"),
        ("scaling.mode=big", "scaling.mode"),
        ("scaling.sorces=[]", "did you mean scaling.sources"),
    ],
)
def test_bad_study_configs_are_errors_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_study([], [override])


def test_the_control_mode_defaults_to_the_transfer_mode_and_reports_say_whether_arms_match() -> None:
    from finetune.scaling.report import arms

    assert ScalingConfig(mode="frozen").control == "frozen" and ScalingConfig(control_mode="full").control == "full"
    rows = [{"kind": "content", "source_fraction": f, "mode": m} for f, m in (("0", "top"), ("0.5", "top"))]
    assert arms(rows).startswith("Pretrained cells and their no-pretraining controls finetune in the same mode (top)")
    rows[0]["mode"] = "full"
    assert arms(rows).startswith("NOT matched arms: pretrained cells finetune in mode top, the no-pretraining "
                                 "controls in mode full")  # fmt: skip


def test_gains_reach_the_cells_hparams() -> None:
    from finetune.scaling.report import _hparams

    row = {c: "" for c in COLUMNS} | {"cell": "src1-tgt0.5-seed0", "kind": "content", "mode": "frozen", "seed": "0",
                                      "target_fraction": "0.5", "target_users": "15", "source_fraction": "1",
                                      "source_interactions": "900", "trainable_params": "10", "wall_s": "3",
                                      "ndcg@10": "0.2", "gain_ndcg@10": "0.05", "gain_ndcg@10_low": "0.01",
                                      "gain_ndcg@10_high": "0.09"}  # fmt: skip
    _, metrics = _hparams(row)
    assert metrics["test/gain_ndcg@10"] == 0.05 and metrics["test/gain_ndcg@10_low"] == 0.01
    assert "test/gain_hr@10" not in metrics  # an empty cell is no number


def test_every_shipped_study_file_loads() -> None:
    files = sorted((REPO / "launch" / "studies").glob("*.toml"))
    real = {"games_office.toml", "games_office_top.toml", "ml100k_frozen.toml", "ml100k_top.toml"}
    assert {f.name for f in files} >= {"demo.toml", *real}
    for path in files:
        cfg = load_study([path])
        assert cfg.target and cfg.sources and len(grid(cfg)) >= 4
        assert cfg.control == cfg.mode, path  # matched arms
        if path.name in real:  # whole sources, scarce targets, several seeds
            assert max(cfg.source_fractions) == 1.0 and min(cfg.target_fractions) <= 0.05 and len(cfg.seeds) >= 2


def test_cli_errors_and_help(tmp_path: Path, capsys) -> None:
    assert cli.main(["--help-config"]) == 0
    assert "scaling.source_fractions: list[float]" in capsys.readouterr().out
    assert cli.main(["scaling.source_fractions=[2.0]"]) == 2
    assert "must lie in [0, 1]" in capsys.readouterr().err
    assert cli.main([f"scaling.out_dir={tmp_path}", "--dry-run"]) == 2  # no target
    assert "scaling.target" in capsys.readouterr().err


def test_a_second_study_into_a_held_folder_is_refused(domains, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    settings = [f"scaling.{k}={json.dumps(v)}" for k, v in to_dict(study_config(domains, out)).items() if v != []]
    with other_process() as proc:
        hold_lock(out, proc.pid)
        assert cli.main(settings) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: scaling.out_dir {out} is held by another process (host {socket.gethostname()}, "
                          f"pid {proc.pid}, since 2025-01-02 03:04:05 +0000") and err.count("\n") == 1  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written: no study.json, no subsets
    hold_lock(out, 1, host="node-that-died")  # another host's study: honoured unless forced
    assert cli.main([*settings, "--dry-run"]) == 0 and cli.main(settings) == 2
    assert "host node-that-died" in capsys.readouterr().err


def test_a_run_that_exits_2_is_not_retried_but_a_crashed_one_is(domains, tmp_path: Path, caplog) -> None:
    study = Study(study_config(domains, tmp_path, retries=2), progress=False)
    calls = []

    def run_module(code: int) -> Callable[[str, Sequence[str], Path], int]:
        def run(module: str, args: Sequence[str], log_file: Path) -> int:
            calls.append(code)
            with log_file.open("a") as f:
                f.write(f"error: attempt {len(calls)}\n")
            return code

        return run

    for code, attempts in ((2, 1), (1, 3), (-9, 3)):
        calls.clear()
        study.run_module = run_module(code)
        with caplog.at_level(logging.WARNING, logger="finetune.scaling.runner"):
            assert not study._attempts(f"cell{code}", "finetune", [], tmp_path / f"run{code}")
        assert calls == [code] * attempts
    assert caplog.text.count("not tried again") == 1 and "cell2: failed with a config or input error" in caplog.text
    assert caplog.text.count("cell1: attempt") == 3 and caplog.text.count("cell-9: attempt") == 3


def test_target_subsets_are_nested_per_seed(domains, tmp_path: Path) -> None:
    layout = Layout(study_config(domains, tmp_path))
    users = {(f, s): load_manifest(layout.target(f, s)).n_users for f in (0.25, 0.5) for s in (0, 1)}
    assert users == {(0.25, 0): 8, (0.25, 1): 8, (0.5, 0): 15, (0.5, 1): 15}
    assert layout.target(1.0, 0) == domains["target"][0]  # the whole domain is not copied
    assert layout.sources(1.0, 0) == domains["source"]


def test_pretraining_per_seed_gets_its_own_sources_and_run(domains, tmp_path: Path) -> None:
    shared = Layout(study_config(domains, tmp_path / "shared", seeds=[0, 1]))
    assert shared.pretrain_dir(0.5, 0) == shared.pretrain_dir(0.5, 1) == tmp_path / "shared/pretrain/source-0.5"
    assert shared.sources(0.5, 0) == shared.sources(0.5, 1)
    own = Layout(study_config(domains, tmp_path / "own", seeds=[0, 1], pretrain_per_seed=True))
    assert own.pretrain_dir(0.5, 1) == tmp_path / "own/pretrain/source-0.5-seed1"
    first, second = own.sources(0.5, 0), own.sources(0.5, 1)
    assert first != second and all("source-0.5-seed" in f for f in first + second)
    assert [load_manifest(f).n_users for f in (first[0], second[0])] == [15, 15]
    assert _contents(first[0]) != _contents(second[0])  # drawn with each seed
    assert own.sources(1.0, 1) == domains["source"]  # the whole domains are not copied


def test_a_target_smaller_than_one_batch_gets_the_batch_it_fills(domains, tmp_path: Path) -> None:
    study = Study(study_config(domains, tmp_path), progress=False)
    target = study.layout.target(0.5, 0)  # 15 users
    cell = Cell("id", None, 0.5, 0)
    sasrec = [str(REPO / "launch/configs/sasrec_id.toml")]  # batches of 128
    assert study._fit_batch(cell, target, sasrec, []) == ["data.stream.batch_size=15"]
    assert study._fit_batch(cell, target, sasrec, ["data.stream.batch_size=6"]) == []
    args = study._cell_args(cell, target)
    assert args is not None and "data.stream.batch_size=15" not in args  # the study's baseline batch (6) fits


def _contents(folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).glob("seqs-*")}


def _fake_cell(study: Study, cell: Cell, ranks: dict[int, int], interactions: int) -> None:
    """A finished cell: its results.csv row and its per-user test ranks."""
    from finetune.scaling import results

    folder = study.layout.cell_dir(cell)
    folder.mkdir(parents=True)
    users = sorted(ranks)
    doc = {"per_user": {"test": {"user": users, "full": [ranks[u] for u in users]}}}
    (folder / "eval-target.json").write_text(json.dumps(doc))
    row = {"cell": cell.name, "kind": "content", "source_fraction": f"{cell.source_fraction:g}",
           "target_fraction": f"{cell.target_fraction:g}", "seed": cell.seed,
           "source_interactions": interactions if cell.source_fraction else 0}  # fmt: skip
    results.append(study.layout.results, row)


def test_the_gain_pooled_over_seeds_averages_each_users_difference(domains, tmp_path: Path) -> None:
    from finetune.scaling import report

    cfg = study_config(domains, tmp_path, source_fractions=[0.0, 0.5, 1.0], seeds=[0, 1], id_baseline=False)
    study = Study(cfg, progress=False)
    users = range(40)
    for seed in (0, 1):
        _fake_cell(study, Cell("content", 0.0, 0.5, seed), {u: 100 for u in users}, 0)  # NDCG 0: never in the top
    # pretrained: seed 0 ranks the even users first (NDCG 1), seed 1 every user first: per user 1 or 0.5
    _fake_cell(study, Cell("content", 1.0, 0.5, 0), {u: 0 if u % 2 == 0 else 100 for u in users}, 600)
    _fake_cell(study, Cell("content", 1.0, 0.5, 1), {u: 0 for u in users}, 600)
    _fake_cell(study, Cell("content", 0.5, 0.5, 0), {u: 0 for u in users}, 300)  # one seed: nothing pooled
    (row,) = study.pooled_gains()
    assert (row["source_fraction"], row["target_fraction"], row["seeds"], row["users"]) == ("1", "0.5", "0 1", 40)
    assert row["source_interactions"] == "600"
    assert row["gain_ndcg@10"] == pytest.approx(0.75) and row["gain_hr@10"] == pytest.approx(0.75)
    assert 0.0 < row["gain_ndcg@10_low"] < 0.75 < row["gain_ndcg@10_high"] < 1.0
    md = report.markdown(read(study.layout.results), [row])
    assert "**pooled s0+s1: +0.7500 [" in md and "gain**" in md


# ---- one real sweep ------------------------------------------------------------------------------------


class Runs:
    """The study's real subprocess runner, recording calls. Runs named in ``break_first`` get an invalid override
    the first time (a config error: the process exits 2); runs named in ``crash_first`` are SIGKILLed the first
    time, right after their second step, with a checkpoint of their first (tests/reliability/faults injects it)."""

    def __init__(self, study: Study, break_first: Sequence[str] = (), crash_first: Sequence[str] = ()) -> None:
        self.study, self.break_first, self.crash_first, self.calls = study, set(break_first), set(crash_first), []
        study.run_module = self

    def __call__(self, module: str, args: Sequence[str], log_file: Path) -> int:
        self.calls.append((module, log_file.stem))
        if log_file.stem in self.break_first:
            self.break_first.discard(log_file.stem)
            args = [*args, "optim.max_steps=0"]
        if log_file.stem in self.crash_first:
            self.crash_first.discard(log_file.stem)
            with mock.patch.dict(os.environ, _killed_after_step(2)):
                return self.study._subprocess(module, [*args, "run.save_every=1"], log_file)
        return self.study._subprocess(module, args, log_file)


def _killed_after_step(step: int) -> dict[str, str]:
    """The environment of a one-rank run that SIGKILLs itself after optimizer step ``step`` (the fault injection
    reads RANK when the interpreter starts, so the launcher's variables are set as a launcher would)."""
    from pretrain.distributed import free_port

    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "MOMREC_FAULT": f"kill:train:{step}:0", "RANK": "0", "WORLD_SIZE": "1",
            "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip


def test_a_sweep_runs_skips_finished_cells_and_retries_failed_ones(
    domains, tmp_path: Path, lone_process, caplog
) -> None:
    out = tmp_path / "study"
    # 1: the ID cell fails with a config error (exit 2): not retried, though retries=1; the content cells finish,
    # the study reports one failure
    runs = Runs(Study(study_config(domains, out, retries=1), progress=False), break_first=["id-tgt0.5-seed0"])
    with caplog.at_level(logging.WARNING, logger="finetune.scaling.runner"):
        assert runs.study.run() == 1
    assert runs.calls == [("finetune", "src0-tgt0.5-seed0"), ("pretrain", "source-1"),
                          ("finetune", "src1-tgt0.5-seed0"), ("finetune", "id-tgt0.5-seed0")]  # fmt: skip
    assert "optim.max_steps must be >= 1" in (out / "logs" / "id-tgt0.5-seed0.log").read_text()
    assert caplog.text.count("id-tgt0.5-seed0: failed with a config or input error (exit 2), not tried again") == 1
    assert caplog.text.count("optim.max_steps must be >= 1") == 1  # the log's tail, once
    assert [r["cell"] for r in read(out / "results.csv")] == ["src0-tgt0.5-seed0", "src1-tgt0.5-seed0"]

    # 2: a re-run retries only the failed cell; its first attempt is killed after a checkpoint, the retry
    # (retries=1) resumes from it, taking over the lock the killed run left, and succeeds
    runs = Runs(Study(study_config(domains, out, retries=1), progress=False), crash_first=["id-tgt0.5-seed0"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.scaling.runner"):
        assert runs.study.run() == 0
    assert runs.calls == [("finetune", "id-tgt0.5-seed0")] * 2
    assert "id-tgt0.5-seed0: attempt 1 of 2 failed (exit -9)" in caplog.text
    retry = (out / "logs" / "id-tgt0.5-seed0.log").read_text().rsplit("\n$ ", 1)[1]
    assert retry.split("\n", 1)[0].endswith("--resume")
    assert "taking over the lock of a run that is no longer running" in retry and "resumed from step 1" in retry
    assert "resuming with changed settings: run.save_every 1 -> " in retry
    assert not (out / ".lock").exists() and not (out / "runs" / "id-tgt0.5-seed0" / ".lock").exists()

    # 3: everything finished: nothing runs
    runs = Runs(Study(study_config(domains, out), progress=False))
    assert runs.study.run() == 0 and runs.calls == []
    with pytest.raises(ValueError, match="mode differ"):
        Study(study_config(domains, out, mode="lora"), progress=False).run()

    rows = {r["cell"]: r for r in read(out / "results.csv")}
    assert list(rows) == ["src0-tgt0.5-seed0", "src1-tgt0.5-seed0", "id-tgt0.5-seed0"]
    _check_rows(rows)
    _check_reports(out, rows)


def _check_rows(rows: dict[str, dict[str, str]]) -> None:
    control, pretrained, ident = rows["src0-tgt0.5-seed0"], rows["src1-tgt0.5-seed0"], rows["id-tgt0.5-seed0"]
    assert control["mode"] == "full" and pretrained["mode"] == "adapter" and ident["mode"] == "full"
    assert (control["source_users"], pretrained["source_users"]) == ("0", "60")  # 2 sources x 30 users
    assert {r["target_users"] for r in rows.values()} == {"15"}  # half of the target's 30 users
    assert int(pretrained["trainable_params"]) < int(pretrained["total_params"])
    assert control["trainable_params"] == control["total_params"]
    for row in rows.values():
        assert 0.0 <= float(row["ndcg@10"]) <= float(row["hr@10"]) <= 1.0
        assert row["pop_ndcg@10"] == control["pop_ndcg@10"]  # all ranked on the whole target's test split
    assert pretrained["pretrain_s"] and not control["pretrain_s"]
    for row in rows.values():  # the cold and tail targets' share of the test users, and their metrics
        users = {b: int(row[f"users_{b}"]) for b in ("cold", "tail")}
        assert sum(users.values()) <= 30 and users["tail"] > 0
        for bucket, n in users.items():
            assert (row[f"ndcg@10_{bucket}"] == "") == (n == 0)
            assert n == 0 or 0.0 <= float(row[f"ndcg@10_{bucket}"]) <= float(row[f"hr@10_{bucket}"]) <= 1.0
    for metric in ("ndcg@10", "hr@10"):  # the paired gain over the control, on the same test users
        gain, low, high = (float(pretrained[f"gain_{metric}{end}"]) for end in ("", "_low", "_high"))
        assert gain == pytest.approx(float(pretrained[metric]) - float(control[metric]), abs=2e-6)
        assert low <= gain <= high
        assert control[f"gain_{metric}"] == ident[f"gain_{metric}"] == ""
        for row in (control, pretrained):  # zero-shot: the start of finetuning, tested before any step
            assert 0.0 <= float(row[f"start_{metric}"]) <= 1.0


def _check_reports(out: Path, rows: dict[str, dict[str, str]]) -> None:
    assert cli.main(["--report", f"scaling.out_dir={out}", *_cli_settings(out)]) == 0
    with Image.open(out / "scaling.png") as png:
        assert png.size[0] > 500 and png.size[1] > 300
    md = (out / "scaling.md").read_text()
    assert "| 0.5 (15) |" in md and "NOT matched arms: pretrained cells finetune in mode adapter" in md
    assert "## gain over no pretraining, test NDCG@10" in md and "| 0.5 | s0: " in md
    tail = rows["id-tgt0.5-seed0"]
    assert "## test NDCG@10, tail targets only" in md
    assert f"| 0.5 ({tail['users_tail']}) | {float(rows['src0-tgt0.5-seed0']['ndcg@10_tail']):.4f} |" in md
    assert f"| {float(tail['ndcg@10_tail']):.4f} |\n" in md  # the ID baseline's column, no popularity column
    assert (
        "## zero-shot: the start of finetuning" in md
        and f"| 1 | {float(rows['src1-tgt0.5-seed0']['start_ndcg@10']):.4f}" in md
    )
    curves = EventAccumulator(str(out / "tb" / "curves")).Reload()
    steps = [e.step for e in curves.Scalars("ndcg@10/target_0.5")]
    assert steps == [0, int(rows["src1-tgt0.5-seed0"]["source_interactions"])]
    values = [e.value for e in curves.Scalars("ndcg@10/target_0.5")]
    assert values == pytest.approx([float(rows[c]["ndcg@10"]) for c in ("src0-tgt0.5-seed0", "src1-tgt0.5-seed0")])
    assert [e.value for e in curves.Scalars("hr@10/id_target_0.5")] == pytest.approx([float(rows["id-tgt0.5-seed0"]
                                                                                         ["hr@10"])] * 2)  # fmt: skip
    assert curves.Tags()["images"] == ["scaling"]
    assert curves.PluginTagToContent("custom_scalars")
    for cell in rows:
        run = EventAccumulator(str(out / "tb" / "cells" / cell)).Reload()
        assert run.PluginTagToContent("hparams"), cell
    with (out / "results.csv").open() as f:
        assert tuple(next(csv.reader(f))) == COLUMNS


def _cli_settings(out: Path) -> list[str]:
    """The saved settings as overrides, so the CLI's --report opens the same study."""
    saved = json.loads((out / "study.json").read_text())
    return [f"scaling.{k}={json.dumps(v)}" for k, v in saved.items() if v not in ([], "")]
