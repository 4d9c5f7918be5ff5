"""compare_retrieval.py / engine/report.py: the report renders from real evaluation outputs (a tiny CLIP and a tiny
BLIP on generated data), its numbers are the runs' numbers, and the caption buckets are right on a fixed list."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import compare_retrieval
import eval_retrieval
from configs.schema import save_config
from data.synthetic import config_keys, make_synthetic_dataset
from engine.report import bucket_names, caption_phenomena, phenomenon_buckets, rank_buckets
from tests.clip_helpers import clip_config, save_open_clip_checkpoint, write_open_clip_config
from tests.helpers import synthetic_config
from utils import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two eval_retrieval.py --save-scores directories on the same generated test split: a tiny open_clip CLIP and a
    tiny randomly initialised BLIP (ITC + ITM re-ranking)."""
    root = tmp_path_factory.mktemp("report")
    paths = make_synthetic_dataset(
        str(root / "data"), num_train_images=4, num_val_images=4, num_test_images=12, captions_per_image=3, seed=1
    )
    keys = config_keys(paths)
    oc = write_open_clip_config(str(root / "oc"), "tiny-clip-report", quick_gelu=False)
    ckpt = save_open_clip_checkpoint(oc, str(root / "oc" / "w.pt"))
    clip = clip_config(clip_model=oc, pretrained=ckpt, clip_pretrained_tag="custom", **{**keys, "text_encoder": ""})
    blip = synthetic_config(root, paths, image_size=64, k_test=4, batch_size_test=8)
    out = {}
    for name, config in (("clip", clip), ("blip", blip)):
        path = str(root / f"{name}.yaml")
        save_config(config, path)
        out[name] = str(root / f"eval_{name}")
        eval_retrieval.main(["--config", path, "--output-dir", out[name], "--save-scores"])
    out["root"] = str(root)
    return out


def test_report_renders_and_holds_the_runs_numbers(runs, tmp_path):
    out = str(tmp_path / "report")
    files = compare_retrieval.main([runs["clip"], runs["blip"], "--output-dir", out, "--num-failures", "5"])
    table = open(files["table"]).read()
    clip_metrics = json.load(open(os.path.join(runs["clip"], "metrics_test.json")))
    blip_metrics = json.load(open(os.path.join(runs["blip"], "metrics_test.json")))
    assert "tiny-clip-report" in table and "BLIP (custom ViT)" in table
    resolution = next(line for line in table.splitlines() if line.startswith("| image size"))
    assert resolution.split("|")[2:4] == [" 32 ", " 64 "]  # each model's own resolution
    ranking = next(line for line in table.splitlines() if line.startswith("| ranking"))
    assert "| ITC |" in ranking and "ITC + ITM top 4" in ranking
    row = next(line for line in table.splitlines() if line.startswith("| IR R-Precision"))
    assert row.split("|")[2:4] == [f" {clip_metrics['img_rprec']:.1f} ", f" {blip_metrics['img_rprec']:.1f} "]
    row = next(line for line in table.splitlines() if line.startswith("| TR R@5"))
    assert row.split("|")[2:4] == [f" {clip_metrics['txt_r5']:.1f} ", f" {blip_metrics['txt_r5']:.1f} "]

    for key in ("recall_curves", "rank_histograms"):
        with Image.open(files[key]) as image:
            assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 300
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 10  # drawn, not blank

    page = open(files["gallery"], encoding="utf-8").read()
    index = json.load(open(os.path.join(runs["clip"], "index_test.json")))
    ranks = np.load(os.path.join(runs["clip"], "scores_test.npz"))["t2i_rank"]
    worst = index["texts"][int(np.argsort(-ranks, kind="stable")[0])]
    assert worst in page  # the CLIP run's worst query is shown first in its section
    assert len(re.findall(r"<img src='data:image/jpeg;base64,", page)) == 2 * 5 * 6  # 2 runs x 5 queries x (5 + gt)
    assert page.count("class='query'") == 10 and page.count("ground truth &middot; rank") == 10

    summary = json.load(open(files["summary"]))
    assert summary["metrics"]["tiny-clip-report"]["img_r1"] == pytest.approx(clip_metrics["img_r1"])
    phenomena = summary["phenomena_t2i_r1"]
    assert phenomena["all captions"]["captions"] == 36
    assert phenomena["all captions"]["tiny-clip-report"] == pytest.approx(clip_metrics["img_r1"])
    assert phenomena["negation"]["captions"] == 0 and phenomena["negation"]["tiny-clip-report"] is None
    assert sum(phenomena[name]["captions"] for name in bucket_names() if name.startswith("length")) == 36


def test_phenomenon_buckets_on_a_fixed_caption_list():
    captions = [
        "two dogs run on the grass",  # counting
        "a man in a red shirt",  # colour/attribute
        "a cat sitting to the left of a small box",  # spatial + attribute
        "a woman without an umbrella",  # negation
        "the boy doesn't smile",  # negation (contraction)
        "3 people next to a bus",  # digit count + spatial phrase
        "a photo of a street in the evening with lots of people walking around and talking together",  # long
        "nothing",  # negation, 1 word
        "a bird on a branch",  # no phenomenon (on is not counted as spatial)
    ]
    buckets = phenomenon_buckets(captions)
    assert buckets["counting"] == [0, 5]
    assert buckets["colour/attribute"] == [1, 2]
    assert buckets["spatial"] == [2, 5, 6]  # 'around' in the long caption
    assert buckets["negation"] == [3, 4, 7]
    assert buckets["length <= 8 words"] == [0, 1, 3, 4, 5, 7, 8]
    assert buckets["length 9-14 words"] == [2]
    assert buckets["length >= 15 words"] == [6]
    assert caption_phenomena("a bird on a branch") == ["length <= 8 words"]
    assert "negation" not in caption_phenomena("a note on the knot")  # whole words only


def test_report_errors_name_the_missing_file_and_the_mismatch(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"metrics_test.json not found: run eval_retrieval.py with --save-scores"):
        compare_retrieval.main([runs["clip"], str(empty), "--output-dir", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--names gives 1 names for 2 runs"):
        compare_retrieval.main([runs["clip"], runs["blip"], "--output-dir", str(tmp_path / "r"), "--names", "a"])
    other = tmp_path / "other"
    other.mkdir()
    for name in ("metrics_test.json", "scores_test.npz"):
        os.link(os.path.join(runs["clip"], name), other / name)
    index = json.load(open(os.path.join(runs["clip"], "index_test.json")))
    index["texts"][0] = "a different caption"
    json.dump(index, open(other / "index_test.json", "w"))
    with pytest.raises(UserError, match="evaluated different data"):
        compare_retrieval.main([runs["clip"], str(other), "--output-dir", str(tmp_path / "r")])


def test_rank_ranges_cover_every_rank_once():
    assert [label for label, _, _ in rank_buckets(250)] == [
        "1",
        "2",
        "3-5",
        "6-10",
        "11-20",
        "21-50",
        "51-100",
        "101-200",
        "201-250",
    ]
    for largest in (1, 2, 3, 7, 50, 1000, 5000):
        covered = [r for _, lo, hi in rank_buckets(largest) for r in range(lo, hi + 1)]
        assert covered == list(range(1, largest + 1))
