"""The disk store under the frozen-bottom cache (pretrain.feature_store) and its command (python -m pretrain.cache):
a later encoder reads what an earlier one wrote, bit for bit, without running the frozen layers; every part of the
key makes a new entry; corrupt, truncated and half-written files are never read as valid; list and prune."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain import cache as cache_cli
from pretrain import feature_store
from pretrain.catalog import encode_catalog
from pretrain.config import TrainConfig, load_config
from pretrain.encoders import ImageEncoder, TextEncoder
from pretrain.feature_files import (
    ENTRY_FILE,
    FORMAT,
    SEGMENT_GLOB,
    TMP_PREFIX,
    CorruptSegment,
    Segment,
    checksummed,
    decode_segment,
)
from pretrain.feature_prune import STALE_TMP_S, list_entries
from pretrain.feature_store import Source, feature_dir, image_source, text_source
from pretrain.model import Catalog, Recommender
from shards import schema
from tests.pretrain.test_encoders import BERT, IMAGE_CONFIGS, keys, pixels, texts
from tests.testutil import TINY, fork_two_ranks

D = 12
SOURCE = Source("items-of-domain-0", {"domain": "books", "n_items": 40})


def text_encoder(root: Path, seed: int = 0, **kw) -> TextEncoder:
    torch.manual_seed(seed)
    enc = TextEncoder(None, init="random", config_overrides=BERT, out_dim=D, trainable="top", top_layers=1,
                      cache_frozen=True, feature_cache=root, **kw)  # fmt: skip
    enc.backbone.bind_source(0, SOURCE)
    return enc.eval()


def image_encoder(root: Path, seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    enc = ImageEncoder(None, architecture="resnet", init="random", config_overrides=IMAGE_CONFIGS["resnet"],
                       out_dim=D, trainable="top", top_layers=1, cache_frozen=True, feature_cache=root)  # fmt: skip
    enc.backbone.bind_source(0, SOURCE)
    return enc.eval()


def refuse_bottom(enc: nn.Module) -> None:
    """Make the stem raise: a forward that needs the frozen bottom fails."""

    def refuse(*_):
        raise AssertionError("the frozen bottom ran")

    enc.backbone.stages()[0].register_forward_pre_hook(refuse)


def segments(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/{SEGMENT_GLOB}"))


def entry_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


TEXT = texts([5, 2, 7])
TEXT_KEYS = keys((0, 1), (0, 2), (0, 3))


def fill_text(root: Path, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """A first process: encodes three items and writes them."""
    enc = text_encoder(root, **kw)
    out = enc(*TEXT, TEXT_KEYS)
    assert enc.backbone.flush_cache() == 3
    return out


# ---- a later process reads what an earlier one wrote -------------------------------------------------------------


def test_text_features_are_read_back_bit_identical_without_the_bottom(tmp_path):
    first = fill_text(tmp_path)
    later = text_encoder(tmp_path)  # same weights, empty memory: a new process
    refuse_bottom(later)
    again = later(*TEXT, TEXT_KEYS)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert later.backbone.cache_stats() == {"memory": 0, "disk": 3, "computed": 0}
    with pytest.raises(AssertionError, match="the frozen bottom ran"):  # an item never stored
        later(*texts([4]), keys((0, 9)))
    # a batch padded to another length, one stored item and one new: only the new one runs the bottom
    fresh = text_encoder(tmp_path)
    ids_UT, mask_UT = texts([3, 2], T=9)
    ids_UT[1, :2] = TEXT[0][1, :2]
    fresh(ids_UT, mask_UT, keys((0, 7), (0, 2)))
    assert fresh.backbone.cache_stats() == {"memory": 0, "disk": 1, "computed": 1}


def test_image_features_are_read_back_bit_identical_without_the_bottom(tmp_path):
    x, k = pixels(3), keys((0, 1), (0, 2), (0, 3))
    first = image_encoder(tmp_path)
    expected = first(x, k)
    first.backbone.flush_cache()
    later = image_encoder(tmp_path)
    refuse_bottom(later)
    for a, b in zip(expected, later(x, k)):
        assert torch.equal(a, b)


def test_items_of_a_segment_read_together_count_as_disk_hits(tmp_path):
    fill_text(tmp_path)
    later = text_encoder(tmp_path)
    later(*texts([5]), keys((0, 1)))  # reads the segment of all three
    ids_UT, mask_UT = TEXT
    later(ids_UT[1:], mask_UT[1:, :7], keys((0, 2), (0, 3)))
    assert later.backbone.cache_stats() == {"memory": 0, "disk": 3, "computed": 0}
    assert len(later.backbone.cache) == 3


def test_held_reads_only_the_wanted_items_and_each_segment_once(tmp_path, monkeypatch):
    """Backbone.held (a catalog pass) takes the wanted items out of a segment, not the others, and reads and checks a
    segment once however many chunks it serves; the tensors are the stored ones, bit for bit."""
    first = fill_text(tmp_path)
    reads = []
    read = feature_store.read_segment
    monkeypatch.setattr(feature_store, "read_segment", lambda *a: reads.append(a[0]) or read(*a))
    later = text_encoder(tmp_path)
    refuse_bottom(later)
    got = later.backbone.held([(0, 1), (0, 9)])  # (0, 9) was never stored
    assert list(got) == [(0, 1)] and len(later.backbone.cache) == 1
    assert set(later.backbone.held([(0, 2), (0, 3)])) == {(0, 2), (0, 3)} and len(reads) == 1
    assert torch.equal(later(*TEXT, TEXT_KEYS)[0], first[0])
    assert later.backbone.cache_stats() == {"memory": 0, "disk": 3, "computed": 0}
    later.backbone.disk.release()
    later.backbone.cache.invalidate()
    later.backbone.held([(0, 1)])
    assert len(reads) == 2  # released: read again


def test_a_segment_whose_header_lies_about_a_tensor_is_corrupt():
    data = bytearray(checksummed({"i1": torch.ones(2, 3), "i2": torch.zeros(4)}, {"format": FORMAT, "entry": "k"}))
    assert torch.equal(Segment(bytearray(data), "k").tensor(1), torch.ones(2, 3))
    assert torch.equal(decode_segment(bytes(data), "k")[2], torch.zeros(4))
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["i1"]["shape"] = [2, 4]  # more elements than its bytes hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    lying = data[:8] + text + data[8 + n :]
    digest = header["__metadata__"]["sha256"]
    at = lying.index(digest.encode())
    fixed = lying[:at] + hashlib.sha256(lying[:at] + b"0" * 64 + lying[at + 64 :]).hexdigest().encode()
    fixed += lying[at + 64 :]  # a valid checksum: only the span check can tell
    with pytest.raises(CorruptSegment, match="do not match its shape"):
        Segment(bytearray(fixed), "k")
    with pytest.raises(CorruptSegment, match="not a segment of this entry"):
        Segment(bytearray(data), "another")


def test_an_unbound_domain_stays_in_memory(tmp_path):
    enc = text_encoder(tmp_path)
    enc(*TEXT, keys((5, 1), (5, 2), (5, 3)))  # domain 5 has no items source
    assert enc.backbone.flush_cache() == 0 and not segments(tmp_path)


# ---- what makes a new entry -----------------------------------------------------------------------------------


def test_a_changed_frozen_weight_is_a_new_entry_and_a_trained_top_is_not(tmp_path):
    first = fill_text(tmp_path)
    changed = text_encoder(tmp_path)
    with torch.no_grad():
        changed.backbone.model.encoder.layer[0].output.dense.weight[0, 0] += 1e-3  # frozen bottom
    out = changed(*TEXT, TEXT_KEYS)
    assert changed.backbone.cache_stats()["computed"] == 3 and not torch.equal(out[0], first[0])
    changed.backbone.flush_cache()
    assert len(entry_folders(tmp_path)) == 2
    top = text_encoder(tmp_path)
    with torch.no_grad():
        top.backbone.model.encoder.layer[1].output.dense.weight.mul_(2.0)  # the trainable top: not in the key
    top(*TEXT, TEXT_KEYS)
    assert top.backbone.cache_stats()["computed"] == 0


def test_a_changed_split_or_source_is_a_new_entry(tmp_path):
    fill_text(tmp_path)
    frozen = text_encoder(tmp_path)
    frozen.set_trainable("none")  # the whole backbone is the bottom now
    frozen(*TEXT, TEXT_KEYS)
    assert frozen.backbone.cache_stats()["computed"] == 3
    other = text_encoder(tmp_path)
    other.backbone.bind_source(0, Source("other-items", {}))
    other(*TEXT, TEXT_KEYS)
    assert other.backbone.cache_stats()["computed"] == 3


def test_weights_changed_before_a_flush_are_not_written(tmp_path):
    enc = text_encoder(tmp_path)
    enc(*TEXT, TEXT_KEYS)
    with torch.no_grad():  # behind the cache's back: the items pending were computed with other weights
        enc.backbone.model.embeddings.word_embeddings.weight.mul_(2.0)
    assert enc.backbone.flush_cache() == 0 and not segments(tmp_path)


def tiny_cfg(folders: list[str], root: Path, *more: str) -> TrainConfig:
    overrides = [f"data.domains={json.dumps(folders)}", "data.stream.num_workers=0", f"model.feature_cache_dir={root}"]
    for tower in ("text", "image"):
        overrides += [f"model.{tower}.trainable=top", f"model.{tower}.top_layers=1", f"model.{tower}.cache_frozen=true"]
    return load_config(str(TINY), [*overrides, *more])


def catalog(cfg: TrainConfig, folders: list[str], folder: str) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders), image_size=cfg.data.stream.image_size)
    items = encode_catalog(model.eval(), folder, folders.index(folder), cfg.data.stream)
    return items.items_UD, model.feature_cache_stats()


def test_catalog_encoding_reads_the_store_and_preprocessing_changes_miss(folders, tmp_path):
    cfg = tiny_cfg(folders, tmp_path)
    first, stats = catalog(cfg, folders, folders[1])
    n = schema.load_manifest(folders[1]).n_items
    assert stats["text"]["computed"] == n and stats["image"]["computed"] > 0
    again, stats = catalog(cfg, folders, folders[1])
    assert torch.equal(first, again)
    assert stats["text"] == {"memory": 0, "disk": n, "computed": 0} and stats["image"]["computed"] == 0
    swapped = list(reversed(folders))  # another domain order: the entry follows the items, not the domain index
    _, stats = catalog(tiny_cfg(swapped, tmp_path), swapped, folders[1])
    assert stats["text"]["computed"] == 0 and stats["image"]["computed"] == 0
    _, stats = catalog(tiny_cfg(folders, tmp_path, "data.stream.max_text_len=16"), folders, folders[1])
    assert stats["text"]["computed"] == n and stats["image"]["computed"] == 0
    _, stats = catalog(tiny_cfg(folders, tmp_path, "data.stream.image_size=24"), folders, folders[1])
    assert stats["text"]["computed"] == 0 and stats["image"]["computed"] > 0
    _, stats = catalog(tiny_cfg(folders, tmp_path, "model.feature_cache_dir=none"), folders, folders[1])
    assert stats["text"]["computed"] == n


def test_sources_follow_the_items_shards_and_the_preprocessing(folders, tmp_path):
    cfg = tiny_cfg(folders, tmp_path).data.stream
    copy = tmp_path / "copy"
    shutil.copytree(folders[0], copy)
    assert text_source(copy, cfg) == text_source(folders[0], cfg)  # same shards, another folder: same entry
    manifest = json.loads((copy / schema.MANIFEST_NAME).read_text())
    manifest["shards"]["items"][0]["sha256"] = "0" * 64  # a rebuilt items shard
    (copy / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert text_source(copy, cfg).digest != text_source(folders[0], cfg).digest
    assert image_source(copy, cfg).digest != image_source(folders[0], cfg).digest
    longer = tiny_cfg(folders, tmp_path, "data.stream.max_text_len=16").data.stream
    assert text_source(folders[0], longer).digest != text_source(folders[0], cfg).digest
    assert image_source(folders[0], longer) == image_source(folders[0], cfg)


def test_feature_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("MOMREC_CACHE", str(tmp_path))
    assert feature_dir("") == tmp_path / "features"
    assert feature_dir("none") is None and feature_dir("/x/y") == Path("/x/y")
    monkeypatch.delenv("MOMREC_CACHE")
    assert feature_dir("") == Path.home() / ".cache/momrec/features"


# ---- damaged files --------------------------------------------------------------------------------------------


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def damage_flip_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def damage_flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b'"entry":"') + 12  # a digit of the entry key in the metadata
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_data, damage_flip_header])
def test_a_damaged_segment_is_detected_deleted_and_recomputed(tmp_path, damage, caplog):
    first = fill_text(tmp_path)
    (segment,) = segments(tmp_path)
    damage(segment)
    later = text_encoder(tmp_path)
    again = later(*TEXT, TEXT_KEYS)
    assert later.backbone.cache_stats()["computed"] == 3 and torch.equal(first[0], again[0])
    assert not segment.exists() and "corrupt" in caplog.text
    later.backbone.flush_cache()
    reader = text_encoder(tmp_path)
    refuse_bottom(reader)
    assert torch.equal(reader(*TEXT, TEXT_KEYS)[0], first[0])


def test_a_writer_killed_before_its_rename_leaves_nothing_valid(tmp_path):
    fill_text(tmp_path)
    (segment,) = segments(tmp_path)
    tmp = segment.with_name(f"{TMP_PREFIX}{segment.name}.123.abcdef01")  # complete bytes, never renamed
    segment.rename(tmp)
    later = text_encoder(tmp_path)
    later(*TEXT, TEXT_KEYS)
    assert later.backbone.cache_stats()["computed"] == 3
    old = tmp.stat().st_mtime - STALE_TMP_S - 10
    os.utime(tmp, (old, old))
    assert cache_cli.main(["prune", "--dir", str(tmp_path), "--older-than", "1"]) == 0
    assert not tmp.exists() and entry_folders(tmp_path)  # the entry stays, its stale temporary file went


def test_two_ranks_writing_the_same_items_leave_valid_segments(tmp_path, monkeypatch):
    ranks = [text_encoder(tmp_path), text_encoder(tmp_path)]
    first = [enc(*TEXT, TEXT_KEYS) for enc in ranks][0]  # both compute before either writes
    for rank, enc in enumerate(ranks):
        monkeypatch.setenv("RANK", str(rank))
        assert enc.backbone.flush_cache() == 3
    assert len(segments(tmp_path)) == 2 and not list(tmp_path.glob(f"*/{TMP_PREFIX}*"))
    reader = text_encoder(tmp_path)
    refuse_bottom(reader)
    assert torch.equal(reader(*TEXT, TEXT_KEYS)[0], first[0])


# ---- python -m pretrain.cache -------------------------------------------------------------------------------------


def test_list_and_prune(tmp_path, capsys):
    fill_text(tmp_path)
    fill_text(tmp_path, seed=1)  # other weights: a second entry
    infos = list_entries(tmp_path)
    assert len(infos) == 2 and all(i.items == 3 and i.segments == 1 for i in infos)
    assert cache_cli.main(["list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and out.count(" text ") == 2 and "3/40" in out and "BertModel 2/3 stages" in out
    old = infos[1].last_used - 10 * 86400
    for path in infos[1].folder.iterdir():
        os.utime(path, (old, old))
    assert cache_cli.main(["prune", "--dir", str(tmp_path), "--older-than", "5"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert [i.folder for i in list_entries(tmp_path)] == [infos[0].folder]
    assert (infos[0].folder / ENTRY_FILE).is_file()
    assert cache_cli.main(["prune", "--dir", str(tmp_path), "--all"]) == 0
    assert list_entries(tmp_path) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune"], "one of the arguments --older-than --all is required"),
        (["prune", "--older-than", "soon"], "DAYS must be a number"),
        (["prune", "--older-than", "-1"], "DAYS must be >= 0"),
        (["prune", "--all", "--older-than", "1"], "not allowed with argument"),
        (["shrink"], "invalid choice"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_arguments_give_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cache_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_file_as_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cache_cli.main(["list", "--dir", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'f'}: not a folder\n"


# ---- through the engine -------------------------------------------------------------------------------------------


def test_training_fills_the_store_and_the_export_reads_it(folders, tmp_path, lone_process):
    from pretrain.engine import train
    from pretrain.export import load_pretrained
    from tests.testutil import tiny_overrides

    store = tmp_path / "store"
    frozen = [
        f"model.{t}.{k}" for t in ("text", "image") for k in ("trainable=top", "top_layers=1", "cache_frozen=true")
    ]
    more = [
        *frozen,
        f"model.feature_cache_dir={store}",
        "optim.max_steps=2",
        "optim.warmup_steps=1",
        "run.eval_every=2",
        "run.eval_users=8",
    ]
    train(load_config(str(TINY), tiny_overrides(folders, tmp_path / "run", *more)))
    n_items = {schema.load_manifest(f).domain: schema.load_manifest(f).n_items for f in folders}
    infos = list_entries(store)
    assert sorted((i.summary["tower"], i.summary["source"]["domain"]) for i in infos) == [
        ("image", "books"), ("image", "movies"), ("text", "books"), ("text", "movies")]  # fmt: skip
    assert all(i.items == n_items[i.summary["source"]["domain"]] for i in infos if i.summary["tower"] == "text")
    model, cfg, _ = load_pretrained(tmp_path / "run/model")
    encode_catalog(model, folders[0], 0, cfg.data.stream)
    assert all(s["computed"] == 0 for s in model.feature_cache_stats().values())  # the frozen bottoms did not train


def _rank_main(rank: int, port: int, argv: list[str]) -> None:
    """A forked rank of ``python -m pretrain.evaluate``."""
    from pretrain.evaluate import main

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    os._exit(main(argv))


@pytest.mark.dist
def test_two_ranks_write_their_own_segments_and_one_process_reads_them(folders, tmp_path):
    """Two gloo ranks encode alternate catalog chunks, each writing its own segments; one process then ranks with
    every frozen output read back (nothing new written) and gets the two ranks' numbers exactly."""
    from types import SimpleNamespace

    import pretrain.export
    from pretrain.evaluate import main

    store = tmp_path / "store"
    cfg = tiny_cfg(folders, store)
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders), image_size=cfg.data.stream.image_size)
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    export = pretrain.export.export(engine, cfg, model.catalog, tmp_path / "model")
    args = ["--model", str(export), "--data", folders[1], "--split", "test", "--encode-chunk", "8", "--timeout-s", "60"]
    argv = [*args, "--out", str(tmp_path / "two.json")]
    assert fork_two_ranks(_rank_main, lambda r: (argv,)) == [0, 0]
    written = segments(store)
    assert {p.name.split("-")[1] for p in written} == {"r0", "r1"}
    assert sorted(i.items for i in list_entries(store) if i.summary["tower"] == "text") == [40]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    assert segments(store) == written  # every item was read back: nothing computed, nothing written
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("one", "two"))
    assert one == two
