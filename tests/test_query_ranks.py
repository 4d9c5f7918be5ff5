"""Per-query ranks and R-Precision (engine/metrics.py) against a brute-force recomputation written independently:
plain Python sorting of each row, no numpy argsort, counting relevant items among the top R."""

from __future__ import annotations

import numpy as np
import pytest

from engine.metrics import compute_metrics, query_ranks


def _brute_force(i2t: np.ndarray, t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """Rank by a stable sort on descending score with ties broken by the larger column index (the official
    `argsort(...)[::-1]` order for distinct scores puts the larger index first among equals)."""

    def ranking(row: np.ndarray) -> list[int]:
        return sorted(range(len(row)), key=lambda j: (-float(row[j]), -j))

    i2t_rank, i2t_rprec = [], []
    for i, row in enumerate(i2t):
        order = ranking(row)
        relevant = set(img2txt[i])
        i2t_rank.append(1 + min(order.index(t) for t in relevant))
        top_r = order[: len(relevant)]
        i2t_rprec.append(sum(t in relevant for t in top_r) / len(relevant))
    t2i_rank = [1 + ranking(row).index(txt2img[t]) for t, row in enumerate(t2i)]
    return {"i2t_rank": i2t_rank, "i2t_rprec": i2t_rprec, "t2i_rank": t2i_rank}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("caps", [5, 3])
def test_ranks_and_r_precision_equal_brute_force(seed: int, caps: int):
    rng = np.random.default_rng(seed)
    n_img = 23
    img2txt = {i: list(range(caps * i, caps * i + caps)) for i in range(n_img)}
    img2txt[n_img - 1].append(caps * n_img)  # one image with an extra caption (COCO has some): R differs per image
    n_txt = caps * n_img + 1
    txt2img = {t: i for i, ts in img2txt.items() for t in ts}
    i2t = rng.normal(size=(n_img, n_txt)).astype(np.float32)
    # Make the relevant captions likelier to rank high, so R-Precision is not ~0 everywhere.
    for i, ts in img2txt.items():
        i2t[i, ts] += rng.uniform(0, 2.5, size=len(ts)).astype(np.float32)
    t2i = np.ascontiguousarray(i2t.T) + rng.normal(scale=0.5, size=(n_txt, n_img)).astype(np.float32)

    got = query_ranks(i2t, t2i, txt2img, img2txt)
    expected = _brute_force(i2t, t2i, txt2img, img2txt)
    np.testing.assert_array_equal(got["i2t_rank"], expected["i2t_rank"])
    np.testing.assert_allclose(got["i2t_rprec"], expected["i2t_rprec"])
    np.testing.assert_array_equal(got["t2i_rank"], expected["t2i_rank"])
    assert 0 < np.mean(expected["i2t_rprec"]) < 1  # the data exercise partial R-Precision

    m = compute_metrics(i2t, t2i, txt2img, img2txt)
    assert m["txt_rprec"] == pytest.approx(100 * np.mean(expected["i2t_rprec"]))
    assert m["img_rprec"] == pytest.approx(100 * np.mean(np.array(expected["t2i_rank"]) == 1))
    assert m["img_rprec"] == m["img_r1"]  # R = 1 for text->image
    for prefix, ranks in (("txt", expected["i2t_rank"]), ("img", expected["t2i_rank"])):
        ranks = np.array(ranks)
        for k in (1, 5, 10):
            assert m[f"{prefix}_r{k}"] == pytest.approx(100 * np.mean(ranks <= k))
        assert m[f"{prefix}_medr"] == pytest.approx(np.median(ranks))
        assert m[f"{prefix}_meanr"] == pytest.approx(np.mean(ranks))


def test_r_precision_by_hand():
    """Two images with 5 captions each. Image 0 ranks 3 of its captions in its top 5: R-Precision 0.6, rank 1.
    Image 1 ranks all 5 first: 1.0. Text->image: texts of image 0 all rank image 1 first except text 0."""
    i2t = np.array(
        [
            [0.9, 0.8, 0.1, 0.2, 0.7, 0.6, 0.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.8, 0.7, 0.6, 0.5],
        ],
        dtype=np.float32,
    )
    t2i = np.array([[0.9, 0.1]] + [[0.1, 0.9]] * 9, dtype=np.float32)
    img2txt = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}
    txt2img = {t: t // 5 for t in range(10)}
    got = query_ranks(i2t, t2i, txt2img, img2txt)
    assert got["i2t_rprec"].tolist() == [0.6, 1.0]
    assert got["i2t_rank"].tolist() == [1, 1]
    assert got["t2i_rank"].tolist() == [1, 2, 2, 2, 2, 1, 1, 1, 1, 1]
    m = compute_metrics(i2t, t2i, txt2img, img2txt)
    assert m["txt_rprec"] == pytest.approx(80.0) and m["img_rprec"] == pytest.approx(60.0)
