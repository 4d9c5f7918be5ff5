"""bench/gpu_suite.py --quick on the CPU: every part runs its code path at tiny sizes and lands in one JSON, the
CUDA-only ones reported as skipped with a reason, and the agreement checks the GPU run reports hold here too."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_suite


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_suite_on_cpu_writes_every_part(tmp_path):
    out = tmp_path / "suite.json"
    payload = gpu_suite.main(["--quick", "--device", "cpu", "--in-process", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["parts"].keys() == set(gpu_suite.PARTS)
    assert payload["command"].startswith("python -m bench.gpu_suite --quick")
    parts = payload["parts"]
    assert parts["peak"]["status"] == "skipped" and "CUDA" in parts["peak"]["reason"]
    failed = {name: part.get("error") for name, part in parts.items() if part["status"] not in ("ok", "skipped")}
    assert not failed
    # train: MFU needs the measured peak (skipped on a CPU); the loss curves are there, bf16 close to fp32
    curves = parts["train"]["loss_curves"]
    assert len(curves["bf16"]["losses"]) == len(curves["fp32"]["losses"]) == curves["steps"]
    assert curves["max_rel_diff"] < 0.05
    assert parts["train"]["ours"]["step_tflop"] < parts["train"]["fp32"]["step_tflop"]
    # eval: the fast fp32 mode reproduces the official recalls on the subset; the official time is extrapolated
    assert parts["eval"]["subset_fast_fp32"]["recalls_equal_official"]
    assert parts["eval"]["subset_fast_fp32"]["max_abs_score_diff_vs_official"] < 1e-4
    assert parts["eval"]["official_full_extrapolated"]["extrapolated"] is True
    # query: both index sizes, both modes, percentiles in order; the cuDNN comparison is CUDA only
    for index in ("8", "1000_synthetic"):
        for mode in ("itc_only", "itc_itm_rerank"):
            lat = parts["query"][index][mode]
            assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert parts["query"]["8"]["itc_itm_rerank_cudnn_allowed"]["status"] == "skipped"
    assert parts["caption"]["identical_ids"]
    assert parts["cir_eval"]["queries"] > 0 and parts["clip_eval"]["metrics"]["wall_s"] > 0
    compiled = parts["train_compile"]
    assert compiled["ours+compile"]["median_step_s"] > 0 and compiled["backend"] == "aot_eager"
    assert set(payload["summary"]) >= {"train_bf16_mfu", "eval_full_fast_fp32_s", "eval_full_fast_bf16_s"}


def test_a_failing_part_leaves_the_others(monkeypatch):
    def broken(quick, device, peak):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(gpu_suite.PART_FUNCTIONS, "caption", broken)
    result = gpu_suite.run_part("caption", True, torch.device("cpu"), None)
    assert result["status"] == "failed" and "simulated" in result["error"]
    skipped = gpu_suite.run_part("peak", True, torch.device("cpu"), None)
    assert skipped["status"] == "skipped"
