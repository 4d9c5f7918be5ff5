"""The shared trainer (engine/trainer.py) across tasks: keys of another task refused, LR schedules against their
references' formulas, exact resume after a kill in the middle of an epoch (the log reads as one run), a corrupt
--resume file, `select_epoch: last`, and CIR's exact resume (retrieval, CLIP and captioning have theirs in
test_train.py, test_clip.py and test_caption_scripts.py)."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

import train_caption
import train_cirr
import train_retrieval
from configs import schema
from configs.schema import load_config, save_config
from data.cirr_synthetic import make_cirr_dataset
from data.synthetic import make_synthetic_dataset
from engine import retrieval_task, trainer
from engine.trainer import cosine_lr, learning_rate
from tests.helpers import synthetic_config
from tests.test_cirr import SMALL, cir_config
from utils import ConfigError

TIMING = ("_per_s", "time")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 train images x 2 captions (6 batches of 8), 8 val and 8 test images, 32 px, 2 epochs."""
    root = tmp_path_factory.mktemp("trainer_data")
    paths = make_synthetic_dataset(
        str(root), num_train_images=24, num_val_images=8, num_test_images=8, captions_per_image=2, image_size=32, seed=0
    )
    config = synthetic_config(
        root, paths, batch_size_train=8, batch_size_test=8, k_test=4, queue_size=16, max_epoch=2, log_every=2
    )
    path = os.path.join(root, "config.yaml")
    save_config(config, path)
    return path


def _records(path: str) -> list[dict]:
    """log.jsonl without timing keys and without events (resume marks, done)."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in records if "event" not in r]


def _assert_same_weights(a_path: str, b_path: str) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # atol 0: momentum encoders and queues included
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), name


# ----------------------------------------------------------------------------------------------------
# Config keys per script
# ----------------------------------------------------------------------------------------------------


def test_every_key_has_one_group_and_every_config_loads_for_its_scripts():
    grouped = [key for keys in schema.KEY_GROUPS.values() for key in keys]
    assert sorted(grouped) == sorted(schema.DEFAULT_CONFIG) and len(grouped) == len(set(grouped))
    for path in sorted(glob.glob("configs/*.yaml")):
        name = os.path.basename(path)
        scripts = (
            ("train_caption.py", "caption.py")
            if name.startswith(("caption", "demo_caption"))
            else ("train_cirr.py",)
            if name.startswith("cirr")
            else ("train_retrieval.py", "eval_retrieval.py", "search.py", "eval_imagecode.py", "export_merged.py")
        )
        for script in scripts:
            load_config(path, script=script)


@pytest.mark.parametrize(
    ("main", "script", "override"),
    [
        (train_retrieval.main, "train_retrieval.py", "prompt=a photo of "),
        (train_retrieval.main, "train_retrieval.py", "cir_query=text"),
        (train_caption.main, "train_caption.py", "k_test=16"),
        (train_caption.main, "train_caption.py", "finetune.method=lora"),
        (train_caption.main, "train_caption.py", "cirr_val_gallery=folder"),
        (train_cirr.main, "train_cirr.py", "num_beams=5"),
        (train_cirr.main, "train_cirr.py", "dataset=coco"),
    ],
)
def test_a_key_of_another_task_is_refused(tmp_path, main, script, override):
    key, config, out = override.split("=")[0].split(".")[0], tmp_path / "shared_keys_only.yaml", tmp_path / "out"
    config.write_text("seed: 1\nmax_epoch: 1\n")
    with pytest.raises(ConfigError, match=rf"config key '{key}' \(in override .*\) is not used by {script}"):
        main(["--config", str(config), "--output-dir", str(out), "--options", override])
    assert not out.exists()  # refused before anything is written


def test_a_key_of_another_task_in_the_yaml_file_is_refused(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("k_test: 16\nprompt: 'a photo of '\n")
    with pytest.raises(ConfigError, match=rf"'prompt' \(in {path}\) is not used by eval_retrieval.py: .*caption"):
        load_config(str(path), script="eval_retrieval.py")
    assert load_config(str(path))["prompt"] == "a photo of "  # bench and study tools accept every key
    # At its default a foreign key changes nothing, so a resolved config.yaml (every key listed) loads anywhere.
    path.write_text("k_test: 16\nprompt: 'a picture of '\n")
    assert load_config(str(path), script="eval_retrieval.py")["k_test"] == 16


# ----------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ----------------------------------------------------------------------------------------------------


def _lr_config(**keys) -> dict:
    return schema.validate_config({**schema.DEFAULT_CONFIG, **keys})


def test_cosine_epoch_is_the_official_per_epoch_cosine():
    config = _lr_config(init_lr=1e-5, min_lr=1e-6, max_epoch=6)
    for epoch in range(6):
        for step in (0, 7, 99):  # constant within an epoch
            assert learning_rate(config, epoch, step, 10) == cosine_lr(epoch, 6, 1e-5, 1e-6)
    assert cosine_lr(3, 6, 1e-5, 0.0) == pytest.approx(0.5e-5)


def test_cosine_step_is_open_clips_warmup_then_cosine():
    """open_clip's schedule (its scheduler.py): base_lr * (step + 1) / warmup, then 0.5 * (1 + cos(pi * e / es))
    * base_lr over the remaining steps (floor 0), written out independently here."""
    warmup, steps_per_epoch, epochs, base = 7, 10, 3, 5e-4
    config = _lr_config(lr_schedule="cosine_step", warmup_steps=warmup, init_lr=base, min_lr=0.0, max_epoch=epochs)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step < warmup:
            expected = base * (step + 1) / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base
        assert learning_rate(config, step // steps_per_epoch, step, steps_per_epoch) == pytest.approx(expected)


def test_step_decay_is_contextblips_warmup_and_decay():
    """ContextBLIP's (and BLIP pre-training's) rule: epoch e at max(min_lr, init_lr * rate ** e); in epoch 0, step
    i at min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)."""
    config = _lr_config(
        lr_schedule="step_decay", warmup_steps=30, warmup_lr=1e-6, init_lr=3e-4, min_lr=1e-6, lr_decay_rate=0.9
    )
    assert learning_rate(config, 0, 0, 20) == pytest.approx(1e-6)
    assert learning_rate(config, 0, 15, 20) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 15 / 30)
    assert learning_rate(config, 1, 20, 20) == pytest.approx(3e-4 * 0.9)  # epoch 0 was shorter than the warmup
    assert learning_rate(config, 100, 2000, 20) == pytest.approx(1e-6)  # the floor
    no_warmup = _lr_config(lr_schedule="step_decay", init_lr=3e-4, lr_decay_rate=0.5)
    assert [learning_rate(no_warmup, e, 0, 20) for e in range(3)] == pytest.approx([3e-4, 1.5e-4, 0.75e-4])


def test_a_per_step_schedule_reaches_the_optimizer(config_path, tmp_path):
    """The lr logged with each step is the schedule's value for that step (the first logged step is step 2)."""
    options = ["lr_schedule=cosine_step", "warmup_steps=4", "init_lr=1e-3", "log_every=1", "max_epoch=1"]
    train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path), "--options", *options])
    steps = [r for r in _records(str(tmp_path / "log.jsonl")) if "loss_ita" in r]
    config = load_config(config_path, options)
    assert [r["lr"] for r in steps] == pytest.approx([learning_rate(config, 0, s, 6) for s in range(6)])
    assert steps[0]["lr"] == pytest.approx(1e-3 / 4) and steps[3]["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------
# Resume, the log, selection
# ----------------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_kill_in_the_middle_of_an_epoch_then_resume_reads_as_one_run(config_path, tmp_path, monkeypatch):
    """Killed in epoch 1 after 3 of its 6 batches (2 step records written after the epoch-0 checkpoint), then
    --resume: weights equal the straight run's bit for bit, and log.jsonl holds each step once."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_retrieval.main(["--config", config_path, "--output-dir", str(straight)])
    step = retrieval_task.RetrievalTask.train_step
    calls = []

    def die_in_epoch_1(self, train_model, batch, info):
        if info.epoch == 1 and len(calls) == 3:
            raise _Killed
        if info.epoch == 1:
            calls.append(1)
        return step(self, train_model, batch, info)

    monkeypatch.setattr(retrieval_task.RetrievalTask, "train_step", die_in_epoch_1)
    with pytest.raises(_Killed):
        train_retrieval.main(["--config", config_path, "--output-dir", str(killed)])
    before = _records(str(killed / "log.jsonl"))
    assert [r["step"] for r in before if r.get("epoch") == 1 and "loss_ita" in r] == [8]  # a partial epoch's record
    monkeypatch.setattr(retrieval_task.RetrievalTask, "train_step", step)
    train_retrieval.main(["--config", config_path, "--output-dir", str(killed), "--resume"])
    _assert_same_weights(str(straight / "checkpoint_last.pth"), str(killed / "checkpoint_last.pth"))
    assert _records(str(killed / "log.jsonl")) == _records(str(straight / "log.jsonl"))


def test_a_corrupt_resume_file_is_one_line(config_path, tmp_path):
    train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path), "--options", "max_epoch=1"])
    last = tmp_path / "checkpoint_last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ConfigError, match=r"--resume: .*checkpoint_last.pth is not a readable checkpoint \(truncated"):
        train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path), "--resume"])
    with pytest.raises(ConfigError, match="not a checkpoint_last.pth written by train_caption.py"):
        trainer.read_train_checkpoint(
            str(_write_other_checkpoint(tmp_path)), ("blip-caption-train-v1",), "train_caption.py"
        )


def _write_other_checkpoint(tmp_path) -> str:
    path = tmp_path / "other.pth"
    torch.save({"format": "blip-retrieval-train-v2", "model": {}}, path)
    return str(path)


def test_select_epoch_last_keeps_the_last_epoch(config_path, tmp_path):
    result = train_retrieval.main(
        ["--config", config_path, "--output-dir", str(tmp_path), "--options", "select_epoch=last", "max_epoch=3"]
    )
    assert result["best_epoch"] == 2
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    last = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert best["epoch"] == 2 and all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert json.loads((tmp_path / "metrics_test.json").read_text())["epoch"] == 2


def test_cir_resume_is_exact(tmp_path, monkeypatch):
    """CIR through the shared trainer: killed after epoch 0 is saved, resumed, equal to two epochs straight."""
    data = make_cirr_dataset(str(tmp_path / "cirr"), SMALL, image_size=32, seed=3)
    path = tmp_path / "cir.yaml"
    save_config(cir_config(tmp_path, data, max_epoch=2, num_workers=0), str(path))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cirr.main(["--config", str(path), "--output-dir", str(straight)])
    save = trainer.save_last_checkpoint

    def save_then_die(contents: dict, where: str) -> None:
        save(contents, where)
        raise _Killed

    monkeypatch.setattr(trainer, "save_last_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_cirr.main(["--config", str(path), "--output-dir", str(resumed)])
    monkeypatch.setattr(trainer, "save_last_checkpoint", save)
    train_cirr.main(["--config", str(path), "--output-dir", str(resumed), "--resume"])
    _assert_same_weights(str(straight / "checkpoint_last.pth"), str(resumed / "checkpoint_last.pth"))
    assert torch.load(resumed / "checkpoint_last.pth", weights_only=True)["format"] == "blip-cir-train-v1"
    assert _records(str(resumed / "log.jsonl")) == _records(str(straight / "log.jsonl"))
