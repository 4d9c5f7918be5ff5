"""Retrieval metrics: the official recall definitions, median and mean ranks, R-Precision, the per-query ranks
behind them, and the paper-style table."""

from __future__ import annotations

import numpy as np


def _positions(scores: np.ndarray, start: int, chunk: int) -> np.ndarray:
    """0-based position of every column in each row's ranking, rows start..start+chunk, official tie order
    (`argsort(...)[::-1]`)."""
    order = np.argsort(scores[start : start + chunk], axis=1)[:, ::-1]
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
    return position


def query_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict[str, np.ndarray]:
    """Per-query results behind the metrics, saved beside the scores (scores_<split>.npz):

    - `i2t_rank` (N_img,) int: 1-based rank of the best-ranked ground-truth caption of each image (R@K, MedR);
    - `i2t_rprec` (N_img,) float: R-Precision of each image, the fraction of its R ground-truth captions in its
      top R (R = its number of captions, 5 in Flickr30K and COCO);
    - `t2i_rank` (N_txt,) int: 1-based rank of each caption's image. With R = 1, R-Precision is `t2i_rank == 1`.
    """
    i2t_rank = np.empty(len(scores_i2t), dtype=np.int64)
    i2t_rprec = np.empty(len(scores_i2t), dtype=np.float64)
    chunk = 1024  # row chunks bound the memory of the argsort
    for start in range(0, len(scores_i2t), chunk):
        position = _positions(scores_i2t, start, chunk)
        for row in range(len(position)):
            gts = img2txt[start + row]
            gt_positions = position[row, gts]
            i2t_rank[start + row] = gt_positions.min() + 1
            i2t_rprec[start + row] = float(np.mean(gt_positions < len(gts)))
    t2i_rank = np.empty(len(scores_t2i), dtype=np.int64)
    for start in range(0, len(scores_t2i), chunk):
        position = _positions(scores_t2i, start, chunk)
        for row in range(len(position)):
            t2i_rank[start + row] = position[row, txt2img[start + row]] + 1
    return {"i2t_rank": i2t_rank, "i2t_rprec": i2t_rprec, "t2i_rank": t2i_rank}


def metrics_from_ranks(ranks: dict[str, np.ndarray]) -> dict:
    """R@1/5/10 (percent), r_mean, 1-based median and mean ranks and R-Precision (percent), both directions."""
    metrics = {}
    for prefix, rank in (("txt", ranks["i2t_rank"]), ("img", ranks["t2i_rank"])):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * float(np.mean(rank <= k))
        metrics[f"{prefix}_r_mean"] = (metrics[f"{prefix}_r1"] + metrics[f"{prefix}_r5"] + metrics[f"{prefix}_r10"]) / 3
        metrics[f"{prefix}_medr"] = float(np.median(rank))
        metrics[f"{prefix}_meanr"] = float(np.mean(rank))
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    # R-Precision: image->text with R = the image's caption count; text->image has R = 1, so it equals R@1.
    metrics["txt_rprec"] = 100.0 * float(np.mean(ranks["i2t_rprec"]))
    metrics["img_rprec"] = 100.0 * float(np.mean(ranks["t2i_rank"] == 1))
    return metrics


def compute_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """Official recall definitions (percentages), 1-based median and mean ranks and R-Precision, both directions.

    Image->text: the rank of an image is the best rank among its ground-truth captions. Rows are ordered with
    `argsort(...)[::-1]`, the official tie order. The per-query values are `query_ranks`.
    """
    return metrics_from_ranks(query_ranks(scores_i2t, scores_t2i, txt2img, img2txt))


def format_metrics_table(metrics: dict) -> str:
    """Paper-style recall table: TR (image->text) and IR (text->image) at R@1/5/10, plus r_mean.

    When the metrics also hold the ITC-only recalls (`itc_*` keys, written by every evaluation), they are shown
    first, beside the re-ranked ones, so the table says what ITM re-ranking adds (not for an ITC-only model); the
    `official_*` keys (the official score, reported when `rerank_score` is another) get a column of their own.
    """
    columns = [("ITM re-ranked", "")]
    # With `rerank_score: calibrated` the evaluation also scores the official way (official_* keys): both shown.
    if "official_txt_r1" in metrics:
        columns = [("re-ranked, official", "official_"), ("re-ranked, calibrated", "")]
    # A dual encoder (eval_mode itc, e.g. CLIP) has one ranking: its itc_* keys repeat the main ones.
    if "itc_txt_r1" in metrics and metrics.get("eval_mode") != "itc":
        columns.insert(0, ("ITC only", "itc_"))

    def recall(key: str, prefix: str, k: int) -> float:
        return float(metrics[f"{key}{prefix}_r{k}"])

    def r_mean(key: str) -> float:
        value = metrics.get(f"{key}r_mean")
        if value is None:
            value = sum(recall(key, p, k) for p in ("txt", "img") for k in (1, 5, 10)) / 6
        return float(value)

    cell = 21  # three 7-wide numbers
    lines = []
    if len(columns) > 1:
        lines.append(f"{'':6}" + "".join(f"{title:>{cell}}  " for title, _ in columns).rstrip())
    lines.append(f"{'':6}" + "".join(f"{'R@1':>7}{'R@5':>7}{'R@10':>7}  " for _ in columns).rstrip())
    for name, prefix in (("TR", "txt"), ("IR", "img")):
        lines.append(
            f"{name:6}"
            + "".join(
                "".join(f"{recall(key, prefix, k):7.1f}" for k in (1, 5, 10)) + "  " for _, key in columns
            ).rstrip()
        )
    lines.append("r_mean" + "".join(f"{r_mean(key):{cell}.2f}  " for _, key in columns).rstrip())
    return "\n".join(lines)
