"""The model card (``README.md``) of a pretrained-model folder: what it was trained on, its configuration, its
parameters per part, its last validation metrics, and how to load it.

Written beside config.json and model.safetensors by the engine's export and by ``Recommender.save_pretrained``
(:mod:`pretrain.hub`); the metrics come from ``run.out_dir/metrics.jsonl``, the last line with ``valid/*`` values
when the export is written (none for a model saved outside a run).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .parts import Counts

FRONT_MATTER = "---\nlibrary_name: momrec\ntags:\n- sequential-recommendation\n- multimodal\n- momrec\n---\n"


def last_validation(out_dir: str | Path) -> dict[str, float]:
    """The last ``valid/*`` values in ``out_dir/metrics.jsonl`` with their ``step`` ({} when there are none)."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        valid = {k: v for k, v in row.items() if k.startswith("valid/")} if isinstance(row, dict) else {}
        if valid:
            return {"step": row.get("step"), **valid}
    return {}


def _data(cfg: TrainConfig, catalog: Mapping[str, Any], trained: bool) -> list[str]:
    lines = ["## Data", "", "| domain | items | training interactions |", "|---|---:|---:|"]
    for domain, n, pop in zip(catalog["domains"], catalog["n_items"], catalog["popularity"], strict=True):
        lines.append(f"| {domain} | {n:,} | {sum(pop):,} |")
    if trained:
        lines += [
            "",
            f"Built shards: {', '.join(f'`{d}`' for d in cfg.data.domains) or '(not recorded)'}; "
            f"validation domains: {cfg.data.valid_domains if cfg.data.valid_domains is not None else 'all'}.",
        ]
    return lines


def _architecture(cfg: TrainConfig) -> list[str]:
    m, lines = cfg.model, ["## Configuration", ""]
    if m.text.enabled:
        lines.append(
            f"- text encoder: `{m.text.name_or_path or 'from its config'}` ({m.text.init}), {m.text.pooling} pooling, "
            f"trained: {m.text.trainable}"
        )
    if m.image.enabled:
        lines.append(
            f"- image encoder: {m.image.architecture} `{m.image.name_or_path or 'from its config'}` ({m.image.init}), "
            f"trained: {m.image.trainable}, {cfg.data.stream.image_size} px"
        )
    u = m.user
    lines += [
        f"- fusion: {m.fusion.kind}",
        f"- user encoder: causal Transformer, width {u.width}, {u.layers} layers, "
        f"{u.heads} heads, up to {u.max_seq_len} items, readout {u.readout}, item-ID embeddings "
        f"{'on' if u.id_embeddings else 'off'}, {u.interest_tokens} interest tokens",
        "- objectives: " + ", ".join(f"{k} {w:g}" for k, w in cfg.loss.weights().items() if w),
    ]
    return lines


def _training(cfg: TrainConfig) -> list[str]:
    o, e = cfg.optim, cfg.engine
    encoder_lr = "the same" if o.encoder_lr is None else f"{o.encoder_lr:g}"
    return [
        f"- training: {o.max_steps} steps, lr {o.lr:g} (pretrained encoders: {encoder_lr}), "
        f"{o.schedule} schedule, warm-up {o.warmup_steps}, micro-batch {cfg.data.stream.batch_size}, "
        f"ZeRO {e.zero_stage}, {e.precision}, seed {e.seed}"
    ]


def _parameters(counts: Counts) -> list[str]:
    rows = [f"| {part} | {row['trainable']:,} | {row['total']:,} |" for part, row in counts.items()]
    return ["## Parameters", "", "| part | trained in pretraining | total |", "|---|---:|---:|", *rows]


def _metrics(metrics: Mapping[str, float]) -> list[str]:
    if not metrics:
        return ["## Metrics", "", "No validation had been logged when this folder was written."]
    rows = [f"| {k} | {v:.4f} |" for k, v in metrics.items() if k != "step"]
    return [
        "## Metrics",
        "",
        f"The last validation before this export (step {metrics.get('step')}):",
        "",
        "| metric | value |",
        "|---|---:|",
        *rows,
    ]


def _usage(folder: str) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from pretrain.model import Recommender",
        "",
        f'model = Recommender.from_pretrained("{folder}")  # eval mode, on the CPU',
        "",
        "from pretrain.export import load_pretrained",
        "",
        f'model, cfg, catalog = load_pretrained("{folder}")  # plus the resolved config and the catalog',
        "```",
        "",
        f"Finetune: `python -m finetune --from {folder} --data DOMAIN --mode lora`; evaluate: "
        f"`python -m pretrain.evaluate --model {folder} --data DOMAIN`.",
    ]


def model_card(
    doc: Mapping[str, Any], cfg: TrainConfig, counts: Counts, metrics: Mapping[str, float], folder: str | Path
) -> str:
    """The README.md text of a folder with config.json ``doc`` (version 2), its resolved config ``cfg``."""
    trained = "config" in doc
    lines = [
        FRONT_MATTER,
        "# momrec pretrained recommender",
        "",
        "A multimodal sequential recommender: item encoders over each item's text and image, fused, and a causal "
        "Transformer user encoder over the user's items; users and items are compared by cosine similarity.",
        "",
        *_data(cfg, doc["catalog"], trained),
        "",
        *_architecture(cfg),
        *(_training(cfg) if trained else ["- training: not recorded (saved outside a run)"]),
        "",
        *_parameters(counts),
        "",
        *_metrics(metrics),
        "",
        *_usage(str(folder)),
        "",
    ]
    return "\n".join(lines)
