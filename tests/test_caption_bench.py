"""Smoke runs of the captioning benchmark scripts with tiny models (CI never times them)."""

from __future__ import annotations

import os

import pytest
import torch

from bench import caption_decode_speed
from configs.schema import save_config
from data.synthetic import make_synthetic_dataset
from models.blip_caption import build_caption_model
from studies import caption_baselines
from tests.helpers import synthetic_config


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_decode_speed_smoke() -> None:
    args = ["--device", "cpu", "--vit", "tiny", "--text", "tiny", "--image-size", "32", "--batch", "2"]
    result = caption_decode_speed.main(args + ["--repeats", "1", "--threads", "1", "--max-length", "8"])
    assert result["identical_ids"] and result["ours_s"] > 0 and result["transformers_s"] > 0


def test_caption_baselines_smoke(tmp_path) -> None:
    paths = make_synthetic_dataset(
        str(tmp_path), num_train_images=4, num_val_images=4, num_test_images=4, captions_per_image=2, image_size=32
    )
    config = synthetic_config(tmp_path, paths, gen_max_length=8, batch_size_test=4)
    config_path = os.path.join(tmp_path, "c.yaml")
    save_config(config, config_path)
    ckpt = os.path.join(tmp_path, "random.pth")
    torch.save({"model": build_caption_model(config).state_dict()}, ckpt)
    rows = caption_baselines.main(["--config", config_path, "--checkpoint", ckpt, "--options", "num_beams=2"])
    assert set(rows) == {"trained", "shuffled", "untrained", "most_frequent"}
    assert all(row["cider"] is not None for row in rows.values())
