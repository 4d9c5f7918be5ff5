"""Smoke runs of the benchmark scripts with tiny towers, so that they keep working (CI never times them).

Each run also checks what the benchmark itself would report as a failure: the fast and official evaluation
agree, the cached query path returns the official ranking, and training variants of one kind start from the
same loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import bench_eval, bench_query, bench_train, itm_negatives, itm_topk_auc
from data.synthetic import make_synthetic_dataset
from models.blip_retrieval import build_model
from tests.helpers import spread_weights, synthetic_config
from utils import save_config

TINY = ["--device", "cpu", "--vit", "tiny", "--text", "tiny", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """--threads 1 sets torch's thread count for the whole process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_eval_tiny_fast_matches_official(tmp_path):
    out = bench_eval.main(
        TINY
        + [
            "--image-size",
            "32",
            "--num-images",
            "6",
            "--k-test",
            "3",
            "--warmup-images",
            "2",
            "--amp-cpu",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert (tmp_path / "eval.json").is_file()
    assert set(out["metrics"]) == {"official", "fast", "fast_fp32"}  # --amp-cpu adds the fp32 check run
    fp32 = out["comparisons"]["fast_fp32"]
    assert fp32["recalls_equal_to_official"] and fp32["max_abs_score_diff_vs_official"] < 1e-4
    flops = out["flops"]
    assert flops["pairs"]["fast"] <= flops["pairs"]["official"] == 3 * 6 + 3 * 30
    assert 0 < flops["rerank_tflop"]["fast"] < flops["rerank_tflop"]["official"]


def test_bench_query_tiny_agrees_with_official(tmp_path):
    out = bench_query.main(
        TINY
        + [
            "--image-size",
            "32",
            "--num-images",
            "6",
            "--num-queries",
            "3",
            "--warmup-queries",
            "1",
            "--k",
            "3",
            "--amp",
            "none",
        ]
    )
    agreement = out["agreement"]
    assert agreement["same_top1"] == agreement["same_topk_set"] == agreement["queries"] == 3


def test_bench_train_tiny_variants_share_their_first_loss():
    out = bench_train.main(TINY + ["--image-size", "32", "--batch-size", "4", "--warmup", "0", "--steps", "1"])
    losses = {name: r["losses"][0] for name, r in out["variants"].items()}
    assert losses["ours"] == pytest.approx(losses["ours+ckpt"], abs=1e-5)
    assert losses["fp32"] == pytest.approx(losses["fp32+ckpt"], abs=1e-5)
    assert set(out["speedup_fp32_over_ours"]) >= {"no_ckpt", "ckpt"}
    tflop = {name: r["step_tflop"] for name, r in out["variants"].items()}
    assert 0 < tflop["ours"] < tflop["fp32"]  # 35-token captions and the full last layer cost more
    assert tflop["ours+ckpt"] >= tflop["ours"]  # checkpointing recomputes, never saves work


def test_pairwise_auc_counts_true_over_false_and_halves_ties():
    truth = np.array([True, False, False])
    assert itm_topk_auc.pairwise_auc([np.array([3.0, 2.0, 1.0])], [truth]) == 1.0
    assert itm_topk_auc.pairwise_auc([np.array([1.0, 2.0, 3.0])], [truth]) == 0.0
    assert itm_topk_auc.pairwise_auc([np.array([2.0, 2.0, 1.0])], [truth]) == 0.75  # one tie, one win
    # A query without a false (or a true) candidate says nothing about the ranking and is skipped.
    assert (
        itm_topk_auc.pairwise_auc([np.array([1.0, 2.0]), np.array([5.0, 1.0, 0.0])], [np.array([True, True]), truth])
        == 1.0
    )


def test_itm_topk_auc_on_a_tiny_checkpoint(tmp_path):
    paths = make_synthetic_dataset(str(tmp_path / "data"), num_train_images=4, num_val_images=4, num_test_images=6)
    config = synthetic_config(tmp_path, paths)
    torch.manual_seed(0)
    model = spread_weights(build_model(config))
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    config_path = tmp_path / "config.yaml"
    save_config(config, str(config_path))
    stats = itm_topk_auc.main(
        [
            "--config",
            str(config_path),
            "--checkpoint",
            str(ckpt),
            "--k",
            "3",
            "--generated-data",
            str(tmp_path / "data"),
        ]
    )
    assert stats["i2t"]["queries"] == 6 and stats["t2i"]["queries"] == 30
    for direction in stats.values():
        assert all(
            0.0 <= direction[key] <= 1.0
            for key in ("auc_cosine", "auc_itm", "auc_itm_plus_cosine")
            if not np.isnan(direction[key])
        )
        assert direction["spread_cosine"] >= 0 and direction["spread_itm"] > 0
        assert 0.0 <= direction["labelled_false_but_true"] <= 1.0


def test_itm_negatives_runs_a_schedule_and_writes_its_table(tmp_path):
    results = itm_negatives.main(
        [
            "--out",
            str(tmp_path),
            "--datasets",
            "two_shapes",
            "--schedules",
            "warmup:10",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--eval-every",
            "1",
            "--parallel",
            "1",
            "--options",
            "vit.depth=1",
            "med_config.num_hidden_layers=1",
        ]
    )
    (run,) = results.values()
    assert run["schedule"] == "warmup:10" and len(run["curves"]["train_loss_itm"]) == 1
    assert {"r_mean", "itc_r_mean"} <= set(run["test"])
    table = (tmp_path / "results.md").read_text()
    assert "| two_shapes | warmup:10 | 1 |" in table


def test_move_places_moves_every_place_to_another_cell_and_keeps_the_other_words():
    import random

    from bench.position_probe import _PLACE, PHRASE_CELL, move_places

    caption = "a red circle in the top left corner and a blue square at the top of the image"
    rng = random.Random(0)
    for _ in range(20):
        moved = move_places(caption, rng)
        before, after = _PLACE.findall(caption), _PLACE.findall(moved)
        assert before == ["in the top left corner", "at the top of the image"] and len(after) == 2
        assert all(PHRASE_CELL[a] != PHRASE_CELL[b] for a, b in zip(before, after, strict=True))
        assert _PLACE.sub("#", moved) == _PLACE.sub("#", caption)
    assert move_places("a picture of a red circle", rng) is None


def test_position_probe_equals_scoring_each_pair_alone(tmp_path):
    """The batched probe against one caption at a time through the model's own encoders, with the same draws."""
    import json
    import random

    from bench import position_probe
    from data.retrieval import DataError, load_image
    from data.transforms import test_transform
    from data.utils import pre_caption

    paths = make_synthetic_dataset(str(tmp_path / "data"), 4, 2, 4)
    config = synthetic_config(tmp_path, paths)
    torch.manual_seed(0)
    model = spread_weights(build_model(config)).eval()
    result = position_probe.position_probe(model, paths["test_file"], paths["image_root"], config, seed=3)
    rng, wins, count = random.Random(3), {"itc": 0, "itm": 0}, 0
    with open(paths["test_file"]) as f, torch.no_grad():
        for record in json.load(f):
            image = test_transform(config["image_size"])(load_image(f"{paths['image_root']}/{record['image']}"))[None]
            for caption in record["caption"]:
                true = pre_caption(caption, config["max_words"])
                moved = position_probe.move_places(true, rng)
                if moved is None:
                    continue
                scores = {"itc": [], "itm": []}
                for text in (true, moved):
                    embeds, feat = model.encode_image(image)
                    ids, atts = model.tokenize([text])
                    scores["itc"].append(float(model.encode_text(ids, atts) @ feat.t()))
                    scores["itm"].append(float(model.itm_logits(model.with_enc_token(ids), atts, embeds)[0, 1]))
                for name, (a, b) in scores.items():
                    wins[name] += a > b
                count += 1
    assert result["captions"] == count > 0
    for name in ("itc", "itm"):
        assert result[f"{name}_true_wins"] == pytest.approx(100 * wins[name] / count)
    checkpoint, config_file = str(tmp_path / "model.pth"), str(tmp_path / "config.yaml")
    torch.save({"model": model.state_dict()}, checkpoint)
    save_config(config, config_file)
    args = ["--config", config_file, "--checkpoint", checkpoint, "--ann-file", paths["test_file"], "--image-root"]
    position_probe.main([*args, paths["image_root"], "--seed", "3", "--out", str(tmp_path / "probe")])
    with open(tmp_path / "probe" / "position_probe.json") as f:
        assert json.load(f)["itm_true_wins"] == pytest.approx(result["itm_true_wins"])
    no_places = tmp_path / "no_places.json"
    no_places.write_text(json.dumps([{"image": "x.png", "caption": ["a picture of a red circle"]}]))
    with pytest.raises(DataError, match="no_places.json: no caption names a place"):
        position_probe.position_probe(model, str(no_places), paths["image_root"], config)
