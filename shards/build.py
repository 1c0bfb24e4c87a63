"""Build one domain's WebDataset shards from a source-format folder.

Steps: read items and interactions (the format reader), render item texts (the template), order
each user's interactions by time (ties keep file order), keep the most recent ``max_seq_len``,
filter to the k-core, re-encode the images of the surviving catalog, then write
``items-*.tar``, ``seqs-*.tar`` and ``manifest.json`` into a temporary sibling folder that is
renamed into place only when everything is written and checksummed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, schema
from .errors import InputError, Skips
from .formats import AUTO, RawItem, detect, open_reader
from .images import IMAGE_FITS, ImageError, reencode_file
from .outdir import atomic_folder
from .procs import die_with_parent
from .progress import bar as progress_bar
from .text import Template, TemplateError
from .writer import write_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """How a domain is turned into shards (saved in the manifest under ``options``)."""

    format: str = "auto"
    """Source layout of the input folder ('auto': told from its file names)."""
    domain: str | None = None
    """Domain name recorded in the manifest (default: the input folder's name)."""
    min_user_interactions: int | None = None
    """k-core: users with fewer interactions are dropped (at least 3: a training item plus two targets). Default:
    5, or 3 for a published split (unisrec, lcrec), which is not re-filtered."""
    min_item_interactions: int | None = None
    """k-core: items with fewer interactions are dropped (filtering repeats until both bounds hold). Default: 1."""
    max_seq_len: int | None = None
    """Only each user's most recent interactions are kept (applied before the k-core filter). Default: 50, or
    every interaction for a published split."""
    image_size: int = 224
    """Side of the re-encoded JPEGs, in pixels: of their central square, or their longest side (see --image-fit)."""
    image_fit: str = "crop"
    """'crop': each image's central square resized to image_size x image_size, what the stream feeds a model (it
    then resamples nothing at that size); 'contain': the whole image, its longest side at most image_size, never
    enlarged (the stream then resamples a non-square or smaller image at every batch)."""
    jpeg_quality: int = 90
    """JPEG quality of the re-encoded images."""
    samples_per_shard: int = 256
    """Samples per tar file (a multiple of ranks x data workers keeps every reader busy)."""
    text_template: str | None = None
    """Item text template, parts separated by '|' (see shards.text); default: the format's."""
    images: str | None = None
    """Folder of item images, where the format allows one elsewhere than its default place."""
    workers: int = 1
    """Processes re-encoding images."""

    def __post_init__(self) -> None:
        if self.min_user_interactions is not None and self.min_user_interactions < schema.MIN_SEQ_LEN:
            raise InputError(f"min_user_interactions must be at least {schema.MIN_SEQ_LEN} (train item + 2 targets)")
        if self.min_item_interactions is not None and self.min_item_interactions < 1:
            raise InputError("min_item_interactions must be at least 1")
        if self.max_seq_len is not None and self.max_seq_len < (self.min_user_interactions or schema.MIN_SEQ_LEN):
            raise InputError("max_seq_len must be at least min_user_interactions (and 3)")
        for name, low, high in (("image_size", 8, 4096), ("jpeg_quality", 1, 100), ("samples_per_shard", 1, 10**7)):
            if not low <= getattr(self, name) <= high:
                raise InputError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        if self.workers < 1:
            raise InputError("workers must be at least 1")
        if self.image_fit not in IMAGE_FITS:
            raise InputError(f"image_fit must be one of {', '.join(IMAGE_FITS)}, got {self.image_fit!r}")
        if self.domain is not None:
            _check_domain_name(self.domain)

    def filtering(self, published_split: bool) -> BuildOptions:
        """These options with the filter defaults filled in: a published split is kept as it is unless asked."""
        return dataclasses.replace(
            self,
            min_user_interactions=self.min_user_interactions or (schema.MIN_SEQ_LEN if published_split else 5),
            min_item_interactions=self.min_item_interactions or 1,
            max_seq_len=self.max_seq_len or (None if published_split else 50),
        )


def _check_domain_name(name: str) -> str:
    try:
        return schema.check_key(name)
    except ValueError:
        raise InputError(f"domain name {name!r}: use letters, digits, '_' and '-' only (see --domain)") from None


@dataclass
class _Catalog:
    """Items as read: parallel lists indexed by an internal slot, and the id -> slot map."""

    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    images: list[Path | None] = field(default_factory=list)
    slot: dict[str, int] = field(default_factory=dict)


def _render_text(item: RawItem, template: Template, skips: Skips) -> str | None:
    """The item's text; a field of the wrong type is dropped with a counted skip."""
    fields = dict(item.fields)
    while True:
        try:
            return template.render(fields)
        except TypeError as e:
            name = str(e).split("'")[1]
            skips.add(item.file, item.line, name, f"wrong type: {str(e).split(': ', 1)[1]}")
            fields.pop(name)


def _read_catalog(items: Iterable[RawItem], template: Template, skips: Skips) -> _Catalog:
    cat = _Catalog()
    for item in items:
        if item.id in cat.slot:
            skips.add(item.file, item.line, "id", f"duplicate item id: {item.id!r} (the first definition is kept)")
            continue
        cat.slot[item.id] = len(cat.ids)
        cat.ids.append(item.id)
        cat.texts.append(_render_text(item, template, skips))
        cat.images.append(item.image)
    return cat


@dataclass
class Events:
    """One user's interactions as two typed arrays (16 bytes an interaction: Amazon-size inputs fit in memory)."""

    times: array = field(default_factory=lambda: array("d"))
    """Timestamps (0 when the source has none), in file order until sorted."""
    slots: array = field(default_factory=lambda: array("q"))
    """Catalog slots of the items."""

    def __len__(self) -> int:
        return len(self.slots)

    def keep(self, positions: Iterable[int]) -> None:
        positions = list(positions)
        self.times = array("d", (self.times[p] for p in positions))
        self.slots = array("q", (self.slots[p] for p in positions))


def _read_sequences(interactions: Iterable, cat: _Catalog, skips: Skips) -> tuple[dict[str, Events], bool]:
    """Per user, the interactions in file order; and whether the source has timestamps."""
    users: dict[str, Events] = {}
    timed = None
    for inter in interactions:
        slot = cat.slot.get(inter.item)
        if slot is None:
            skips.add(inter.file, inter.line, "item", f"unknown item id: {inter.item!r}")
            continue
        if timed is None:
            timed = inter.timestamp is not None
        events = users.get(inter.user)
        if events is None:
            events = users[inter.user] = Events()
        events.times.append(inter.timestamp or 0.0)
        events.slots.append(slot)
    return users, bool(timed)


def _order_and_truncate(users: dict[str, Events], max_len: int | None) -> int:
    """Sort each user's events by time, keep the newest ``max_len`` (None: all); returns how many were dropped."""
    dropped = 0
    for events in users.values():
        order = sorted(range(len(events)), key=events.times.__getitem__)  # stable: equal times keep file order
        if max_len is not None:
            dropped += max(0, len(order) - max_len)
            order = order[-max_len:]
        events.keep(order)
    return dropped


def _k_core(users: dict[str, Events], min_user: int, min_item: int) -> None:
    """Drop users and items below their bounds, repeatedly, until both hold (in place)."""
    while True:
        for user in [u for u, ev in users.items() if len(ev) < min_user]:
            del users[user]
        counts = Counter(slot for ev in users.values() for slot in ev.slots)
        rare = {slot for slot, c in counts.items() if c < min_item}
        if not rare:
            return
        for events in users.values():
            events.keep(p for p, slot in enumerate(events.slots) if slot not in rare)


def _encode_images(paths: list[Path | None], opts: BuildOptions, skips: Skips, progress: bool) -> list[bytes | None]:
    """JPEG bytes per catalog position (None: no image, or an unreadable one, counted)."""
    todo = [(i, p) for i, p in enumerate(paths) if p is not None]
    jobs = [(p, opts.image_size, opts.jpeg_quality, opts.image_fit) for _, p in todo]
    out: list[bytes | None] = [None] * len(paths)
    with _pool(opts.workers) as pool:
        results = pool.map(_encode_one, jobs, chunksize=64) if pool else map(_encode_one, jobs)
        for (i, path), result in progress_bar(zip(todo, results), enabled=progress, total=len(todo), desc="images"):
            if isinstance(result, str):
                skips.add(path.name, None, "image", result)
            else:
                out[i] = result
    return out


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` processes (None for one: the work runs here) that die with this one, even when it is killed
    outright; when the block raises (an error, Ctrl-C, SIGTERM), the jobs not yet started are cancelled."""
    if workers == 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _encode_one(job: tuple[Path, int, int, str]) -> bytes | str:
    try:
        return reencode_file(*job)
    except ImageError as e:
        return str(e)


@dataclass(frozen=True)
class _Domain:
    """The filtered domain, ready to write: catalog in index order, users in index order."""

    items: list[schema.Item]
    users: list[tuple[str, Events]]
    timed: bool
    slot_to_index: dict[int, int]


def _assemble(
    cat: _Catalog, users: dict[str, Events], timed: bool, opts: BuildOptions, skips: Skips, progress: bool
) -> _Domain:
    """Catalog = items still interacted with, sorted by id; users sorted by id."""
    used = sorted({slot for ev in users.values() for slot in ev.slots}, key=lambda s: cat.ids[s])
    images = _encode_images([cat.images[s] for s in used], opts, skips, progress)
    items = [schema.Item(index=i, id=cat.ids[s], text=cat.texts[s], image=images[i]) for i, s in enumerate(used)]
    return _Domain(items, sorted(users.items()), timed, {s: i for i, s in enumerate(used)})


def _sequence(dom: _Domain, index: int) -> schema.Sequence:
    user, events = dom.users[index]
    catalog = [dom.slot_to_index[slot] for slot in events.slots]
    distinct = list(dict.fromkeys(catalog))
    position = {c: p for p, c in enumerate(distinct)}
    return schema.Sequence(
        index=index,
        id=user,
        items=tuple(dom.items[c] for c in distinct),
        seq=tuple(position[c] for c in catalog),
        timestamps=tuple(events.times) if dom.timed else None,
    )


def _counts(dom: _Domain, before: dict[str, int]) -> dict[str, Any]:
    has = Counter(tuple(it.modalities) for it in dom.items)
    return {
        "users": len(dom.users),
        "items": len(dom.items),
        "interactions": sum(len(ev) for _, ev in dom.users),
        "items_text_and_image": has[("text", "image")],
        "items_text_only": has[("text",)],
        "items_image_only": has[("image",)],
        "items_without_content": has[()],
        "before_filtering": before,
    }


def _popularity(dom: _Domain) -> list[int]:
    """Training interactions per catalog index (each user's last two, the eval targets, excluded)."""
    counts = [0] * len(dom.items)
    for _, events in dom.users:
        for slot in events.slots[:-2]:
            counts[dom.slot_to_index[slot]] += 1
    return counts


def build(
    input_dir: str | Path, out_dir: str | Path, opts: BuildOptions, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Build ``out_dir`` from ``input_dir``; returns the manifest. Raises :class:`InputError` on bad input."""
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"output folder {out_dir} exists; pass --overwrite to replace it")
    domain = opts.domain or _check_domain_name(input_dir.resolve().name)
    if opts.format == AUTO:
        opts = dataclasses.replace(opts, format=detect(input_dir))
        log.info("%s: format %s", input_dir, opts.format)
    reader = open_reader(opts.format, input_dir, images=opts.images, progress=progress)
    published = getattr(reader, "published_split", False)
    opts = opts.filtering(published)
    try:
        template = Template.parse(opts.text_template if opts.text_template is not None else reader.default_template)
    except TemplateError as e:
        raise InputError(str(e)) from None
    skips = Skips()
    cat = _read_catalog(reader.items(skips), template, skips)
    if not cat.ids:
        raise InputError(f"no readable item in {input_dir} ({len(skips)} records skipped)")
    users, timed = _read_sequences(reader.interactions(skips), cat, skips)
    before = {"users": len(users), "items": len(cat.ids), "interactions": sum(map(len, users.values()))}
    before["interactions_beyond_max_seq_len"] = _order_and_truncate(users, opts.max_seq_len)
    targets = {user: tuple(events.slots[-2:]) for user, events in users.items()} if published else {}
    _k_core(users, opts.min_user_interactions, opts.min_item_interactions)
    if not users:
        raise InputError(f"no user of {input_dir} has {opts.min_user_interactions} interactions after filtering")
    dom = _assemble(cat, users, timed, opts, skips, progress)
    manifest = {
        "schema": schema.SCHEMA_VERSION,
        "domain": domain,
        "format": opts.format,
        "momrec_version": __version__,
        "options": {**asdict(opts), "domain": domain},
        "timestamps": timed,
        "split": _split(targets, users) if published else {"kind": "leave-one-out"},
        "counts": _counts(dom, before),
        "popularity": _popularity(dom),
        "skipped_counts": skips.counts(),
        "skipped": skips.as_json(),
    }
    _write_atomically(dom, manifest, out_dir, opts, progress)
    log.info("built %s: %s", out_dir, {k: v for k, v in manifest["counts"].items() if k != "before_filtering"})
    return manifest


def _split(targets: dict[str, tuple[int, ...]], users: dict[str, Events]) -> dict[str, Any]:
    """How much of a published split the shards keep: users whose last two items are still the files' validation
    and test targets (a filter the user asked for may drop users or move targets)."""
    kept = sum(1 for user, events in users.items() if tuple(events.slots[-2:]) == targets[user])
    if kept < len(targets):
        log.warning(
            "the published split is not intact: %d of %d users keep their published validation and test targets "
            "(the filter options dropped or changed the others); numbers are not comparable with published tables",
            kept, len(targets),
        )  # fmt: skip
    return {"kind": "published", "users": len(targets), "users_with_published_targets": kept}


def _write_atomically(
    dom: _Domain, manifest: dict[str, Any], out_dir: Path, opts: BuildOptions, progress: bool
) -> None:
    """Write into a hidden sibling folder; rename it into place once complete (a crash leaves no complete-looking
    output: the manifest is the last file written, and ``out_dir`` appears only by the final rename; see
    :mod:`shards.outdir`)."""
    with atomic_folder(out_dir, _estimated_bytes(dom), f"the shards of {out_dir}") as tmp:
        items = (schema.encode_item(it) for it in dom.items)
        seqs = (schema.encode_seq(_sequence(dom, u)) for u in range(len(dom.users)))
        per = opts.samples_per_shard
        manifest["shards"] = {
            "items": write_shards(tmp, "items", items, per, len(dom.items), progress),
            "seqs": write_shards(tmp, "seqs", seqs, per, len(dom.users), progress),
        }
        text = schema.dumps_manifest(manifest)
        (tmp / schema.MANIFEST_NAME).write_text(text, encoding="utf-8")


TAR_MEMBER_BYTES = 1024
"""A tar member's header and padding, at most."""


def _estimated_bytes(dom: _Domain) -> int:
    """What the shards will take: every item's image and text once in items-*.tar, and again in the sequence
    sample of each user who has it (plus tar overhead); an over- rather than an under-estimate."""
    sizes = [len(it.image or b"") + len((it.text or "").encode()) + 2 * TAR_MEMBER_BYTES + 200 for it in dom.items]
    total = sum(sizes)
    for _, events in dom.users:
        distinct = {dom.slot_to_index[slot] for slot in events.slots}
        total += sum(sizes[i] for i in distinct) + 40 * len(events) + TAR_MEMBER_BYTES
    return total
