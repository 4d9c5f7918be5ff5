"""Smoke runs of the benchmark scripts with tiny towers, so that they keep working (CI never times them).

Each run also checks what the benchmark itself would report as a failure: the fast and official evaluation
agree, the cached query path returns the official ranking, and training variants of one kind start from the
same loss.
"""

from __future__ import annotations

import pytest
import torch

from bench import bench_eval, bench_query, bench_train

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
