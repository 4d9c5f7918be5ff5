"""Tests for data/: captions, transforms, datasets, input validation, download, loaders, synthetic set."""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

import data
from configs.schema import DEFAULT_CONFIG, validate_config
from data import (
    ANNOTATION_FILES,
    DataError,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    annotation_path,
    create_dataset,
    create_loader,
)
from data import transforms as T
from data.captions import create_caption_dataset
from data.synthetic import SPECIAL_TOKENS, make_synthetic_dataset
from data.synthetic import main as synthetic_main
from data.utils import pre_caption
from utils import ConfigError

# ----------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny synthetic dataset shared by the tests of this module (generation takes ~0.1 s)."""
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(
        str(out), num_train_images=6, num_val_images=4, num_test_images=4, captions_per_image=3, image_size=32
    )


def _write_json(path: os.PathLike | str, obj: object) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def _write_image(path: os.PathLike | str, size: tuple[int, int] = (20, 16)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)


def _gradient_image(w: int = 40, h: int = 30) -> Image.Image:
    x = np.linspace(30, 220, w, dtype=np.float32)[None, :, None]
    y = np.linspace(20, 120, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


# ----------------------------------------------------------------------------- pre_caption


@pytest.mark.parametrize("ch", list('.!"()*#:;~'))
def test_pre_caption_blanks_each_listed_character(ch: str) -> None:
    assert pre_caption(f"a{ch}b") == "a b"


def test_pre_caption_lowercases_and_keeps_other_punctuation() -> None:
    assert pre_caption("A Dog's Toy, Half-Eaten / Why?") == "a dog's toy, half-eaten / why?"


def test_pre_caption_collapses_whitespace_and_strips() -> None:
    assert pre_caption("  Two   dogs.\n") == "two dogs"
    assert pre_caption("a\t\tb") == "a b"
    # A single tab is not a run of two, so it survives inside a "word", as in the reference.
    assert pre_caption("a\tb") == "a\tb"
    assert pre_caption("(hello)") == "hello"
    assert pre_caption("end.\n\n") == "end"


def test_pre_caption_max_words() -> None:
    caption = " ".join(f"w{i}" for i in range(60))
    assert len(pre_caption(caption).split(" ")) == 50
    assert pre_caption(caption, max_words=3) == "w0 w1 w2"
    assert pre_caption("one two", max_words=30) == "one two"


# ----------------------------------------------------------------------------- transforms


def test_test_transform_shape_and_normalisation() -> None:
    mean_rgb = tuple(round(m * 255) for m in T.CLIP_MEAN)
    img = Image.new("RGB", (50, 30), mean_rgb)
    out = T.test_transform(24)(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    # A mean-coloured image normalises to ~0 (up to 8-bit rounding).
    assert out.abs().max() < 0.01
    white = T.test_transform(8)(Image.new("RGB", (8, 8), (255, 255, 255)))
    expected = torch.tensor([(1 - m) / s for m, s in zip(T.CLIP_MEAN, T.CLIP_STD)])
    assert torch.allclose(white[:, 0, 0], expected, atol=1e-5)


def test_train_transform_shape_and_determinism() -> None:
    tf = T.train_transform(16)
    img = _gradient_image()
    torch.manual_seed(0)
    random.seed(0)
    a = tf(img)
    torch.manual_seed(0)
    random.seed(0)
    b = tf(img)
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, b)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomAugment", "ToTensor", "Normalize"]
    assert tf.transforms[0].scale == (0.5, 1.0)


def test_train_augment_modes(synth: dict[str, str]) -> None:
    """train_augment: official is the default pipeline; crop keeps only the crop; none is the eval transform
    (same output as the val/test images get), reached from the config key."""
    config = {
        **DEFAULT_CONFIG,
        "dataset": "custom",
        "image_root": synth["image_root"],
        "train_file": synth["train_file"],
        "image_size": 16,
    }
    assert DEFAULT_CONFIG["train_augment"] == "official"

    def names(augment: str) -> list[str]:
        transform = create_dataset({**config, "train_augment": augment}, "train").transform
        return [type(t).__name__ for t in transform.transforms]

    assert names("official") == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomAugment", "ToTensor", "Normalize"]
    assert names("crop") == ["RandomResizedCrop", "ToTensor", "Normalize"]
    assert names("none") == ["Resize", "ToTensor", "Normalize"]
    # captioning and CIR training build theirs from the same keys (data.config_train_transform)
    caption_transform = create_caption_dataset({**config, "train_augment": "crop"}, "train").transform
    assert [type(t).__name__ for t in caption_transform.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    img = _gradient_image()
    assert torch.equal(T.train_transform(16, augment="none")(img), T.test_transform(16)(img))
    with pytest.raises(ValueError, match="train_augment must be one of"):
        T.train_transform(16, augment="flip")
    with pytest.raises(ConfigError, match=r"'train_augment'.*official, crop, none"):
        validate_config(dict(DEFAULT_CONFIG, train_augment="flip"))


@pytest.mark.parametrize("name", list(T.AUGMENT_OPS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_each_augment_op_returns_same_size_pil(name: str, mode: str) -> None:
    img = _gradient_image().convert(mode)
    random.seed(1)
    out = T.AUGMENT_OPS[name](img, 5)
    assert isinstance(out, Image.Image)
    assert out.size == img.size and out.mode == img.mode


def test_augment_op_semantics() -> None:
    img = _gradient_image()
    # Brightness and Sharpness are exact no-ops at level 5 (factor 1.0), as in the reference.
    assert T._enhance_factor(5) == 1.0
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8), mode="RGB")
    for op in (T.brightness, T.sharpness):
        assert np.array_equal(np.asarray(op(noisy, 5)), np.asarray(noisy))
        assert not np.array_equal(np.asarray(op(noisy, 9)), np.asarray(noisy))
    # The fixed AutoContrast stretches each channel to the full range (the official one: see below).
    ac = np.asarray(T.auto_contrast_fixed(img, 5))
    assert (ac.reshape(-1, 3).min(0) == 0).all() and (ac.reshape(-1, 3).max(0) == 255).all()
    eq = np.asarray(T.equalize(img, 5))
    assert eq.reshape(-1, 3).max(0).min() == 255
    # Geometric ops fill uncovered pixels with grey 128.
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    random.seed(0)
    shifted = np.asarray(T.translate_x(white, 5))
    grey_cols = [c for c in range(40) if (shifted[:, c] == 128).all()]
    assert len(grey_cols) == 5 and grey_cols in (list(range(5)), list(range(35, 40)))
    rotated = np.asarray(T.rotate(white, 10))  # 30 degrees leaves the corners uncovered
    assert (rotated[0, 0] == 128).all() and (rotated[15, 20] == 255).all()
    sheared = np.asarray(T.shear_x(white, 10))
    assert (sheared[0] == 255).all()  # the top row is the shear origin and does not move
    assert (sheared[-1] == 128).all(axis=1).sum() > 0


def test_random_augment_seeded_and_validated() -> None:
    aug = T.RandomAugment(2, 5)
    img = _gradient_image()
    random.seed(3)
    a = np.asarray(aug(img))
    random.seed(3)
    b = np.asarray(aug(img))
    assert np.array_equal(a, b)
    assert isinstance(aug(img), Image.Image)
    with pytest.raises(ValueError, match="Unknown RandomAugment ops"):
        T.RandomAugment(ops=["Solarize"])
    with pytest.raises(ValueError, match="magnitude"):
        T.RandomAugment(magnitude=11)


def _rgb(r: list[list[int]], g: list[list[int]], b: list[list[int]]) -> Image.Image:
    return Image.fromarray(np.stack([r, g, b], axis=2).astype(np.uint8), mode="RGB")


def _on_grey(op: T.AugmentOp, rows: list[list[int]]) -> list[list[int]]:
    """Apply ``op`` to a greyscale 'L' image of ``rows``; check it stays 'L'; return its pixels."""
    out = op(Image.fromarray(np.array(rows, np.uint8), mode="L"), 5)
    assert out.mode == "L"
    return np.asarray(out).tolist()


# Hand-computed AutoContrast cases on one 2x3 RGB image:
# R: min 0, max 80, scale 255/80 = 3.1875 (exact in binary), so both variants give floor(v * 3.1875).
# G: min 16, max 96: the fix stretches (v - 16) * 255 // 80; the official offset is (256 - 16) * 3.1875 = 765,
#    so every value clips to 255.
# B: flat (7 everywhere): unchanged by both.
_AC_R, _AC_R_OUT = [[0, 10, 20], [40, 60, 80]], [[0, 31, 63], [127, 191, 255]]
_AC_G, _AC_G_FIXED = [[16, 32, 48], [64, 80, 96]], [[0, 51, 102], [153, 204, 255]]
_AC_B = [[7, 7, 7], [7, 7, 7]]


def test_auto_contrast_official_reproduces_the_uint8_wrap() -> None:
    out = np.asarray(T.auto_contrast(_rgb(_AC_R, _AC_G, _AC_B), 5))
    assert out[:, :, 0].tolist() == _AC_R_OUT
    assert out[:, :, 1].tolist() == [[255] * 3] * 2  # min > 0: the wrapped offset turns the channel white
    assert out[:, :, 2].tolist() == _AC_B
    # Greyscale: min 0, max 160, scale 1.59375 -> floor(v * 1.59375); min 20 > 0 -> all 255; flat unchanged.
    assert _on_grey(T.auto_contrast, [[0, 40], [100, 160]]) == [[0, 63], [159, 255]]
    assert _on_grey(T.auto_contrast, [[20, 60], [100, 180]]) == [[255, 255], [255, 255]]
    assert _on_grey(T.auto_contrast, [[9, 9]]) == [[9, 9]]
    # Float product, then a truncating cast: 25 * (255 / 25) = 254.99999999999997 -> 254, as official.
    assert _on_grey(T.auto_contrast, [[0, 25]]) == [[0, 254]]


def test_auto_contrast_fixed_stretches_every_channel() -> None:
    out = np.asarray(T.auto_contrast_fixed(_rgb(_AC_R, _AC_G, _AC_B), 5))
    assert out[:, :, 0].tolist() == _AC_R_OUT
    assert out[:, :, 1].tolist() == _AC_G_FIXED
    assert out[:, :, 2].tolist() == _AC_B
    # Greyscale, min 20, max 180: (v - 20) * 255 // 160; the maximum always reaches 255.
    assert _on_grey(T.auto_contrast_fixed, [[20, 60], [100, 180]]) == [[0, 63], [127, 255]]
    assert _on_grey(T.auto_contrast_fixed, [[9, 9]]) == [[9, 9]]
    assert _on_grey(T.auto_contrast_fixed, [[0, 25]]) == [[0, 255]]


def test_official_autocontrast_table_matches_numpy_uint8_arithmetic() -> None:
    """Our explicit formula equals the official arithmetic done with np.uint8 scalars, for every min < max."""
    for lo in range(255):
        low = np.uint8(lo)
        for hi in range(lo + 1, 256):
            high = np.uint8(hi)
            with np.errstate(over="ignore"):  # negating a uint8 wraps (and warns on numpy 2)
                scale = 255 / (high - low)
                offset = -low * scale
            expected = np.clip(np.arange(256) * scale + offset, 0, 255).astype(np.uint8)
            assert np.array_equal(T._official_autocontrast_lut(lo, hi), expected), (lo, hi)


def test_autocontrast_config_reaches_random_augment(synth: dict[str, str]) -> None:
    config = {
        **DEFAULT_CONFIG,
        "dataset": "custom",
        "image_root": synth["image_root"],
        "train_file": synth["train_file"],
        "image_size": 16,
    }
    for value, fn in ((None, T.auto_contrast), ("official", T.auto_contrast), ("fixed", T.auto_contrast_fixed)):
        cfg = dict(config) if value is None else {**config, "autocontrast": value}
        (aug,) = [t for t in create_dataset(cfg, "train").transform.transforms if isinstance(t, T.RandomAugment)]
        assert aug.autocontrast == (value or "official")
        assert aug.op_fns["AutoContrast"] is fn
    assert T.train_transform(16).transforms[2].autocontrast == "official"
    assert DEFAULT_CONFIG["autocontrast"] == "official"
    # Applied through RandomAugment (repeats are no-ops on these outputs), each variant gives its own output.
    img = _rgb(_AC_R, _AC_G, _AC_B)
    for mode, fn in T.AUTOCONTRAST_MODES.items():
        random.seed(0)
        out = T.RandomAugment(num_ops=8, ops=["AutoContrast"], autocontrast=mode)(img)
        assert np.array_equal(np.asarray(out), np.asarray(fn(img, 5))), mode
    with pytest.raises(ValueError, match="Unknown autocontrast 'wrap'"):
        T.RandomAugment(autocontrast="wrap")


def test_autocontrast_config_value_is_validated() -> None:
    config = dict(DEFAULT_CONFIG, autocontrast="fixed")
    assert validate_config(config)["autocontrast"] == "fixed"
    with pytest.raises(ConfigError, match=r"'autocontrast'.*official, fixed.*'wrap'"):
        validate_config(dict(DEFAULT_CONFIG, autocontrast="wrap"))


# ----------------------------------------------------------------------------- datasets (happy path)


def test_train_dataset_on_synthetic(synth: dict[str, str]) -> None:
    ds = RetrievalTrainDataset(synth["train_file"], synth["image_root"], T.test_transform(16))
    assert len(ds) == 6 * 3
    assert list(ds.img_ids.values()) == list(range(6))
    assert list(ds.img_ids) == [f"synth_train_{i}" for i in range(6)]
    image, caption, idx = ds[4]
    assert image.shape == (3, 16, 16)
    assert isinstance(caption, str) and caption == pre_caption(caption, 30)
    assert idx == 1  # records 3..5 belong to the second image
    assert isinstance(idx, int)


def test_train_img_ids_follow_first_appearance(tmp_path) -> None:
    for name in ("x.png", "y.png", "z.png"):
        _write_image(tmp_path / "img" / name)
    recs = [
        {"image": "y.png", "caption": "Caption One.", "image_id": "b"},
        {"image": "x.png", "caption": "two", "image_id": "a"},
        {"image": "y.png", "caption": "three", "image_id": "b"},
        {"image": "z.png", "caption": "four", "image_id": 7},
    ]
    ds = RetrievalTrainDataset(_write_json(tmp_path / "t.json", recs), str(tmp_path / "img"), None, max_words=1)
    assert ds.img_ids == {"b": 0, "a": 1, 7: 2}
    assert [ds[i][2] for i in range(4)] == [0, 1, 0, 2]
    image, caption, _ = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert caption == "caption"  # pre_caption with max_words=1


def test_eval_dataset_on_synthetic(synth: dict[str, str]) -> None:
    ds = RetrievalEvalDataset(synth["test_file"], synth["image_root"], T.test_transform(16))
    assert len(ds) == 4 and len(ds.image) == 4 and len(ds.text) == 12
    assert ds.image[0] == "test/00000.png"
    for img_id, txt_ids in ds.img2txt.items():
        assert len(txt_ids) == 3
        assert all(ds.txt2img[t] == img_id for t in txt_ids)
    assert sorted(ds.txt2img) == list(range(12))
    assert sorted(t for ts in ds.img2txt.values() for t in ts) == list(range(12))
    image, index = ds[2]
    assert image.shape == (3, 16, 16) and index == 2
    with open(synth["test_file"]) as f:
        raw = json.load(f)
    assert ds.text[ds.img2txt[1][2]] == pre_caption(raw[1]["caption"][2], 30)


def test_create_dataset_and_loader(synth: dict[str, str]) -> None:
    config = {
        **DEFAULT_CONFIG,
        "dataset": "custom",
        "image_root": synth["image_root"],
        "train_file": synth["train_file"],
        "val_file": synth["val_file"],
        "test_file": synth["test_file"],
        "image_size": 16,
    }
    train = create_dataset(config, "train")
    assert isinstance(train, RetrievalTrainDataset) and train.max_words == 30
    val = create_dataset(config, "val")
    assert isinstance(val, RetrievalEvalDataset)
    loader = create_loader(train, batch_size=4, num_workers=0, is_train=True)
    assert loader.drop_last and len(loader) == 18 // 4
    images, captions, idx = next(iter(loader))
    assert images.shape == (4, 3, 16, 16)
    assert isinstance(captions, (list, tuple)) and all(isinstance(c, str) for c in captions)
    assert idx.dtype == torch.long
    eval_loader = create_loader(val, batch_size=3, num_workers=0, is_train=False)
    assert not eval_loader.drop_last and len(eval_loader) == 2
    assert [int(i) for _, batch in eval_loader for i in batch] == [0, 1, 2, 3]


def test_create_loader_rejects_batch_larger_than_train_set(synth: dict[str, str]) -> None:
    ds = RetrievalTrainDataset(synth["train_file"], synth["image_root"], None)
    with pytest.raises(DataError, match=r"18 samples.*batch_size=32.*zero batches"):
        create_loader(ds, batch_size=32, num_workers=0, is_train=True)
    # Eval keeps the partial batch, so a small set is fine there.
    assert len(create_loader(ds, batch_size=32, num_workers=0, is_train=False)) == 1


# ----------------------------------------------------------------------------- bad inputs


def test_missing_annotation_file(tmp_path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DataError, match="Annotation file not found") as exc:
        RetrievalTrainDataset(missing, str(tmp_path), None)
    assert missing in str(exc.value) and "ann_root" in str(exc.value) and "train_file" in str(exc.value)


def test_annotation_must_be_a_list(tmp_path) -> None:
    ann = _write_json(tmp_path / "a.json", {"images": [], "annotations": []})
    with pytest.raises(DataError, match="JSON list") as exc:
        RetrievalEvalDataset(ann, str(tmp_path), None)
    assert ann in str(exc.value) and "raw COCO" in str(exc.value)
    bad = tmp_path / "b.json"
    bad.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        RetrievalEvalDataset(str(bad), str(tmp_path), None)


def test_empty_split(tmp_path) -> None:
    ann = _write_json(tmp_path / "a.json", [])
    with pytest.raises(DataError, match="empty") as exc:
        RetrievalTrainDataset(ann, str(tmp_path), None)
    assert ann in str(exc.value)


def test_train_record_without_image_id(tmp_path) -> None:
    _write_image(tmp_path / "x.png")
    recs = [{"image": "x.png", "caption": "a", "image_id": 1}, {"image": "x.png", "caption": "b"}]
    ann = _write_json(tmp_path / "t.json", recs)
    with pytest.raises(DataError, match=r"Record 1 .*missing key\(s\) \['image_id'\]") as exc:
        RetrievalTrainDataset(ann, str(tmp_path), None)
    assert ann in str(exc.value)


def test_train_caption_must_be_string(tmp_path) -> None:
    recs = [{"image": "x.png", "caption": ["a", "b"], "image_id": 1}]
    with pytest.raises(DataError, match="must be a string.*val/test format"):
        RetrievalTrainDataset(_write_json(tmp_path / "t.json", recs), str(tmp_path), None)


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"image": "x.png"}, r"Record 0 .*missing key\(s\) \['caption'\]"),
        ({"image": "x.png", "caption": []}, r"Record 0 .*empty caption list"),
        ({"image": "x.png", "caption": "one string"}, r"Record 0 .*list of strings.*train format"),
        ({"image": "x.png", "caption": ["ok", 3]}, r"Record 0 .*caption 1 must be a string"),
        ({"caption": ["ok"]}, r"Record 0 .*missing key\(s\) \['image'\]"),
    ],
)
def test_bad_eval_records(tmp_path, record: dict, pattern: str) -> None:
    ann = _write_json(tmp_path / "e.json", [record])
    with pytest.raises(DataError, match=pattern) as exc:
        RetrievalEvalDataset(ann, str(tmp_path), None)
    assert ann in str(exc.value)


def test_missing_image_with_flickr_folder_hint(tmp_path) -> None:
    root = tmp_path / "flickr30k"
    _write_image(root / "flickr30k_images" / "1.jpg")
    ann = _write_json(tmp_path / "test.json", [{"image": "flickr30k-images/1.jpg", "caption": ["a dog"]}])
    with pytest.raises(DataError, match="Image not found") as exc:
        RetrievalEvalDataset(ann, str(root), None)
    msg = str(exc.value)
    assert str(root) in msg and os.path.join(str(root), "flickr30k-images/1.jpg") in msg
    assert "'flickr30k_images'" in msg and "'flickr30k-images'" in msg and "Rename" in msg


def test_missing_image_when_root_is_the_image_folder(tmp_path) -> None:
    folder = tmp_path / "flickr30k-images"
    _write_image(folder / "1.jpg")
    ann = _write_json(tmp_path / "test.json", [{"image": "flickr30k-images/1.jpg", "caption": ["a dog"]}])
    with pytest.raises(DataError, match="Set image_root to its parent") as exc:
        RetrievalEvalDataset(ann, str(folder), None)
    assert str(tmp_path) in str(exc.value)


def test_missing_image_root(tmp_path) -> None:
    ann = _write_json(tmp_path / "t.json", [{"image": "a/1.jpg", "caption": "x", "image_id": 0}])
    with pytest.raises(DataError, match="image_root itself does not exist"):
        RetrievalTrainDataset(ann, str(tmp_path / "nowhere"), None)


def test_corrupt_and_truncated_image_files(tmp_path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    _write_image(tmp_path / "good.png", size=(64, 64))
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    recs = [{"image": "bad.jpg", "caption": ["a"]}, {"image": "cut.png", "caption": ["b"]}]
    ds = RetrievalEvalDataset(_write_json(tmp_path / "e.json", recs), str(tmp_path), None)
    with pytest.raises(DataError, match="Could not read image file") as exc:
        ds[0]
    assert str(tmp_path / "bad.jpg") in str(exc.value)
    with pytest.raises(DataError, match="Could not read image file") as exc:
        ds[1]
    assert str(tmp_path / "cut.png") in str(exc.value)


def test_image_deleted_after_construction(tmp_path) -> None:
    _write_image(tmp_path / "x.png")
    ds = RetrievalTrainDataset(
        _write_json(tmp_path / "t.json", [{"image": "x.png", "caption": "c", "image_id": 0}]),
        str(tmp_path),
        None,
    )
    os.remove(tmp_path / "x.png")
    with pytest.raises(DataError, match="Image file not found") as exc:
        ds[0]
    assert str(tmp_path / "x.png") in str(exc.value)


# ----------------------------------------------------------------------------- annotation_path / download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture()
def http_dir(tmp_path) -> Iterator[tuple[str, str]]:
    """Serve a temp folder over HTTP on a free port; yields (folder, url prefix)."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield str(served), f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_annotation_download_from_local_server(tmp_path, http_dir: tuple[str, str]) -> None:
    served, prefix = http_dir
    records = [{"image": "flickr30k-images/1.jpg", "caption": ["a"]}]
    _write_json(os.path.join(served, "flickr30k_val.json"), records)
    ann_root = tmp_path / "annotation"
    config = {"dataset": "flickr", "ann_root": str(ann_root)}
    path = annotation_path(config, "val", url_prefix=prefix)
    assert path == os.path.join(str(ann_root), "flickr30k_val.json")
    with open(path) as f:
        assert json.load(f) == records
    assert os.listdir(ann_root) == ["flickr30k_val.json"]  # no temp file left behind
    # Present now, so no network is needed even with a dead prefix.
    assert annotation_path(config, "val", url_prefix="http://127.0.0.1:9/") == path


def test_annotation_download_failure_message(tmp_path, http_dir: tuple[str, str]) -> None:
    _, prefix = http_dir
    ann_root = tmp_path / "annotation"
    config = {"dataset": "coco", "ann_root": str(ann_root)}
    with pytest.raises(DataError) as exc:
        annotation_path(config, "test", url_prefix=prefix)  # the server has no such file: 404
    msg = str(exc.value)
    expected = os.path.join(str(ann_root), "coco_karpathy_test.json")
    assert expected in msg and prefix + "coco_karpathy_test.json" in msg and "by hand" in msg
    assert not os.path.exists(expected) and os.listdir(ann_root) == []


def test_annotation_path_config_errors(tmp_path) -> None:
    with pytest.raises(DataError, match=r"Unknown dataset 'flikr'.*\['coco', 'custom', 'flickr'\]"):
        annotation_path({"dataset": "flikr", "ann_root": str(tmp_path)}, "train")
    with pytest.raises(DataError, match="'val_file'"):
        annotation_path({"dataset": "custom", "train_file": "x.json"}, "val")
    with pytest.raises(DataError, match="from config key 'train_file'"):
        annotation_path({"dataset": "custom", "train_file": str(tmp_path / "x.json")}, "train")
    with pytest.raises(DataError, match="Unknown split"):
        annotation_path({"dataset": "flickr", "ann_root": str(tmp_path)}, "dev")
    with pytest.raises(DataError, match="flickr30k_test.json") as exc:
        annotation_path({"dataset": "flickr", "ann_root": str(tmp_path)}, "test", download=False)
    assert data.ANNOTATION_URL_PREFIX + "flickr30k_test.json" in str(exc.value)
    assert set(ANNOTATION_FILES) == {"flickr", "coco"}
    assert ANNOTATION_FILES["coco"]["val"] == "coco_karpathy_val.json"


# ----------------------------------------------------------------------------- synthetic data set


def test_synthetic_vocab_covers_all_captions(synth: dict[str, str]) -> None:
    from transformers import BertTokenizer

    # from_pretrained(folder) reads vocab.txt in transformers 4.x and 5.x alike; in 5.x the constructor
    # takes `vocab=` and silently ignores a `vocab_file=` keyword (leaving only the special tokens).
    tok = BertTokenizer.from_pretrained(os.path.dirname(synth["vocab_file"]), do_lower_case=True)
    assert len(tok) == len(open(synth["vocab_file"]).read().split())
    with open(synth["vocab_file"]) as f:
        vocab = f.read().split("\n")
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and tok.pad_token_id == 0
    captions: list[str] = []
    with open(synth["train_file"]) as f:
        captions += [r["caption"] for r in json.load(f)]
    for split in ("val_file", "test_file"):
        with open(synth[split]) as f:
            captions += [c for r in json.load(f) for c in r["caption"]]
    assert len(captions) == 6 * 3 + 4 * 3 + 4 * 3
    for cap in captions:
        ids = tok(pre_caption(cap, 30))["input_ids"]
        assert tok.unk_token_id not in ids, cap


def test_synthetic_format_and_determinism(tmp_path, synth: dict[str, str]) -> None:
    with open(synth["train_file"]) as f:
        train = json.load(f)
    assert set(train[0]) == {"image", "caption", "image_id"} and train[0]["image"] == "train/00000.png"
    with open(synth["val_file"]) as f:
        val = json.load(f)
    assert all(set(r) == {"image", "caption"} and len(set(r["caption"])) == 3 for r in val)
    assert Image.open(os.path.join(synth["image_root"], val[0]["image"])).size == (32, 32)
    again = make_synthetic_dataset(str(tmp_path / "again"), 6, 4, 4, captions_per_image=3, image_size=32)
    with open(again["train_file"]) as f:
        assert json.load(f) == train
    other = make_synthetic_dataset(str(tmp_path / "other"), 6, 4, 4, captions_per_image=3, image_size=32, seed=1)
    with open(other["train_file"]) as f:
        assert json.load(f) != train


def test_synthetic_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--num-test", "1"])
    paths = json.loads(capsys.readouterr().out)
    assert os.path.isfile(paths["test_file"]) and os.path.isfile(os.path.join(paths["image_root"], "val/00000.png"))
    with open(paths["train_file"]) as f:
        assert len(json.load(f)) == 2 * 5


def test_generate_split_replays_the_written_scenes_and_true_captions_cover_them(tmp_path) -> None:
    """generator.json + generate_split give back the very captions written, and every written caption is among
    the true captions of its own scene (the basis of studies/itm_topk_auc.py's label check)."""
    from data.synthetic import GENERATOR_FILE, generate_split, true_captions

    paths = make_synthetic_dataset(str(tmp_path), num_train_images=3, num_val_images=4, num_test_images=5, seed=3)
    with open(os.path.join(tmp_path, GENERATOR_FILE)) as f:
        generator = json.load(f)
    with open(paths["test_file"]) as f:
        written = [record["caption"] for record in json.load(f)]
    replayed = list(generate_split(generator, "test"))
    assert [captions for _, _, captions in replayed] == written
    for scene, _, captions in replayed:
        assert set(captions) <= true_captions(scene)


def test_outline_style_draws_the_same_scenes_as_contours(tmp_path) -> None:
    """--style outline: the same captions (same scenes, same RNG draws) as the filled twin, fewer shape pixels, the
    style recorded for replay; an unknown style is refused."""
    from data.synthetic import GENERATOR_FILE, generate_split

    kwargs = {"num_train_images": 3, "num_val_images": 4, "num_test_images": 4, "image_size": 64, "seed": 2}
    filled = make_synthetic_dataset(str(tmp_path / "filled"), **kwargs)
    outline = make_synthetic_dataset(str(tmp_path / "outline"), style="outline", **kwargs)
    for split in ("train", "val", "test"):
        with open(filled[f"{split}_file"]) as f, open(outline[f"{split}_file"]) as g:
            assert json.load(f) == json.load(g)

    def shape_pixels(root: str, rel: str) -> int:
        # Background pixels are grey (R = G = B, up to the light noise); the shape colours but white are far from grey.
        pixels = np.asarray(Image.open(os.path.join(root, rel)), dtype=np.int16)
        return int((pixels.max(axis=2) - pixels.min(axis=2) > 40).sum())

    rels = [f"test/{i:05d}.png" for i in range(4)]
    drawn = sum(shape_pixels(filled["image_root"], rel) for rel in rels)
    contour = sum(shape_pixels(outline["image_root"], rel) for rel in rels)
    assert 0 < contour < 0.8 * drawn, (contour, drawn)
    with open(os.path.join(tmp_path / "outline", GENERATOR_FILE)) as f:
        generator = json.load(f)
    assert generator["style"] == "outline"
    replayed = [np.asarray(image) for _, image, _ in generate_split(generator, "val")]
    assert np.array_equal(replayed[0], np.asarray(Image.open(os.path.join(outline["image_root"], "val/00000.png"))))
    del generator["style"]  # generator.json written before the option existed: filled shapes
    replayed = [np.asarray(image) for _, image, _ in generate_split(generator, "val")]
    assert np.array_equal(replayed[0], np.asarray(Image.open(os.path.join(filled["image_root"], "val/00000.png"))))
    with pytest.raises(ValueError, match="style must be one of"):
        make_synthetic_dataset(str(tmp_path / "bad"), style="dotted", **kwargs)
