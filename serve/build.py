"""Write the serving files of a model for each domain folder: what ``python -m serve`` runs.

Layout of the output folder (written whole or not at all: :func:`shards.outdir.atomic_folder`)::

    serve.json                       format, the model pointer, each domain's subfolder
    README.md                        how to use the files
    <domain>/item_embeddings.safetensors
                                     vectors (C, D) float32: the unit item vectors the model scores with
                                     table   (C, D) float32: the item embeddings histories are made of
    <domain>/items.json              ids per row, dim, metric, the model pointer, the user tower's interface
    <domain>/items.faiss             faiss.IndexFlatIP over ``vectors`` (FAISS id = row = catalog index)
    <domain>/user_tower.onnx         history (catalog indices, -1 padded) -> unit user vector

One subfolder per domain because each domain is ranked against its own catalog, as evaluation ranks it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import safetensors.torch
import torch

from pretrain.catalog import ENCODE_CHUNK
from pretrain.ranking import model_for_domain
from shards import schema
from shards.errors import InputError
from shards.outdir import atomic_folder

from .catalog import METRIC, ServedCatalog, encode, flat_index
from .check import check_tower
from .models import ServedModel, check_servable
from .readme import readme
from .tower import INPUT, OPSET, OUTPUT, Exporter, UserTower, export_onnx, interest_rows

log = logging.getLogger(__name__)

FORMAT = "momrec-serve"
VERSION = 1
MAX_CHECK_DIFF = 1e-4
"""The largest difference between the ONNX and the PyTorch unit user vectors the command accepts."""


@dataclass(frozen=True)
class ServeOptions:
    exporter: Exporter = "dynamo"
    encode_chunk: int = ENCODE_CHUNK
    check_users: int = 64
    """Test users whose ONNX user vector is compared with the model's (0: no check)."""


def write_serving(served: ServedModel, data: list[str], out: Path, opts: ServeOptions) -> dict[str, Any]:
    """Write ``out`` (see the module docstring) for the domains ``data``; returns the ``serve.json`` document."""
    check_servable(served.model)
    manifests = [schema.load_manifest(f) for f in data]  # every folder checked before the long part
    names = [m.domain for m in manifests]
    if len(set(names)) != len(names):
        raise InputError(f"--data names a domain twice: {names}")
    _check_out(out)
    pointer = served.pointer()
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": pointer, "domains": {}}
    with atomic_folder(out, what=f"the serving files {out}") as tmp:
        for folder, manifest in zip(data, manifests):
            sub = _subfolder(manifest.domain)
            items = write_domain(served, pointer, folder, manifest, tmp / sub, opts)
            doc["domains"][manifest.domain] = {"folder": sub, "n_items": items["n_items"], "dim": items["dim"]}
        (tmp / "serve.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(doc), encoding="utf-8")
    return doc


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier output of this command (a model, the data...)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "serve.json").is_file())):
        raise InputError(f"--out {out} exists and is not an output of python -m serve: choose another folder")


def _subfolder(domain: str) -> str:
    if not domain or domain in (".", "..") or "/" in domain or "\\" in domain:
        raise InputError(f"domain name {domain!r} cannot name a folder")
    return domain


def write_domain(
    served: ServedModel,
    pointer: dict[str, Any],
    folder: str,
    manifest: schema.Manifest,
    out: Path,
    opts: ServeOptions,
) -> dict[str, Any]:
    """One domain's files into ``out`` (``pointer``: the model's, for items.json); returns its ``items.json``
    document."""
    model, domain = model_for_domain(served.model, served.cfg, manifest)
    rows_C = model.domain_offset[domain] + torch.arange(manifest.n_items, device=model.domain_offset.device)
    prototype_C = interest_rows(model, rows_C)  # refused before the long part
    started = time.perf_counter()
    catalog = encode(model, folder, domain, served.cfg.data.stream, opts.encode_chunk)
    out.mkdir(parents=True)
    safetensors.torch.save_file({"vectors": catalog.vectors_CD.contiguous(), "table": catalog.table_CD.contiguous()},
                                str(out / "item_embeddings.safetensors"), metadata={"format": "pt"})  # fmt: skip
    faiss.write_index(flat_index(catalog.vectors_CD), str(out / "items.faiss"))
    tower = UserTower(model, catalog.table_CD, None if prototype_C is None else prototype_C.cpu())
    exporter = export_onnx(tower.cpu(), out / "user_tower.onnx", opts.exporter)
    max_len = served.cfg.data.stream.max_seq_len
    check = None
    if opts.check_users:
        check = check_tower(out / "user_tower.onnx", model, catalog.encoded, folder, opts.check_users, max_len)
        if check["max_abs_diff"] > MAX_CHECK_DIFF:
            raise ValueError(f"{manifest.domain}: the exported user tower differs from the model by "
                             f"{check['max_abs_diff']:.2e} (> {MAX_CHECK_DIFF}) on {check['users']} users")  # fmt: skip
    in_catalog = domain < len(served.catalog.domains)
    doc = _items_doc(pointer, folder, in_catalog, catalog, exporter, prototype_C is not None, max_len, check)
    (out / "items.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    log.info("%s: %d items, dim %d, written in %.1f s (user tower: %s exporter; check %s)", manifest.domain,
             doc["n_items"], doc["dim"], time.perf_counter() - started, exporter, check)  # fmt: skip
    return doc


def _items_doc(pointer: dict[str, Any], folder: str, in_catalog: bool, catalog: ServedCatalog, exporter: Exporter,
               memory: bool, max_len: int, check: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "format": FORMAT + "-items",
        "version": VERSION,
        "domain": catalog.domain,
        "data": str(Path(folder).resolve()),
        "in_model_catalog": in_catalog,
        "n_items": len(catalog.ids),
        "dim": int(catalog.vectors_CD.shape[1]),
        "metric": METRIC,
        "score": "cosine: the inner product of the unit user vector and the unit item vector (Recommender.score)",
        "model": pointer,
        "embeddings": {
            "file": "item_embeddings.safetensors",
            "vectors": "unit item vectors, scored",
            "table": "item embeddings the user tower reads (baked into user_tower.onnx)",
        },  # fmt: skip
        "index": {"file": "items.faiss", "type": "IndexFlatIP", "ids": "FAISS id = row = catalog index"},
        "user_tower": {
            "file": "user_tower.onnx",
            "input": INPUT,
            "output": OUTPUT,
            "max_seq_len": max_len,
            "padding": -1,
            "opset": OPSET,
            "exporter": exporter,
            "interest_memory": memory,
            "check": check,
        },  # fmt: skip
        "ids": catalog.ids,
    }
