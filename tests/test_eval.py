"""Tests for eval_retrieval.py and engine/: recall metrics, ITM re-ranking (fast and official) against brute force,
distributed evaluation with real gloo processes, the command line and bad eval splits.

Reference semantics (the official evaluation): the score of a pair in a query's
top k_test by ITC cosine is ITM match logit + cosine, every other pair gets cosine - 100; recall uses
`np.argsort(row)[::-1]` ordering and, image->text, the best rank over the image's captions.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import eval_retrieval
from configs.schema import DEFAULT_CONFIG, load_config
from data import DataError, create_dataset
from data.synthetic import make_synthetic_dataset
from engine import evaluation, features, itm_rerank
from engine.metrics import compute_metrics, format_metrics_table, query_ranks
from models.blip_retrieval import build_model
from tests.dist_helpers import run_distributed
from tests.helpers import TINY_MED, spread_weights, synthetic_config
from utils import ConfigError

CPU = torch.device("cpu")
RECALL_KEYS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]
RANK_KEYS = ["txt_medr", "txt_meanr", "img_medr", "img_meanr"]
RPREC_KEYS = ["txt_rprec", "img_rprec"]  # R-Precision (issue 15), added beside the official keys
TIME_KEYS = ["time_text_features", "time_image_features", "time_itc", "time_rerank", "time_total"]
# patch 8 at 32 px: 16 patches + CLS, so cross-attention has more than a handful of image tokens.
VIT = {"width": 48, "depth": 2, "heads": 2, "patch_size": 8}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Synthetic shapes data: val 11 images (odd, for uneven shards), test 12 images, 5 captions each."""
    out = tmp_path_factory.mktemp("synth_eval")
    paths = make_synthetic_dataset(
        str(out), num_train_images=1, num_val_images=11, num_test_images=12, captions_per_image=5, image_size=32, seed=3
    )
    paths["root"] = str(out)
    return paths


@pytest.fixture(scope="module")
def config(synth: dict[str, str]) -> dict:
    return synthetic_config(synth["root"], synth, vit=dict(VIT), batch_size_test=5, k_test=8)


@pytest.fixture(scope="module")
def model(config: dict):
    """A tiny random model whose weights are spread (tests.helpers.spread_weights) for clear top-k boundaries."""
    torch.manual_seed(0)
    return spread_weights(build_model(config)).eval()


@pytest.fixture(scope="module")
def test_ds(config: dict):
    return create_dataset(config, "test")


@pytest.fixture(scope="module")
def val_ds(config: dict):
    return create_dataset(config, "val")


def _cfg(config: dict, **overrides) -> dict:
    return {**config, **overrides}


def _brute_force(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """ITC cosines and ITM match logits of EVERY (image, text) pair (see `_brute_force_logits`), both
    (N_img, N_txt) float64."""
    cos, logits = _brute_force_logits(model, dataset)
    return cos, logits[..., 1]


@torch.no_grad()
def _brute_force_logits(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """ITC cosines and both ITM logits of EVERY (image, text) pair, computed independently of eval_retrieval:
    all images in one batch, all texts in one batch, and the ITM of each pair as its own row with the image
    tokens passed as encoder hidden states (no cached keys/values, no top-k). Returns cos (N_img, N_txt) and
    logits (N_img, N_txt, 2), float64."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    image_tokens, image_feat = model.encode_image(images)
    ids, atts = model.tokenize(dataset.text, CPU)
    text_feat = model.encode_text(ids, atts)
    enc_ids = ids.clone()
    enc_ids[:, 0] = model.tokenizer.convert_tokens_to_ids("[ENC]")
    n_img, n_txt = len(images), len(dataset.text)
    itm = torch.empty(n_img, n_txt, 2)
    for i in range(n_img):
        pair_images = image_tokens[i : i + 1].expand(n_txt, -1, -1)  # one (image i, text t) pair per row
        itm[i] = model.itm_logits(enc_ids, atts, pair_images)
    cos = image_feat @ text_feat.t()
    return cos.double().numpy(), itm.double().numpy()


def _topk_columns(row: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(row))
    desc = np.sort(row)[::-1]
    if k < len(row):  # the test data must not have a tie at the top-k boundary, or the top-k set is ambiguous
        assert desc[k - 1] - desc[k] > 1e-5, f"fixture precondition: cosine tie at the top-{k} boundary"
    return np.argsort(-row, kind="stable")[:k]


def _expected_scores(cos: np.ndarray, itm: np.ndarray, k: int, cos_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Reference score matrices built row by row: top-k by cosine get itm + cos * cos_scale, the rest cos - 100."""
    i2t = cos - 100.0
    for i in range(cos.shape[0]):
        top = _topk_columns(cos[i], k)
        i2t[i, top] = itm[i, top] + cos[i, top] * cos_scale
    t2i = cos.T - 100.0
    for t in range(cos.shape[1]):
        top = _topk_columns(cos[:, t], k)
        t2i[t, top] = itm[top, t] + cos[top, t] * cos_scale
    return i2t, t2i


@pytest.fixture(scope="module")
def brute_test(model, test_ds) -> tuple[np.ndarray, np.ndarray]:
    return _brute_force(model, test_ds)


def _without_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time_")}


# ----------------------------------------------------------------------------- compute_metrics by hand

# 4 images with 3, 2, 4 and 3 captions (12 texts).
IMG2TXT = {0: [0, 1, 2], 1: [3, 4], 2: [5, 6, 7, 8], 3: [9, 10, 11]}
TXT2IMG = {t: i for i, ts in IMG2TXT.items() for t in ts}

# Image -> text, no ties. Best 0-based rank over each image's captions: 0, 3, 7, 0.
I2T = np.array(
    [
        # gt 0,1,2: col 2 is first                                           -> rank 0
        [0.1, 0.5, 0.9, 0.3, 0.2, 0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
        # gt 3,4: order 0 1 2 4 5 6 7 8 3 ...; caption 4 at 3, caption 3 at 8  -> rank 3
        [0.9, 0.8, 0.7, 0.1, 0.6, 0.5, 0.4, 0.3, 0.2, 0.0, -0.1, -0.2],
        # gt 5-8: seven non-gt above (0 1 2 3 4 9 10), then 7                 -> rank 7
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.0, 0.2, -0.1, 0.4, 0.3, -0.2],
        # gt 9,10,11: col 9 first                                              -> rank 0
        [0.1, 0.2, 0.3, 0.4, -0.1, -0.2, -0.3, -0.4, 0.7, 0.8, -0.5, -0.6],
    ],
    dtype=np.float32,
)

# Text -> image, no ties. 0-based rank of the single gt image per text.
T2I = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],  # t0 gt 0                 -> 0
        [0.1, 0.9, 0.2, 0.3],  # t1 gt 0: order 1 3 2 0  -> 3
        [0.5, 0.6, 0.1, 0.2],  # t2 gt 0: order 1 0      -> 1
        [0.2, 0.5, 0.6, 0.1],  # t3 gt 1: order 2 1      -> 1
        [0.3, 0.2, 0.4, 0.1],  # t4 gt 1: order 2 0 1    -> 2
        [0.0, 0.1, 0.7, 0.2],  # t5 gt 2                 -> 0
        [0.1, 0.2, 0.3, 0.4],  # t6 gt 2: order 3 2      -> 1
        [0.1, 0.2, 0.3, 0.35],  # t7 gt 2: order 3 2     -> 1
        [0.2, 0.15, 0.25, 0.1],  # t8 gt 2               -> 0
        [0.1, 0.2, 0.3, 0.4],  # t9 gt 3                 -> 0
        [0.4, 0.1, 0.15, 0.2],  # t10 gt 3: order 0 3    -> 1
        [0.5, 0.6, 0.7, -1.0],  # t11 gt 3: last         -> 3
    ],
    dtype=np.float32,
)


def test_compute_metrics_hand_computed():
    m = compute_metrics(I2T, T2I, TXT2IMG, IMG2TXT)
    # txt ranks 0, 3, 7, 0 -> 1-based 1, 4, 8, 1
    assert m["txt_r1"] == pytest.approx(50.0)
    assert m["txt_r5"] == pytest.approx(75.0)
    assert m["txt_r10"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx(75.0)
    assert m["txt_medr"] == pytest.approx(2.5)
    assert m["txt_meanr"] == pytest.approx(3.5)
    # img ranks 0 3 1 1 2 0 1 1 0 0 1 3 -> four at rank 0; 1-based sum 25
    assert m["img_r1"] == pytest.approx(100.0 * 4 / 12)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["img_r10"] == pytest.approx(100.0)
    assert m["img_r_mean"] == pytest.approx((100.0 * 4 / 12 + 200.0) / 3)
    assert m["img_medr"] == pytest.approx(2.0)
    assert m["img_meanr"] == pytest.approx(25 / 12)
    assert m["r_mean"] == pytest.approx((75.0 + (100.0 * 4 / 12 + 200.0) / 3) / 2)
    assert set(m) == set(RECALL_KEYS + RANK_KEYS + RPREC_KEYS)


def _official_ranks(scores: np.ndarray, gts: list[list[int]]) -> np.ndarray:
    """The official per-row loop: inds = np.argsort(row)[::-1]; rank = min position of a gt."""
    ranks = np.zeros(len(scores))
    for row, gt in enumerate(gts):
        inds = np.argsort(scores[row])[::-1]
        ranks[row] = min(np.where(inds == g)[0][0] for g in gt)
    return ranks


def _metrics_from_ranks(tr: np.ndarray, ir: np.ndarray) -> dict:
    m = {}
    for prefix, r in (("txt", tr), ("img", ir)):
        for k in (1, 5, 10):
            m[f"{prefix}_r{k}"] = 100.0 * np.mean(r < k)
        m[f"{prefix}_medr"], m[f"{prefix}_meanr"] = np.median(r + 1), np.mean(r + 1)
    return m


def test_compute_metrics_ties_follow_official_argsort():
    """Ties are ordered exactly as the official `np.argsort(row)[::-1]` orders them.

    NOTE: numpy's default argsort is NOT stable on CPUs where it dispatches to a SIMD sort (numpy 2.x with
    AVX-512/AVX2), so "higher column index first" is not guaranteed: the official tie order depends on the
    numpy build and CPU. We therefore assert agreement with the official expression evaluated here, and that
    every tied rank lies inside the range the tie allows.
    """
    i2t, t2i = I2T.copy(), T2I.copy()
    i2t[0, 5] = i2t[0, 2]  # gt 2 tied at the top with non-gt 5            -> rank 0 or 1
    i2t[3, 8] = i2t[3, 9]  # gt 9 tied at the top with non-gt 8            -> rank 0 or 1
    i2t[1] = 0.0  # everything tied; gts 3 and 4                             -> rank 0 .. 10
    t2i[2] = [0.5, 0.5, 0.1, 0.1]  # gt 0 tied with 1 at the top          -> 0 or 1
    t2i[4] = [0.3, 0.3, 0.3, 0.3]  # gt 1, all tied                       -> 0 .. 3
    t2i[9] = [0.1, 0.1, 0.1, 0.1]  # gt 3, all tied                       -> 0 .. 3
    t2i[7] = [0.1, 0.2, 0.3, 0.3]  # gt 2 tied with 3 at the top          -> 0 or 1
    tr = _official_ranks(i2t, [IMG2TXT[i] for i in range(4)])
    ir = _official_ranks(t2i, [[TXT2IMG[t]] for t in range(12)])
    assert 0 <= tr[0] <= 1 and 0 <= tr[3] <= 1 and 0 <= tr[1] <= 10
    assert 0 <= ir[2] <= 1 and 0 <= ir[4] <= 3 and 0 <= ir[9] <= 3 and 0 <= ir[7] <= 1
    m = compute_metrics(i2t, t2i, TXT2IMG, IMG2TXT)
    for key, value in _metrics_from_ranks(tr, ir).items():
        assert m[key] == pytest.approx(value), key


def _row_with_gt_at(n: int, gt: int, rank: int) -> np.ndarray:
    """Scores n, n-1, ..., 1 laid out so that column `gt` is exactly at 0-based position `rank`."""
    others = [c for c in range(n) if c != gt]
    order = others[:rank] + [gt] + others[rank:]
    row = np.empty(n, dtype=np.float32)
    row[order] = np.arange(n, 0, -1)
    return row


def test_compute_metrics_recall_boundaries():
    """One caption per image, 15 images; ranks straddle every K boundary (4/5 and 9/10 included)."""
    ranks = [0, 1, 4, 5, 9, 10, 14, 0, 0, 2, 3, 6, 12, 8, 7]
    n = len(ranks)
    i2t = np.stack([_row_with_gt_at(n, i, r) for i, r in enumerate(ranks)])
    t2i = np.stack([_row_with_gt_at(n, i, r) for i, r in enumerate(ranks[::-1])])
    m = compute_metrics(i2t, t2i, {i: i for i in range(n)}, {i: [i] for i in range(n)})
    for prefix in ("txt", "img"):
        assert m[f"{prefix}_r1"] == pytest.approx(100 * 3 / 15)
        assert m[f"{prefix}_r5"] == pytest.approx(100 * 7 / 15)
        assert m[f"{prefix}_r10"] == pytest.approx(100 * 12 / 15)
        assert m[f"{prefix}_r_mean"] == pytest.approx(100 * 22 / 45)
        assert m[f"{prefix}_medr"] == pytest.approx(6.0)
        assert m[f"{prefix}_meanr"] == pytest.approx(96 / 15)
    assert m["r_mean"] == pytest.approx(100 * 22 / 45)


def test_compute_metrics_many_rows_matches_official_loop():
    """More than one 1024-row chunk, heavy ties (integer scores): equals the per-row official loop."""
    rng = np.random.default_rng(0)
    n_img, per = 1100, 2
    n_txt = n_img * per
    img2txt = {i: list(range(i * per, (i + 1) * per)) for i in range(n_img)}
    txt2img = {t: t // per for t in range(n_txt)}
    i2t = rng.integers(0, 30, size=(n_img, n_txt)).astype(np.float32)
    t2i = rng.integers(0, 30, size=(n_txt, n_img)).astype(np.float32)

    tr = _official_ranks(i2t, [img2txt[i] for i in range(n_img)])
    ir = _official_ranks(t2i, [[txt2img[t]] for t in range(n_txt)])
    m = compute_metrics(i2t, t2i, txt2img, img2txt)
    for k in (1, 5, 10):
        assert m[f"txt_r{k}"] == pytest.approx(100.0 * np.mean(tr < k))
        assert m[f"img_r{k}"] == pytest.approx(100.0 * np.mean(ir < k))
    assert m["txt_medr"] == pytest.approx(np.median(tr + 1))
    assert m["img_meanr"] == pytest.approx(np.mean(ir + 1))
    assert 0 < m["txt_r1"] < 100 and 0 < m["img_r10"] < 100  # not degenerate


# ----------------------------------------------------------------------------- re-ranking vs brute force


@pytest.mark.parametrize("mode", ["fast", "official"])
@pytest.mark.parametrize("k_test", [1, 7, 20, 1000])  # 20 > 12 images (t2i clamps); 1000 > both (all re-ranked)
def test_evaluate_matches_brute_force(model, test_ds, config, brute_test, mode, k_test):
    cos, itm = brute_test
    assert cos.shape == (12, 60)
    exp_i2t, exp_t2i = _expected_scores(cos, itm, k_test)
    result = evaluation.evaluate(model, test_ds, _cfg(config, eval_mode=mode, k_test=k_test, itm_batch_size=256), CPU)
    assert result.scores_i2t.dtype == np.float32 and result.scores_t2i.dtype == np.float32
    assert result.scores_i2t.shape == (12, 60) and result.scores_t2i.shape == (60, 12)
    np.testing.assert_allclose(result.scores_i2t, exp_i2t, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.scores_t2i, exp_t2i, atol=1e-4, rtol=0)
    # Exactly min(k, N) entries per row were re-ranked (ITM logits are O(1); the rest are near -100).
    assert ((result.scores_i2t > -50).sum(1) == min(k_test, 60)).all()
    assert ((result.scores_t2i > -50).sum(1) == min(k_test, 12)).all()
    expected_metrics = compute_metrics(exp_i2t, exp_t2i, test_ds.txt2img, test_ds.img2txt)
    expected_itc = compute_metrics(cos, np.ascontiguousarray(cos.T), test_ds.txt2img, test_ds.img2txt)
    for key in RECALL_KEYS:
        assert result.metrics[key] == pytest.approx(expected_metrics[key]), key
        assert result.metrics[f"itc_{key}"] == pytest.approx(expected_itc[key]), key  # cosines alone
    assert result.metrics["k_test"] == k_test and result.metrics["num_images"] == 12
    assert result.metrics["num_texts"] == 60
    assert not model.training


@pytest.mark.parametrize("mode", ["fast", "official"])
def test_calibrated_score_matches_brute_force(model, test_ds, config, mode):
    """rerank_score: calibrated scores the top k by log P_ITM(match) + cosine / temp, in both modes; fast mode
    also reports the official score's metrics (official_*) from the same forwards."""
    cos, logits = _brute_force_logits(model, test_ds)
    log_p_match = logits[..., 1] - np.logaddexp(logits[..., 0], logits[..., 1])
    temp = float(model.temp.detach())
    exp_i2t, exp_t2i = _expected_scores(cos, log_p_match, 7, cos_scale=1.0 / temp)
    cfg = _cfg(config, eval_mode=mode, k_test=7, rerank_score="calibrated")
    result = evaluation.evaluate(model, test_ds, cfg, CPU)
    np.testing.assert_allclose(result.scores_i2t, exp_i2t, atol=1e-3, rtol=0)
    np.testing.assert_allclose(result.scores_t2i, exp_t2i, atol=1e-3, rtol=0)
    expected = compute_metrics(exp_i2t, exp_t2i, test_ds.txt2img, test_ds.img2txt)
    official_i2t, official_t2i = _expected_scores(cos, logits[..., 1], 7)
    official = compute_metrics(official_i2t, official_t2i, test_ds.txt2img, test_ds.img2txt)
    # Guard: the two scores order the shortlists differently on this data, so a mix-up would fail.
    assert (np.argsort(-exp_t2i, axis=1)[:, :7] != np.argsort(-official_t2i, axis=1)[:, :7]).any()
    for key in RECALL_KEYS:
        assert result.metrics[key] == pytest.approx(expected[key]), key
        if mode == "fast":
            assert result.metrics[f"official_{key}"] == pytest.approx(official[key]), key
    assert ("official_r_mean" in result.metrics) == (mode == "fast")
    table = format_metrics_table(result.metrics)
    assert ("re-ranked, official" in table) == (mode == "fast") and "ITC only" in table


def test_rerank_score_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="rerank_score must be one of"):
        itm_rerank.rerank_score(torch.zeros(2, 2), torch.zeros(2), "sum", 0.07)


def test_itm_changes_the_ranking(test_ds, brute_test):
    """Guard for the brute-force test: the ITM term really matters on this data (the scores are not just
    the cosine order), so a re-ranker that skipped or misplaced ITM would fail it."""
    cos, itm = brute_test
    exp_i2t, _ = _expected_scores(cos, itm, 1000)
    assert (np.argsort(-exp_i2t, axis=1)[:, :5] != np.argsort(-cos, axis=1)[:, :5]).any()
    assert itm.std() > 1e-3


def _fast_matching_official(model, dataset, cfg: dict):
    """Evaluate in both modes, check the fast mode gives the official scores and metrics; return both results."""
    fast = evaluation.evaluate(model, dataset, _cfg(cfg, eval_mode="fast"), CPU)
    official = evaluation.evaluate(model, dataset, _cfg(cfg, eval_mode="official"), CPU)
    np.testing.assert_allclose(fast.scores_i2t, official.scores_i2t, atol=1e-4, rtol=0)
    np.testing.assert_allclose(fast.scores_t2i, official.scores_t2i, atol=1e-4, rtol=0)
    for key in RECALL_KEYS + RANK_KEYS:
        assert fast.metrics[key] == official.metrics[key], key
    return fast, official


def test_fast_and_official_agree_with_split_itm_batches(model, test_ds, config):
    cfg = _cfg(config, k_test=9, itm_batch_size=7)  # 7 does not divide any image's pair count in general
    fast, official = _fast_matching_official(model, test_ds, cfg)
    assert fast.metrics["eval_mode"] == "fast" and official.metrics["eval_mode"] == "official"
    # itm_batch_size must not change the fast scores beyond float rounding.
    big = evaluation.evaluate(model, test_ds, _cfg(cfg, eval_mode="fast", itm_batch_size=1000), CPU)
    np.testing.assert_allclose(fast.scores_i2t, big.scores_i2t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast.scores_t2i, big.scores_t2i, atol=1e-5, rtol=0)


def test_fast_mode_with_cpu_bf16_autocast_stays_close_to_fp32(model, test_ds, config):
    """amp_cpu runs the fast mode in bf16 on the CPU: scores come back as float32 and within bf16 rounding."""
    fp32 = evaluation.evaluate(model, test_ds, _cfg(config, eval_mode="fast", k_test=5), CPU)
    bf16_config = _cfg(config, eval_mode="fast", k_test=5, eval_amp="bf16", amp_cpu=True)
    bf16 = evaluation.evaluate(model, test_ds, bf16_config, CPU)
    assert bf16.scores_i2t.dtype == np.float32
    in_top_k = fp32.scores_i2t > -50
    assert ((bf16.scores_i2t > -50) == in_top_k).mean() > 0.9  # the ITC top k barely moves
    both = in_top_k & (bf16.scores_i2t > -50)
    diff = np.abs(bf16.scores_i2t[both] - fp32.scores_i2t[both])
    assert diff.mean() < 0.05 and diff.max() < 0.25  # ITM + cosine in [-1, 3] here; bf16 keeps ~3 digits
    assert np.corrcoef(bf16.scores_i2t[both], fp32.scores_i2t[both])[0, 1] > 0.99
    assert np.abs(bf16.scores_i2t - fp32.scores_i2t).max() > 0  # it really ran in bf16


def test_official_mode_ignores_amp(model, test_ds, config):
    """The reference path is fp32 whatever `eval_amp` says (here bf16 on the CPU via amp_cpu)."""
    plain = evaluation.evaluate(model, test_ds, _cfg(config, eval_mode="official", k_test=4), CPU)
    asked_config = _cfg(config, eval_mode="official", k_test=4, eval_amp="bf16", amp_cpu=True)
    asked = evaluation.evaluate(model, test_ds, asked_config, CPU)
    np.testing.assert_array_equal(plain.scores_i2t, asked.scores_i2t)
    np.testing.assert_array_equal(plain.scores_t2i, asked.scores_t2i)


def test_paper_configs_evaluate_in_fp32_by_default():
    """The official numerics: the paper configs evaluate in fp32 even on CUDA, where training defaults to bf16;
    bf16 evaluation is the opt-in `eval_amp: bf16`."""
    cuda = torch.device("cuda")
    for name in ("retrieval_flickr", "retrieval_coco", "retrieval_flickr_large", "retrieval_coco_large"):
        config = load_config(f"configs/{name}.yaml")
        assert config["eval_amp"] == "none" and config["amp"] == "bf16", name
        assert features.eval_autocast_args(cuda, config)[1] == "none"
        assert features.token_dtype(cuda, config) == torch.float32
        assert features.token_dtype(cuda, {**config, "eval_amp": "bf16"}) == torch.bfloat16


def test_image_tokens_are_stored_in_the_autocast_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert features.token_dtype(cuda, {**DEFAULT_CONFIG, "eval_amp": "bf16"}) == torch.bfloat16
    assert features.token_dtype(cuda, {**DEFAULT_CONFIG, "eval_amp": "fp16"}) == torch.float16
    assert features.token_dtype(cuda, {**DEFAULT_CONFIG, "eval_amp": "none"}) == torch.float32
    assert features.token_dtype(cuda, {**DEFAULT_CONFIG, "eval_amp": "bf16", "eval_mode": "official"}) == torch.float32
    assert features.token_dtype(cpu, {**DEFAULT_CONFIG, "eval_amp": "bf16"}) == torch.float32
    assert features.token_dtype(cpu, {**DEFAULT_CONFIG, "eval_amp": "bf16", "amp_cpu": True}) == torch.bfloat16


def test_image_tokens_leave_the_gpu_when_they_take_over_half_its_free_memory(monkeypatch):
    """The decision only (no GPU here): 1000 Flickr images of ViT-B tokens at 384 px in bf16 are 0.85 GiB."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    cuda, values = torch.device("cuda"), 1000 * 577 * 768
    assert features.token_home(cuda, values, torch.bfloat16) == cuda
    assert features.token_home(cuda, 5 * values, torch.bfloat16) == torch.device("cpu")  # 4.2 GiB > half of 4 GiB
    assert features.token_home(torch.device("cpu"), 5 * values, torch.float32) == torch.device("cpu")


@pytest.mark.filterwarnings("ignore::UserWarning")  # autocast("cuda") on a machine without CUDA warns
def test_fast_mode_keeps_attention_off_cudnn_on_cuda_only():
    """cuDNN attention plans every new shape (seconds per evaluation on an H100, results/benchmarks.md): the fast mode
    turns that backend off inside its region on CUDA and restores the global setting afterwards."""
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with features.eval_autocast(torch.device("cuda"), {**DEFAULT_CONFIG, "eval_amp": "bf16"}):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with features.eval_autocast(torch.device("cpu"), {**DEFAULT_CONFIG, "eval_amp": "bf16"}):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_length_batches_bound_padding_and_batch_size():
    assert features.length_batches([], 4) == []
    assert features.length_batches([5, 5, 5, 5, 5], 2) == [(0, 2), (2, 4), (4, 5)]  # max_batch only
    # 3 texts of 10 then one of 20: padding 3 x 10 tokens to 20 would double the work, so 20 goes alone.
    assert features.length_batches([10, 10, 10, 20], 8) == [(0, 3), (3, 4)]
    assert features.length_batches([10, 10, 10, 11], 8) == [(0, 4)]  # 3 padding tokens on 41: within 10%
    lengths = sorted(np.random.default_rng(0).integers(4, 36, 500).tolist())
    batches = features.length_batches(lengths, 64)
    assert batches[0][0] == 0 and batches[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(batches, batches[1:]))  # contiguous, every text once
    for start, end in batches:
        chunk = lengths[start:end]
        assert 1 <= len(chunk) <= 64
        assert len(chunk) == 1 or len(chunk) * max(chunk) <= 1.1 * sum(chunk)


def test_plan_itm_forwards_scores_every_pair_once_against_its_own_image(monkeypatch):
    rng = np.random.default_rng(1)
    counts = [0, 5, 1, 17, 9, 3, 12]
    lengths = [n for c in counts for n in sorted(rng.integers(3, 30, c).tolist())]
    image_of = [j for j, c in enumerate(counts) for _ in range(c)]
    for piece, max_batch, chunk in ((None, 4, 3), (4, 12, 3), (4, 3, 32), (16, 1024, 32)):
        monkeypatch.setattr(itm_rerank, "KV_CHUNK", chunk)
        plan = list(itm_rerank.plan_itm_forwards(counts, lengths, max_batch, piece))
        assert len(plan) == -(-len(counts) // chunk)
        scored = []
        for c, forwards in enumerate(plan):
            for f in forwards:
                per_piece = len(f.rows) // len(f.images)
                assert len(f.rows) == per_piece * len(f.images)
                assert len(f.rows) <= max(max_batch, piece or 0)
                assert f.max_len == max(lengths[r] for r in f.rows)
                for p, image in enumerate(f.images):  # every row of a piece belongs to that piece's image
                    assert {image_of[r] for r in f.rows[p * per_piece : (p + 1) * per_piece]} == {c * chunk + image}
                scored += [f.rows[i] for i in f.real]
                fillers = set(range(len(f.rows))) - set(f.real)
                assert all(f.rows[i] == f.rows[i - 1] for i in fillers)  # filler repeats the previous row
        assert sorted(scored) == list(range(len(lengths)))  # every pair exactly once


def test_cross_image_forwards_give_the_official_scores(model, test_ds, config, monkeypatch):
    """The GPU batching (pieces of several images in one forward, with filler rows), forced on the CPU with small
    pieces and chunks, gives the official scores."""
    monkeypatch.setitem(itm_rerank.ITM_PIECE, "cpu", 3)
    monkeypatch.setattr(itm_rerank, "KV_CHUNK", 5)  # 12 images: chunks of 5, 5 and 2
    _fast_matching_official(model, test_ds, _cfg(config, k_test=9, itm_batch_size=10))


def test_evaluate_restores_training_mode(model, test_ds, config):
    model.train()
    try:
        evaluation.evaluate(model, test_ds, _cfg(config, k_test=2), CPU)
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- distributed (2 gloo processes)


DIST_MODES = ("fast", "fast_pieces", "official")  # fast_pieces: the GPU batching forced on the CPU


def _evaluate_mode(model, dataset, config: dict, mode: str):
    if mode != "fast_pieces":
        return evaluation.evaluate(model, dataset, _cfg(config, eval_mode=mode), CPU)
    saved = dict(itm_rerank.ITM_PIECE), itm_rerank.KV_CHUNK
    itm_rerank.ITM_PIECE["cpu"], itm_rerank.KV_CHUNK = 2, 4  # pieces of 2 texts, chunks of 4 images
    try:
        return evaluation.evaluate(model, dataset, _cfg(config, eval_mode="fast"), CPU)
    finally:
        itm_rerank.ITM_PIECE.clear()
        itm_rerank.ITM_PIECE.update(saved[0])
        itm_rerank.KV_CHUNK = saved[1]


def _dist_eval_body(rank: int, world_size: int, configs: dict, state_path: str) -> dict:
    out = {}
    for name, config in configs.items():
        model = build_model(config)
        model.load_state_dict(torch.load(state_path, weights_only=True))
        dataset = create_dataset(config, "val")
        for mode in DIST_MODES:
            r = _evaluate_mode(model, dataset, config, mode)
            out[name, mode] = (r.scores_i2t, r.scores_t2i, _without_times(r.metrics))
    return out


def test_distributed_matches_single_process(model, val_ds, config, synth, tmp_path):
    """2 gloo processes vs 1 process, both modes (fast also with the GPU's cross-image batching): on 11 images
    (uneven shards: 6 + 5 images, 28 + 27 texts) and on a 1-image split, where rank 1 gets no image at all."""
    assert len(val_ds.image) == 11
    with open(synth["test_file"]) as f:
        one_image = tmp_path / "one_image.json"
        one_image.write_text(json.dumps(json.load(f)[:1]))
    configs = {
        "11": _cfg(config, k_test=6, itm_batch_size=7, batch_size_test=4),
        "1": _cfg(config, k_test=6, itm_batch_size=7, val_file=str(one_image)),
    }
    state_path = str(tmp_path / "state.pt")
    torch.save(model.state_dict(), state_path)
    single, shapes = {}, {"11": (11, 55), "1": (1, 5)}
    for name, cfg in configs.items():
        dataset = create_dataset(cfg, "val")
        for mode in DIST_MODES:
            single[name, mode] = _evaluate_mode(model, dataset, cfg, mode)
        np.testing.assert_allclose(
            single[name, "fast_pieces"].scores_i2t, single[name, "official"].scores_i2t, atol=1e-4, rtol=0
        )
    results = run_distributed(_dist_eval_body, 2, configs, state_path, timeout_s=120)
    for rank, per_rank in enumerate(results):
        assert set(per_rank) == set(single)
        for (name, mode), (i2t, t2i, metrics) in per_rank.items():
            ref = single[name, mode]
            n_img, n_txt = shapes[name]
            assert i2t.shape == (n_img, n_txt) and t2i.shape == (n_txt, n_img)
            where = f"rank {rank}, {name} image(s), {mode}"
            np.testing.assert_allclose(i2t, ref.scores_i2t, atol=1e-5, rtol=0, err_msg=where)
            np.testing.assert_allclose(t2i, ref.scores_t2i, atol=1e-5, rtol=0, err_msg=where)
            assert metrics == _without_times(ref.metrics), where


def test_distributed_fast_with_fewer_texts_than_ranks(model, config, synth, tmp_path):
    """1 image with 1 caption on 2 processes: in fast mode rank 1's text shard is empty (like its image shard,
    which evaluate already handles); the result must equal the single-process one."""
    with open(synth["test_file"]) as f:
        record = json.load(f)[0]
    one_text = tmp_path / "one_text.json"
    one_text.write_text(json.dumps([{"image": record["image"], "caption": record["caption"][:1]}]))
    cfg = _cfg(config, k_test=4, val_file=str(one_text))
    state_path = str(tmp_path / "state.pt")
    torch.save(model.state_dict(), state_path)
    dataset = create_dataset(cfg, "val")
    assert len(dataset.text) == 1
    single = {mode: _evaluate_mode(model, dataset, cfg, mode) for mode in DIST_MODES}
    results = run_distributed(_dist_eval_body, 2, {"1x1": cfg}, state_path, timeout_s=60)
    for rank, per_rank in enumerate(results):
        for (_, mode), (i2t, t2i, metrics) in per_rank.items():
            np.testing.assert_allclose(i2t, single[mode].scores_i2t, atol=1e-5, rtol=0, err_msg=f"rank {rank}")
            np.testing.assert_allclose(t2i, single[mode].scores_t2i, atol=1e-5, rtol=0, err_msg=f"rank {rank}")
            assert metrics == _without_times(single[mode].metrics)
            assert metrics["txt_r1"] == 100.0 and metrics["img_r1"] == 100.0  # one candidate each way


# ----------------------------------------------------------------------------- command line


def _write_cli_config(synth: dict[str, str], path: str, **extra) -> str:
    cfg = {
        "dataset": "custom",
        "image_root": synth["image_root"],
        "train_file": synth["train_file"],
        "val_file": synth["val_file"],
        "test_file": synth["test_file"],
        "text_encoder": synth["vocab_file"],
        "med_config": dict(TINY_MED),
        "vit": dict(VIT),
        "image_size": 32,
        "queue_size": 16,
        "embed_dim": 16,
        "device": "cpu",
        "num_workers": 0,
        "amp": "none",
        "batch_size_test": 5,
        "k_test": 8,
        **extra,
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def cli_files(synth, model, tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("cli")
    cfg_path = _write_cli_config(synth, str(d / "eval.yaml"))
    ckpt = str(d / "model.pth")
    torch.save({"model": model.state_dict()}, ckpt)
    return cfg_path, ckpt


def test_cli_end_to_end(cli_files, model, test_ds, config, tmp_path):
    cfg_path, ckpt = cli_files
    out = str(tmp_path / "out")
    returned = eval_retrieval.main(
        ["--config", cfg_path, "--checkpoint", ckpt, "--split", "test", "--output-dir", out, "--save-scores"]
    )
    with open(os.path.join(out, "metrics_test.json")) as f:
        metrics = json.load(f)
    required = RECALL_KEYS + RANK_KEYS + ["num_images", "num_texts", "k_test"] + TIME_KEYS
    missing = [k for k in required if k not in metrics]
    assert not missing, f"metrics_test.json lacks {missing}"
    assert metrics["num_images"] == 12 and metrics["num_texts"] == 60 and metrics["k_test"] == 8
    assert all(metrics[k] >= 0 for k in TIME_KEYS)
    for key in RECALL_KEYS:
        assert 0.0 <= metrics[key] <= 100.0
    assert {k: returned[k] for k in required if not k.startswith("time_")} == {
        k: metrics[k] for k in required if not k.startswith("time_")
    }

    scores = np.load(os.path.join(out, "scores_test.npz"))
    # The matrices, and (issue 15) the per-query ranks and R-Precision behind the metrics.
    assert set(scores.files) == {"i2t", "t2i", "i2t_rank", "i2t_rprec", "t2i_rank"}
    ranks = query_ranks(scores["i2t"], scores["t2i"], test_ds.txt2img, test_ds.img2txt)
    for key, value in ranks.items():
        np.testing.assert_array_equal(scores[key], value, err_msg=key)
    with open(os.path.join(out, "index_test.json")) as f:
        assert json.load(f)["texts"] == test_ds.text
    i2t, t2i = scores["i2t"], scores["t2i"]
    assert i2t.shape == (12, 60) and t2i.shape == (60, 12)
    assert i2t.dtype == np.float32 and t2i.dtype == np.float32
    recomputed = compute_metrics(i2t, t2i, test_ds.txt2img, test_ds.img2txt)
    for key in RECALL_KEYS + RANK_KEYS + RPREC_KEYS:
        assert recomputed[key] == metrics[key], key  # exactly: the saved matrices ARE the metrics' input

    # The checkpoint really was loaded: same scores as evaluating the in-memory model directly.
    direct = evaluation.evaluate(model, test_ds, _cfg(config, k_test=8), CPU)
    np.testing.assert_allclose(i2t, direct.scores_i2t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(t2i, direct.scores_t2i, atol=1e-5, rtol=0)

    with open(os.path.join(out, "config.yaml")) as f:
        resolved = yaml.safe_load(f)
    assert resolved["k_test"] == 8 and resolved["dataset"] == "custom"


def test_cli_options_override_k_test(cli_files, tmp_path):
    cfg_path, ckpt = cli_files
    out = str(tmp_path / "out3")
    eval_retrieval.main(
        [
            "--config",
            cfg_path,
            "--checkpoint",
            ckpt,
            "--split",
            "val",
            "--output-dir",
            out,
            "--save-scores",
            "--options",
            "k_test=3",
        ]
    )
    with open(os.path.join(out, "metrics_val.json")) as f:
        metrics = json.load(f)
    assert metrics["k_test"] == 3 and metrics["num_images"] == 11 and metrics["num_texts"] == 55
    scores = np.load(os.path.join(out, "scores_val.npz"))
    assert ((scores["i2t"] > -50).sum(1) == 3).all()  # exactly 3 re-ranked candidates per query
    assert ((scores["t2i"] > -50).sum(1) == 3).all()
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["k_test"] == 3
    assert not os.path.exists(os.path.join(out, "metrics_test.json"))


def test_cli_unknown_option_names_the_key(cli_files, tmp_path):
    cfg_path, ckpt = cli_files
    with pytest.raises(ConfigError) as err:
        eval_retrieval.main(
            ["--config", cfg_path, "--checkpoint", ckpt, "--output-dir", str(tmp_path / "x"), "--options", "k_tset=3"]
        )
    assert "k_tset" in str(err.value) and "k_test" in str(err.value)  # the bad key and the nearest valid one
    assert not os.path.exists(tmp_path / "x" / "metrics_test.json")


# ----------------------------------------------------------------------------- bad eval splits


def test_empty_eval_split_names_the_file(synth, cli_files, tmp_path):
    _, ckpt = cli_files
    empty = tmp_path / "empty_test.json"
    empty.write_text("[]")
    cfg_path = _write_cli_config(synth, str(tmp_path / "empty.yaml"), test_file=str(empty))
    with pytest.raises(DataError, match="empty") as err:
        eval_retrieval.main(["--config", cfg_path, "--checkpoint", ckpt, "--output-dir", str(tmp_path / "o")])
    assert str(empty) in str(err.value)


def test_eval_split_without_captions_names_the_file(synth, cli_files, tmp_path):
    _, ckpt = cli_files
    no_text = tmp_path / "no_captions.json"
    no_text.write_text(json.dumps([{"image": "test/00000.png", "caption": []}]))
    cfg_path = _write_cli_config(synth, str(tmp_path / "notext.yaml"), test_file=str(no_text))
    with pytest.raises(DataError, match="empty caption list") as err:
        eval_retrieval.main(["--config", cfg_path, "--checkpoint", ckpt, "--output-dir", str(tmp_path / "o")])
    assert str(no_text) in str(err.value)


@pytest.mark.parametrize("n_img,n_txt", [(0, 0), (2, 0)])
def test_evaluate_rejects_a_split_with_nothing_to_score(model, config, n_img, n_txt):
    dataset = SimpleNamespace(
        image=[f"{i}.png" for i in range(n_img)], text=["a"] * n_txt, img2txt={i: [] for i in range(n_img)}, txt2img={}
    )
    with pytest.raises(ValueError, match=f"{n_img} images and {n_txt} texts") as err:
        evaluation.evaluate(model, dataset, config, CPU, desc="val")
    assert "val" in str(err.value)


def test_format_metrics_table():
    m = {
        "txt_r1": 97.24,
        "txt_r5": 99.9,
        "txt_r10": 100.0,
        "img_r1": 87.56,
        "img_r5": 97.7,
        "img_r10": 98.9,
        "r_mean": 96.87,
    }
    table = format_metrics_table(m)
    lines = table.splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10"]
    assert lines[1].split() == ["TR", "97.2", "99.9", "100.0"]
    assert lines[2].split() == ["IR", "87.6", "97.7", "98.9"]
    assert "r_mean" in lines[3] and "96.87" in lines[3]
    del m["r_mean"]
    assert "96.88" in format_metrics_table(m)  # computed from the six recalls when absent


def test_format_metrics_table_shows_itc_only_beside_re_ranked():
    m = {
        "txt_r1": 40.0,
        "txt_r5": 80.0,
        "txt_r10": 90.0,
        "img_r1": 30.0,
        "img_r5": 70.0,
        "img_r10": 85.0,
        "r_mean": 65.83,
        "itc_txt_r1": 20.0,
        "itc_txt_r5": 60.0,
        "itc_txt_r10": 90.0,
        "itc_img_r1": 18.0,
        "itc_img_r5": 55.0,
        "itc_img_r10": 85.0,
        "itc_r_mean": 54.67,
    }
    lines = format_metrics_table(m).splitlines()
    assert lines[0].split() == ["ITC", "only", "ITM", "re-ranked"]
    assert lines[1].split() == ["R@1", "R@5", "R@10"] * 2
    assert lines[2].split() == ["TR", "20.0", "60.0", "90.0", "40.0", "80.0", "90.0"]
    assert lines[3].split() == ["IR", "18.0", "55.0", "85.0", "30.0", "70.0", "85.0"]
    assert lines[4].split() == ["r_mean", "54.67", "65.83"]
