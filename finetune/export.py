"""A finetuned model on disk: only what the pretrained export cannot give, plus a pointer to that export.

Layout of a folder (``run.out_dir/model`` at the end of a run, ``run.out_dir/best`` for the best validation)::

    finetuned.json              format (version 2), the pointer to the pretrained export (its folder and the SHA-256
                                of its model.safetensors; null for --from none), the resolved config (finetune
                                section included), the target catalog, the layout, the LoRA layers and the tensors
                                saved (by their names in the model)
    adapter_model.safetensors   the trainable parameters (LoRA A/B, heads, fresh ID embeddings...) and every buffer
                                (batch-norm statistics, interest prototypes); with no pretrained export behind it,
                                the whole state dict
    adapter_config.json         LoRA from a pretrained export only (layout "peft"): PEFT's LoraConfig for the whole
                                Recommender (the LoRA layers by full name, the trained non-LoRA modules as
                                modules_to_save, the export as base_model_name_or_path)

In the "peft" layout adapter_model.safetensors is PEFT's: keys as ``PeftModel.save_pretrained`` writes them
(``base_model.model.<layer>.lora_A.weight``, ``base_model.model.<module>.<tensor>`` for modules_to_save and the
other saved tensors, which PEFT loads as they are), so ``peft.PeftModel.from_pretrained(base, folder)`` loads it onto
the pretrained Recommender rebuilt on the target catalog (:func:`base_model`) and ``merge_and_unload()`` folds it.
Other modes, and --from none, keep the "state_dict" layout: the tensors under the model's own names.

:func:`load_finetuned` rebuilds the model as finetuning did and loads the saved tensors; by default it merges LoRA
through PEFT. Version 1 folders (the "state_dict" layout, LoRA included) still load. JSON and safetensors only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from pretrain.config import TrainConfig
from pretrain.configlib import to_dict
from pretrain.distributed import rank
from pretrain.export import new_model
from pretrain.model import Catalog, Recommender
from pretrain.outputs import rank0_folder, tensor_bytes

from .config import FinetuneTrainConfig, from_dict
from .modes import lora_config, lora_layers, merge_lora
from .transfer import Source, is_fresh, prepare_model, transfer_weights

FORMAT = "momrec-finetuned"
VERSION = 2
READS = (1, 2)
DOC = "finetuned.json"
WEIGHTS = "adapter_model.safetensors"
"""PEFT's adapter weights file name (peft.utils.SAFETENSORS_WEIGHTS_NAME)."""
ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter config file name (peft.utils.CONFIG_NAME)."""
PEFT_PREFIX = "base_model.model."
"""The prefix of every key in a PEFT adapter file: a PeftModel's path to the model it wraps."""


def saved_names(model: nn.Module, pretrained: bool, fresh: Sequence[str] = ()) -> list[str]:
    """The state-dict entries a finetuned folder holds: trainable parameters, buffers and the parts not loaded
    from the export (``fresh``, finetune.fresh); everything when there is no pretrained export to rebuild the rest
    from."""
    state_keys = list(model.state_dict(keep_vars=True))
    if not pretrained:
        return state_keys
    params = dict(model.named_parameters())
    return [k for k in state_keys if k not in params or params[k].requires_grad or is_fresh(k, fresh)]


@contextlib.contextmanager
def _gathered(engine: Any, params: list[nn.Parameter]) -> Iterator[None]:
    """Full tensors of ``params`` inside the block; under ZeRO-3 every rank must enter it (an adapter saved
    outside ``GatheredParameters`` comes out empty)."""
    if engine is None or engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed  # imported by the engine already, with its accelerator chosen

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def peft_key(name: str, lora: Sequence[str], adapter: str = "default") -> str:
    """The key of state-dict entry ``name`` in a PEFT adapter file: the PeftModel prefix, and, inside a LoRA layer
    (one of ``lora``) but not its base layer, without the adapter name (``x.lora_A.default.weight`` ->
    ``base_model.model.x.lora_A.weight``), as ``PeftModel.save_pretrained`` writes them."""
    for layer in lora:
        rest = name.removeprefix(layer + ".")
        parts = rest.split(".")
        if rest != name and parts[0] != "base_layer" and len(parts) > 1 and parts[1] == adapter:
            return PEFT_PREFIX + ".".join([layer, parts[0], *parts[2:]])
    return PEFT_PREFIX + name


def modules_to_save(model: nn.Module, names: Sequence[str], lora: Sequence[str]) -> list[str]:
    """PEFT's ``modules_to_save`` for the saved tensors ``names``: the largest modules below the root whose
    parameters are all saved, that hold no LoRA layer and lie in none, and whose name no other module's ends with
    (PEFT's match). Saved tensors outside them (buffers, a fresh base layer) travel under their plain names."""
    saved, chosen = set(names), []
    every = [n for n, _ in model.named_modules()]
    for name, module in model.named_modules():  # parents first: the largest module that qualifies wins
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        own = [f"{name}.{p}" for p, _ in module.named_parameters()]
        touches = any(x == name or x.startswith(name + ".") or name.startswith(x + ".") for x in lora)
        if own and not touches and saved.issuperset(own) and [n for n in every if n.endswith(name)] == [name]:
            chosen.append(name)
    return chosen


def save_finetuned(
    model: nn.Module,
    cfg: FinetuneTrainConfig,
    catalog: Catalog,
    source: Source | None,
    folder: str | Path,
    engine: Any = None,
) -> Path:
    """Write ``folder`` (see the module docstring) from ``model`` (the engine's module when ``engine`` is given:
    every rank must call it then; rank 0 writes). Atomic: a crash leaves the previous folder or none; space-checked: a
    full disk is one ValueError on every rank (:func:`pretrain.outputs.rank0_folder`)."""
    folder = Path(folder)
    names = saved_names(model, source is not None, cfg.finetune.fresh)
    wanted = set(names)
    params = [p for n, p in model.named_parameters() if n in wanted]
    with _gathered(engine, params):
        tensors = {}
        if rank() == 0:
            state = model.state_dict()
            tensors = {k: state[k].detach().cpu().clone().contiguous() for k in names}
    lora = lora_layers(model)
    layers = [n for part in lora.values() for n in part]
    peft = source is not None and bool(layers)
    keep = modules_to_save(model, names, layers) if peft else []
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "pretrained": None if source is None else source.pointer(),
        "mode": cfg.finetune.mode,
        "layout": "peft" if peft else "state_dict",
        "lora": lora,
        "modules_to_save": keep,
        "tensors": names,
        "config": to_dict(cfg),
        "catalog": catalog.to_dict(),
    }
    text = json.dumps(doc, indent=1) + "\n"
    if peft:
        tensors = {peft_key(k, layers): v for k, v in tensors.items()}
    with rank0_folder(folder, tensor_bytes(tensors) + len(text) + 4096, f"the finetuned model {folder}") as tmp:
        if tmp is not None:
            safetensors.torch.save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            if peft:
                lora_config(cfg.finetune, layers, keep or None, source.path).save_pretrained(str(tmp))
            (tmp / DOC).write_text(text, encoding="utf-8")
    return folder


def read_finetuned(folder: str | Path) -> dict[str, Any]:
    """The ``finetuned.json`` document of a finetuned folder (format checked; versions 1 and 2)."""
    path = Path(folder) / DOC
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a momrec finetuned model ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{path}: not a momrec finetuned model (format {found!r})")
    if doc.get("version") not in READS:
        raise ValueError(f"{path}: format version {doc.get('version')!r}, this momrec reads {list(READS)}: "
                         "finetune again from the pretrained export with this momrec (python -m finetune)")  # fmt: skip
    return doc


def base_model(cfg: TrainConfig, catalog: Catalog, source: Source) -> Recommender:
    """What a "peft" folder adapts: the pretrained Recommender rebuilt on the target catalog, without the mode
    (``peft.PeftModel.from_pretrained(base_model(...), folder)``)."""
    model = new_model(cfg, catalog)
    transfer_weights(model, source.weights(), cfg.finetune.fresh)
    return model.eval()


def _check_keys(found: set[str], expected: set[str], path: Path) -> None:
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"{path} does not fit its config: missing {missing}, unexpected {extra}")


def _load_peft(folder: Path, doc: dict[str, Any], cfg: TrainConfig, catalog: Catalog, source: Source) -> nn.Module:
    """A "peft" folder through PEFT: ``PeftModel.from_pretrained`` onto :func:`base_model`, every key of the file
    checked against PEFT's own (LoRA and modules_to_save) and the model's (the rest), then ``merge_and_unload``."""
    from peft import PeftModel, get_peft_model_state_dict

    with safetensors.safe_open(str(folder / WEIGHTS), framework="pt") as f:  # the names only: PEFT loads the tensors
        found = set(f.keys())
    layers = [n for part in doc["lora"].values() for n in part]
    _check_keys(found, {peft_key(n, layers) for n in doc["tensors"]}, folder / WEIGHTS)  # what finetuned.json lists
    peft_model = PeftModel.from_pretrained(base_model(cfg, catalog, source), str(folder))
    needed, known = set(get_peft_model_state_dict(peft_model)), set(peft_model.state_dict())
    _check_keys(found, needed | (found & known), folder / WEIGHTS)
    return peft_model.merge_and_unload()


def saved_tensors(folder: str | Path, doc: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a finetuned folder by their names in the model (a "peft" folder's PEFT keys mapped back);
    ``doc``: its finetuned.json when already read."""
    doc = read_finetuned(folder) if doc is None else doc
    path = Path(folder) / WEIGHTS
    tensors = safetensors.torch.load_file(str(path))
    if doc.get("layout") != "peft":
        return tensors
    layers = [n for part in doc["lora"].values() for n in part]
    name = {peft_key(n, layers): n for n in doc["tensors"]}
    _check_keys(set(tensors), set(name), path)
    return {name[k]: v for k, v in tensors.items()}


def _load_state(folder: Path, doc: dict[str, Any], cfg: TrainConfig, catalog: Catalog, source: Source | None,
                merge: bool) -> nn.Module:  # fmt: skip
    """The model as finetuning built it (LoRA injected per host), the saved tensors loaded by their model names,
    LoRA folded by PEFT's LoraLayer.merge when ``merge`` (a version 1 LoRA folder, or ``merge=False``)."""
    model, _ = prepare_model(cfg, catalog, source)
    names = set(saved_names(model, source is not None, cfg.finetune.fresh))
    tensors = saved_tensors(folder, doc)
    _check_keys(set(tensors), names, folder / WEIGHTS)
    _check_keys(set(doc["tensors"]), names, folder / DOC)
    model.load_state_dict(tensors, strict=False)
    if merge:
        merge_lora(model)
    return model


def load_finetuned(
    folder: str | Path, merge: bool = True, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[Recommender, TrainConfig, Catalog]:
    """The finetuned model (eval mode), its config and catalog. The model is rebuilt as finetuning built it: the
    pretrained export (at ``pretrained`` when it moved; its weights must hash as recorded), the mode, the LoRA
    layers; then the saved tensors are loaded. ``merge``: fold LoRA into the weights (a plain Recommender's
    modules; scores equal the unmerged model's up to float rounding), for a "peft" folder by loading it with
    ``PeftModel.from_pretrained`` and ``merge_and_unload``."""
    folder = Path(folder)
    doc = read_finetuned(folder)
    cfg, catalog = from_dict(doc["config"]), Catalog.from_dict(doc["catalog"])
    source = None if doc["pretrained"] is None else Source.from_pointer(doc["pretrained"], pretrained)
    with torch.random.fork_rng(devices=[]):  # the LoRA and ID initialisation drawn here is overwritten anyway
        if merge and doc.get("layout") == "peft" and source is not None:
            model = _load_peft(folder, doc, cfg, catalog, source)
        else:
            model = _load_state(folder, doc, cfg, catalog, source, merge)
    return model.to(device).eval(), cfg, catalog
