"""The whole GPU measurement of issue 27 in one run (under 8 minutes on one H100/H200), one JSON out.

    python -m bench.gpu_suite --out results/gpu_<date>/suite.json          # on the GPU machine
    python -m bench.gpu_suite --quick --device cpu --out /tmp/suite.json    # the same code paths, tiny, on a CPU
    python -m bench.gpu_suite --flops                                       # FLOP counts at the default sizes (CPU)

Parts, in this order (each in its own subprocess with a time limit, so that a failure, a hang or a CUDA error in one
still leaves the others' results; `--in-process` runs them in this process instead, as the test does):

    peak          dense matmul peak of this GPU, bf16 and fp32 (TF32 off), 8192^3 products: the MFU reference
    train         ViT-B/16 + BERT-base, 384 px, batch 32, bf16 eager: step time and FLOPs (bench_train.py's
                  FlopCounterMode count), MFU against the measured bf16 peak; the fp32 official step beside it;
                  then a 50-step loss curve of the same step in bf16 and in fp32 (same weights, batch, seed,
                  dropout masks), with the largest loss difference
    eval          the Flickr30K-size evaluation (1,000 generated images, 5,000 captions, k_test 128, both ways,
                  384 px, random weights) end to end in eval_mode fast fp32 (eval_amp none) and bf16; the official
                  mode on a 32-image subset, whose R@1 the fast modes must equal on the same subset; the official
                  algorithm's full-size time EXTRAPOLATED (from one official query batch of k pairs timed directly,
                  and from the subset's time scaled by the pair count) -- the JSON says so
    query         text->image query latency (p50/p90/p99) over 1K generated images and over 100K synthetic unit ITC
                  features (re-ranked candidates take the tokens of a 1K-image pool), ITC-only and with ITM
                  re-ranking, through the search path's functions (text_features, itc_topk, itm_match_one_text);
                  at 1K also with cuDNN attention allowed, to show the planning stalls it avoids
    caption       caption decoding, 3 beams, max 20: ours vs transformers' generate on the same weights
                  (bench/caption_decode_speed.py)
    vit_large     ViT-L/16 + BERT-base training step (bf16, 384 px, batch 32, ViT checkpointing of 4 blocks)
    clip_eval     CLIP (open_clip ViT-B-16, random) evaluation, 200 images, 1,000 captions
    cir_eval      composed retrieval (BlipCir, random) on generated CIRR-format data: 40 subsets (240 images)
    train_compile the training step under torch.compile (captions padded to max_length) against eager; last,
                  because compiling is the slowest and least predictable part

On a CPU the CUDA-only measurements (the peak, hence MFU; the cuDNN comparison of the query part) are reported as
skipped with the reason. `--quick` runs every other part at tiny sizes (tiny towers, 32 px, bf16 autocast on the CPU,
torch.compile with the aot_eager backend instead of inductor) so that the code paths are exercised on a CPU in
about two minutes (tests/test_gpu_suite.py).

FLOP counts (2 FLOPs per multiply-add; torch.utils.flop_counter.FlopCounterMode, matrix products and attention
only, AdamW's elementwise work not counted) at the default sizes, from `--flops` on a CPU under FakeTensorMode (no
compute; results/gpu_prep_2026-12-02/flops_at_defaults.json):

    training step, BERT-base text, 384 px (577 image tokens), batch 32, queue 57600:
        per step = ViT fwd+bwd (about 3 F_vit) + momentum ViT fwd (F_vit) + text ITC fwd+bwd + momentum text fwd
                   + ITM on 3B (text, image) pairs fwd+bwd; F_vit(1 image, ViT-B/16, 384 px) = 98.7 GFLOP
        ViT-B/16:  20.40 TFLOP (ours: trimmed text), 20.80 (static: captions padded to 35, as compiled),
                   21.01 (official text work)          -> MFU = 20.40 TFLOP / step time / measured bf16 peak
        ViT-L/16:  55.22 TFLOP (trimmed), 55.61 (static), 55.82 (official)
    evaluation, 1,000 images, 5,000 captions, k_test 128, ViT-B/16 at 384 px:
        image features 1,000 x 98.7 GFLOP = 98.7 TFLOP (both modes)
        official re-rank: (128 x 1,000 + 128 x 5,000) = 768,000 pair forwards x 24.06 GFLOP (35-token text through
            12 layers: per token per layer 4H^2 + 2LH + 2H^2 + 2NH + 2HI, plus the K/V projections 2 x 2NEH per layer
            of the pair's 577 image tokens) = 18,479 TFLOP
        fast re-rank: counted per run from the pairs it scored (bench_eval.py's rerank_flops); about 300 TFLOP per
            150 images in the 2026-11-23 H100 run, so roughly 2,000 TFLOP at 1,000 images
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from bench import bench_train
from bench.bench_eval import (
    RECALL_KEYS,
    bench_config,
    device_description,
    environment,
    head_dataset,
    itm_text_flops,
    kv_projection_flops,
    make_data,
    make_model,
    resolve_device,
    sync,
    write_json,
)

PARTS = ("peak", "train", "eval", "query", "caption", "vit_large", "clip_eval", "cir_eval", "train_compile")
# Seconds each part may take on the GPU (the whole suite stops starting parts after --budget-s).
PART_LIMIT_S = {
    "peak": 60,
    "train": 150,
    "eval": 200,
    "query": 120,
    "caption": 90,
    "vit_large": 90,
    "clip_eval": 60,
    "cir_eval": 60,
    "train_compile": 300,
}
CUDA_ONLY = {"peak": "the dense matmul peak is a GPU figure (the MFU reference)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes: the same code paths in about a minute on a CPU")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--out", default=None, help="the suite's JSON")
    p.add_argument("--budget-s", type=float, default=470.0, help="no part starts after this many seconds")
    p.add_argument("--in-process", action="store_true", help="run the parts in this process (no time limits)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--flops", action="store_true", help="print the FLOP counts at the default sizes and exit")
    # internal: one part in a subprocess
    p.add_argument("--part", default=None, choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def percentiles_ms(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "n": len(ms),
        "p99_over_p50": float(np.percentile(ms, 99) / np.percentile(ms, 50)),
    }


def train_args(quick: bool, cuda: bool, **overrides) -> argparse.Namespace:
    """bench_train.py's arguments for the suite's sizes."""
    argv = ["--device", "cuda" if cuda else "cpu"]
    if quick:
        argv += ["--vit", "tiny", "--text", "tiny", "--image-size", "32", "--batch-size", "4"]
        argv += ["--warmup", "1", "--steps", "2", "--amp-cpu"]  # bf16 autocast on the CPU too: the same code
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return bench_train.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------


def part_peak(quick: bool, device: torch.device, peak: dict | None) -> dict:
    """Best of several timed dense products n x n x n (2 n^3 FLOPs each), bf16 and fp32 with TF32 off."""
    n = 512 if quick else 8192
    out = {"n": n}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            for _ in range(3):
                a @ b
            best = float("inf")
            for _ in range(5):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(10):
                    a @ b
                sync(device)
                best = min(best, (time.perf_counter() - t0) / 10)
            out[f"{name}_tflops"] = 2 * n**3 / best / 1e12
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def part_train(quick: bool, device: torch.device, peak: dict | None) -> dict:
    """Eager bf16 step and the fp32 official step (bench_train.py), then 50-step loss curves bf16 vs fp32."""
    cuda = device.type == "cuda"
    args = train_args(quick, cuda, variants=["ours", "fp32"])
    model, init_state, batch, n_params = bench_train.setup(args, device)
    out = {"trainable_params": n_params, "batch_size": args.batch_size, "image_size": args.image_size}
    for variant in ("ours", "fp32"):
        r = bench_train.run_variant(model, init_state, batch, variant, args, device)
        out[variant] = without(r, "step_times_s")
    add_mfu(out, peak)
    steps = 3 if quick else 50
    curves = {}
    for name, amp in (("bf16", "bf16"), ("fp32", "none")):
        # Both the model's default step ("ours": trimmed text, fused AdamW on CUDA); only autocast differs, so the
        # dropout masks and hard negatives are drawn alike and the curves differ by bf16 rounding alone.
        curve_args = copy.copy(args)
        curve_args.amp, curve_args.warmup, curve_args.steps = amp, 0, steps
        curve_args.amp_cpu = amp == "bf16" and not cuda
        r = bench_train.run_variant(model, init_state, batch, "ours", curve_args, device)
        curves[name] = {"losses": r["losses"], "median_step_s": r["median_step_s"]}
    diff = np.abs(np.array(curves["bf16"]["losses"]) - np.array(curves["fp32"]["losses"]))
    out["loss_curves"] = {
        **curves,
        "steps": steps,
        "note": "the same fixed generated batch every step, from the same weights and seed",
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.abs(np.array(curves["fp32"]["losses"]))).max()),
        "final_abs_diff": float(diff[-1]),
    }
    return out


def add_mfu(out: dict, peak: dict | None) -> None:
    """MFU of each variant against the peak measured in this run (bf16 for autocast variants, else fp32)."""
    if not peak or peak.get("status") != "ok":
        return
    for r in out.values():
        if isinstance(r, dict) and "achieved_tflops" in r:
            ref = peak["bf16_tflops"] if r["autocast"] in ("bf16", "fp16") else peak["fp32_tflops"]
            r["mfu_vs_measured_peak"] = r["achieved_tflops"] / ref
            r["measured_peak_tflops"] = ref


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def part_train_compile(quick: bool, device: torch.device, peak: dict | None) -> dict:
    args = train_args(quick, device.type == "cuda", variants=["ours", "ours+compile"])
    # On a CPU (--quick) dynamo and AOTAutograd trace the step as on the GPU, without inductor's minutes of C++ build.
    args.compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    model, init_state, batch, n_params = bench_train.setup(args, device)
    out = {"backend": args.compile_backend}
    for variant in ("ours", "ours+compile"):
        t0 = time.perf_counter()
        r = bench_train.run_variant(model, init_state, batch, variant, args, device)
        out[variant] = {**without(r, "step_times_s"), "wall_s_incl_warmup": time.perf_counter() - t0}
    add_mfu(out, peak)
    out["speedup_compile"] = out["ours"]["median_step_s"] / out["ours+compile"]["median_step_s"]
    out["note"] = "ours+compile pads captions to max_length (text_compute static); warm-up steps include compiling"
    return out


def part_vit_large(quick: bool, device: torch.device, peak: dict | None) -> dict:
    overrides = {} if quick else {"vit": "large", "warmup": 2, "steps": 5}
    args = train_args(quick, device.type == "cuda", variants=["ours+ckpt"], **overrides)
    model, init_state, batch, n_params = bench_train.setup(args, device)
    out = {"vit": args.vit, "trainable_params": n_params, "batch_size": args.batch_size, "image_size": args.image_size}
    out["ours+ckpt"] = without(bench_train.run_variant(model, init_state, batch, "ours+ckpt", args, device))
    add_mfu(out, peak)
    return out


def eval_sizes(quick: bool) -> dict:
    if quick:
        return {"vit": "tiny", "text": "tiny", "image_size": 32, "num_images": 8, "k_test": 4, "subset": 4, "warm": 2}
    return {
        "vit": "base",
        "text": "base",
        "image_size": 384,
        "num_images": 1000,
        "k_test": 128,
        "subset": 32,
        "warm": 4,
    }


def timed_evaluate(model, dataset, config: dict, device: torch.device) -> tuple[dict, object]:
    from engine.evaluation import evaluate

    sync(device)
    t0 = time.perf_counter()
    result = evaluate(model, dataset, config, device, desc="gpu_suite")
    sync(device)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics, result


def part_eval(quick: bool, device: torch.device, peak: dict | None) -> dict:
    from data import create_dataset
    from engine.features import eval_autocast

    s = eval_sizes(quick)
    cuda = device.type == "cuda"
    out = {"sizes": s}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_eval_") as tmp:
        t0 = time.perf_counter()
        paths = make_data(tmp, s["num_images"], 5, s["image_size"])
        out["data_generation_s"] = time.perf_counter() - t0
        base = bench_config(
            paths,
            s["vit"],
            s["text"],
            s["image_size"],
            k_test=s["k_test"],
            device=device.type,
            num_workers=4 if cuda else 0,
        )
        dataset = create_dataset(base, "test")
        model = make_model(base, 0, device).eval()
        modes = {
            "official": dict(base, eval_mode="official", eval_amp="none", amp_cpu=False),
            "fast_fp32": dict(base, eval_mode="fast", eval_amp="none", amp_cpu=False),
            "fast_bf16": dict(base, eval_mode="fast", eval_amp="bf16", amp_cpu=not cuda),
        }
        warm = head_dataset(dataset, s["warm"])
        for name in ("fast_fp32", "fast_bf16"):
            timed_evaluate(model, warm, modes[name], device)  # kernels, allocator, cuBLAS handles
            metrics, _ = timed_evaluate(model, dataset, modes[name], device)
            out[f"full_{name}"] = metrics
        subset = head_dataset(dataset, s["subset"])
        timed_evaluate(model, warm, modes["official"], device)
        results = {}
        for name in ("official", "fast_fp32", "fast_bf16"):
            out[f"subset_{name}"], results[name] = timed_evaluate(model, subset, modes[name], device)
        official = out["subset_official"]
        for name in ("fast_fp32", "fast_bf16"):
            out[f"subset_{name}"]["r1_equal_official"] = all(
                out[f"subset_{name}"][k] == official[k] for k in ("txt_r1", "img_r1")
            )
            out[f"subset_{name}"]["recalls_equal_official"] = all(
                out[f"subset_{name}"][k] == official[k] for k in RECALL_KEYS
            )
            out[f"subset_{name}"]["max_abs_score_diff_vs_official"] = float(
                max(
                    np.abs(results[name].scores_i2t - results["official"].scores_i2t).max(),
                    np.abs(results[name].scores_t2i - results["official"].scores_t2i).max(),
                )
            )
        # The official algorithm at full size, extrapolated (running it would take about 13 minutes on an H100):
        # (a) one official query batch (k pairs, text padded to 35, image tokens copied from the host, K/V per pair,
        # full last layer, fp32) timed directly, times N_img + N_txt queries; (b) the subset's re-rank time scaled by
        # the number of pair forwards. (b) overestimates: the subset's text->image batches hold only N_sub pairs.
        k, n_img, n_txt = s["k_test"], s["num_images"], 5 * s["num_images"]
        n_tok = model.visual_encoder.num_patches + 1
        tokens_host = torch.randn(k, n_tok, model.visual_encoder.embed_dim)
        ids, atts = model.tokenize(dataset.text[:1], device)
        enc = model.with_enc_token(ids).repeat(k, 1)
        atts = atts.repeat(k, 1)
        batch_times = []
        with torch.no_grad(), eval_autocast(device, modes["official"]):
            for rep in range(2 if quick else 6):
                sync(device)
                t0 = time.perf_counter()
                model.itm_logits(enc, atts, tokens_host.to(device), cls_only=False)
                sync(device)
                if rep:
                    batch_times.append(time.perf_counter() - t0)
        per_query = statistics.median(batch_times)
        sub_img, sub_txt = s["subset"], 5 * s["subset"]
        pairs_full = min(k, n_txt) * n_img + min(k, n_img) * n_txt
        pairs_sub = min(k, sub_txt) * sub_img + min(k, sub_img) * sub_txt
        scale_features = n_img / sub_img
        features_s = (official["time_text_features"] + official["time_image_features"]) * scale_features
        out["official_full_extrapolated"] = {
            "extrapolated": True,
            "how": "(a) median time of one official ITM batch of k pairs x (N_img + N_txt) queries, plus the subset's "
            "feature time x N_img / N_sub; (b) the subset's re-rank time x official pair forwards full / subset",
            "query_batch_s": per_query,
            "estimate_a_total_s": features_s + per_query * (n_img + n_txt),
            "estimate_b_total_s": features_s + official["time_rerank"] * pairs_full / pairs_sub,
            "pair_forwards_full": pairs_full,
            "pair_forwards_subset": pairs_sub,
        }
        med = model.med_config
        per_pair = itm_text_flops(med, model.max_length, n_tok) + kv_projection_flops(med, n_tok)
        out["official_rerank_tflop_full"] = pairs_full * per_pair / 1e12
        for name in ("fast_fp32", "fast_bf16"):
            out[f"speedup_{name}_vs_official_extrapolated_a"] = (
                out["official_full_extrapolated"]["estimate_a_total_s"] / out[f"full_{name}"]["time_total"]
            )
    out["goals"] = {"fast_fp32_total_s_max": 30, "fast_bf16_total_s_max": 15}
    return out


def part_query(quick: bool, device: torch.device, peak: dict | None) -> dict:
    """Query latency through the search path's own functions (as engine/search_query.Searcher.search_text answers a
    query with every shortlisted image's tokens cached)."""
    from data import create_dataset
    from engine import features
    from engine.itm_rerank import itm_match_one_text
    from engine.search_index import itc_topk

    cuda = device.type == "cuda"
    pool_n, big_n, k, n_queries, warmup = (8, 1000, 4, 5, 2) if quick else (1000, 100_000, 128, 200, 10)
    vit, text, size = ("tiny", "tiny", 32) if quick else ("base", "base", 384)
    out = {"k": k, "queries": n_queries, "warmup_queries": warmup}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_query_") as tmp:
        paths = make_data(tmp, pool_n, 5, size)
        config = bench_config(paths, vit, text, size, device=device.type, num_workers=4 if cuda else 0, k_test=k)
        config = dict(config, eval_mode="fast", eval_amp="bf16", amp_cpu=not cuda)
        dataset = create_dataset(config, "test")
        model = make_model(config, 0, device).eval()
        sync(device)
        t0 = time.perf_counter()
        tokens, feats = features.image_features(model, dataset, device, config, range(pool_n), keep_on=device)
        sync(device)
        out["index_build_s"] = time.perf_counter() - t0
    captions = [dataset.text[i % len(dataset.text)] for i in range(warmup + n_queries)]
    rng = np.random.default_rng(0)
    big = rng.standard_normal((big_n, feats.shape[1]), dtype=np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    indexes = {
        f"{pool_n}": feats.to(torch.float16) if cuda else feats,
        f"{big_n}_synthetic": torch.from_numpy(big).to(device, torch.float16 if cuda else torch.float32),
    }

    @torch.no_grad()
    def query(text: str, index: torch.Tensor, rerank: bool) -> torch.Tensor:
        ids, atts, feat = features.text_features(model, [text], device, config)
        length = int(atts[0].sum())
        cos, rows = itc_topk(index, feat, k, config["search_block_rows"], device)
        if not rerank:
            return rows[0].cpu()
        logits = itm_match_one_text(model, ids[:, :length], atts[:, :length], tokens[rows[0] % pool_n], device, config)
        return rows[0][(logits[:, 1].float() + cos[0]).argsort(descending=True)].cpu()

    def latencies(index: torch.Tensor, rerank: bool) -> dict:
        times = []
        for q, caption in enumerate(captions):
            sync(device)
            t0 = time.perf_counter()
            query(caption, index, rerank)
            if q >= warmup:
                times.append(time.perf_counter() - t0)
        return percentiles_ms(times)

    for name, index in indexes.items():
        out[name] = {"itc_only": latencies(index, False), "itc_itm_rerank": latencies(index, True)}
    if cuda:  # the same 1K re-ranked queries with the default SDPA backend choice (cuDNN allowed)
        features.AVOID_CUDNN_ATTENTION = False
        try:
            out[f"{pool_n}"]["itc_itm_rerank_cudnn_allowed"] = latencies(indexes[f"{pool_n}"], True)
        finally:
            features.AVOID_CUDNN_ATTENTION = True
    else:
        out[f"{pool_n}"]["itc_itm_rerank_cudnn_allowed"] = {
            "status": "skipped",
            "reason": "cuDNN attention is CUDA only",
        }
    out["goal"] = "p99 within 2x of p50"
    return out


def part_caption(quick: bool, device: torch.device, peak: dict | None) -> dict:
    from bench import caption_decode_speed

    argv = ["--device", device.type, "--num-beams", "3", "--max-length", "20"]
    argv += ["--vit", "tiny", "--text", "tiny", "--image-size", "32", "--batch", "2", "--repeats", "1"] if quick else []
    return caption_decode_speed.main(argv)


def part_clip_eval(quick: bool, device: torch.device, peak: dict | None) -> dict:
    from configs.schema import DEFAULT_CONFIG, validate_config
    from data import create_dataset
    from data.synthetic import config_keys
    from models.clip import dataset_transform, load_clip_model

    n = 4 if quick else 200
    with tempfile.TemporaryDirectory(prefix="gpu_suite_clip_") as tmp:
        if quick:  # a tiny open_clip architecture from a model-config file (open_clip reads the JSON path)
            name = os.path.join(tmp, "tiny-clip.json")
            tiny = {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
            }
            with open(name, "w") as f:
                json.dump(tiny, f)
        else:
            name = "ViT-B-16"
        paths = make_data(tmp, n, 5, 32 if quick else 224)
        keys = config_keys(paths)
        keys.pop("text_encoder")  # CLIP brings its own tokenizer
        config = copy.deepcopy(DEFAULT_CONFIG)
        config.update(keys, model="clip", clip_model=name, pretrained="", device=device.type, num_workers=0)
        config.update(eval_amp="bf16", amp_cpu=device.type != "cuda")
        config = validate_config(config, "gpu_suite clip")
        torch.manual_seed(0)
        model = load_clip_model(config, "")
        config["image_size"] = model.image_size
        dataset = create_dataset(config, "test", dataset_transform(model, train=False))
        model.to(device)
        timed_evaluate(model, head_dataset(dataset, 2), config, device)
        metrics, _ = timed_evaluate(model, dataset, config, device)
    return {"clip_model": "tiny" if quick else name, "images": n, "captions": 5 * n, "metrics": metrics}


def part_cir_eval(quick: bool, device: torch.device, peak: dict | None) -> dict:
    from bench.bench_eval import VIT_PRESETS, med_config_for
    from configs.schema import DEFAULT_CONFIG, validate_config
    from data.cirr import load_cirr_split
    from data.cirr_synthetic import config_keys, make_cirr_dataset
    from engine.cir import evaluate_cirr
    from models.blip_cir import build_cir_model

    subsets, size, vit, text = (2, 32, "tiny", "tiny") if quick else (40, 384, "base", "base")
    with tempfile.TemporaryDirectory(prefix="gpu_suite_cir_") as tmp:
        paths = make_cirr_dataset(tmp, {"train": 1, "val": subsets, "test1": 1}, image_size=size, seed=0)
        config = copy.deepcopy(DEFAULT_CONFIG)
        config.update(config_keys(paths), vit=copy.deepcopy(VIT_PRESETS[vit]), med_config=med_config_for(text))
        config.update(image_size=size, device=device.type, num_workers=0, eval_amp="bf16")
        config.update(amp_cpu=device.type != "cuda")
        config = validate_config(config, "gpu_suite cir")
        torch.manual_seed(0)
        model = build_cir_model(config).to(device)
        data = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "val")
        evaluate_cirr(model, data, config, device)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        result = evaluate_cirr(model, data, config, device)
        sync(device)
        wall_s = time.perf_counter() - t0
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
    return {"queries": len(data.pairs), "gallery": len(data.image_names), "wall_s": wall_s, **metrics}


PART_FUNCTIONS = {
    "peak": part_peak,
    "train": part_train,
    "eval": part_eval,
    "query": part_query,
    "caption": part_caption,
    "vit_large": part_vit_large,
    "clip_eval": part_clip_eval,
    "cir_eval": part_cir_eval,
    "train_compile": part_train_compile,
}


def run_part(name: str, quick: bool, device: torch.device, peak: dict | None) -> dict:
    """One part, guarded: {'status': ok|skipped|failed, 'seconds', ...figures or 'reason'/'error'}."""
    if device.type != "cuda" and name in CUDA_ONLY:
        return {"status": "skipped", "reason": f"no CUDA device: {CUDA_ONLY[name]}"}
    t0 = time.perf_counter()
    try:
        result = PART_FUNCTIONS[name](quick, device, peak)
    except Exception as err:  # noqa: BLE001 -- one part's failure must not lose the others
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
            "seconds": time.perf_counter() - t0,
        }
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "seconds": time.perf_counter() - t0, **result}


def run_part_subprocess(name: str, args: argparse.Namespace, peak: dict | None, limit_s: float, tmp: str) -> dict:
    """The part in a fresh interpreter with a time limit: a hang or a poisoned CUDA context stays in it."""
    part_out = os.path.join(tmp, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--part-out", part_out, "--device", args.device]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    if peak is not None:
        peak_json = os.path.join(tmp, "peak_in.json")
        with open(peak_json, "w") as f:
            json.dump(peak, f)
        cmd += ["--peak-json", peak_json]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-2000:]
        return {
            "status": "timeout",
            "limit_s": limit_s,
            "stdout_tail": tail.decode() if isinstance(tail, bytes) else tail,
        }
    if os.path.isfile(part_out):
        with open(part_out) as f:
            return json.load(f)
    return {
        "status": "failed",
        "error": f"the part's process exited with {proc.returncode} and wrote no result",
        "stderr_tail": proc.stderr[-3000:],
        "seconds": time.perf_counter() - t0,
    }


def summary(parts: dict) -> dict:
    """The headline figures, each None where its part did not run."""

    def get(*path):
        node = parts
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    return {
        "peak_bf16_tflops": get("peak", "bf16_tflops"),
        "train_bf16_mfu": get("train", "ours", "mfu_vs_measured_peak"),
        "train_bf16_step_s": get("train", "ours", "median_step_s"),
        "train_compile_mfu": get("train_compile", "ours+compile", "mfu_vs_measured_peak"),
        "train_loss_curve_max_abs_diff": get("train", "loss_curves", "max_abs_diff"),
        "eval_full_fast_fp32_s": get("eval", "full_fast_fp32", "time_total"),
        "eval_full_fast_bf16_s": get("eval", "full_fast_bf16", "time_total"),
        "eval_official_full_extrapolated_s": get("eval", "official_full_extrapolated", "estimate_a_total_s"),
        "eval_subset_r1_equal_fp32": get("eval", "subset_fast_fp32", "r1_equal_official"),
        "eval_subset_r1_equal_bf16": get("eval", "subset_fast_bf16", "r1_equal_official"),
        "caption_ratio_transformers_over_ours": get("caption", "ratio_wall"),
        "caption_identical_ids": get("caption", "identical_ids"),
    }


# ----------------------------------------------------------------------------------------------------
# FLOP counts at the default sizes without computing (FakeTensorMode)
# ----------------------------------------------------------------------------------------------------


def count_flops() -> dict:
    """FlopCounterMode under FakeTensorMode: the training step at the default GPU sizes (ViT-B and ViT-L) and the
    evaluation's encoders (one image, one batch of texts); the re-rank count is analytic (bench_eval.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for vit in ("base", "large"):
        args = train_args(False, False, vit=vit, batch_size=32, image_size=384)  # the GPU defaults, built on a CPU
        model, _, (images, captions, idx), _ = bench_train.setup(args, torch.device("cpu"))
        model.train()
        for text_compute in ("trimmed", "static", "official"):
            with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
                torch.manual_seed(0)
                loss = model(images, captions, 0.4, idx, text_compute=text_compute, update_queues=False)
                (loss["loss_ita"] + loss["loss_itm"]).backward()
            out[f"train_step_vit_{vit}_{text_compute}_tflop"] = counter.get_total_flops() / 1e12
        model.zero_grad(set_to_none=True)
        if vit == "base":
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as c:
                model.visual_encoder(images[:1])
            out["eval_vit_b16_384_one_image_gflop"] = c.get_total_flops() / 1e9
            med, n_tok = model.med_config, model.visual_encoder.num_patches + 1
            out["eval_official_rerank_per_pair_gflop"] = (
                itm_text_flops(med, model.max_length, n_tok) + kv_projection_flops(med, n_tok)
            ) / 1e9
            pairs = 128 * 1000 + 128 * 5000
            out["eval_official_rerank_full_tflop"] = pairs * out["eval_official_rerank_per_pair_gflop"] / 1e3
            out["eval_images_full_tflop"] = 1000 * out["eval_vit_b16_384_one_image_gflop"] / 1e3
        del model
    return out


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flops:
        counts = count_flops()
        print(json.dumps(counts, indent=1))
        write_json(args.out, counts)
        return counts
    device = resolve_device(args.device)
    peak = None
    if args.peak_json:
        with open(args.peak_json) as f:
            peak = json.load(f)
    if args.part:  # a subprocess of the suite
        result = run_part(args.part, args.quick, device, peak)
        write_json(args.part_out, result)
        return result
    command = " ".join(["python", "-m", "bench.gpu_suite", *(sys.argv[1:] if argv is None else argv)])
    payload = {
        "benchmark": "gpu_suite",
        "command": command,
        "quick": args.quick,
        "env": environment(),
        "device": device_description(device),
        "weights": "random init (seeded); generated images and captions",
        "parts": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        for name in args.parts:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s and not args.quick:
                payload["parts"][name] = {"status": "skipped", "reason": f"suite budget {args.budget_s:g}s spent"}
                continue
            print(f"[gpu_suite {elapsed:6.1f}s] {name} ...", flush=True)
            limit = max(10.0, min(PART_LIMIT_S[name], args.budget_s - elapsed + 30))
            if args.in_process:
                result = run_part(name, args.quick, device, peak)
            else:
                result = run_part_subprocess(name, args, peak, limit if not args.quick else 900.0, tmp)
            payload["parts"][name] = result
            if name == "peak":
                peak = result
            print(f"[gpu_suite] {name}: {result['status']} {result.get('reason', result.get('error', ''))}", flush=True)
            write_json(args.out, {**payload, "summary": summary(payload["parts"])})  # partial results survive
    payload["total_s"] = time.perf_counter() - start
    payload["summary"] = summary(payload["parts"])
    print(json.dumps(payload["summary"], indent=1))
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
