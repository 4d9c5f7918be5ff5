"""Composed image retrieval on CIRR: metrics against brute force, HN-NCE against the formula, the batch samplers'
invariants, the CIRR reader's errors, checkpoint loading, and train + eval end to end on generated data."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

import train_cirr
from data import pre_caption, test_transform
from data.cirr import CirrPair, CirrSplit, DataError, load_cirr_split
from data.cirr_sampler import CirrBatchSampler, plan_epoch, subset_groups
from data.cirr_synthetic import config_keys, make_cirr_dataset
from data.retrieval import load_image
from engine.cir import (
    cirr_scores,
    evaluate_cirr,
    format_cirr_table,
    positive_matrix,
    recall_at_k,
    recall_subset_at_k,
    submissions,
    subset_matrix,
)
from models.blip_cir import build_cir_model, hn_nce_loss, hn_nce_terms, load_cir_model
from models.blip_retrieval import build_model
from tests.helpers import for_script, spread_weights, tiny_config
from utils import ConfigError

SMALL = {"train": 8, "val": 3, "test1": 2}


@pytest.fixture(scope="module")
def cirr_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cirr")
    return make_cirr_dataset(str(root), SMALL, image_size=32, seed=3)


def cir_config(root, paths: dict, **overrides) -> dict:
    base = {**config_keys(paths), "batch_size_train": 8, "batch_size_test": 7, "log_every": 1, "max_epoch": 1}
    return for_script(tiny_config(root, **{**base, **overrides}), "train_cirr.py")


# ----------------------------------------------------------------------------------------------------
# Metrics against brute force
# ----------------------------------------------------------------------------------------------------


def _random_split(rng: random.Random, num_queries: int, gallery: list[str]) -> CirrSplit:
    pairs = []
    for q in range(num_queries):
        members = rng.sample(gallery, 6)
        reference = members[0]
        # Mostly a member target; sometimes one outside the subset (a miss in Recall_subset by definition).
        target = members[rng.randrange(1, 6)] if rng.random() < 0.8 else rng.choice(gallery)
        while target == reference:
            target = rng.choice(gallery)
        pairs.append(CirrPair(q, reference, "x", members, q, target))
    return CirrSplit("val", pairs, {n: n + ".png" for n in gallery}, "", "", "")


def _brute_force(scores: dict[str, dict[str, float]], data: CirrSplit) -> dict[str, float]:
    """Sort each query's candidates by score with the reference REMOVED (not scored -100), count target hits."""
    hits = {f"r{k}": 0 for k in (1, 5, 10, 50)} | {f"rs{k}": 0 for k in (1, 2, 3)}
    for pair in data.pairs:
        row = scores[pair.pairid]
        ranked = sorted((n for n in data.images if n != pair.reference), key=lambda n: -row[n])
        for k in (1, 5, 10, 50):
            hits[f"r{k}"] += pair.target in ranked[:k]
        subset = sorted((m for m in pair.members if m != pair.reference), key=lambda n: -row[n])
        for k in (1, 2, 3):
            hits[f"rs{k}"] += pair.target in subset[:k]
    return {k: 100.0 * v / len(data.pairs) for k, v in hits.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recalls_equal_brute_force(seed):
    rng = random.Random(seed)
    on_disk = [f"img{i}" for i in range(90)]
    gallery = rng.sample(on_disk, 70)  # the split's gallery is a part of what is on disk
    data = _random_split(rng, 40, gallery)
    torch.manual_seed(seed)
    query, feats = torch.randn(40, 8), torch.randn(len(on_disk), 8)
    index = {n: i for i, n in enumerate(gallery)}
    gallery_feats = feats[[on_disk.index(n) for n in gallery]]
    reference_index = torch.tensor([index[p.reference] for p in data.pairs])
    scores = cirr_scores(query, gallery_feats, reference_index)
    got = recall_at_k(scores, torch.tensor([index[p.target] for p in data.pairs]))
    got |= recall_subset_at_k(scores, subset_matrix(data, index), torch.tensor([index[p.target] for p in data.pairs]))
    raw = {p.pairid: {n: float(query[p.pairid] @ gallery_feats[index[n]]) for n in gallery} for p in data.pairs}
    expected = _brute_force(raw, data)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key
    assert 0 < expected["rs3"] < 100 and 0 < expected["r50"] < 100  # the check is not vacuous


def test_reference_is_never_retrieved():
    # Each query is closest to its reference, then to its target: only the exclusion puts the target first.
    gallery = torch.eye(5)
    query = gallery[[2, 4]] + 0.5 * gallery[[3, 0]]
    scores = cirr_scores(query, gallery, torch.tensor([2, 4]))
    assert scores[0, 2] == -100 and scores[1, 4] == -100
    assert recall_at_k(scores, torch.tensor([3, 0]), ks=(1,)) == {"r1": 100.0}
    kept = cirr_scores(query, gallery, torch.tensor([-1, -1]))  # references outside the gallery: nothing excluded
    assert recall_at_k(kept, torch.tensor([3, 0]), ks=(1, 2)) == {"r1": 0.0, "r2": 100.0}


# ----------------------------------------------------------------------------------------------------
# Graded (target_soft) recalls
# ----------------------------------------------------------------------------------------------------


def _soft_split(rng: random.Random, num_queries: int, gallery: list[str]) -> CirrSplit:
    """Like the release's val: target_soft holds target_hard at 1.0 and sometimes other images at 1.0, 0.5 or -1.0,
    members or not, and now and then the reference (never retrieved)."""
    data = _random_split(rng, num_queries, gallery)
    for pair in data.pairs:
        soft = {pair.target: 1.0}
        for name in rng.sample(pair.members, 3) + rng.sample(gallery, 1):
            soft.setdefault(name, rng.choice([1.0, 0.5, 0.2, -1.0]))
        pair.target_soft = soft
    return data


def _graded_brute_force(scores: dict[str, dict[str, float]], data: CirrSplit, positives: str) -> dict[str, float]:
    """CIRR's graded rule written out: walk the ranked list (reference removed), keep the best grade among the
    positives seen in the top K, never below 0. positives: 'hard' ({target_hard: 1}) or 'soft' (target_soft)."""
    totals = {f"r{k}": 0.0 for k in (1, 5, 10, 50)} | {f"rs{k}": 0.0 for k in (1, 2, 3)}
    for pair in data.pairs:
        grades = {pair.target: 1.0} if positives == "hard" else pair.target_soft
        row = scores[pair.pairid]
        ranked = sorted((n for n in data.images if n != pair.reference), key=lambda n: -row[n])
        subset = [n for n in ranked if n in pair.members]
        for prefix, ks, order in (("r", (1, 5, 10, 50), ranked), ("rs", (1, 2, 3), subset)):
            for k in ks:
                totals[f"{prefix}{k}"] += max([0.0] + [grades[n] for n in order[:k] if n in grades])
    return {k: 100.0 * v / len(data.pairs) for k, v in totals.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_graded_recalls_equal_brute_force(seed):
    rng = random.Random(seed)
    gallery = [f"img{i}" for i in range(70)]
    data = _soft_split(rng, 40, gallery)
    torch.manual_seed(seed)
    query, feats = torch.randn(40, 8), torch.randn(70, 8)
    index = {n: i for i, n in enumerate(gallery)}
    scores = cirr_scores(query, feats, torch.tensor([index[p.reference] for p in data.pairs]))
    raw = {p.pairid: {n: float(query[p.pairid] @ feats[index[n]]) for n in gallery} for p in data.pairs}
    members = subset_matrix(data, index)
    results = {}
    for positives in ("hard", "soft"):
        pos = positive_matrix(data, index, soft=positives == "soft")
        got = recall_at_k(scores, *pos) | recall_subset_at_k(scores, members, *pos)
        expected = _graded_brute_force(raw, data, positives)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-4), (positives, key)
        results[positives] = got
    assert results["soft"]["rs1"] > results["hard"]["rs1"]  # the soft positives change the figure


def test_soft_grades_count_their_best_hit():
    # One query, members m0..m4 and reference ref; the hard target m0 is ranked last among the members.
    gallery = ["ref", "m0", "m1", "m2", "m3", "m4"]
    pair = CirrPair(1, "ref", "x", gallery, 0, "m0", {"m0": 1.0, "m1": 0.5, "m2": -1.0, "ref": 1.0})
    data = CirrSplit("val", [pair], {n: n for n in gallery}, "", "", "")
    index = {n: i for i, n in enumerate(gallery)}
    scores = cirr_scores(torch.tensor([[0.0, 0.1, 0.8, 0.9, 0.5, 0.4]]), torch.eye(6), torch.tensor([0]))
    members = subset_matrix(data, index)
    soft, hard = positive_matrix(data, index, soft=True), positive_matrix(data, index, soft=False)
    # Ranking m2 (-1.0), m1 (0.5), m3, m4, m0 (1.0): a -1.0 hit scores 0, the 0.5 hit 0.5, the reference nothing.
    assert recall_subset_at_k(scores, members, *soft) == {"rs1": 0.0, "rs2": 50.0, "rs3": 50.0}
    assert recall_subset_at_k(scores, members, *hard) == {"rs1": 0.0, "rs2": 0.0, "rs3": 0.0}
    assert recall_at_k(scores, *soft, ks=(1, 2, 5)) == {"r1": 0.0, "r2": 50.0, "r5": 100.0}


def _rewrite_val_soft(src: dict, dst) -> dict:
    """A copy of the generated CIRR data whose val target_soft also grades two more members (1.0 and 0.5)."""
    import shutil

    shutil.copytree(src["ann_root"], dst, ignore=shutil.ignore_patterns("img_raw"))
    path = os.path.join(dst, "captions", "cap.rc2.val.json")
    with open(path) as f:
        records = json.load(f)
    for rec in records:
        others = [m for m in rec["img_set"]["members"] if m not in (rec["reference"], rec["target_hard"])]
        rec["target_soft"] = {rec["target_hard"]: 1.0, others[0]: 1.0, others[1]: 0.5}
    with open(path, "w") as f:
        json.dump(records, f)
    return {**src, "ann_root": str(dst)}


def test_val_targets_option_picks_the_positives(tmp_path, cirr_data):
    paths = _rewrite_val_soft(cirr_data, tmp_path / "soft")
    config = cir_config(tmp_path, paths)
    torch.manual_seed(0)
    model = spread_weights(build_cir_model(config))
    val = load_cirr_split(paths["ann_root"], paths["image_root"], "val")
    index = {n: i for i, n in enumerate(val.image_names)}
    results = {}
    for targets in ("soft_subset", "soft", "hard"):
        result = evaluate_cirr(model, val, {**config, "cirr_val_targets": targets}, torch.device("cpu"))
        assert result.metrics["targets"] == targets and result.metrics["gallery"] == "split"
        raw = {p.pairid: {n: float(result.scores[q, index[n]]) for n in val.images} for q, p in enumerate(val.pairs)}
        for key, value in raw.items():
            value[val.pairs[[p.pairid for p in val.pairs].index(key)].reference] = -100.0
        hard, soft = _graded_brute_force(raw, val, "hard"), _graded_brute_force(raw, val, "soft")
        recall_from, subset_from = {"soft_subset": (hard, soft), "soft": (soft, soft), "hard": (hard, hard)}[targets]
        for k in (1, 5, 10, 50):
            assert result.metrics[f"r{k}"] == pytest.approx(recall_from[f"r{k}"], abs=1e-4), (targets, k)
        for k in (1, 2, 3):
            assert result.metrics[f"rs{k}"] == pytest.approx(subset_from[f"rs{k}"], abs=1e-4), (targets, k)
        results[targets] = result.metrics
    assert results["soft_subset"]["rs1"] > results["hard"]["rs1"]  # the fixture's soft positives matter
    assert "soft_subset targets" in format_cirr_table(results["soft_subset"])


def test_target_soft_values_are_checked(tmp_path):
    _write_split(tmp_path, [{**GOOD, "target_soft": {"b": "yes"}}])
    with pytest.raises(DataError, match=r"pairid 7: target_soft\['b'\] must be a number"):
        load_cirr_split(str(tmp_path), str(tmp_path / "img_raw"), "val", check_images=False)
    _write_split(tmp_path, [{**GOOD, "target_soft": {"b": 1.0, "zz": 0.5}}])
    with pytest.raises(DataError, match=r"pairid 7: target_soft key 'zz' is not in the image split"):
        load_cirr_split(str(tmp_path), str(tmp_path / "img_raw"), "val", check_images=False)


# ----------------------------------------------------------------------------------------------------
# The val gallery: the split file's images or the whole folder (CoVR)
# ----------------------------------------------------------------------------------------------------


def test_folder_gallery_ranks_every_image_of_the_folder(tmp_path, cirr_data):
    split = load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "val")
    folder = load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "val", gallery="folder")
    on_disk = sorted(f[:-4] for f in os.listdir(os.path.join(cirr_data["image_root"], "dev")) if f.endswith(".png"))
    assert folder.image_names == on_disk and set(split.images) < set(folder.images)
    assert folder.images["dev-unlisted-0-img0"] == os.path.join("dev", "dev-unlisted-0-img0.png")
    config = cir_config(tmp_path, cirr_data)
    torch.manual_seed(0)
    model = build_cir_model(config)
    a = evaluate_cirr(model, split, config, torch.device("cpu"))
    b = evaluate_cirr(model, folder, config, torch.device("cpu"))
    assert (a.metrics["gallery"], a.metrics["num_gallery"]) == ("split", len(split.images))
    assert (b.metrics["gallery"], b.metrics["num_gallery"]) == ("folder", len(split.images) + 2)
    assert f"(folder gallery, {len(split.images) + 2} images" in format_cirr_table(b.metrics)
    # The split's columns score the same in both; the extra images only add competitors.
    cols = [folder.image_names.index(n) for n in split.image_names]
    assert torch.allclose(a.scores, b.scores[:, cols], atol=1e-5)
    assert all(b.metrics[f"r{k}"] <= a.metrics[f"r{k}"] for k in (1, 5, 10, 50))
    with pytest.raises(DataError, match="folder needs the images of .*split.rc2.train.json in one folder"):
        load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "train", gallery="folder")


# ----------------------------------------------------------------------------------------------------
# HN-NCE
# ----------------------------------------------------------------------------------------------------


def _hn_nce_formula(q: torch.Tensor, t: torch.Tensor, temp: float, alpha: float, beta: float) -> torch.Tensor:
    """Radenovic et al. 2023 eq. (HN-NCE), term by term in float64 with explicit loops."""
    s = (q.double() @ t.double().t()) / temp
    n = len(s)
    total = 0.0
    for direction in (s, s.t()):
        terms = []
        for i in range(n):
            norm = sum(math.exp(beta * direction[i, k].item()) for k in range(n) if k != i)
            denom = alpha * torch.exp(direction[i, i])
            for j in range(n):
                if j != i:
                    denom = denom + (n - 1) * torch.exp(beta * direction[i, j]) / norm * torch.exp(direction[i, j])
            terms.append(torch.log(denom) - direction[i, i])
        total = total + torch.stack(terms).mean()
    return total


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (1.0, 0.0), (0.7, 2.0)])
def test_hn_nce_matches_formula(alpha, beta):
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    t = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    got = hn_nce_loss(q, t, 0.07, alpha, beta)
    assert got.item() == pytest.approx(_hn_nce_formula(q, t, 0.07, alpha, beta).item(), rel=1e-5)


def _covr_code_q2t(q: torch.Tensor, t: torch.Tensor, temp: float, alpha: float, beta: float) -> torch.Tensor:
    """CoVR's released query->target term (src/model/blip/loss.py), written out: the negatives of row i are
    weighted by (B - 1) exp(beta S_ij) / sum_{k != j} exp(beta S_jk), the off-diagonal sum of row j."""
    s = (q.double() @ t.double().t()) / temp
    n = len(s)
    terms = []
    for i in range(n):
        denom = alpha * torch.exp(s[i, i])
        for j in range(n):
            if j != i:
                z_j = sum(torch.exp(beta * s[j, k]) for k in range(n) if k != j)
                denom = denom + (n - 1) * torch.exp(beta * s[i, j]) / z_j * torch.exp(s[i, j])
        terms.append(torch.log(denom) - s[i, i])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.7, 2.0)])
def test_hn_nce_variants_differ_only_in_the_query_to_target_weights(alpha, beta):
    torch.manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    t = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    paper = hn_nce_terms(q, t, 0.07, alpha, beta, "paper")
    covr = hn_nce_terms(q, t, 0.07, alpha, beta, "covr_code")
    assert covr[1].item() == paper[1].item()  # target->query: the same computation
    assert covr[0].item() == pytest.approx(_covr_code_q2t(q, t, 0.07, alpha, beta).item(), rel=1e-5)
    assert abs(covr[0].item() - paper[0].item()) > 1e-3  # random batches: the row sums differ, so the terms do
    total = hn_nce_loss(q, t, 0.07, alpha, beta, "covr_code")
    assert total.item() == pytest.approx((covr[0] + covr[1]).item(), rel=1e-6)


def test_hn_nce_variants_agree_when_every_row_sum_is_the_same():
    # Queries and targets on a circle, the queries turned by a fixed angle: S is circulant (S_ij depends on i - j
    # only), so every row's off-diagonal sum is the same and the released code's normaliser equals the paper's.
    n = 6
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    t = torch.stack([angles.cos(), angles.sin()], dim=1)
    q = torch.stack([(angles + 0.4).cos(), (angles + 0.4).sin()], dim=1)
    paper = hn_nce_loss(q, t, 0.1, 1.0, 0.5, "paper")
    covr = hn_nce_loss(q, t, 0.1, 1.0, 0.5, "covr_code")
    assert covr.item() == pytest.approx(paper.item(), rel=1e-6)
    assert covr.item() == pytest.approx(_hn_nce_formula(q, t, 0.1, 1.0, 0.5).item(), rel=1e-6)


def test_model_uses_the_configured_hn_nce_variant(tmp_path, cirr_data):
    config = cir_config(tmp_path, cirr_data, cir_hnnce_variant="covr_code")
    model = build_cir_model(config)
    assert model.hnnce_variant == "covr_code"
    model.eval()
    torch.manual_seed(3)
    images, texts = torch.randn(4, 3, 32, 32), ["make the red circle blue"] * 4
    targets = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    loss = model(images, texts, targets, 1.0, 0.5)["loss"]
    with torch.no_grad():
        query = model.query_feat(model.image_tokens(images), texts)
    expected = hn_nce_loss(query, targets, model.temp, 1.0, 0.5, "covr_code")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hn_nce_reduces_to_infonce_and_weights_hard_negatives():
    torch.manual_seed(1)
    q, t = torch.randn(8, 4), torch.randn(8, 4)
    s, labels = q @ t.t() / 0.1, torch.arange(8)
    infonce = torch.nn.functional.cross_entropy(s, labels) + torch.nn.functional.cross_entropy(s.t(), labels)
    assert hn_nce_loss(q, t, 0.1, 1.0, 0.0).item() == pytest.approx(infonce.item(), rel=1e-6)
    # beta > 0 up-weights the most similar negatives, so the loss is at least InfoNCE's (Jensen).
    assert hn_nce_loss(q, t, 0.1, 1.0, 0.5) > infonce
    with pytest.raises(ValueError, match="at least two pairs"):
        hn_nce_loss(q[:1], t[:1], 0.1)


# ----------------------------------------------------------------------------------------------------
# Batch samplers
# ----------------------------------------------------------------------------------------------------


def _members(num_subsets: int, pairs_per_subset: list[int]) -> list[list[str]]:
    out = []
    for s in range(num_subsets):
        names = [f"s{s}-{m}" for m in range(6)]
        out += [names] * pairs_per_subset[s % len(pairs_per_subset)]
    return out


@pytest.mark.parametrize("mode", ["random", "contrastive", "similar"])
def test_samplers_fixed_size_each_pair_once(mode):
    members = _members(40, [5, 3, 4, 1])
    groups = subset_groups(members)
    for epoch in range(3):
        batches = plan_epoch(groups, 8, mode, seed=epoch)
        flat = [i for b in batches for i in b]
        assert all(len(b) == 8 for b in batches)
        assert len(flat) == len(set(flat))  # no pair twice in an epoch
        assert len(members) - len(flat) < 8  # only a last partial batch is left out
        if mode == "contrastive":
            for b in batches:
                assert len({groups[i] for i in b}) == len(b)  # no two pairs of one subset
        if mode == "similar":
            # filled subset by subset: a subset's pairs sit in one batch, or straddle two consecutive ones.
            spans: dict[int, set[int]] = {}
            for n, b in enumerate(batches):
                for i in b:
                    spans.setdefault(groups[i], set()).add(n)
            assert all(len(v) == 1 or (len(v) == 2 and max(v) - min(v) == 1) for v in spans.values())
            shared = sum(len(b) - len({groups[i] for i in b}) for b in batches)
            assert shared >= len(flat) // 2  # most pairs sit with a subset-mate
    assert plan_epoch(groups, 8, mode, 0) == plan_epoch(groups, 8, mode, 0)
    assert plan_epoch(groups, 8, mode, 0) != plan_epoch(groups, 8, mode, 1)


def test_subset_groups_are_member_sets():
    members = [["a", "b"], ["c", "d"], ["b", "a"], ["a", "b", "e"]]
    assert subset_groups(members) == [0, 1, 0, 2]  # order of members does not matter; a different set differs


@pytest.mark.parametrize("mode", ["random", "contrastive", "similar"])
def test_sampler_shards_ranks_consistently(mode):
    members = _members(30, [5, 2])
    world, per_rank = 3, 4
    samplers = [CirrBatchSampler(members, per_rank, mode, seed=7, rank=r, world_size=world) for r in range(world)]
    groups = subset_groups(members)
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank_batches = [list(s) for s in samplers]
        assert len({len(b) for b in per_rank_batches}) == 1  # every rank takes the same number of steps
        seen = []
        for step in zip(*per_rank_batches, strict=True):
            global_batch = [i for part in step for i in part]
            assert all(len(part) == per_rank for part in step)
            if mode == "contrastive":  # the invariant holds over the gathered (global) batch
                assert len({groups[i] for i in global_batch}) == len(global_batch)
            seen += global_batch
        assert len(seen) == len(set(seen)) and len(members) - len(seen) == samplers[0].num_dropped < world * per_rank


def test_sampler_refuses_impossible_batches():
    with pytest.raises(DataError, match="fewer than one global batch"):
        CirrBatchSampler(_members(2, [3]), 8, "random", 0)
    with pytest.raises(DataError, match="contrastive needs at least one subset per pair"):
        CirrBatchSampler(_members(3, [5]), 4, "contrastive", 0, world_size=2)


# ----------------------------------------------------------------------------------------------------
# The CIRR reader
# ----------------------------------------------------------------------------------------------------


def test_generated_data_follows_the_release_format(cirr_data):
    val = load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "val")
    test = load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "test1")
    assert len(val.pairs) == 5 * SMALL["val"] and len(val.images) == 6 * SMALL["val"]
    on_disk = [f for _, _, files in os.walk(os.path.join(cirr_data["image_root"], "dev")) for f in files]
    assert len(on_disk) > len(val.images)  # unlisted images exist on disk and stay out of the gallery
    with open(os.path.join(cirr_data["ann_root"], "captions", "cap.rc2.test1.json")) as f:
        raw = json.load(f)
    assert all("target_hard" not in r and "target_soft" not in r for r in raw) and test.pairs[0].target is None
    for pair in val.pairs:
        assert len(pair.members) == 6 and pair.reference in pair.members and pair.target in pair.members


def _write_split(root, records, images=None):
    os.makedirs(root / "captions", exist_ok=True)
    os.makedirs(root / "image_splits", exist_ok=True)
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(records))
    images = {"a": "./dev/a.png", "b": "./dev/b.png"} if images is None else images
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps(images))


GOOD = {
    "pairid": 7,
    "reference": "a",
    "target_hard": "b",
    "target_soft": {"b": 1.0},
    "caption": "add a dog",
    "img_set": {"id": 1, "members": ["a", "b"]},
}


@pytest.mark.parametrize(
    "records,images,match",
    [
        ({"pairs": []}, None, r"cap\.rc2\.val\.json: expected a non-empty JSON list of pairs, got a JSON dict"),
        ([{**GOOD, "caption": None}], None, r"pairid 7: key 'caption' must be str"),
        ([{k: v for k, v in GOOD.items() if k != "target_hard"}], None, r"pairid 7: missing key 'target_hard'"),
        ([{k: v for k, v in GOOD.items() if k != "pairid"}], None, r"entry 0: missing key 'pairid'"),
        ([{**GOOD, "reference": "zz"}], None, r"pairid 7: reference 'zz' is not in the image split .*split\.rc2\.val"),
        ([{**GOOD, "img_set": {"members": "ab"}}], None, r"pairid 7, img_set: key 'members' must be list"),
        ([GOOD, GOOD], None, r"pairid 7 appears more than once"),
        ([GOOD], ["a", "b"], r"split\.rc2\.val\.json: expected a non-empty JSON object"),
        ([GOOD], None, r"image 'a' of .* not found at .*: set cirr_image_root"),
    ],
)
def test_bad_cirr_files_name_file_pair_and_key(tmp_path, records, images, match):
    _write_split(tmp_path, records, images)
    with pytest.raises(DataError, match=match):
        load_cirr_split(str(tmp_path), str(tmp_path / "img_raw"), "val")


def test_missing_files_and_wrong_split_names(tmp_path):
    with pytest.raises(DataError, match=r"split\.rc2\.val\.json.*Set cirr_ann_root"):
        load_cirr_split(str(tmp_path), str(tmp_path), "val")
    with pytest.raises(DataError, match="CIRR's test split is called test1"):
        load_cirr_split(str(tmp_path), str(tmp_path), "test")
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "image_splits" / "split.rc2.val.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_cirr_split(str(tmp_path), str(tmp_path), "val")


# ----------------------------------------------------------------------------------------------------
# Model and checkpoints
# ----------------------------------------------------------------------------------------------------


def test_loads_a_retrieval_checkpoint_and_builds_the_covr_query(tmp_path, cirr_data):
    config = cir_config(tmp_path, cirr_data)
    retrieval = spread_weights(build_model(config))
    path = tmp_path / "retrieval.pth"
    torch.save({"model": retrieval.state_dict()}, path)
    model, report = load_cir_model(config, str(path))
    model.eval(), retrieval.eval()  # no dropout
    assert report.clean and not report.expected_missing
    assert any(k.startswith("itm_head") for k in report.expected_unexpected)
    assert "temp" in report.expected_unexpected and "image_queue" in report.expected_unexpected
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    assert not any(p.requires_grad for p in model.vision_proj.parameters())
    # The query, computed independently with the retrieval model's own modules: [ENC] + text over the image tokens,
    # position 0 of the full last layer, through text_proj.
    image = torch.stack(
        [test_transform(32)(load_image(os.path.join(cirr_data["image_root"], "dev", "dev-0-0-img0.png")))]
    )
    texts = ["make the red circle blue", "add a square"]
    with torch.no_grad():
        tokens = retrieval.visual_encoder(image).expand(2, -1, -1)
        ids, atts = retrieval.tokenize(texts, pad_to_longest=True)
        hidden = retrieval.text_encoder(retrieval.with_enc_token(ids), atts, tokens, mode="multimodal")
        expected = torch.nn.functional.normalize(retrieval.text_proj(hidden[:, 0]), dim=-1)
        got = model.query_feat(model.image_tokens(image).expand(2, -1, -1), texts)
        target = torch.nn.functional.normalize(retrieval.vision_proj(tokens[:1, 0]), dim=-1)
        assert torch.allclose(model.image_feat(model.image_tokens(image)), target, atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-5)


def test_training_refuses_an_image_only_query(tmp_path, cirr_data):
    config = cir_config(tmp_path, cirr_data)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="cir_query: image .* nothing to train"):
        train_cirr.main(
            ["--config", str(cfg_path), "--output-dir", str(tmp_path / "o"), "--options", "cir_query=image"]
        )
    with pytest.raises(ConfigError, match="cir_sampler.*expected one of random, contrastive, similar"):
        train_cirr.main(["--config", str(cfg_path), "--output-dir", str(tmp_path / "o"), "--options", "cir_sampler=x"])


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------


def _independent_metrics(model, data: CirrSplit, image_size: int) -> dict[str, float]:
    """Every image encoded alone from its file, every query alone; the brute-force ranking above."""
    transform = test_transform(image_size)
    model.eval()
    with torch.no_grad():
        feats = {}
        for name in data.images:
            feats[name] = model.image_feat(model.image_tokens(transform(load_image(data.image_path(name)))[None]))[0]
        raw = {}
        for pair in data.pairs:
            tokens = model.image_tokens(transform(load_image(data.image_path(pair.reference)))[None])
            q = model.query_feat(tokens, [pre_caption(pair.caption, 30)])[0]
            raw[pair.pairid] = {n: float(q @ f) for n, f in feats.items()}
    return _brute_force(raw, data)


def test_train_evaluate_resume_end_to_end(tmp_path, cirr_data):
    config = cir_config(tmp_path, cirr_data, cir_sampler="contrastive", init_lr=1e-3, max_epoch=2)
    config["med_config"]["initializer_range"] = 0.3
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    args = ["--config", str(cfg_path), "--output-dir", str(out)]
    train_cirr.main(args + ["--options", "max_epoch=1"])
    result = train_cirr.main(args + ["--resume"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if "train_loss" in r]
    assert epochs == [0, 1] and any(r.get("event") == "resume" for r in records)
    for name in ("config.yaml", "checkpoint_last.pth", "checkpoint_best.pth", "metrics_val.json", "metrics_test1.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert metrics["checkpoint"].endswith("checkpoint_best.pth") and metrics["split"] == "val"
    assert metrics["num_gallery"] == 6 * SMALL["val"] and metrics["num_queries"] == 5 * SMALL["val"]

    # The submission files: the server's format, for every test1 pair, names from the test1 gallery only.
    test = load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "test1")
    for metric, top in (("recall", 50), ("recall_subset", 3)):
        sub = json.loads((out / f"cirr_submission_test1_{metric}.json").read_text())
        assert sub.pop("version") == "rc2" and sub.pop("metric") == metric
        assert sorted(sub) == sorted(str(p.pairid) for p in test.pairs)
        for pair in test.pairs:
            names = sub[str(pair.pairid)]
            # Every gallery image but the reference (a 12-image gallery: the top 50 is all of it), or 3 members.
            assert len(names) == min(top, len(test.images) - 1 if metric == "recall" else 5) == len(set(names))
            assert set(names) <= set(test.images) and pair.reference not in names
            if metric == "recall_subset":
                assert set(names) <= set(pair.members)

    # The batched, sharded evaluation equals an independent one-by-one computation on the trained weights.
    model, val = result["model"], load_cirr_split(cirr_data["ann_root"], cirr_data["image_root"], "val")
    got = evaluate_cirr(model, val, config, torch.device("cpu")).metrics
    expected = _independent_metrics(model, val, config["image_size"])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key

    # --evaluate of the best checkpoint reproduces the selected epoch's val metrics.
    ev = train_cirr.main(
        ["--config", str(cfg_path), "--output-dir", str(tmp_path / "ev"), "--evaluate", "--save-scores", "--options"]
        + [f"pretrained={out / 'checkpoint_best.pth'}"]
    )
    assert ev["best_val"]["r_avg"] == pytest.approx(metrics["r_avg"], abs=1e-4)

    # --save-scores: the matrix and ranks behind the figures, audited from the file alone.
    import numpy as np

    saved = np.load(tmp_path / "ev" / "scores_val.npz")
    assert list(saved["gallery"]) == val.image_names and list(saved["pairids"]) == [p.pairid for p in val.pairs]
    rows = np.arange(len(val.pairs))
    assert (saved["scores"][rows, saved["reference_index"]] == -100).all()
    assert np.allclose(saved["scores"], ev["results"]["val"].scores.numpy())
    for k in (1, 5, 10, 50):  # soft_subset: Recall@K counts target_hard
        assert 100 * (saved["target_rank"] < k).mean() == pytest.approx(ev["best_val"][f"r{k}"], abs=1e-4)
    target_scores = saved["scores"][rows, saved["target_index"]]
    assert (saved["target_rank"] == (saved["scores"] > target_scores[:, None]).sum(1)).all()
    assert saved["soft_index"].shape == saved["soft_grade"].shape and (saved["soft_grade"] == -1.0).any()
    assert set(np.load(tmp_path / "ev" / "scores_test1.npz").files) == {
        "scores",
        "pairids",
        "gallery",
        "reference_index",
        "members",
    }


def test_submissions_rank_members_without_reference():
    data = _random_split(random.Random(5), 4, [f"g{i}" for i in range(60)])
    index = {n: i for i, n in enumerate(data.images)}
    scores = cirr_scores(torch.randn(4, 3), torch.randn(60, 3), torch.tensor([index[p.reference] for p in data.pairs]))
    reference_index = torch.tensor([index[p.reference] for p in data.pairs])
    sub = submissions(scores, data, subset_matrix(data, index), list(data.images), reference_index)
    for pair in data.pairs:
        row = scores[pair.pairid]
        expected = sorted((m for m in pair.members if m != pair.reference), key=lambda n: -row[index[n]])[:3]
        assert sub["recall_subset"][str(pair.pairid)] == expected
        others = (n for n in data.images if n != pair.reference)
        assert sub["recall"][str(pair.pairid)] == sorted(others, key=lambda n: -row[index[n]])[:50]


@pytest.mark.parametrize("reference_in_gallery", [True, False])
def test_submission_never_lists_the_reference_in_a_small_gallery(reference_in_gallery):
    # 30 images: the top 50 would be the whole gallery, the reference (scored -100) last, before the fix.
    gallery = [f"g{i}" for i in range(30)]
    data = _random_split(random.Random(7), 5, gallery)
    index = {n: i for i, n in enumerate(gallery)}
    reference_index = torch.tensor([index[p.reference] if reference_in_gallery else -1 for p in data.pairs])
    scores = cirr_scores(torch.randn(5, 4), torch.randn(30, 4), reference_index)
    sub = submissions(scores, data, subset_matrix(data, index), gallery, reference_index)
    for q, pair in enumerate(data.pairs):
        listed = sub["recall"][str(pair.pairid)]
        if reference_in_gallery:
            assert pair.reference not in listed and len(listed) == 29
            assert listed == sorted((n for n in gallery if n != pair.reference), key=lambda n: -scores[q, index[n]])
        else:  # a reference outside the gallery is not scored -100 and removes nothing
            assert len(listed) == 30 and listed[0] == gallery[int(scores[q].argmax())]
        assert pair.reference not in sub["recall_subset"][str(pair.pairid)]


# ----------------------------------------------------------------------------------------------------
# Two real processes (gloo)
# ----------------------------------------------------------------------------------------------------


def _ddp_body(rank: int, world_size: int, config: dict, batch: tuple) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = build_cir_model(config)
    images, texts, targets = batch
    per_rank = len(texts) // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    ddp = DistributedDataParallel(model)
    out = ddp(images[part], texts[part], targets[part], 1.0, 0.5)
    out["loss"].backward()
    val = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "val")
    metrics = evaluate_cirr(model, val, config, torch.device("cpu")).metrics
    return {"loss": out["loss"].item(), "grad": model.text_proj.weight.grad.clone(), "metrics": metrics}


def test_two_processes_equal_one(tmp_path, cirr_data):
    from tests.dist_helpers import run_distributed

    config = cir_config(tmp_path, cirr_data)
    config["med_config"]["hidden_dropout_prob"] = config["med_config"]["attention_probs_dropout_prob"] = 0.0
    torch.manual_seed(1)
    batch = (torch.randn(6, 3, 32, 32), [f"make the red circle {c}" for c in "abcdef"], torch.randn(6, 16))
    batch = (batch[0], batch[1], torch.nn.functional.normalize(batch[2], dim=1))
    results = run_distributed(_ddp_body, 2, config, batch, timeout_s=120)
    torch.manual_seed(0)
    model = build_cir_model(config)
    out = model(*batch, 1.0, 0.5)
    out["loss"].backward()
    val = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "val")
    single = evaluate_cirr(model, val, config, torch.device("cpu")).metrics
    for r in results:
        assert r["loss"] == pytest.approx(out["loss"].item(), rel=1e-5)
        # DDP averages the ranks' gradients; the gather's backward sums each rank's share: the one-process gradient.
        assert torch.allclose(r["grad"], model.text_proj.weight.grad, atol=1e-6, rtol=1e-4)
        for key in ("r1", "r5", "r10", "r50", "rs1", "rs2", "rs3"):
            assert r["metrics"][key] == pytest.approx(single[key], abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# Launch instructions and config keys
# ----------------------------------------------------------------------------------------------------


def test_launch_instructions_give_covr_global_batch():
    # configs/cirr.yaml and train_cirr.py name the same process count, and it times batch_size_train is CoVR's
    # global batch (configs/machine/server.yaml 512 x configs/trainer/gpu.yaml 2 devices).
    import re

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "cirr.yaml")) as f:
        text = f.read()
    counts = {int(n) for n in re.findall(r"--nproc_per_node=(\d+)", text + train_cirr.__doc__)}
    assert len(counts) == 1, counts
    assert counts.pop() * yaml.safe_load(text)["batch_size_train"] == 1024


@pytest.mark.parametrize(
    "option,expected",
    [
        ("cir_hnnce_variant=covr", "paper, covr_code"),
        ("cirr_val_targets=target_soft", "soft_subset, soft, hard"),
        ("cirr_val_gallery=dev", "split, folder"),
    ],
)
def test_new_cirr_keys_refuse_unknown_values(tmp_path, cirr_data, option, expected):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(cir_config(tmp_path, cirr_data)))
    key = option.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}.*expected one of {expected}"):
        train_cirr.main(["--config", str(cfg_path), "--output-dir", str(tmp_path / "o"), "--options", option])
