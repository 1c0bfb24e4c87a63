"""pretrain.config (on pretrain.configlib): defaults, precedence, errors that name the key, values that follow
another key, round trips, the derived DeepSpeed config, and every shipped config file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pretrain.config import (
    EngineConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    UserEncoderConfig,
    config_help,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from pretrain.configlib import all_keys
from pretrain.ds_config import deepspeed_config
from shards.stream_config import default_text_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.toml"
BASES = sorted((ROOT / "launch").glob("**/configs/*.toml"))
STUDIES = ROOT / "launch" / "studies"  # scaling-study files: another schema, tested in tests/finetune
FRAGMENTS = sorted(p for p in (ROOT / "launch").glob("**/*.toml") if p not in BASES and STUDIES not in p.parents)


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- defaults and precedence ------------------------------------------------------------------------------


def test_defaults_are_valid_and_what_load_gives_without_input() -> None:
    cfg = TrainConfig()
    assert load_config(None, []) == cfg
    assert cfg.model.text.name_or_path == default_text_model() == cfg.data.stream.text_model
    assert cfg.model.user.max_seq_len >= cfg.data.stream.max_seq_len


def test_precedence_cli_over_later_file_over_earlier_file_over_defaults(tmp_path: Path) -> None:
    text = "[optim]\nlr = 0.5\nmax_steps = 7\nwarmup_steps = 1\n[data.stream]\nbatch_size = 4\n"
    base = write(tmp_path, text, "base.toml")
    frag = write(tmp_path, "[optim]\nmax_steps = 9\n", "frag.toml")
    cfg = load_config([base, frag], ["optim.lr=0.25"])
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.data.stream.batch_size) == (0.25, 9, 4)
    assert cfg.optim.weight_decay == OptimConfig().weight_decay  # untouched: the default
    assert load_config(str(base)).optim.lr == 0.5  # a single path works too


def test_tables_merge_key_by_key_including_free_form_ones(tmp_path: Path) -> None:
    base = write(tmp_path, "[model.text.config_overrides]\nhidden_size = 32\nnum_hidden_layers = 2\n", "a.toml")
    cfg = load_config([base], ["model.text.config_overrides.num_hidden_layers=1"])
    assert cfg.model.text.config_overrides == {"hidden_size": 32, "num_hidden_layers": 1}


def test_cli_values_toml_literals_strings_lists_and_none() -> None:
    cfg = load_config(
        None,
        [
            "data.domains=shards/a, shards/b",  # not TOML: a comma-separated list of strings
            "data.valid_domains=['shards/c']",
            "run.out_dir=2024",  # a string field keeps the raw text
            "optim.encoder_lr=1e-5",
            "optim.betas=[0.8, 0.9]",
            "engine={zero_stage = 2, seed = 3}",  # a whole section as an inline table
            "--engine.deepspeed.zero_optimization.overlap_comm=true",
        ],
    )
    assert cfg.data.domains == ["shards/a", "shards/b"]
    assert cfg.data.valid_domains == ["shards/c"]
    assert cfg.run.out_dir == "2024"
    assert cfg.optim.encoder_lr == 1e-5 and cfg.optim.betas == (0.8, 0.9)
    assert (cfg.engine.zero_stage, cfg.engine.seed) == (2, 3)
    assert cfg.engine.deepspeed == {"zero_optimization": {"overlap_comm": True}}
    assert load_config(None, ["optim.encoder_lr=1e-5", "optim.encoder_lr=none"]).optim.encoder_lr is None


# ---- errors name the key (and where it came from) ---------------------------------------------------------


def test_unknown_key_in_file_names_the_dotted_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[model.text]\npoolng = 'cls'\n")
    with pytest.raises(ValueError, match=r"'model\.text\.poolng'.*run\.toml.*did you mean model\.text\.pooling"):
        load_config(path)
    with pytest.raises(ValueError, match=r"unknown config key 'modle'.*did you mean model"):
        load_config(write(tmp_path, "[modle.user]\nwidth = 8\n", "b.toml"))


def test_unknown_cli_key_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"'optim\.warmup'.*command-line.*did you mean optim\.warmup_steps"):
        load_config(None, ["optim.warmup=3"])
    with pytest.raises(ValueError, match="not of the form"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lr\.x'"):
        load_config(None, ["optim.lr.x=1"])


@pytest.mark.parametrize(
    ("toml", "pattern"),
    [
        ("[data]\ndomains = 3", r"data\.domains: expected list\[str\], got int 3"),
        ("[data]\ndomains = ['a', 2]", r"data\.domains\[1\]: expected str, got int"),
        ("[optim]\nlr = 'fast'", r"optim\.lr: expected float"),
        ("[optim]\nbetas = [0.9]", r"optim\.betas: expected 2 values"),
        ("[model.user]\nlayers = 2.5", r"model\.user\.layers: expected int, got float"),
        ("[engine]\nzero_stage = true", r"engine\.zero_stage must be one of 0, 1, 2, 3; got True"),
        ("[engine]\nzero_stage = 4", r"engine\.zero_stage must be one of"),
        ("[data.stream]\nbatch_size = '8'", r"data\.stream\.batch_size: expected int, got str"),
        ("[data.stream]\nsplit = 'dev'", r"data\.stream\.split must be one of 'train', 'valid', 'test'"),
        ("model = 3", r"model: expected table, got int"),
        ("[model.text]\nconfig_overrides = 3", r"model\.text\.config_overrides: expected dict"),
    ],
)
def test_type_errors_name_the_key_and_the_file(tmp_path: Path, toml: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern + r".*run\.toml"):
        load_config(write(tmp_path, toml))


def test_fp16_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"engine\.precision must be one of 'fp32', 'bf16'; got 'fp16' \(fp16 is"):
        load_config(None, ["engine.precision=fp16"])
    with pytest.raises(ValueError, match="not supported on your device"):
        EngineConfig(precision="fp16")  # type: ignore[arg-type]


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run\.toml: not valid TOML"):
        load_config(write(tmp_path, "[optim\nlr = 1"))
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["data.stream.max_seq_len=60"], r"model\.user\.max_seq_len \(50\) must be >= data\.stream\.max_seq_len \(60"),
        (["data.stream.batch_size=0"], r"data\.stream: batch_size must be >= 1"),
        (["data.stream.text_model=bert-base-uncased"], r"model\.text\.name_or_path .*data\.stream\.text_model"),
        (["loss.content_id=0.1"], r"loss\.content_id needs model\.user\.id_embeddings"),
        (
            ["loss.gather_negatives=true", "model.fusion.kind=score", "model.image.enabled=true"],
            r"loss\.gather_negatives is not supported with model\.fusion\.kind='score'",
        ),
        (["loss.softmax=0"], r"loss needs a positive weight"),
        (["model.image.enabled=false", "model.fusion.kind=score"], r"model\.fusion\.kind is 'score', which comb"),
        (["model.text.enabled=false", "model.image.enabled=false"], r"model\.text\.enabled or model\.image\.enabled"),
        (["model.user.heads=3"], r"model\.user\.width \(128\) must be divisible by heads"),
        (
            ["model.image.trainable=top", "data.stream.augment=true"],
            r"model\.image\.cache_frozen \(default true\) cannot be combined with data\.stream\.augment",
        ),
        (["model.image.init=pretrained"], r"model\.image\.name_or_path is needed"),
        (["model.image.config_overrides.image_size=64"], r"model\.image\.config_overrides\.image_size"),
        (["model.text.config_overrides.max_position_embeddings=8"], r"max_position_embeddings \(8\) must be >="),
        (["engine.offload_optimizer=true"], r"engine\.offload_optimizer needs engine\.zero_stage >= 1"),
        (["data.domains=a,a"], r"data\.domains lists \['a'\] more than once"),
        (["loss.cpc=1", "loss.cpc_prefix=50"], r"loss\.cpc_prefix \(50\) must be < data\.stream\.max_seq_len"),
    ],
)
def test_value_and_cross_section_rules_name_the_fields(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_config(None, overrides)


def test_frozen_towers_are_cached_by_default_and_an_unfrozen_one_needs_nothing_turned_off() -> None:
    cfg = load_config(None, ["model.text.trainable=none"])
    assert cfg.model.text.cache_frozen and cfg.model.image.cache_frozen
    load_config(None, ["model.text.trainable=all"])  # nothing frozen: the cache stays unused, not an error
    load_config(None, ["data.stream.augment=true"])  # the image tower trains whole by default: nothing cached
    load_config(None, ["model.image.trainable=none", "model.image.cache_frozen=false", "data.stream.augment=true"])


def test_sections_validate_when_built_in_python() -> None:
    with pytest.raises(ValueError, match=r"optim\.lr must be > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"optim\.warmup_steps \(20\) must be <= optim\.max_steps \(10\)"):
        OptimConfig(warmup_steps=20, max_steps=10)  # built in Python nothing is fitted (fit_warmup is loading's)
    with pytest.raises(ValueError, match=r"model\.user\.max_seq_len"):
        TrainConfig(model=ModelConfig(user=UserEncoderConfig(max_seq_len=10)))  # the stream's window stays 50


# ---- each value in one key ------------------------------------------------------------------------------------


def test_a_warmup_set_longer_than_the_run_is_cut_to_a_tenth_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="pretrain.config"):
        cfg = load_config(ROOT / "launch/configs/small_cpu.toml", ["optim.max_steps=16"])  # its warm-up is 20
    assert (cfg.optim.warmup_steps, cfg.optim.max_steps) == (1, 16)
    lines = [r.getMessage() for r in caplog.records if r.name == "pretrain.config"]
    assert lines == ["optim.warmup_steps (20) is longer than the run, optim.max_steps (16): warming up for 1 steps "
                     "instead (a tenth of the run)"]  # fmt: skip
    save_config(cfg, tmp_path / "config.json")  # the saved config tells the warm-up used, and loads without a word
    caplog.clear()
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["warmup_steps"] == 1
    assert load_config(tmp_path / "config.json") == cfg and not caplog.records


@pytest.mark.parametrize(
    ("overrides", "warmup"),
    [
        (["optim.max_steps=30"], 3),  # the default (100) is cut to a tenth of a short run
        (["optim.max_steps=5"], 0),
        (["optim.max_steps=999"], 99),
        (["optim.max_steps=1000"], 100),  # from 1000 steps on the default holds
        (["optim.max_steps=30", "optim.warmup_steps=30"], 30),  # a warm-up set within the run is kept
        (["optim.max_steps=30", "optim.warmup_steps=12"], 12),
        (["optim.max_steps=30", "optim.warmup_steps=31"], 3),
    ],
)
def test_the_warmup_fits_the_run(overrides: list[str], warmup: int, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, overrides)
    assert cfg.optim.warmup_steps == warmup
    assert bool(caplog.records) == ("optim.warmup_steps=31" in overrides)  # only a set warm-up that is cut warns


def test_only_rank_0_warns_of_a_cut_warmup(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RANK", "1")
    assert load_config(None, ["optim.max_steps=10", "optim.warmup_steps=20"]).optim.warmup_steps == 1
    assert not caplog.records


def test_the_stream_follows_the_model_keys_unless_set() -> None:
    cfg = load_config(None, ["model.user.max_seq_len=10", "model.text.name_or_path=bert-base-uncased"])
    assert (cfg.data.stream.max_seq_len, cfg.data.stream.text_model) == (10, "bert-base-uncased")
    assert from_dict({"model": {"user": {"max_seq_len": 10}}}).data.stream.max_seq_len == 10
    shorter = load_config(None, ["data.stream.max_seq_len=20"])  # a shorter window than the position table
    assert (shorter.data.stream.max_seq_len, shorter.model.user.max_seq_len) == (20, 50)
    with pytest.raises(ValueError, match=r"set model\.user\.max_seq_len, which data\.stream\.max_seq_len follows"):
        from_dict({"model": {"user": {"max_seq_len": 10}}, "data": {"stream": {"max_seq_len": 20}}})
    with pytest.raises(ValueError, match=r"follows: set model\.text\.name_or_path only"):
        load_config(None, ["data.stream.text_model=bert-base-uncased"])
    same = load_config(None, [f"data.stream.text_model={default_text_model()}"])  # the same value: no conflict
    assert same == TrainConfig()


def test_a_finetune_section_in_a_pretraining_file_is_read_past(tmp_path: Path) -> None:
    saved = to_dict(load_config(TINY)) | {"finetune": {"mode": "lora", "from_path": "x"}}  # saved before it moved
    path = write(tmp_path, json.dumps(saved), "config.json")
    assert load_config(path) == load_config(TINY) == from_dict(saved)
    assert "finetune" not in to_dict(load_config(path))


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_round_trip_is_exact(tmp_path: Path, path: Path) -> None:
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    save_config(cfg, tmp_path / "run" / "config.json")
    assert load_config(tmp_path / "run" / "config.json") == cfg
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == to_dict(cfg)


def test_round_trip_keeps_nones_tuples_and_floats(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.betas=[0.8, 0.95]", "optim.lr=1.2345678901234567e-4", "data.valid_domains=[]"])
    save_config(cfg, tmp_path / "c.json")
    back = load_config(tmp_path / "c.json")
    assert back == cfg and back.optim.betas == (0.8, 0.95) and back.data.valid_domains == []
    assert back.optim.encoder_lr is None and isinstance(back.data.stream.image_mean, tuple)


def test_save_config_writes_json_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="writes JSON"):
        save_config(TrainConfig(), tmp_path / "c.toml")


# ---- DeepSpeed --------------------------------------------------------------------------------------------


def test_deepspeed_numbers_come_from_ours() -> None:
    cfg = load_config(
        None,
        ["data.stream.batch_size=6", "optim.grad_accum=3", "optim.grad_clip=0.5", "engine.precision=bf16"]
        + ["engine.zero_stage=2", "engine.offload_optimizer=true"],
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] > 10**6
    plain = deepspeed_config(TrainConfig(), 1)
    assert plain["bf16"] == {"enabled": False} and "zero_force_ds_cpu_optimizer" not in plain
    with pytest.raises(ValueError, match="world_size"):
        deepspeed_config(cfg, 0)


def test_passthrough_merges_last_and_deep() -> None:
    cfg = load_config(
        None,
        ["engine.zero_stage=3", "engine.deepspeed.zero_optimization.reduce_bucket_size=5e7"]
        + ["engine.deepspeed.steps_per_print=100", "engine.deepspeed.comms_logger={enabled = true}"],
    )
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 5e7}
    assert ds["steps_per_print"] == 100 and ds["comms_logger"] == {"enabled": True}
    assert cfg.engine.deepspeed["zero_optimization"] == {"reduce_bucket_size": 5e7}  # not mutated by the merge


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("train_micro_batch_size_per_gpu=4", "data.stream.batch_size"),
        ("gradient_accumulation_steps=2", "optim.grad_accum"),
        ("train_batch_size=64", "data.stream.batch_size and optim.grad_accum"),
        ("gradient_clipping=1.0", "optim.grad_clip"),
        ("fp16={enabled = true}", "engine.precision"),
        ("bf16.enabled=true", "engine.precision"),
        ("zero_optimization.stage=2", "engine.zero_stage"),
        ("zero_optimization.offload_optimizer.device='cpu'", "engine.offload_optimizer"),
        ("optimizer={type = 'Adam'}", r"optim\.\*"),
        ("zero_allow_untested_optimizer=false", "nothing"),
    ],
)
def test_passthrough_refuses_what_we_derive(key: str, ours: str) -> None:
    dotted = re.escape(key.partition("=")[0].removesuffix(".enabled"))
    with pytest.raises(ValueError, match=rf"engine\.deepspeed\.{dotted} is derived by momrec: set {ours}"):
        load_config(None, [f"engine.deepspeed.{key}"])


def test_passthrough_refuses_tuning_an_offload_that_is_off() -> None:
    tune = "engine.deepspeed.zero_optimization.offload_optimizer.pin_memory=false"
    with pytest.raises(ValueError, match="set engine.offload_optimizer=true"):
        load_config(None, [tune])
    cfg = load_config(None, ["engine.zero_stage=2", "engine.offload_optimizer=true", tune])
    assert deepspeed_config(cfg, 1)["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


# ---- shipped configs and help -----------------------------------------------------------------------------


def test_shipped_files_exist() -> None:
    assert {p.name for p in BASES} >= {"tiny.toml", "small_cpu.toml", "transrec.toml", "missrec.toml", "em3.toml"}
    names = {p.name for p in FRAGMENTS}
    assert names >= {"zero0.toml", "zero1.toml", "zero2.toml", "zero3.toml", "zero2_offload.toml"}


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_derives_deepspeed(path: Path) -> None:
    ds = deepspeed_config(load_config(path), world_size=2)
    assert ds["train_batch_size"] == 2 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_every_engine_fragment_combines_with_tiny(path: Path) -> None:
    cfg = load_config([TINY, path])
    stage = int(re.search(r"zero(\d)", path.name).group(1))
    assert cfg.engine.zero_stage == stage
    assert cfg.model.user.width == load_config(TINY).model.user.width  # the fragment touched only [engine]
    assert deepspeed_config(cfg, 2)["zero_optimization"]["stage"] == stage


def test_tiny_is_tiny() -> None:
    cfg = load_config(TINY)
    assert cfg.model.text.init == cfg.model.image.init == "random"
    assert cfg.model.text.config_overrides["hidden_size"] == 32 and cfg.model.user.width == 32


def test_help_lists_every_key_with_its_docstring() -> None:
    text = config_help()
    for key in all_keys(TrainConfig):
        assert re.search(rf"^  {re.escape(key)}: .+ = .+\n      \S", text, re.M) or f"[{key}]" in text, key
    assert "engine.precision: 'fp32' | 'bf16' = \"fp32\"" in text
    assert "follows model.text.name_or_path: set that key instead" in text
