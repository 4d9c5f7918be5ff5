"""Runs of the study scripts (studies/) on tiny models and generated data, so that they keep working.

Each test checks what the study computes against an independent computation or a hand-worked case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.schema import save_config
from data.synthetic import make_synthetic_dataset
from models.blip_retrieval import build_model
from studies import itm_negatives, itm_topk_auc, position_probe
from tests.helpers import spread_weights, synthetic_config


@pytest.fixture(autouse=True)
def _restore_threads():
    """--threads sets torch's thread count for the whole process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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

    from studies.position_probe import _PLACE, PHRASE_CELL, move_places

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
