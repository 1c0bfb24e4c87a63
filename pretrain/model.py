"""The recommender: item encoders -> fusion -> the batch's item table; a causal user encoder over sequences of
those items; the pretraining objectives of TransRec, MISSRec and EM3, weighted by ``LossConfig``.

Items are known by content (text, image) and optionally by a per-domain ID (hybrid), or by their ID alone (the
ID-only SASRec baseline: ``model.user.id_embeddings`` with both content encoders disabled). Every distinct item of a
batch is encoded once (the stream's item table); sequences index into it. Users and items are compared by
cosine similarity (unit vectors; divided by ``loss.temperature`` in the losses), or, with score fusion
(MISSRec), by fusing the per-modality cosines.

Shape legend::

    B sequences   L positions   U distinct items of the batch (table rows)   N items with an image
    D model width (model.user.width)   T tokens   P image patches / interest prototypes   J CPC negatives
    K prediction points (sampled softmax)   G rows of the catalog (all domains)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from shards import schema

from . import hub
from .config import LossConfig, ModelConfig
from .encoders import ImageEncoder, TextEncoder
from .feature_store import feature_dir, image_source, text_source
from .frozen_cache import image_keys, item_keys
from .fusion import build_fusion, rows_to_items
from .interests import centroids, dpc_knn, interest_memory
from .losses import (
    NegativeQueue,
    combine,
    content_id_infonce,
    cpc_bce,
    false_negative_mask,
    interest_diversity,
    log_q_from_popularity,
    next_item_ce,
    sampled_softmax,
    seq_seq_infonce,
)
from .user import UserEncoder, user_states


@dataclass(frozen=True)
class Catalog:
    """The domains a model knows, in stream order: catalog sizes (ID-embedding rows) and item popularity."""

    domains: tuple[str, ...]
    n_items: tuple[int, ...]
    popularity: tuple[tuple[int, ...], ...]
    """Training interactions per catalog index, per domain (the manifests' ``popularity``)."""

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path]) -> Catalog:
        manifests = [schema.load_manifest(f) for f in folders]
        return cls(tuple(m.domain for m in manifests), tuple(m.n_items for m in manifests),
                   tuple(m.popularity for m in manifests))  # fmt: skip

    @property
    def offsets(self) -> list[int]:
        """Row of each domain's first item in the concatenated catalog."""
        return list(itertools.accumulate(self.n_items, initial=0))[:-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "n_items": list(self.n_items),
            "popularity": [list(p) for p in self.popularity],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Catalog:
        return cls(tuple(d["domains"]), tuple(d["n_items"]), tuple(tuple(p) for p in d["popularity"]))


class Gather(Protocol):
    """Negatives from all ranks (the engine's all-gather; model code never calls torch.distributed).

    ``gather(x_U...)`` returns every rank's rows concatenated in rank order (padded to the largest table, padding
    rows with item id -1), gradients flowing back to the local rows; ``offset(U)`` is the first gathered row of
    this rank's table."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def offset(self, rows: int) -> int: ...


@dataclass
class ItemEmbeddings:
    """Encoded item-table rows (U of them)."""

    items_UD: torch.Tensor
    """What sequences are made of and dot products score: fused content, plus the ID embedding when hybrid (the
    ID embedding alone when ID-only)."""
    content_UD: torch.Tensor | None
    """Fused content embedding alone (None for an ID-only model: no text or image encoder)."""
    text_UD: torch.Tensor | None
    image_UD: torch.Tensor | None
    has_text_U: torch.Tensor
    has_image_U: torch.Tensor
    id_UD: torch.Tensor | None
    rows_U: torch.Tensor
    """Each item's row in the concatenated catalog of all domains (its global id)."""


class ModelOutput(NamedTuple):
    """What ``forward`` returns: a named tuple, which DeepSpeed's ZeRO-3 hooks can look into (a dataclass they
    cannot: they would warn that backward hooks may not trigger)."""

    loss: torch.Tensor
    """The weighted sum of the objectives (a scalar)."""
    logs: dict[str, float]
    """Each objective's value, the total, and batch counts (sequences, positions, distinct items)."""


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class Recommender(nn.Module, PyTorchModelHubMixin, library_name="momrec", tags=["sequential-recommendation"]):
    """Item encoders, fusion, user encoder and objectives; see the module docstring. ``save_pretrained(folder)`` and
    ``Recommender.from_pretrained(folder)`` (huggingface_hub's mixin) write and read the export (pretrain/hub.py)."""

    _hub_mixin_config: dict[str, Any] = {}  # config.json, set by from_pretrained and new_model: not the mixin's copy
    # of every constructor's arguments (the catalog's popularity, at each build)

    def __init__(self, model: ModelConfig, loss: LossConfig, catalog: Catalog, image_size: int | None = None) -> None:
        """``image_size``: the side of the stream's images (data.stream.image_size), for backbones whose config
        fixes it (ViT)."""
        super().__init__()
        D = model.user.width
        self.model_cfg, self.loss_cfg, self.catalog, self.image_size = model, loss, catalog, image_size
        self.queue = NegativeQueue(loss.queue_batches) if loss.queue_batches else None
        self.text = _text_encoder(model, D) if model.text.enabled else None
        self.image = _image_encoder(model, D, image_size) if model.image.enabled else None
        fusion_kw = {"score": {"tau": model.fusion.score_tau}, "qformer": {
            "queries": model.fusion.qformer_queries, "layers": model.fusion.qformer_layers,
            "heads": model.fusion.qformer_heads}}.get(model.fusion.kind, {})  # fmt: skip
        self.fusion = build_fusion(model.fusion.kind, D, **fusion_kw)
        self.user = UserEncoder(D, model.user.layers, model.user.heads, model.user.dropout, model.user.max_seq_len,
                                n_interest_tokens=model.user.interest_tokens, readout=model.user.readout)  # fmt: skip
        n_rows = sum(catalog.n_items)
        self.ids = nn.Embedding(n_rows, D) if model.user.id_embeddings else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.02)
        # derived from the catalog (saved in the export's config), so not part of the state dict
        self.register_buffer("domain_offset", torch.tensor(catalog.offsets, dtype=torch.long), persistent=False)
        flat = [c for pop in catalog.popularity for c in pop]
        self.register_buffer("popularity", torch.tensor(flat, dtype=torch.float32), persistent=False)
        P = model.user.interest_tokens
        # MISSRec interests, refreshed by refresh_interests(); -1: not computed yet (no memory is used)
        self.register_buffer("prototype_of", torch.full((n_rows,), -1, dtype=torch.long))
        self.register_buffer("interests", torch.zeros(P, D))
        assert not (loss.gather_negatives and self.fusion.per_modality_scores), "refused by the config's check"

    # ---- Hugging Face Hub (PyTorchModelHubMixin) ------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json, model.safetensors and README.md; the run's config is the one the model was built or
        loaded with (``pretrain.export.new_model``, ``from_pretrained``), absent for one built by hand."""
        doc = hub.document(self.model_cfg, self.loss_cfg, self.catalog.to_dict(), self.image_size,
                           self._hub_mixin_config.get("config"))  # fmt: skip
        hub.write_folder(save_directory, self, self.state_dict(), doc)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", **hub_args: Any) -> Recommender:
        """The model of a folder (or a Hub repository: ``hub_args``) in eval mode; every weight must fit its config."""
        folder = hub.local_folder(model_id, **hub_args)
        return cls.from_document(folder, hub.read_document(folder), map_location)

    @classmethod
    def from_document(cls, folder: Path, doc: dict[str, Any], map_location: str | torch.device = "cpu") -> Recommender:
        """The model of the local ``folder`` whose config.json is ``doc`` (as :func:`pretrain.hub.read_document`
        returns it), in eval mode; every weight must fit its config."""
        cfg = hub.train_config(doc)
        model = cls(cfg.model, cfg.loss, Catalog.from_dict(doc["catalog"]), image_size=doc["image_size"])
        model._hub_mixin_config = doc
        hub.load_weights(model, folder)
        return model.to(map_location).eval()

    # ---- items ----------------------------------------------------------------------------------------

    def encode_items(self, table: Any) -> ItemEmbeddings:
        """Encode item-table rows: anything with the item fields of ``shards.collate.Batch``."""
        rows_U = self.domain_offset[table.item_domain] + table.item_index
        tokens = self.model_cfg.fusion.kind == "qformer"
        text_UD = text_tokens = image_UD = image_tokens = content_UD = None
        if self.text is not None:
            keys_U2 = item_keys(table.item_domain, table.item_index)
            text_UD, text_tokens = self.text(table.input_ids, table.attention_mask, keys_U2, with_tokens=tokens)
        if self.image is not None:
            dtype = next(self.image.parameters()).dtype
            keys_N2 = image_keys(table.item_domain, table.item_index, table.image_row)
            pooled_ND, tokens_NPD = self.image(table.normalized_pixels(dtype), keys_N2, with_tokens=tokens)
            image_UD = rows_to_items(pooled_ND, table.image_row)
            image_tokens = None if tokens_NPD is None else rows_to_items(tokens_NPD, table.image_row)
        has_text_U = table.has_text & (self.text is not None)
        has_image_U = table.has_image & (self.image is not None)
        if self.text is not None or self.image is not None:
            content_UD = self.fusion(text_UD, image_UD, has_text_U, has_image_U, text_tokens, table.attention_mask,
                                     image_tokens)  # fmt: skip
        id_UD = None if self.ids is None else self.ids(rows_U)
        if content_UD is None and id_UD is None:  # the config refuses this; a hand-built ModelConfig may not
            raise ValueError("the model has no item representation: enable a content encoder or id_embeddings")
        items_UD = id_UD if content_UD is None else content_UD if id_UD is None else content_UD + id_UD
        return ItemEmbeddings(items_UD, content_UD, text_UD, image_UD, has_text_U, has_image_U, id_UD, rows_U)

    def bind_items(self, domain: int, folder: str | Path, stream: Any) -> None:
        """Domain ``domain``'s items are read from the built folder ``folder`` with the stream config ``stream``
        (:class:`shards.stream_config.StreamConfig`): their frozen-bottom outputs may then come from, and go to, the
        disk store (model.feature_cache_dir). Without a binding a domain is cached in memory only."""
        if self.text is not None and self.text.backbone.disk is not None:
            self.text.backbone.bind_source(domain, text_source(folder, stream))
        if self.image is not None and self.image.backbone.disk is not None:
            self.image.backbone.bind_source(domain, image_source(folder, stream))

    def flush_feature_cache(self) -> int:
        """Write the frozen-bottom outputs computed since the last flush to the disk store; returns how many."""
        return sum(tower.backbone.flush_cache() for tower in (self.text, self.image) if tower is not None)

    def feature_cache_stats(self) -> dict[str, dict[str, int]]:
        """Per tower with a frozen-bottom cache: items served from memory, read from disk, computed (this process)."""
        towers = {"text": self.text, "image": self.image}
        cached = {name: t for name, t in towers.items() if t is not None and t.backbone.cache is not None}
        return {name: t.backbone.cache_stats() for name, t in cached.items()}

    def score(self, user_BD: torch.Tensor, items: ItemEmbeddings) -> torch.Tensor:
        """(B, U) cosine scores of users against items (fused per modality with score fusion)."""
        if not self.fusion.per_modality_scores:
            return _unit(user_BD) @ _unit(items.items_UD).T
        return self.fusion.score(_unit(user_BD), _unit(items.text_UD), _unit(items.image_UD), items.has_text_U,
                                 items.has_image_U)  # fmt: skip

    @torch.no_grad()
    def refresh_interests(self, items: ItemEmbeddings) -> None:
        """MISSRec: DPC-KNN prototypes over the catalog's item embeddings (``items`` = the whole catalog of the
        training domains, e.g. once per epoch); each item's interest and the interest tokens (cluster means)."""
        P = self.model_cfg.user.interest_tokens
        if P == 0:
            raise ValueError("refresh_interests needs model.user.interest_tokens > 0")
        # ID-only: cluster the ID embeddings (there is no content)
        content_GD = _unit((items.items_UD if items.content_UD is None else items.content_UD).float())
        k = min(self.model_cfg.user.interest_knn, content_GD.shape[0] - 1)
        _, assignment_G = dpc_knn(content_GD, min(P, content_GD.shape[0]), k)
        self.interests.zero_()
        self.interests[: int(assignment_G.max()) + 1] = centroids(content_GD, assignment_G, int(assignment_G.max()) + 1)
        self.prototype_of[items.rows_U] = assignment_G

    # ---- users ----------------------------------------------------------------------------------------

    def _states(self, batch: Any, items: ItemEmbeddings, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) user-encoder states over ``batch.seq`` (``mask_BL`` overrides the batch's mask)."""
        mask_BL = batch.seq_mask if mask_BL is None else mask_BL
        items_BLD = items.items_UD[batch.seq.clamp_min(0)]
        memory_BMD = memory_mask_BM = None
        prototype_U = self.prototype_of[items.rows_U] if self.model_cfg.user.interest_tokens else None
        if prototype_U is not None and bool((prototype_U >= 0).all()):
            memory_BMD, memory_mask_BM = interest_memory(batch.seq, mask_BL, prototype_U, self.interests)
            memory_BMD = memory_BMD.to(items_BLD.dtype)
        return self.user(items_BLD, mask_BL, memory_BMD, memory_mask_BM)

    def user_vectors(self, batch: Any, items: ItemEmbeddings | None = None) -> torch.Tensor:
        """(B, D) the state at each history's last position: the user, for scoring a held-out target."""
        items = self.encode_items(batch) if items is None else items
        return user_states(self._states(batch, items), batch.seq_mask)

    # ---- objectives -----------------------------------------------------------------------------------

    def forward(self, batch: Any, gather: Gather | None = None, items: ItemEmbeddings | None = None) -> ModelOutput:
        """The weighted objectives on a training batch (``split="train"``: every position predicts the next).
        ``items``: the batch's table already encoded (benchmarks.dedup encodes it without deduplication)."""
        items = self.encode_items(batch) if items is None else items
        states_BLD = self._states(batch, items)
        weights, T = self.loss_cfg.weights(), self.loss_cfg.temperature
        losses: dict[str, torch.Tensor] = {}
        if weights["softmax"]:
            losses["softmax"] = self._sampled_softmax(states_BLD, batch, items, gather)
        if weights["next_item_ce"]:
            losses["next_item_ce"] = next_item_ce(_unit(states_BLD), _unit(items.items_UD), batch.seq,
                                                  batch.seq_mask, temperature=T)  # fmt: skip
        if weights["cpc"]:
            losses["cpc"] = self._cpc(states_BLD, batch, items)
        if weights["content_id"]:
            if items.content_UD is None or items.id_UD is None:
                raise ValueError("loss.content_id needs content (a text or image encoder) and model.user.id_embeddings")
            losses["content_id"] = content_id_infonce(items.content_UD, items.id_UD, T)
        if weights["seq_seq"]:
            losses["seq_seq"] = self._seq_seq(states_BLD, batch, items)
        if weights["interest_diversity"]:
            losses["interest_diversity"] = self._diversity(batch, items, states_BLD)
        total, logs = combine(losses, weights)
        logs.update(sequences=float(batch.seq.shape[0]), positions=float(batch.seq_mask.sum()),
                    items=float(items.items_UD.shape[0]))  # fmt: skip
        return ModelOutput(total, logs)

    def _prediction_pairs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, t) of the states that predict position t + 1: all of them, or each sequence's last."""
        valid_BL = batch.seq_mask[:, :-1] & batch.seq_mask[:, 1:]
        if self.loss_cfg.softmax_positions == "last":
            last_B = valid_BL.sum(1) - 1  # histories are right-padded, so the last valid pair is at length - 2
            keep_B = last_B >= 0
            return torch.nonzero(keep_B).squeeze(1), last_B[keep_B]
        b_K, t_K = torch.nonzero(valid_BL, as_tuple=True)
        return b_K, t_K

    def _sampled_softmax(self, states_BLD: torch.Tensor, batch: Any, items: ItemEmbeddings,
                         gather: Gather | None) -> torch.Tensor:  # fmt: skip
        b_K, t_K = self._prediction_pairs(batch)
        user_KD, target_K = states_BLD[b_K, t_K], batch.seq[b_K, t_K + 1]
        T = self.loss_cfg.temperature
        log_q_U = None
        if self.loss_cfg.logq_correction:
            log_q_U = log_q_from_popularity(self.popularity[items.rows_U], total=float(self.popularity.sum()))
        seen_KU = None
        if self.loss_cfg.exclude_history:
            seen_KU = seen_before(batch.seq, batch.seq_mask, b_K, t_K, len(items.rows_U))
        if self.fusion.per_modality_scores:  # the rows are distinct items: no false negative to mask
            logits_KU = self.score(user_KD, items) / T
            logits_KU = logits_KU if log_q_U is None else logits_KU - log_q_U
            if seen_KU is not None:
                logits_KU = logits_KU.masked_fill(false_negative_mask(target_K, len(items.rows_U), exclude_NU=seen_KU),
                                                  -math.inf)  # fmt: skip
            return F.cross_entropy(logits_KU, target_K)
        items_UD = _unit(items.items_UD)
        extra = None if self.queue is None else self.queue.negatives(items.rows_U)
        if gather is None and extra is None:
            loss = sampled_softmax(_unit(user_KD), items_UD, target_K, temperature=T, log_q_U=log_q_U,
                                   exclude_NU=seen_KU)  # fmt: skip
        else:  # item ids: a gathered or queued copy of a target or history item is masked
            offset = 0 if gather is None else gather.offset(len(items.rows_U))
            loss = sampled_softmax(_unit(user_KD), items_UD, target_K + offset, temperature=T, log_q_U=log_q_U,
                                   item_ids_U=items.rows_U, exclude_NU=seen_KU, gather=gather, extra=extra)  # fmt: skip
        if self.queue is not None and self.training:  # this batch's items join the queue after its own loss
            self.queue.push(items_UD, items.rows_U, log_q_U)
        return loss

    def _cpc(self, states_BLD: torch.Tensor, batch: Any, items: ItemEmbeddings) -> torch.Tensor:
        """TransRec CPC: the prefix's state scores each suffix item (positive) and J random table rows."""
        mask_BL, seq_BL = batch.seq_mask, batch.seq
        B, L = seq_BL.shape
        length_B = mask_BL.sum(1)
        wanted = self.loss_cfg.cpc_prefix or None
        prefix_B = (torch.full_like(length_B, wanted) if wanted else length_B // 2).clamp(1)
        prefix_B = torch.minimum(prefix_B, (length_B - 1).clamp(1))
        user_BD = states_BLD[torch.arange(B, device=seq_BL.device), prefix_B - 1]
        positions_L = torch.arange(L, device=seq_BL.device)
        suffix_mask_BL = mask_BL & (positions_L >= prefix_B[:, None])
        U, J = items.items_UD.shape[0], self.loss_cfg.cpc_negatives
        negatives_BJ = torch.randint(0, U, (B, J), device=seq_BL.device)
        in_sequence_BJ = ((negatives_BJ[:, :, None] == seq_BL[:, None, :]) & mask_BL[:, None, :]).any(-1)
        table_UD, T = _unit(items.items_UD), self.loss_cfg.temperature
        return cpc_bce(_unit(user_BD) / T, table_UD[seq_BL.clamp_min(0)], suffix_mask_BL, table_UD[negatives_BJ],
                       ~in_sequence_BJ)  # fmt: skip

    def _seq_seq(self, states_BLD: torch.Tensor, batch: Any, items: ItemEmbeddings) -> torch.Tensor:
        """MISSRec sequence-sequence contrast: the full history vs. a view with ~20% of its positions dropped."""
        mask_BL = batch.seq_mask
        keep_BL = torch.rand(mask_BL.shape, device=mask_BL.device) >= 0.2
        keep_BL[torch.arange(mask_BL.shape[0], device=mask_BL.device), mask_BL.sum(1).clamp(1) - 1] = True
        view_BLD = self._states(batch, items, mask_BL & keep_BL)
        return seq_seq_infonce(user_states(states_BLD, mask_BL), user_states(view_BLD, mask_BL & keep_BL),
                               self.loss_cfg.temperature)  # fmt: skip

    def _diversity(self, batch: Any, items: ItemEmbeddings, states_BLD: torch.Tensor) -> torch.Tensor:
        prototype_U = self.prototype_of[items.rows_U]
        if not bool((prototype_U >= 0).all()):  # interests not computed yet: nothing to regularise
            return states_BLD.sum() * 0.0
        memory_BMD, mask_BM = interest_memory(batch.seq, batch.seq_mask, prototype_U, self.interests)
        return interest_diversity(self.user.encode_interests(memory_BMD.to(states_BLD.dtype), mask_BM), mask_BM)


def seen_before(seq_BL: torch.Tensor, mask_BL: torch.Tensor, b_K: torch.Tensor, t_K: torch.Tensor,
                n_rows: int) -> torch.Tensor:  # fmt: skip
    """(K, U) bool: the item-table rows that sequence ``b_K`` holds at positions <= ``t_K`` (what the user has seen
    when predicting position t + 1; the evaluation masks these items too)."""
    positions_L = torch.arange(seq_BL.shape[1], device=seq_BL.device)
    seen_KL = mask_BL[b_K] & (positions_L <= t_K[:, None])
    rows_KL = torch.where(seen_KL, seq_BL[b_K], n_rows)  # unseen positions go to a spare column, dropped below
    seen_KU = torch.zeros(len(b_K), n_rows + 1, dtype=torch.bool, device=seq_BL.device)
    return seen_KU.scatter_(1, rows_KL, True)[:, :n_rows]


def _text_encoder(model: ModelConfig, width: int) -> TextEncoder:
    c = model.text
    return TextEncoder(c.name_or_path, init=c.init, config_overrides=dict(c.config_overrides), pooling=c.pooling,
                       out_dim=width, projection=c.projection, dropout=c.dropout, trainable=c.trainable,
                       top_layers=c.top_layers, gradient_checkpointing=c.gradient_checkpointing,
                       cache_frozen=c.cache_frozen, feature_cache=feature_dir(model.feature_cache_dir))  # fmt: skip


def _image_encoder(model: ModelConfig, width: int, image_size: int | None) -> ImageEncoder:
    c = model.image
    overrides = dict(c.config_overrides)
    if c.architecture == "vit" and image_size is not None:
        overrides["image_size"] = image_size
    return ImageEncoder(
        c.name_or_path,
        architecture=c.architecture,
        init=c.init,
        config_overrides=overrides,
        out_dim=width,
        projection=c.projection,
        dropout=c.dropout,
        trainable=c.trainable,
        top_layers=c.top_layers,
        gradient_checkpointing=c.gradient_checkpointing,
        cache_frozen=c.cache_frozen,
        feature_cache=feature_dir(model.feature_cache_dir),
    )
