"""Tests for the photo search (search.py, engine/search_index.py, engine/search_query.py, data/image_folder.py):
ranking parity with an independent computation, the blocked top-k, incremental updates, interrupted and killed
runs, model identity, unreadable files, sharding with two gloo processes, and the command line.

The web server has its own file (tests/test_search_server.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
import yaml

import search
from data.image_folder import scan_image_folder
from data.synthetic import make_synthetic_dataset
from data.transforms import test_transform
from engine import search_index
from engine.search_index import SearchIndex, SearchIndexError, build_index, itc_topk
from engine.search_query import Searcher
from models.blip_retrieval import build_model
from models.checkpoint import CheckpointError
from models.loading import load_model
from tests.dist_helpers import run_distributed
from tests.helpers import bomb_png, spread_weights, synthetic_config
from utils import UserError

CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = {"width": 48, "depth": 2, "heads": 2, "patch_size": 8}  # 16 patches + CLS at 32 px


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """12 generated test images with captions, a tiny spread-weight model saved as a checkpoint, its config."""
    root = tmp_path_factory.mktemp("search")
    paths = make_synthetic_dataset(
        str(root / "gen"), num_train_images=0, num_val_images=0, num_test_images=12, image_size=32, seed=5
    )
    config = synthetic_config(root, paths, vit=dict(VIT), k_test=6, batch_size_test=4, search_feature_dtype="float32")
    torch.manual_seed(0)
    model = spread_weights(build_model(config)).eval()
    torch.save({"model": model.state_dict()}, root / "model.pth")
    with open(root / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)
    with open(paths["test_file"]) as f:
        records = json.load(f)
    return {
        "root": root,
        "config": config,
        "model": model,
        "checkpoint": str(root / "model.pth"),
        "config_file": str(root / "config.yaml"),
        "images": os.path.join(paths["image_root"], "test"),
        "captions": [cap for rec in records for cap in rec["caption"]],
    }


def make_photos(synth: dict, dest) -> str:
    """A photo folder with sub-folders: the 12 generated images spread over two levels."""
    dest = str(dest)
    for i, name in enumerate(sorted(os.listdir(synth["images"]))):
        sub = os.path.join(dest, "trip" if i % 2 else "", "day2" if i % 3 == 0 else "")
        os.makedirs(sub, exist_ok=True)
        shutil.copy2(os.path.join(synth["images"], name), os.path.join(sub, name))
    return dest


def cfg(synth: dict, **overrides) -> dict:
    return {**synth["config"], **overrides}


def index_features(index_dir) -> dict[str, np.ndarray]:
    index = SearchIndex.load(str(index_dir))
    return {path: np.array(index.features[i]) for i, path in enumerate(index.paths)}


# ----------------------------------------------------------------------------- ranking parity


@torch.no_grad()
def _independent_ranking(
    model, image_root: str, paths: list[str], caption: str, k: int, image_size: int, calibrated: bool = False
):
    """ITC top k then ITM + cosine (calibrated: log P(match) + cosine / temp), from the model's own calls:
    official text padding (35), full last layer, image tokens as encoder_hidden_states (no cached K/V), images
    loaded here with PIL."""
    from PIL import Image

    transform = test_transform(image_size)
    images = torch.stack([transform(Image.open(os.path.join(image_root, p)).convert("RGB")) for p in paths])
    image_embeds, image_feat = model.encode_image(images)
    ids, atts = model.tokenize([caption], CPU)
    text_feat = model.encode_text(ids, atts, cls_only=False)
    cos = (image_feat @ text_feat[0]).float()
    top_cos, top = cos.topk(k)
    enc = model.with_enc_token(ids)
    logits = model.itm_logits(enc.repeat(k, 1), atts.repeat(k, 1), image_embeds[top], cls_only=False)
    if calibrated:
        match = logits[:, 1] - torch.logsumexp(logits, dim=1)
        score = match + top_cos / model.temp
    else:
        score = logits[:, 1] + top_cos
    order = score.argsort(descending=True)
    return [paths[i] for i in top[order].tolist()], score[order], [paths[i] for i in top.tolist()]


@pytest.mark.parametrize("rerank_score", ["official", "calibrated"])
def test_query_matches_independent_computation_and_reranking_changes_the_order(synth, tmp_path, rerank_score):
    photos = make_photos(synth, tmp_path / "photos")
    build_index(synth["model"], cfg(synth), synth["checkpoint"], photos, str(tmp_path / "idx"), CPU, False)
    index = SearchIndex.load(str(tmp_path / "idx"))
    assert len(index) == 12 and index.features.dtype == np.float32
    searcher = Searcher(synth["model"], index, {**cfg(synth), "rerank_score": rerank_score}, CPU)
    k, reordered = 6, 0
    for caption in synth["captions"][::5][:8]:
        result = searcher.search_text(caption, top=k, rerank_k=k)
        ref_paths, ref_scores, ref_itc = _independent_ranking(
            synth["model"], photos, index.paths, caption, k, synth["config"]["image_size"], rerank_score == "calibrated"
        )
        assert [h.path for h in result.hits] == ref_paths
        np.testing.assert_allclose([h.score for h in result.hits], ref_scores.numpy(), atol=1e-4)
        itc = searcher.search_text(caption, top=k, rerank=False)
        assert [h.path for h in itc.hits] == ref_itc
        reordered += ref_paths != ref_itc
    assert reordered >= 2, "ITM re-ranking should reorder the ITC shortlist of some queries"


def test_rerank_k_smaller_than_top_keeps_itc_order_after_the_shortlist(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    build_index(synth["model"], cfg(synth), synth["checkpoint"], photos, str(tmp_path / "idx"), CPU, False)
    searcher = Searcher(synth["model"], SearchIndex.load(str(tmp_path / "idx")), cfg(synth), CPU)
    caption = synth["captions"][0]
    hits = searcher.search_text(caption, top=8, rerank_k=3).hits
    itc = searcher.search_text(caption, top=8, rerank=False).hits
    assert {h.path for h in hits[:3]} == {h.path for h in itc[:3]}
    assert [h.path for h in hits[3:]] == [h.path for h in itc[3:]]
    assert all(h.itm is None and h.score == pytest.approx(h.cosine - 100) for h in hits[3:])


def test_float16_index_scores_close_to_float32(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    for dtype in ("float16", "float32"):
        build_index(
            synth["model"], cfg(synth, search_feature_dtype=dtype), None, photos, str(tmp_path / dtype), CPU, False
        )
    f16, f32 = index_features(tmp_path / "float16"), index_features(tmp_path / "float32")
    assert SearchIndex.load(str(tmp_path / "float16")).features.dtype == np.float16
    for path in f32:  # unit vectors: fp16 keeps about 3 significant digits
        np.testing.assert_allclose(f16[path].astype(np.float32), f32[path], atol=1e-3)


def test_image_query_by_itc(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    build_index(synth["model"], cfg(synth), None, photos, str(tmp_path / "idx"), CPU, False)
    searcher = Searcher(synth["model"], SearchIndex.load(str(tmp_path / "idx")), cfg(synth), CPU)
    some = searcher.index.paths[5]
    hits = searcher.search_image(os.path.join(photos, some), top=3).hits
    assert hits[0].path == some and hits[0].cosine == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SearchIndexError, match="Image file not found"):
        searcher.search_image(os.path.join(photos, "nope.png"))


def test_token_cache_is_bounded_and_reused(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    build_index(synth["model"], cfg(synth), None, photos, str(tmp_path / "idx"), CPU, False)
    searcher = Searcher(synth["model"], SearchIndex.load(str(tmp_path / "idx")), cfg(synth, search_cache_images=4), CPU)
    caption = synth["captions"][0]
    first = searcher.search_text(caption, top=6, rerank_k=6)
    assert len(searcher.cache) == 4
    loads = []
    original = searcher._load
    searcher._load = lambda row: loads.append(row) or original(row)
    again = searcher.search_text(caption, top=6, rerank_k=6)
    assert len(loads) == 2  # the 4 most recent of the 6 came from the cache
    assert [h.path for h in again.hits] == [h.path for h in first.hits]
    np.testing.assert_allclose([h.score for h in again.hits], [h.score for h in first.hits], atol=1e-6)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_blocked_topk_equals_full_product(tmp_path, dtype):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1000, 16)).astype(dtype)
    path = tmp_path / "f.npy"
    np.save(path, feats)
    mapped = np.load(path, mmap_mode="r")
    query = torch.randn(3, 16)
    full = query @ torch.from_numpy(feats.astype(np.float32)).t()
    ref = full.topk(25, dim=1)
    for block in (64, 1000, 4096):
        scores, rows = itc_topk(mapped, query, 25, block, CPU)
        assert torch.equal(rows, ref.indices)
        torch.testing.assert_close(scores, ref.values)
    scores, rows = itc_topk(mapped, query, 5000, 64, CPU)  # k larger than N: everything, sorted
    assert rows.shape == (3, 1000) and torch.equal(rows, full.argsort(dim=1, descending=True))


# ----------------------------------------------------------------------------- incremental and crash safety


def test_incremental_add_change_delete(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    first = build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert (first.new, first.embedded, first.total) == (12, 12, 12)
    before = index_features(out)
    files = [f.path for f in scan_image_folder(photos)[0]]
    deleted, changed, unchanged = files[0], files[1], files[2:]
    os.remove(os.path.join(photos, deleted))
    shutil.copy(os.path.join(photos, files[5]), os.path.join(photos, changed))  # new content, new size/mtime
    os.makedirs(os.path.join(photos, "new"))
    shutil.copy(os.path.join(photos, files[6]), os.path.join(photos, "new", "added.png"))
    second = build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert (second.new, second.changed, second.deleted, second.unchanged) == (1, 1, 1, 10)
    assert second.embedded == 2 and second.total == 12
    after = index_features(out)
    assert deleted not in after and "new/added.png" in after
    for path in unchanged:  # not recomputed: the same bytes
        assert np.array_equal(after[path], before[path])
    np.testing.assert_allclose(after[changed], before[files[5]], atol=1e-6)
    np.testing.assert_allclose(after["new/added.png"], before[files[6]], atol=1e-6)
    fresh = str(tmp_path / "fresh")
    build_index(synth["model"], cfg(synth), None, photos, fresh, CPU, False)
    assert SearchIndex.load(fresh).paths == SearchIndex.load(out).paths
    assert sorted(os.listdir(out)) == [
        ".lock",
        "config.yaml",
        "entries-2.json",
        "features-2.npy",
        "manifest.json",
        "pending",
    ]
    third = build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert third.embedded == 0 and third.unchanged == 12


class Interrupt(Exception):
    pass


def _stop_after(n: int):
    def on_chunk(written: int) -> None:
        if written >= n:
            raise Interrupt

    return on_chunk


def test_interrupted_first_run_resumes(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    config = cfg(synth, search_chunk_images=2, batch_size_test=2)
    with pytest.raises(Interrupt):
        build_index(synth["model"], config, None, photos, out, CPU, False, on_chunk=_stop_after(2))
    with pytest.raises(SearchIndexError, match="no search index"):
        SearchIndex.load(out)  # nothing committed yet, and nothing half-written either
    stats = build_index(synth["model"], config, None, photos, out, CPU, False)
    assert (stats.resumed, stats.embedded, stats.total) == (4, 8, 12)
    assert os.listdir(os.path.join(out, "pending")) == []
    fresh = str(tmp_path / "fresh")
    build_index(synth["model"], config, None, photos, fresh, CPU, False)
    a, b = index_features(out), index_features(fresh)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-6)


def test_interrupted_update_leaves_the_committed_index_usable(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    config = cfg(synth, search_chunk_images=1, batch_size_test=1)
    build_index(synth["model"], config, None, photos, out, CPU, False)
    committed = index_features(out)
    for i in range(3):
        shutil.copy(os.path.join(photos, SearchIndex.load(out).paths[i]), os.path.join(photos, f"extra{i}.png"))
    with pytest.raises(Interrupt):
        build_index(synth["model"], config, None, photos, out, CPU, False, on_chunk=_stop_after(1))
    still = index_features(out)  # generation 1, untouched
    assert still.keys() == committed.keys()
    stats = build_index(synth["model"], config, None, photos, out, CPU, False)
    assert (stats.resumed, stats.embedded, stats.new, stats.total) == (1, 2, 3, 15)


def test_crash_during_commit_keeps_the_old_generation(synth, tmp_path, monkeypatch):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    os.remove(os.path.join(photos, SearchIndex.load(out).paths[0]))

    def crash(*args):
        raise Interrupt

    monkeypatch.setattr(search_index, "_write_manifest", crash)
    with pytest.raises(Interrupt):
        build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert len(SearchIndex.load(out)) == 12  # the new generation's files exist, but the manifest is the old one
    monkeypatch.undo()
    stats = build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert stats.total == 11 and stats.deleted == 1 and stats.embedded == 0
    assert len([n for n in os.listdir(out) if n.startswith("features-")]) == 1


SLOW_INDEX = """
import sys, time
sys.path.insert(0, {repo!r})
from engine import search_index
write = search_index._write_chunk
written = []
def slow(*args):
    write(*args)
    written.append(1)
    if len(written) == 2:
        time.sleep(600)  # stalls after the second chunk until the test kills it: no race with the test's polling
search_index._write_chunk = slow
import search
from utils import run_cli
run_cli(search.main)
"""


def test_killed_process_resumes(synth, tmp_path):
    """SIGKILL a real `search.py index` process between chunks; the next run finishes from the chunks.

    The child stalls after its second chunk (rather than sleeping a little after each), so the kill lands between
    chunks however slow or loaded the machine is."""
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    args = ["index", "--config", synth["config_file"], "--checkpoint", synth["checkpoint"], "--images", photos]
    args += ["--index", out, "--options", "search_chunk_images=2", "batch_size_test=2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_INDEX.format(repo=REPO), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pending = os.path.join(out, "pending")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(pending) and len([n for n in os.listdir(pending) if n.endswith(".npz")]) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the indexing process ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    model, _ = load_model(cfg(synth), synth["checkpoint"])
    stats = build_index(model, cfg(synth), synth["checkpoint"], photos, out, CPU, False)
    assert stats.resumed >= 4 and stats.resumed + stats.embedded == 12 and stats.total == 12


# ----------------------------------------------------------------------------- identity and bad input


def test_refuses_an_index_of_another_model(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    build_index(synth["model"], cfg(synth), synth["checkpoint"], photos, out, CPU, False)
    torch.manual_seed(1)
    other = spread_weights(build_model(cfg(synth))).eval()
    with pytest.raises(SearchIndexError, match=r"built with another model .* differs in its weights"):
        build_index(other, cfg(synth), None, photos, out, CPU, False)
    with pytest.raises(SearchIndexError, match="built with another model"):
        Searcher(other, SearchIndex.load(out), cfg(synth), CPU)
    bigger = {**cfg(synth), "image_size": 48}  # same weights, other features: also refused
    model48, _ = load_model(dict(bigger), synth["checkpoint"])
    with pytest.raises(SearchIndexError, match=r"differs in its feature settings \(image_size 32 vs 48\)"):
        build_index(model48, bigger, None, photos, out, CPU, False)
    with pytest.raises(SearchIndexError, match="covers"):
        build_index(synth["model"], cfg(synth), None, str(tmp_path / "gen_elsewhere"), out, CPU, False)


def test_unreadable_files_and_links_out_are_listed_and_skipped(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    with open(os.path.join(photos, "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(synth["images"], "00000.png"), outside / "secret.png")
    os.symlink(outside / "secret.png", os.path.join(photos, "link_out.png"))
    os.symlink(os.path.join(photos, "trip"), os.path.join(photos, "loop"))  # a folder link: not followed
    with open(os.path.join(photos, "notes.txt"), "w") as f:
        f.write("not an image")
    out = str(tmp_path / "idx")
    stats = build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert stats.total == 12
    assert len(stats.unreadable) == 1 and stats.unreadable[0].startswith("broken.jpg: Could not read image file")
    assert stats.skipped == ["link_out.png: a symlink to a file outside the folder"]
    assert "broken.jpg" not in SearchIndex.load(out).paths
    again = build_index(synth["model"], cfg(synth), None, photos, out, CPU, False)
    assert again.embedded == 0 and len(again.unreadable) == 1  # unchanged: listed again, not re-read


def test_bad_folders(synth, tmp_path):
    with pytest.raises(UserError, match="image folder not found"):
        build_index(synth["model"], cfg(synth), None, str(tmp_path / "nope"), str(tmp_path / "idx"), CPU, False)
    photos = make_photos(synth, tmp_path / "photos")
    with pytest.raises(SearchIndexError, match="is the image folder itself"):
        build_index(synth["model"], cfg(synth), None, photos, photos, CPU, False)
    with pytest.raises(SearchIndexError, match="no search index"):
        SearchIndex.load(str(tmp_path / "empty"))
    (tmp_path / "notours").mkdir()
    (tmp_path / "notours" / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(SearchIndexError, match="not a search index manifest"):
        SearchIndex.load(str(tmp_path / "notours"))


def test_decompression_bomb_is_skipped_and_named(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    with open(os.path.join(photos, "bomb.png"), "wb") as f:
        f.write(bomb_png(15000, 15000))  # 225 M pixels declared in a few hundred bytes
    stats = build_index(synth["model"], cfg(synth, num_workers=0), None, photos, str(tmp_path / "idx"), CPU, False)
    assert stats.total == 12 and len(stats.unreadable) == 1
    assert (
        stats.unreadable[0].startswith("bomb.png: Could not read image file")
        and "decompression bomb" in stats.unreadable[0].lower()
    )


def _break(index_dir: str, how: str) -> str:
    """Damage a committed index as a full disk, a bad copy or a hand edit would; returns the file damaged."""
    manifest = search_index.read_manifest(index_dir)
    if how == "manifest truncated":
        name = "manifest.json"
        with open(os.path.join(index_dir, name), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    elif how == "manifest without keys":
        name = "manifest.json"
        with open(os.path.join(index_dir, name), "w") as f:
            json.dump({k: v for k, v in manifest.items() if k != "entries"}, f)
    elif how == "features truncated":
        name = manifest["features"]
        with open(os.path.join(index_dir, name), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 100)
    elif how == "features missing":
        name = manifest["features"]
        os.remove(os.path.join(index_dir, name))
    elif how == "entries truncated":
        name = manifest["entries"]
        with open(os.path.join(index_dir, name), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    else:
        name = manifest["entries"]
        os.remove(os.path.join(index_dir, name))
    return name


@pytest.mark.parametrize(
    "how",
    [
        "manifest truncated",
        "manifest without keys",
        "features truncated",
        "features missing",
        "entries truncated",
        "entries missing",
    ],
)
def test_damaged_index_gives_one_line_naming_the_file(synth, tmp_path, capsys, how):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    build_index(synth["model"], cfg(synth), synth["checkpoint"], photos, out, CPU, False)
    name = _break(out, how)
    with pytest.raises(SearchIndexError) as caught:
        search.main(["query", "--index", out, "a red circle"])
    message = str(caught.value)
    assert name in message and "\n" not in message
    assert "build it again" in message if name == "manifest.json" else "run `search.py index`" in message
    if name != "manifest.json":  # a damaged generation is rebuilt by the next `index` run
        stats = build_index(synth["model"], cfg(synth), synth["checkpoint"], photos, out, CPU, False)
        assert stats.embedded == 12 and "embedding every image again" in capsys.readouterr().out
        assert SearchIndex.load(out).paths == [f.path for f in scan_image_folder(photos)[0]]


# ----------------------------------------------------------------------------- two processes


def _dist_index(rank: int, world: int, checkpoint: str, config: dict, photos: str, out: str) -> dict:
    torch.manual_seed(0)
    model, _ = load_model(dict(config), checkpoint)
    stats = build_index(model, config, checkpoint, photos, out, CPU, False)
    return {"embedded": stats.embedded, "total": stats.total}


def test_two_gloo_processes_shard_the_work(synth, tmp_path):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    config = cfg(synth, search_chunk_images=2)
    results = run_distributed(_dist_index, 2, synth["checkpoint"], config, photos, out)
    assert [r["embedded"] for r in results] == [6, 6] and all(r["total"] == 12 for r in results)
    single = str(tmp_path / "single")
    build_index(synth["model"], config, None, photos, single, CPU, False)
    a, b = index_features(out), index_features(single)
    assert list(a) == list(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-5)


# ----------------------------------------------------------------------------- command line


def test_command_line_index_and_query(synth, tmp_path, capsys):
    photos = make_photos(synth, tmp_path / "photos")
    out = str(tmp_path / "idx")
    base = ["--config", synth["config_file"], "--checkpoint", synth["checkpoint"]]
    search.main(["index", *base, "--images", photos, "--index", out])
    assert "index " + out + ": 12 images (12 new" in capsys.readouterr().out
    caption = synth["captions"][10]
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        search.main(["query", "--index", out, caption, "--top", "4", "--rerank-k", "5", "--json"])
    payload = json.loads(buffer.getvalue())
    searcher = Searcher(synth["model"], SearchIndex.load(out), cfg(synth), CPU)
    expected = searcher.search_text(caption, top=4, rerank_k=5)
    assert [r["path"] for r in payload["results"]] == [h.path for h in expected.hits]
    assert payload["results"][0]["file"] == os.path.join(os.path.abspath(photos), expected.hits[0].path)
    search.main(["query", "--index", out, caption, "--itc-only", "--top", "3"])
    text = capsys.readouterr().out
    assert "3 of 12 images, ITC only" in text and text.count(os.path.abspath(photos)) == 3
    search.main(["query", "--index", out, "--image", os.path.join(photos, expected.hits[0].path), "--top", "2"])
    assert "image -> image ITC" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        search.main(["query", "--index", out])  # neither text nor --image
    with pytest.raises(SearchIndexError, match="no search index"):
        search.main(["query", "--index", str(tmp_path / "missing"), "x"])
    for empty in ("", "  \t "):  # refused as the API refuses it, not answered with an arbitrary ranking
        with pytest.raises(SystemExit):
            search.main(["query", "--index", out, empty])
        assert "query: empty text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.main(["serve", "--index", out, "--port", "99999"])
    assert "--port: expected a port number in 0..65535 (0: any free port), got '99999'" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        with pytest.raises(UserError, match=f"serve: cannot listen on 127.0.0.1:{port}: .* choose another with --port"):
            search.main(["serve", "--index", out, "--port", port])


def test_bench_search_runs_and_its_topk_paths_agree():
    from bench import bench_search

    payload = bench_search.main(
        ["--device", "cpu", "--topk-rows", "3000", "--sizes", "50", "--num-queries", "2", "--k", "4"]
        + ["--pool-images", "6", "--index-images", "6", "--image-size", "32"]
    )
    assert payload["topk"]["rows"] == 3000  # bench_topk asserts that all four top-k paths return the same rows
    assert payload["indexing"]["images"] == 6 and set(payload["queries"][50]) >= {"itc_only", "rerank_cold"}


# ----------------------------------------------------------------------------- kill, change the folder, rerun


def _change_folder(photos: str, sources: list[str], rng: np.random.Generator, clock: list[int]) -> None:
    """A few random edits of the kinds a user makes between two runs: touch, modify (new content in place),
    replace (a new file renamed over the old one), remove, add. Every written file gets a distinct mtime, as
    edits seconds apart would (the index tells versions apart by size, mtime and inode, like make and rsync)."""

    def stamp(path: str) -> None:
        clock[0] += 1_000_000_007
        os.utime(path, ns=(clock[0], clock[0]))

    files = [f.path for f in scan_image_folder(photos)[0]]
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.choice(["touch", "modify", "replace", "remove", "add"])
        if kind == "add" or not files:
            path = os.path.join(photos, "added", f"{rng.integers(1_000_000)}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copy(sources[int(rng.integers(len(sources)))], path)
            stamp(path)
            continue
        path = os.path.join(photos, files[int(rng.integers(len(files)))])
        if kind == "remove":
            os.remove(path)
            files.remove(os.path.relpath(path, photos))
        elif kind == "touch":
            stamp(path)
        elif kind == "modify":
            with open(sources[int(rng.integers(len(sources)))], "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
            stamp(path)
        else:
            tmp = path + ".tmp"
            shutil.copy(sources[int(rng.integers(len(sources)))], tmp)
            stamp(tmp)
            os.replace(tmp, path)


@pytest.mark.parametrize("seed", range(8))
def test_kill_change_rerun_converges_to_a_fresh_index(synth, tmp_path, seed):
    """Runs stopped after a random number of chunks, with random edits of the folder before each rerun, end in
    exactly the index a fresh run builds of the final folder (same names, same features). The old code let a
    chunk of an older version of a file win over a newer one (chunks were read in random name order) and then
    failed with 'was neither embedded nor in the index'."""
    rng = np.random.default_rng(seed)
    photos = make_photos(synth, tmp_path / "photos")
    sources = [os.path.join(synth["images"], name) for name in sorted(os.listdir(synth["images"]))]
    out = str(tmp_path / "idx")
    config = cfg(synth, search_chunk_images=1, batch_size_test=1)
    clock = [1_600_000_000 * 10**9]
    for _ in range(8):
        draw = rng.random()
        if draw < 0.7:  # killed after 1 to 4 chunks
            with contextlib.suppress(Interrupt):
                stop = _stop_after(int(rng.integers(1, 5)))
                build_index(synth["model"], config, None, photos, out, CPU, False, on_chunk=stop)
        elif draw < 0.9:  # a run that finishes
            build_index(synth["model"], config, None, photos, out, CPU, False)
        _change_folder(photos, sources, rng, clock)
    build_index(synth["model"], config, None, photos, out, CPU, False)
    fresh = str(tmp_path / "fresh")
    build_index(synth["model"], config, None, photos, fresh, CPU, False)
    got, want = index_features(out), index_features(fresh)
    assert list(got) == list(want) == [f.path for f in scan_image_folder(photos)[0]]
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=1e-6, err_msg=path)
    assert os.listdir(os.path.join(out, "pending")) == []


class _RunsCode:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_index_manifest_checkpoint_is_always_read_safely(synth, tmp_path):
    # A shared index folder names its checkpoint in manifest.json; a pickle that runs code there must not run.
    shared = str(tmp_path / "shared.pth")
    shutil.copy2(synth["checkpoint"], shared)
    out = str(tmp_path / "idx")
    base = ["--config", synth["config_file"], "--checkpoint", shared]
    search.main(["index", *base, "--images", synth["images"], "--index", out])
    marker = str(tmp_path / "ran")
    torch.save({"model": synth["model"].state_dict(), "config": _RunsCode(marker)}, shared)
    with pytest.raises(CheckpointError, match=f"{shared}: refused to unpickle"):
        search.main(["query", "--index", out, "a dog"])
    with pytest.raises(SystemExit):  # query and serve have no opt-in
        search.main(["query", "--index", out, "a dog", "--unsafe-trust-checkpoint"])
    assert not os.path.exists(marker)
