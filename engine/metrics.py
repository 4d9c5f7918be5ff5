"""Retrieval metrics: the official recall definitions, median and mean ranks, and the paper-style table."""

from __future__ import annotations

import numpy as np


def compute_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """Official recall definitions (percentages) plus 1-based median and mean ranks, both directions.

    Image->text: the rank of an image is the best rank among its ground-truth captions. Rows are ordered with
    `argsort(...)[::-1]`, the official tie order.
    """

    def gt_ranks(scores: np.ndarray, gts: list[list[int]]) -> np.ndarray:
        ranks = np.empty(len(scores), dtype=np.int64)
        for start in range(0, len(scores), 1024):  # row chunks bound the memory of the argsort
            order = np.argsort(scores[start : start + 1024], axis=1)[:, ::-1]
            position = np.empty_like(order)
            np.put_along_axis(position, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
            for row in range(len(order)):
                ranks[start + row] = position[row, gts[start + row]].min()
        return ranks

    txt_ranks = gt_ranks(scores_i2t, [img2txt[i] for i in range(len(scores_i2t))])
    img_ranks = gt_ranks(scores_t2i, [[txt2img[t]] for t in range(len(scores_t2i))])
    metrics = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        metrics[f"{prefix}_r_mean"] = (metrics[f"{prefix}_r1"] + metrics[f"{prefix}_r5"] + metrics[f"{prefix}_r10"]) / 3
        metrics[f"{prefix}_medr"] = float(np.median(ranks + 1))
        metrics[f"{prefix}_meanr"] = float(np.mean(ranks + 1))
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def format_metrics_table(metrics: dict) -> str:
    """Paper-style recall table: TR (image->text) and IR (text->image) at R@1/5/10, plus r_mean.

    When the metrics also hold the ITC-only recalls (`itc_*` keys, written by every evaluation), they are shown
    first, beside the re-ranked ones, so the table says what ITM re-ranking adds.
    """
    columns = [("ITM re-ranked", "")]
    if "itc_txt_r1" in metrics:
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
