"""Nested user subsets of a built domain (the scaling study's data sizes).

``subset(folder, out, fraction, seed)`` keeps ``round(fraction * users)`` users of ``folder``: the first ones in
the order of ``sha256(seed, domain, user id)``. The order depends only on the seed, the domain name and the
publisher's user ids, so a smaller fraction's users are always among a larger one's (the 10 % subset lies inside
the 25 % subset), and rebuilding the parent from the same data gives the same subsets.

The subset keeps the parent's whole catalog: its items shards are hard links to the parent's (copies where the file
system refuses links), so item indices, ID-embedding rows and the full-ranking candidates are the same; the
sequences shards hold the chosen users' samples, renumbered 0..users-1 in the parent's order. The manifest is the
parent's with the counts of users and interactions, and the training popularity (logQ correction, the popularity
ranker), recomputed over the chosen users, plus a ``subset`` entry (parent folder, the SHA-256 of its manifest,
fraction, seed, users). :func:`catalog_id` is equal for a subset and its parent: a model trained on a subset is
evaluated on the parent's users without a second copy of the catalog.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import schema
from .errors import InputError
from .inspect import read_shard
from .outdir import atomic_folder
from .progress import bar
from .writer import sha256_file, write_shards

log = logging.getLogger(__name__)


def catalog_id(folder: str | Path) -> str:
    """Identity of a built domain's catalog: its name and the checksums of its items shards (equal for a user
    subset and its parent, different for any other build)."""
    manifest = schema.load_manifest(folder)
    digest = hashlib.sha256(manifest.domain.encode("utf-8"))
    for shard in manifest.item_shards:
        digest.update(shard.sha256.encode("ascii"))
    return digest.hexdigest()


def user_order(ids: list[str], domain: str, seed: int) -> list[str]:
    """``ids`` in the seeded hash order that defines the nested subsets (prefixes of this list)."""

    def rank(user: str) -> tuple[bytes, str]:
        return hashlib.sha256(f"{seed}\0{domain}\0{user}".encode()).digest(), user

    return sorted(ids, key=rank)


def subset_size(fraction: float, n_users: int) -> int:
    """Users kept for ``fraction`` (at least one for a positive fraction)."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"subset fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * n_users))


def _raw_samples(folder: Path, manifest: schema.Manifest, fields: tuple[str, ...] | None = None) -> Iterator[dict]:
    """The raw samples of the sequences shards, in order (``fields``: only members with these extensions)."""

    def wanted(name: str) -> bool:
        return fields is None or name.rsplit(".", 1)[-1] in fields

    for shard in manifest.seq_shards:
        path = folder / shard.name
        try:
            yield from read_shard(path, select_files=wanted)
        except Exception as e:  # a tar that breaks midway: the parent is damaged, say which file
            raise InputError(f"{path}: unreadable ({e!r}); run 'python -m shards verify {folder}'") from None


def _json_id(raw: dict[str, Any]) -> str:
    return schema.decode_seq(raw, images=False).id  # the ids pass reads only the json member


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links refused
        shutil.copy2(src, dst)


def subset(folder: str | Path, out: str | Path, fraction: float, seed: int = 0, *, overwrite: bool = False,
           progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write the ``fraction`` user subset of built domain ``folder`` to ``out`` (atomically); returns its
    manifest. Raises :class:`InputError` for a bad folder or fraction."""
    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} exists; pass --overwrite to replace it")
    manifest = schema.load_manifest(folder)
    raws = _raw_samples(folder, manifest, fields=("json",))
    ids = [_json_id(raw) for raw in bar(raws, enabled=progress, total=manifest.n_users, desc="user ids", unit="user")]
    if len(ids) != manifest.n_users:
        raise InputError(f"{folder}: the sequences shards hold {len(ids)} users, the manifest says "
                         f"{manifest.n_users}; run 'python -m shards verify {folder}'")  # fmt: skip
    if len(set(ids)) != len(ids):
        raise InputError(f"{folder}: user ids repeat in the sequences shards")
    keep = set(user_order(ids, manifest.domain, seed)[: subset_size(fraction, len(ids))])
    chosen: list[schema.Sequence] = []

    def samples() -> Iterator[dict[str, Any]]:
        for raw in _raw_samples(folder, manifest):
            seq = schema.decode_seq(raw)
            if seq.id in keep:  # renumbered 0..users-1, as a build numbers them
                chosen.append(dataclasses.replace(seq, index=len(chosen)))
                yield schema.encode_seq(chosen[-1])

    doc = dict(manifest.raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, _estimated_bytes(folder, manifest, len(keep), out), f"the subset {out}") as tmp:
        for shard in manifest.item_shards:
            _link_or_copy(folder / shard.name, tmp / shard.name)
        per = max(s.samples for s in manifest.seq_shards)
        seqs = write_shards(tmp, "seqs", samples(), per, len(keep), progress)
        doc["shards"] = {**manifest.raw["shards"], "seqs": seqs}
        doc["counts"] = {**manifest.raw["counts"], "users": len(chosen),
                         "interactions": sum(len(s.seq) for s in chosen)}  # fmt: skip
        doc["popularity"] = _popularity(chosen, manifest.n_items)
        doc["subset"] = {
            "parent": str(folder.resolve()),
            "parent_manifest_sha256": sha256_file(folder / schema.MANIFEST_NAME),
            "fraction": fraction,
            "seed": seed,
            "users": len(chosen),
            "parent_users": manifest.n_users,
        }
        (tmp / schema.MANIFEST_NAME).write_text(schema.dumps_manifest(doc), encoding="utf-8")
    log.info("subset %s: %d of %d users (fraction %g, seed %d)", out, len(chosen), manifest.n_users, fraction, seed)
    return doc


def _estimated_bytes(folder: Path, manifest: schema.Manifest, users: int, out: Path) -> int:
    """What the subset will take: its users' share of the sequences shards (users differ in size; a margin covers
    it), the items shards where they are copied rather than linked (another file system), and the manifest."""
    seqs = sum(s.bytes for s in manifest.seq_shards) * users / max(1, manifest.n_users)
    items = sum(s.bytes for s in manifest.item_shards) if folder.stat().st_dev != out.parent.stat().st_dev else 0
    return int(1.5 * seqs) + items + (folder / schema.MANIFEST_NAME).stat().st_size


def _popularity(seqs: list[schema.Sequence], n_items: int) -> list[int]:
    """Training interactions per catalog index (each user's last two, the evaluation targets, excluded)."""
    counts = [0] * n_items
    for seq in seqs:
        for index in seq.item_indices()[:-2]:
            counts[index] += 1
    return counts
