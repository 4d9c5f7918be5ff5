"""Ordinary mistakes end in one line naming the file, before any work is done; nothing half-written is left behind
(issue 26, sections 2 and 3): OS errors in run_cli, unusable output locations in every script, decompression-bomb
images, truncated or non-UTF-8 inputs, empty training captions, atomic final outputs, stale temporary files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import caption
import compare_retrieval
import eval_imagecode
import eval_retrieval
import export_merged
import train_caption
import train_cirr
import train_retrieval
import utils
from configs.schema import load_config, save_config
from data.captions import ImageFileDataset, collate_images
from data.cirr import CirrPair, CirrSplit, CirrTrainDataset
from data.imagecode import ImagecodeSet
from data.retrieval import DataError, RetrievalEvalDataset, RetrievalTrainDataset, load_image
from engine import captioning, cir, evaluation
from tests.helpers import for_script, tiny_config
from utils import ConfigError, UserError, atomic_save, atomic_write, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_header_only(path, width: int, height: int) -> str:
    """A 57-byte PNG that claims width x height 1-bit pixels (and holds none): what PIL sees first of a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _exit_message(main) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(main)
    return str(info.value.code)


# ----------------------------------------------------------------------------------------------------
# run_cli: which errors are the user's
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/ann.json"), "/data/ann.json: no such"),
        (PermissionError(errno.EACCES, "Permission denied", "/out/metrics.json"), "/out/metrics.json: permission"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/out/c.json"), "/out/c.json: is a folder"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/sub"), "/f/sub: a part of the path is a file"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "/ro/x: read-only"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (yaml.YAMLError("mapping values are not allowed here"), "not valid YAML: mapping values"),
    ],
)
def test_run_cli_reports_the_users_os_errors_in_one_line(error: Exception, expected: str) -> None:
    def main():
        raise error

    message = _exit_message(main)
    assert message.startswith("error: ") and expected in message and "\n" not in message


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EBADF, "Bad file descriptor"),  # a bug, not a path the user gave
        FileNotFoundError(errno.ENOENT, "No such file or directory"),  # no path to name: keep the traceback
        OSError("something inside a library"),
        KeyError("a bug"),
    ],
)
def test_run_cli_keeps_the_traceback_of_bugs(error: Exception) -> None:
    def main():
        raise error

    with pytest.raises(type(error)):
        run_cli(main)


class _UnreadableImages(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        load_image(f"/nowhere/image{index}.jpg")


def test_run_cli_turns_a_dataloader_workers_error_into_its_one_line() -> None:
    loader = DataLoader(_UnreadableImages(), num_workers=1)
    message = _exit_message(lambda: list(loader))
    assert message == "error: Image file not found: /nowhere/image0.jpg"


def test_disk_full_during_an_atomic_write_names_the_file(tmp_path) -> None:
    def write(_f):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a failing write() raises: no file name

    target = str(tmp_path / "metrics.json")
    message = _exit_message(lambda: atomic_write(target, write))
    assert message.startswith(f"error: {target}: no space left") and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# Output locations are checked before the work starts, in every script that writes outputs
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path) -> str:
    path = str(tmp_path / "tiny.yaml")
    save_config(tiny_config(tmp_path), path)
    return path


def _no_work(*_args, **_kwargs):
    raise AssertionError("the work started before the output location was checked")


def _dir_scripts(config_file: str, tmp_path, monkeypatch) -> dict:
    """{name: (main, argv without the output, the output flag)} of the scripts writing into a folder; the first
    expensive step of each is replaced by _no_work."""
    monkeypatch.setattr(eval_retrieval, "load_model", _no_work)
    monkeypatch.setattr(eval_imagecode, "load_model", _no_work)
    monkeypatch.setattr(compare_retrieval, "load_run", _no_work)
    monkeypatch.setattr(utils, "init_distributed", _no_work)  # the trainers' first step after the config
    cfg = ["--config", config_file]
    per_script = {}
    for script in ("train_caption.py", "train_cirr.py"):  # tiny_config's retrieval keys are not theirs
        per_script[script] = str(tmp_path / f"tiny_{script}.yaml")
        save_config(for_script(tiny_config(tmp_path), script), per_script[script])
    return {
        "eval_retrieval": (eval_retrieval.main, [*cfg, "--checkpoint", "x.pth"]),
        "eval_imagecode": (eval_imagecode.main, [*cfg, "--ann-file", "a.json", "--image-root", "sets"]),
        "compare_retrieval": (compare_retrieval.main, [str(tmp_path)]),
        "train_retrieval": (train_retrieval.main, cfg),
        "train_caption": (train_caption.main, ["--config", per_script["train_caption.py"]]),
        "train_cirr": (train_cirr.main, ["--config", per_script["train_cirr.py"]]),
    }


@pytest.mark.parametrize(
    "script",
    ["eval_retrieval", "eval_imagecode", "compare_retrieval", "train_retrieval", "train_caption", "train_cirr"],
)
def test_an_unusable_output_dir_is_refused_before_the_work(script, config_file, tmp_path, monkeypatch) -> None:
    main, argv = _dir_scripts(config_file, tmp_path, monkeypatch)[script]
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a folder")
    with pytest.raises(UserError, match=f"--output-dir {in_the_way} cannot be an output folder: it is a file"):
        main([*argv, "--output-dir", str(in_the_way)])
    # A missing parent that cannot be created (it would have to be made under a file): as root no chmod stops us.
    under_a_file = in_the_way / "run" / "sub"
    with pytest.raises(UserError, match=f"{under_a_file} cannot be an output folder: it lies under the file"):
        main([*argv, "--output-dir", str(under_a_file)])
    assert in_the_way.read_text() == "not a folder"


def test_an_unusable_output_file_is_refused_before_the_work(config_file, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(caption, "load_caption_model", _no_work)
    monkeypatch.setattr(export_merged, "load_model", _no_work)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("x")
    caption_config = str(tmp_path / "caption.yaml")
    save_config(for_script(tiny_config(tmp_path), "caption.py"), caption_config)
    scripts = {
        "caption": (caption.main, ["--config", caption_config, "--images", str(images)]),
        "export_merged": (export_merged.main, ["--config", config_file, "--checkpoint", "x.pth"]),
    }
    for main, argv in scripts.values():
        with pytest.raises(UserError, match=f"--output {images} is a folder; expected the name of a file"):
            main([*argv, "--output", str(images)])
        with pytest.raises(UserError, match=f"it lies under the file {in_the_way}"):
            main([*argv, "--output", str(in_the_way / "sub" / "out.json")])


@pytest.mark.skipif(
    shutil.which("unshare") is None or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root and unshare for a private read-only bind mount",
)
def test_a_read_only_output_dir_is_refused_in_one_line(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    check = f"import sys, utils; utils.run_cli(lambda: utils.check_output_dir({str(folder / 'run')!r}, '--output-dir'))"
    script = f"mount --bind -o ro {folder} {folder} && exec {sys.executable} -c {check!r}"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    if "mount" in done.stderr and done.returncode != 1:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: --output-dir {folder / 'run'} cannot be written: read-only file system"


# ----------------------------------------------------------------------------------------------------
# Decompression bombs: skipped and named where images can be skipped, one line naming the file elsewhere
# ----------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 15000, 15000)
    assert os.path.getsize(bomb) < 100
    with pytest.raises(DataError, match=f"Could not read image file {bomb}: more pixels than the limit"):
        load_image(bomb)


def test_a_decompression_bomb_is_skipped_by_the_image_loader(tmp_path) -> None:
    good = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path in good:
        Image.new("RGB", (8, 8), "red").save(path)
    paths = [good[0], _png_header_only(tmp_path / "bomb.png", 15000, 15000), good[1]]
    loader = DataLoader(ImageFileDataset(paths, lambda im: torch.zeros(3)), batch_size=3, collate_fn=collate_images)
    ((images, indices, errors),) = list(loader)
    assert images.shape == (2, 3) and indices == [0, 2]
    assert [index for index, _ in errors] == [1] and "bomb.png" in errors[0][1]


def test_caption_cli_captions_the_others_and_names_the_bomb(tmp_path) -> None:
    config = str(tmp_path / "tiny.yaml")
    save_config(for_script(tiny_config(tmp_path, gen_max_length=8, num_beams=1), "caption.py"), config)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (32, 32), "blue").save(images / name)
    _png_header_only(images / "b_bomb.png", 15000, 15000)
    out = tmp_path / "captions.json"
    with pytest.raises(UserError, match=r"1 of 3 images could not be read[\s\S]*b_bomb\.png: .*more pixels"):
        caption.main(["--config", config, "--images", str(images), "--output", str(out)])
    assert [r["image"] for r in json.loads(out.read_text())] == ["a.png", "c.png"]


def test_an_evaluation_image_that_is_a_bomb_is_named(tmp_path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    _png_header_only(tmp_path / "bomb.png", 15000, 15000)
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps([{"image": "ok.png", "caption": ["a dog"]}, {"image": "bomb.png", "caption": ["a"]}]))
    dataset = RetrievalEvalDataset(str(ann), str(tmp_path), None)
    message = _exit_message(lambda: list(DataLoader(dataset, num_workers=1, collate_fn=list)))
    assert message.startswith(f"error: Could not read image file {tmp_path / 'bomb.png'}: more pixels")
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------------
# Truncated, non-UTF-8 and non-JSON inputs; empty training captions
# ----------------------------------------------------------------------------------------------------


def _eval_run_dir(folder) -> str:
    folder.mkdir()
    (folder / "metrics_test.json").write_text(json.dumps({"txt_r1": 1.0}))
    index = {"image_root": "/", "images": ["a.jpg", "b.jpg"], "texts": ["a", "b", "c"], "txt2img": [0, 1, 1]}
    (folder / "index_test.json").write_text(json.dumps(index))
    rng = np.random.default_rng(0)
    np.savez(folder / "scores_test.npz", i2t=rng.normal(size=(2, 3)), t2i=rng.normal(size=(3, 2)))
    return str(folder)


def test_a_truncated_scores_file_is_named(tmp_path) -> None:
    run = _eval_run_dir(tmp_path / "run")
    scores = os.path.join(run, "scores_test.npz")
    data = open(scores, "rb").read()
    for cut in (len(data) // 2, len(data) - 30):
        with open(scores, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(UserError, match=f"{scores} cannot be read .*truncated"):
            compare_retrieval.main([run, "--output-dir", str(tmp_path / "report")])


def test_non_utf8_inputs_are_named(tmp_path) -> None:
    latin1 = "caption: café\n".encode("latin-1")
    config = tmp_path / "config.yaml"
    config.write_bytes(latin1)
    with pytest.raises(ConfigError, match=f"config file {config} is not UTF-8 text"):
        load_config(str(config))
    ann = tmp_path / "ann.json"
    ann.write_bytes('{"set": {"0": "café"}}'.encode("latin-1"))
    with pytest.raises(DataError, match=f"annotation file {ann} is not valid JSON"):
        ImagecodeSet(str(ann), str(tmp_path), 32)
    run = _eval_run_dir(tmp_path / "run")
    with open(os.path.join(run, "index_test.json"), "wb") as f:
        f.write('{"texts": ["café"]}'.encode("latin-1"))
    with pytest.raises(UserError, match="index_test.json is not valid JSON"):
        compare_retrieval.main([run, "--output-dir", str(tmp_path / "report")])


@pytest.mark.parametrize("empty", ["", "   ", "!.;"])
def test_an_empty_training_caption_is_refused(tmp_path, empty: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [
        {"image": "a.png", "caption": "a dog", "image_id": 0},
        {"image": "a.png", "caption": empty, "image_id": 0},
    ]
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(records))
    with pytest.raises(DataError, match=f"Record 1 in {ann}: 'caption' .* is empty"):
        RetrievalTrainDataset(str(ann), str(tmp_path), None)


def test_an_empty_cirr_training_caption_is_refused(tmp_path) -> None:
    pairs = [
        CirrPair(7, "a", "make it red", ["a", "b"], 0, "b"),
        CirrPair(8, "b", "", ["a", "b"], 0, "a"),
    ]
    data = CirrSplit("train", pairs, {"a": "a.png", "b": "b.png"}, str(tmp_path), "cap.rc2.train.json", "split.json")
    with pytest.raises(DataError, match=r"cap.rc2.train.json: entry 1 \(pairid 8\) has an empty caption"):
        CirrTrainDataset(data, lambda image: image)


# ----------------------------------------------------------------------------------------------------
# Final outputs are whole or absent; stale temporaries of a killed write are removed
# ----------------------------------------------------------------------------------------------------


class _FailsMidWrite:
    """A metrics value whose serialisation fails: stands for a kill or crash in the middle of writing the file."""

    def __str__(self) -> str:
        raise RuntimeError("killed while writing")

    __repr__ = __str__


def _write_eval(folder: str, metrics: dict) -> None:
    evaluation.write_eval_outputs(evaluation.EvalResult(np.zeros((1, 1)), np.zeros((1, 1)), metrics), folder, "test")


def _write_caption(folder: str, metrics: dict) -> None:
    captioning.write_caption_outputs(metrics, [], folder, "test")


def _write_cirr(folder: str, metrics: dict) -> None:
    cir.write_cirr_outputs(cir.CirResult("test", torch.zeros(1, 1), metrics), folder, {})


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (_write_eval, "metrics_test.json"),
        (_write_caption, "caption_metrics_test.json"),
        (_write_cirr, "metrics_test.json"),
    ],
)
def test_a_failed_write_leaves_the_previous_output_whole(tmp_path, write, name: str) -> None:
    write(str(tmp_path), {"r1": 50.0})
    before = (tmp_path / name).read_text()
    with pytest.raises((RuntimeError, TypeError)):
        write(str(tmp_path), {"r1": 60.0, "broken": _FailsMidWrite()})
    assert (tmp_path / name).read_text() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_stale_temporaries_of_a_killed_save_are_removed_and_nothing_else(tmp_path) -> None:
    target = tmp_path / "checkpoint_last.pth"
    long_ago = time.time() - 3600
    stale = tmp_path / "checkpoint_last.pth.tmp-0123456789ab"  # what a run killed inside atomic_save leaves
    others = [
        tmp_path / "checkpoint_best.pth.tmp-0123456789ab",  # another target's: its own next save cleans it
        tmp_path / "checkpoint_last.pth.tmp-notours",  # not our naming
        tmp_path / "checkpoint_last.pth.tmp-0123456789abc",  # not exactly our naming
        tmp_path / "notes.txt",
    ]
    for path in [stale, *others]:
        path.write_bytes(b"partial")
        os.utime(path, (long_ago, long_ago))
    live = tmp_path / "checkpoint_last.pth.tmp-fedcba987654"  # a writer still at work: modified after we started
    live.write_bytes(b"being written")
    atomic_save({"step": 1}, str(target))
    assert not stale.exists()
    assert all(path.exists() for path in [*others, live])
    assert torch.load(target, weights_only=True) == {"step": 1}
