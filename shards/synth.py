"""A small, deterministic, multi-domain dataset in momrec's "generic" input format.

It is the embedded default data of the demo and the tests: three domains of a few hundred
items each, written in a couple of seconds. One domain folder holds::

    DOMAIN/
      items.jsonl       one JSON object per line (UTF-8, sorted keys):
                        {"id": "B000001", "title": "...", "description": "...", "category": "...",
                         "image": "images/B000001.jpg"}
                        "image" (a path relative to DOMAIN) is absent for text-only items; an
                        image-only item has no text fields at all, only "id" and "image".
      interactions.csv  header ``user,item,timestamp``, one row per interaction, timestamp in
                        integer unix seconds; rows grouped by user, chronological within a user.
      images/           RGB JPEG files referenced by items.jsonl

What makes transfer learnable: every domain draws on the same latent topics (:data:`TOPICS`).
A topic has a vocabulary (used by titles and descriptions, mixed with noise words) and a visual
signature (a hue and a pattern, drawn with random variation and pixel noise). Each item belongs
to one topic; each user follows one or two topics and draws about 80% of their items from them,
with Zipf-like popularity inside a topic. The topic itself is never written to the files.

Sequences have 5 to 30 interactions (every user passes a 5-interaction filter), some repeats, some
equal consecutive timestamps (ties), and every item is interacted with at least once. About 10%
of items are text-only and 10% image-only. The same arguments give byte-identical files; a
domain's files depend on its name, the seed and the sizes, not on which other domains are written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.synth_topics import CONNECTORS, DOMAIN_NOUNS, GENERIC_NOUNS, NOISE_WORDS, TOPICS, Topic, draw_image

DEFAULT_DOMAINS: tuple[str, ...] = ("books", "movies", "fashion")
MIN_SEQ_LEN, MAX_SEQ_LEN = 5, 30
ON_TOPIC_PROB = 0.8  # share of a user's interactions drawn from the topics they follow
MAIN_TOPIC_PROB = 0.65  # for a two-topic user, share of on-topic draws from the first topic
REPEAT_PROB = 0.3  # chance that a drawn item already in the sequence is kept as a repeat
TIE_PROB = 0.08  # chance that an interaction has the same timestamp as the previous one
JPEG_QUALITY = 90
_EPOCH_START = 1_577_836_800  # 2020-01-01T00:00:00Z

_Pool = tuple[np.ndarray, np.ndarray]  # a topic's item positions and their draw probabilities


@dataclass
class SynthItem:
    """One planned item: its id, latent topic and content (None fields are not written)."""

    id: str
    topic: int
    title: str | None = None
    description: str | None = None
    category: str | None = None
    has_image: bool = True


@dataclass
class DomainPlan:
    """Everything about a domain except its pixels: items, users, their topics and sequences."""

    name: str
    items: list[SynthItem]
    users: list[str]
    user_topics: list[tuple[int, ...]]
    sequences: list[list[int]] = field(default_factory=list)  # item positions, chronological
    timestamps: list[list[int]] = field(default_factory=list)


# ---- arguments and randomness -------------------------------------------------------------------


def _check_args(domains: Sequence[str], users: int, items: int, n_topics: int, image_size: int) -> None:
    if isinstance(domains, str):
        raise ValueError(f"domains must be a sequence of names, not the string {domains!r}")
    if not domains:
        raise ValueError("domains is empty: give at least one domain name")
    for name in domains:
        if not (isinstance(name, str) and name.isascii() and name.isidentifier()):
            raise ValueError(f"domain name {name!r} is not a simple identifier (letters, digits, '_')")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domain names repeat: {list(domains)}")
    if users < 1:
        raise ValueError(f"users_per_domain must be >= 1, got {users}")
    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(f"n_topics must be in 1..{len(TOPICS)}, got {n_topics}")
    if items < n_topics:
        raise ValueError(f"items_per_domain ({items}) must be >= n_topics ({n_topics}): every topic needs an item")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")


def _domain_rngs(seed: int, domain: str) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams for items, interactions and pixels, from the seed and the domain name.

    sha256 rather than hash(): Python salts str hashes per process. Separate streams keep the
    interactions of a domain the same whatever its image size.
    """
    digest = hashlib.sha256(f"momrec-synth:{seed}:{domain}".encode()).digest()
    root = np.random.SeedSequence(int.from_bytes(digest[:16], "little"))
    items, inter, pixels = (np.random.Generator(np.random.PCG64(s)) for s in root.spawn(3))
    return items, inter, pixels


def _item_id(domain: str, index: int) -> str:
    """Ids differ in style by domain, like real catalogs (one keeps a leading zero, as H&M's do)."""
    known = {"books": 0, "movies": 1, "fashion": 2}
    style = known.get(domain, int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "little") % 3)
    if style == 0:
        return f"B{index + 1:06d}"
    if style == 1:
        return f"m{index + 1}"
    return f"0{718000000 + index}"


# ---- planning: items, users, sequences ----------------------------------------------------------


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _item_text(topic: Topic, domain: str, n_topics: int, rng: np.random.Generator) -> tuple[str, str, str]:
    """Title, description and category of an item of ``topic``: topic words mixed with noise words."""
    nouns = DOMAIN_NOUNS.get(domain, GENERIC_NOUNS)
    w1, w2 = (str(w).capitalize() for w in rng.choice(topic.words, size=2, replace=False))
    templates = (
        f"{w1} {w2} {_pick(rng, nouns)}",
        f"The {w1} {_pick(rng, nouns)}",
        f"{_pick(rng, NOISE_WORDS).capitalize()} {w1}: {w2} {_pick(rng, nouns)}",
    )
    title = templates[int(rng.integers(len(templates)))]
    words = [
        _pick(rng, topic.words) if rng.random() < 0.6 else _pick(rng, NOISE_WORDS + CONNECTORS)
        for _ in range(int(rng.integers(8, 15)))
    ]
    words.insert(int(rng.integers(len(words) + 1)), _pick(rng, nouns).lower())
    description = " ".join(words).capitalize() + "."
    # a category usually follows the topic, sometimes not (real category trees are noisy too)
    source = topic if rng.random() < 0.75 else TOPICS[int(rng.integers(n_topics))]
    return title, description, _pick(rng, source.categories)


def _plan_items(domain: str, n_items: int, n_topics: int, rng: np.random.Generator) -> list[SynthItem]:
    topics = rng.permutation(np.arange(n_items) % n_topics)  # every topic gets at least one item
    n_only = max(1, round(0.1 * n_items)) if n_items >= 3 else 0
    order = rng.permutation(n_items)
    text_only, image_only = set(order[:n_only].tolist()), set(order[n_only : 2 * n_only].tolist())
    items = []
    for i, t in enumerate(topics.tolist()):
        item = SynthItem(id=_item_id(domain, i), topic=t, has_image=i not in text_only)
        if i not in image_only:
            item.title, item.description, item.category = _item_text(TOPICS[t], domain, n_topics, rng)
        items.append(item)
    return items


def _topic_pools(items: list[SynthItem], n_topics: int, rng: np.random.Generator) -> list[_Pool]:
    """Per topic: its item positions and Zipf-like draw probabilities (mildly skewed popularity)."""
    pools = []
    for t in range(n_topics):
        # shuffled, so that popularity does not follow id order
        members = rng.permutation([i for i, it in enumerate(items) if it.topic == t])
        weights = 1.0 / np.arange(1, len(members) + 1) ** 0.8
        pools.append((members, weights / weights.sum()))
    return pools


def _user_topics(n_topics: int, rng: np.random.Generator) -> tuple[int, ...]:
    main = int(rng.integers(n_topics))
    if n_topics == 1 or rng.random() < 0.5:
        return (main,)
    other = int(rng.integers(n_topics - 1))
    return (main, other + (other >= main))


def _draw_item(topics: tuple[int, ...], pools: list[_Pool], n_items: int, rng: np.random.Generator) -> int:
    if rng.random() >= ON_TOPIC_PROB:
        return int(rng.integers(n_items))
    t = topics[0] if len(topics) == 1 or rng.random() < MAIN_TOPIC_PROB else topics[1]
    members, probs = pools[t]
    return int(rng.choice(members, p=probs))


def _draw_sequence(topics: tuple[int, ...], pools: list[_Pool], n_items: int, rng: np.random.Generator) -> list[int]:
    seq: list[int] = []
    for _ in range(int(rng.integers(MIN_SEQ_LEN, MAX_SEQ_LEN + 1))):
        # a repeat is mostly redrawn (up to 3 tries): popular items recur, but not in most positions
        for _ in range(3):
            item = _draw_item(topics, pools, n_items, rng)
            if item not in seq or rng.random() < REPEAT_PROB:
                break
        seq.append(item)
    return seq


def _cover_all_items(plan: DomainPlan, rng: np.random.Generator) -> None:
    """Insert every never-seen item into the sequence of a user who follows its topic, if any."""
    seen = {i for seq in plan.sequences for i in seq}
    for i, item in enumerate(plan.items):
        if i in seen:
            continue
        fans = [u for u, ts in enumerate(plan.user_topics) if item.topic in ts and len(plan.sequences[u]) < MAX_SEQ_LEN]
        roomy = [u for u, seq in enumerate(plan.sequences) if len(seq) < MAX_SEQ_LEN]
        candidates = fans or roomy or list(range(len(plan.users)))
        seq = plan.sequences[candidates[int(rng.integers(len(candidates)))]]
        seq.insert(int(rng.integers(len(seq) + 1)), i)


def _timestamps(length: int, rng: np.random.Generator) -> list[int]:
    t = _EPOCH_START + int(rng.integers(365 * 86_400))
    out = [t]
    for _ in range(length - 1):
        if rng.random() >= TIE_PROB:
            t += 1 + int(rng.exponential(2 * 86_400))
        out.append(t)
    return out


def plan_domain(
    domain: str, *, users_per_domain: int = 120, items_per_domain: int = 150, n_topics: int = 8, seed: int = 0
) -> DomainPlan:
    """The items, users and sequences :func:`synthesize` writes for ``domain`` (with the latent topics)."""
    _check_args([domain], users_per_domain, items_per_domain, n_topics, 8)
    item_rng, inter_rng, _ = _domain_rngs(seed, domain)
    items = _plan_items(domain, items_per_domain, n_topics, item_rng)
    users = [f"u{u + 1:04d}" for u in range(users_per_domain)]
    plan = DomainPlan(domain, items, users, [_user_topics(n_topics, inter_rng) for _ in users])
    pools = _topic_pools(items, n_topics, inter_rng)
    plan.sequences = [_draw_sequence(ts, pools, len(items), inter_rng) for ts in plan.user_topics]
    _cover_all_items(plan, inter_rng)
    plan.timestamps = [_timestamps(len(seq), inter_rng) for seq in plan.sequences]
    if not any(a == b for ts in plan.timestamps for a, b in zip(ts, ts[1:])):
        plan.timestamps[0][1] = plan.timestamps[0][0]  # tiny domains: keep at least one tie to break
    return plan


# ---- writing ------------------------------------------------------------------------------------


def _item_record(item: SynthItem) -> dict[str, str]:
    # key order is the generic reader's default text order: title first
    record = {"id": item.id}
    if item.title is not None:
        record.update(title=item.title, description=item.description or "", category=item.category or "")
    if item.has_image:
        record["image"] = f"images/{item.id}.jpg"
    return record


def _write_items(plan: DomainPlan, folder: Path, image_size: int, rng: np.random.Generator, bar: tqdm) -> None:
    (folder / "images").mkdir()
    with open(folder / "items.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for item in plan.items:
            record = _item_record(item)
            f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            if item.has_image:
                image = draw_image(TOPICS[item.topic], image_size, rng)
                image.save(folder / record["image"], format="JPEG", quality=JPEG_QUALITY)
            bar.update(1)


def _write_interactions(plan: DomainPlan, folder: Path) -> None:
    with open(folder / "interactions.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["user", "item", "timestamp"])
        for user, seq, times in zip(plan.users, plan.sequences, plan.timestamps):
            writer.writerows((user, plan.items[i].id, t) for i, t in zip(seq, times))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_domain(plan: DomainPlan, out: Path, image_size: int, pixel_rng: np.random.Generator, bar: tqdm) -> Path:
    """Build the domain in ``out/.tmp-<domain>-<pid>``, then move it into place as ``out/<domain>``."""
    final, tmp = out / plan.name, out / f".tmp-{plan.name}-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        _write_items(plan, tmp, image_size, pixel_rng, bar)
        _write_interactions(plan, tmp)
        _remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def synthesize(
    out: str | Path,
    *,
    domains: Sequence[str] = DEFAULT_DOMAINS,
    users_per_domain: int = 120,
    items_per_domain: int = 150,
    n_topics: int = 8,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = False,
) -> list[Path]:
    """Write one generic-format folder per domain under ``out`` (replacing existing ones).

    Returns the list of domain folders written (``out/<domain>``), in the order of ``domains``.
    Raises ValueError for bad arguments, before anything is written.
    """
    _check_args(domains, users_per_domain, items_per_domain, n_topics, image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tqdm(total=len(domains) * items_per_domain, unit="item", desc="synth", disable=not progress) as bar:
        for domain in domains:
            plan = plan_domain(
                domain,
                users_per_domain=users_per_domain,
                items_per_domain=items_per_domain,
                n_topics=n_topics,
                seed=seed,
            )
            _, _, pixel_rng = _domain_rngs(seed, domain)
            written.append(_write_domain(plan, out, image_size, pixel_rng, bar))
    return written
