"""Text and image towers on tiny random backbones (hidden 32, intermediate 37), and the real MiniLM offline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.encoders import ImageEncoder, TextEncoder, TokenPooling, count_parameters
from pretrain.frozen_cache import image_keys, item_keys

BERT = {
    "model_type": "bert",
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
}
IMAGE_CONFIGS = {
    "vit": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    },
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
    "convnext": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
}
# trainable parameter name prefixes of the backbone with trainable="top", top_layers=1
TOP1 = {
    "text": ("backbone.model.encoder.layer.1.",),
    "vit": ("backbone.model.layers.1.", "backbone.model.layernorm."),
    "resnet": ("backbone.model.encoder.stages.1.",),
    "convnext": ("backbone.model.encoder.stages.1.", "backbone.model.layernorm."),
}
D = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~100x slower when the intra-op threads contend on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_encoder(**kw) -> TextEncoder:
    torch.manual_seed(0)
    kw = {"init": "random", "config_overrides": BERT, "out_dim": D, **kw}
    return TextEncoder(None, **kw)


def image_encoder(architecture: str, **kw) -> ImageEncoder:
    torch.manual_seed(0)
    kw = {"init": "random", "config_overrides": IMAGE_CONFIGS[architecture], "out_dim": D, **kw}
    return ImageEncoder(None, architecture=architecture, **kw)


def texts(lengths: list[int], T: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token ids (pad id 0) and their mask."""
    T = T or max(lengths)
    gen = torch.Generator().manual_seed(sum(lengths) + T)
    ids_UT = torch.randint(1, 99, (len(lengths), T), generator=gen)
    mask_UT = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids_UT * mask_UT, mask_UT


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def keys(*pairs: tuple[int, int]) -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def trainable_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


# ---- shapes and pooling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["attention", "cls", "mean"])
def test_text_encoder_shapes_and_zero_padding(pooling):
    enc = text_encoder(pooling=pooling).eval()
    ids_UT, mask_UT = texts([5, 2, 7])
    pooled_UD, tokens_UTD = enc(ids_UT, mask_UT)
    assert pooled_UD.shape == (3, D) and tokens_UTD.shape == (3, 7, D)
    assert torch.all(tokens_UTD[mask_UT == 0] == 0)
    assert enc(ids_UT, mask_UT, with_tokens=False)[1] is None


@pytest.mark.parametrize("architecture", ["vit", "resnet", "convnext"])
def test_image_encoder_shapes(architecture):
    enc = image_encoder(architecture).eval()
    pooled_ND, tokens_NPD = enc(pixels(3))
    assert pooled_ND.shape == (3, D) and tokens_NPD.shape[0] == 3 and tokens_NPD.shape[2] == D
    assert tokens_NPD.shape[1] == (17 if architecture == "vit" else 16)  # CLS + 4x4 patches; 4x4 positions
    if architecture == "vit":  # pooled = CLS through the same MLP
        torch.testing.assert_close(pooled_ND, tokens_NPD[:, 0])
    empty_ND, empty_tokens = enc(pixels(0))
    assert empty_ND.shape == (0, D) and empty_tokens.shape[0] == 0


@pytest.mark.parametrize("family", ["text", "vit", "resnet", "convnext"])
def test_staged_run_matches_the_model_forward(family):
    """Running stem, frozen blocks and trainable blocks separately computes what the transformers model computes."""
    enc = make(family, trainable="top", top_layers=1).eval()
    model = enc.backbone.model
    if family == "text":
        ids_UT, mask_UT = texts([4, 2, 6])
        real_UT1 = mask_UT[..., None].bool()
        ours = enc.backbone(ids_UT, mask_UT) * real_UT1
        torch.testing.assert_close(ours, model(input_ids=ids_UT, attention_mask=mask_UT).last_hidden_state * real_UT1)
        return
    x = pixels(2)
    pooled_NH, tokens_NPH = enc.backbone.family.features(enc.backbone(x))
    out = model(pixel_values=x)
    if family == "vit":
        torch.testing.assert_close(tokens_NPH, out.last_hidden_state)
    else:
        torch.testing.assert_close(pooled_NH, out.pooler_output.flatten(1))


def test_projection_kinds():
    mlp_text = text_encoder(projection="mlp", dropout=0.1).eval()
    assert [type(m) for m in mlp_text.proj] == [nn.Dropout, nn.Linear, nn.GELU, nn.Linear]
    assert mlp_text(*texts([3, 1]))[0].shape == (2, D)
    linear_image = image_encoder("resnet", projection="linear").eval()
    assert linear_image(pixels(2))[0].shape == (2, D) and len(linear_image.proj) == 2


def test_pooling_against_hand_computed_values():
    tokens_UTH = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask_UT = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = TokenPooling("mean", 2)(tokens_UTH, mask_UT)
    torch.testing.assert_close(mean, torch.tensor([[2.0, 3.0], [7.0, 8.0]]))  # the padded token is ignored
    torch.testing.assert_close(TokenPooling("cls", 2)(tokens_UTH, mask_UT), tokens_UTH[:, 0])

    attention = TokenPooling("attention", 2)
    with torch.no_grad():  # score(h) = sum(tanh(h))
        attention.key.weight.copy_(torch.eye(2))
        attention.key.bias.zero_()
        attention.query.weight.fill_(1.0)
        attention.query.bias.zero_()
    s = torch.tanh(tokens_UTH[0, :2]).sum(-1)
    w = s.exp() / s.exp().sum()
    expected = w[0] * tokens_UTH[0, 0] + w[1] * tokens_UTH[0, 1]
    torch.testing.assert_close(attention(tokens_UTH, mask_UT)[0], expected)


# ---- trainable selection and the frozen bottom ----------------------------------------------------------------------


def make(family: str, **kw) -> nn.Module:
    return text_encoder(**kw) if family == "text" else image_encoder(family, **kw)


def run(enc: nn.Module, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    if family == "text":
        return enc(*texts([4, 2]))
    return enc(pixels(2))


@pytest.mark.parametrize("family", ["text", "vit", "resnet", "convnext"])
def test_trainable_selection(family):
    enc = make(family, trainable="all")
    every = {n for n, _ in enc.named_parameters()}
    assert trainable_names(enc) == every
    head = {n for n in every if not n.startswith("backbone.")}  # pooling and projection: always trainable
    enc.set_trainable("none")
    assert trainable_names(enc) == head
    enc.set_trainable("top", 1)
    top = {n for n in every if n.startswith(TOP1[family])}
    assert top and trainable_names(enc) == head | top
    trainable, total = count_parameters(enc)
    assert total == sum(p.numel() for p in enc.parameters())
    assert trainable == sum(p.numel() for n, p in enc.named_parameters() if n in head | top) < total
    with pytest.raises(ValueError, match="top_layers"):
        enc.set_trainable("top", 3)


@pytest.mark.parametrize("family", ["text", "vit", "resnet", "convnext"])
def test_frozen_bottom_runs_without_graph_and_gets_no_grad(family):
    enc = make(family, trainable="top", top_layers=1).train()
    backbone = enc.backbone
    bottom = backbone.stages()[:-1]  # stem + every block but the last
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for m in bottom]
    pooled, tokens = run(enc, family)
    for h in hooks:
        h.remove()
    assert seen and not any(seen)
    assert all(not m.training for m in bottom) and backbone.stages()[-1].training  # frozen = eval mode
    enc.set_trainable("all")
    run(enc, family)
    assert all(m.training for m in backbone.stages())  # unfrozen stages train again
    enc.set_trainable("top", 1)
    (pooled.sum() + tokens.sum()).backward()
    for name, p in enc.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_frozen_split_follows_requires_grad():
    """An adapter that unfreezes a bottom weight (LoRA) shrinks the bottom instead of losing its gradient."""
    enc = text_encoder(trainable="top", top_layers=1)
    assert enc.backbone.frozen_split() == 2
    enc.backbone.model.encoder.layer[0].output.dense.weight.requires_grad_(True)
    assert enc.backbone.frozen_split() == 1
    pooled, _ = enc(*texts([3]))
    pooled.sum().backward()
    assert enc.backbone.model.encoder.layer[0].output.dense.weight.grad is not None


def test_gradient_checkpointing_matches():
    ids_UT, mask_UT = texts([4, 6])
    grads = []
    for ckpt in (False, True):
        enc = text_encoder(trainable="top", top_layers=2, gradient_checkpointing=ckpt).train()
        torch.manual_seed(1)
        pooled, _ = enc(ids_UT, mask_UT)
        pooled.square().sum().backward()
        grads.append(enc.backbone.model.encoder.layer[0].attention.self.query.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ---- the frozen-bottom cache ----------------------------------------------------------------------------------------


class CallCounter:
    def __init__(self, module: nn.Module) -> None:
        self.batch_sizes: list[int] = []
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        self.batch_sizes.append(output.shape[0])


def test_text_cache_equals_uncached_and_skips_the_bottom_on_hits():
    enc = text_encoder(trainable="top", top_layers=1, cache_frozen=True).eval()
    calls = CallCounter(enc.backbone.model.embeddings)
    ids_UT, mask_UT = texts([5, 2, 7])
    k = keys((0, 1), (0, 2), (1, 1))
    fresh = enc(ids_UT, mask_UT)  # no keys: no cache
    filled = enc(ids_UT, mask_UT, k)
    assert calls.batch_sizes == [3, 3]
    cache = enc.backbone.cache
    assert len(cache) == 3 and [cache.entries[key].shape[0] for key in [(0, 1), (0, 2), (1, 1)]] == [5, 2, 7]
    entry = cache.entries[(0, 2)]  # its own tokens only, in storage of its own (not a view of the batch)
    assert entry.untyped_storage().nbytes() == entry.numel() * entry.element_size()
    hit = enc(ids_UT, mask_UT, k)
    assert calls.batch_sizes == [3, 3]  # a full hit does not run the bottom
    for a, b, c in zip(fresh, filled, hit):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # a new batch, padded to another length, with one cached item and one new: the bottom sees the new one only
    ids2_UT, mask2_UT = texts([3, 2], T=9)
    ids2_UT[1, :2] = ids_UT[1, :2]
    mixed, _ = enc(ids2_UT, mask2_UT, keys((2, 5), (0, 2)))
    assert calls.batch_sizes == [3, 3, 1]
    torch.testing.assert_close(mixed, enc(ids2_UT, mask2_UT)[0])
    torch.testing.assert_close(mixed[1], fresh[0][1])


def test_cache_invalidation_when_frozen_weights_change():
    enc = text_encoder(trainable="top", top_layers=1, cache_frozen=True).eval()
    ids_UT, mask_UT = texts([4, 3])
    k = keys((0, 0), (0, 1))
    before, _ = enc(ids_UT, mask_UT, k)
    assert enc.backbone.verify_cache()
    with torch.no_grad():
        enc.backbone.model.embeddings.word_embeddings.weight.mul_(2.0)
    stale, _ = enc(ids_UT, mask_UT, k)
    torch.testing.assert_close(stale, before)  # served from the cache
    assert not enc.backbone.verify_cache()  # the fingerprint notices, and clears the cache
    after, _ = enc(ids_UT, mask_UT, k)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, enc(ids_UT, mask_UT)[0])

    enc(ids_UT, mask_UT, k)
    enc.invalidate()
    assert len(enc.backbone.cache) == 0
    enc(ids_UT, mask_UT, k)
    enc.load_state_dict(enc.state_dict())
    assert len(enc.backbone.cache) == 0
    enc(ids_UT, mask_UT, k)
    enc.set_trainable("none")
    assert len(enc.backbone.cache) == 0


def test_cache_check_every_catches_weight_changes():
    enc = text_encoder(trainable="none", cache_frozen=True, cache_check_every=1).eval()
    ids_UT, mask_UT = texts([4])
    before, _ = enc(ids_UT, mask_UT, keys((0, 0)))
    with torch.no_grad():
        enc.backbone.model.encoder.layer[1].output.dense.weight.mul_(3.0)  # a bias shift would vanish in LayerNorm
    assert not torch.allclose(enc(ids_UT, mask_UT, keys((0, 0)))[0], before)


@pytest.mark.parametrize(("architecture", "device"), [("resnet", "cpu"), ("vit", "model")])
def test_image_cache_equals_uncached_and_is_bounded(architecture, device):
    kw = {"cache_frozen": True, "cache_max_items": 3, "cache_device": device}
    enc = image_encoder(architecture, trainable="top", top_layers=1, **kw).eval()
    calls = CallCounter(enc.backbone.stages()[0])
    x = pixels(3)
    k = keys((0, 1), (0, 2), (0, 3))
    fresh, filled, hit = enc(x), enc(x, k), enc(x, k)
    assert calls.batch_sizes == [3, 3]
    for a, b, c in zip(fresh, filled, hit):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    enc(pixels(2, seed=1), keys((1, 1), (1, 2)))
    assert len(enc.backbone.cache) == 3  # LRU bound: the two oldest went
    assert list(enc.backbone.cache.entries) == [(0, 3), (1, 1), (1, 2)]


def test_frozen_batchnorm_statistics_stay_fixed_in_train_mode():
    enc = image_encoder("resnet", trainable="top", top_layers=1).train()
    bottom = enc.backbone.stages()[:-1]
    before = [b.clone() for m in bottom for b in m.buffers()]
    enc(pixels(4, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(before, [b for m in bottom for b in m.buffers()]))
    top_stats = enc.backbone.stages()[-1].layers[0].shortcut.normalization.running_mean
    assert not torch.equal(top_stats, torch.zeros_like(top_stats))  # the trainable stage does update its own


def test_image_keys_follow_pixel_rows():
    domain_U = torch.tensor([0, 0, 1, 1])
    index_U = torch.tensor([5, 6, 7, 8])
    image_row_U = torch.tensor([1, -1, 0, 2])
    assert image_keys(domain_U, index_U, image_row_U).tolist() == [[1, 7], [0, 5], [1, 8]]
    assert item_keys(domain_U, index_U).shape == (4, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="architecture"):
        ImageEncoder(None, architecture="vit", init="random", config_overrides={"model_type": "resnet"})
    with pytest.raises(ValueError, match="pooling"):
        text_encoder(pooling="max")
    with pytest.raises(ValueError, match="projection"):
        text_encoder(projection="conv")
    with pytest.raises(ValueError, match="pretrained"):
        ImageEncoder(None, architecture="resnet", init="pretrained")


def test_minilm_loads_offline():
    from shards.stream_config import default_text_model
    from shards.tokens import load_tokenizer

    path = default_text_model()
    enc = TextEncoder(path, init="pretrained", pooling="mean", out_dim=D, trainable="top", top_layers=1).eval()
    assert len(enc.backbone.model.encoder.layer) == 6 and enc.backbone.model.config.hidden_size == 384
    sentences = ["a red wool sweater", "noise cancelling headphones for long flights"]
    batch = load_tokenizer(path)(sentences, padding=True, return_tensors="pt")
    ids_UT, mask_UT = batch["input_ids"], batch["attention_mask"]
    pooled_UD, tokens_UTD = enc(ids_UT, mask_UT)
    assert pooled_UD.shape == (2, D) and torch.isfinite(pooled_UD).all()
    assert tokens_UTD.shape[:2] == ids_UT.shape
    real_UT1 = mask_UT[..., None].bool()
    expected = enc.backbone.model(input_ids=ids_UT, attention_mask=mask_UT).last_hidden_state
    torch.testing.assert_close(enc.backbone(ids_UT, mask_UT) * real_UT1, expected * real_UT1, atol=1e-5, rtol=1e-4)
