"""Evaluation benchmark: our re-ranking (eval_mode fast) vs the official algorithm (eval_mode official).

    python -m bench.bench_eval [--device auto|cuda|cpu] [--vit base|large|tiny] [--text base|tiny]
        [--image-size N] [--num-images N] [--captions-per-image 5] [--k-test K] [--itm-batch-size B]
        [--amp bf16|fp16|none] [--amp-cpu] [--peak-tflops T] [--out results.json]

Both modes run in ONE process on the SAME randomly initialised model and the SAME generated dataset
(data.synthetic). Random weights are fine for timing: the work done does not depend on the weights, and
the two score matrices must agree whatever the weights are. Printed: per-phase and total times, the
speed-ups, R@1/5/10 of each mode (they must be equal), the max abs difference between the score matrices,
peak memory, and the analytic FLOPs of the ITM re-rank phase (with model FLOP utilisation on a GPU).

The official mode runs in fp32 as the official code does. The fast mode autocasts with --amp on CUDA, and
on CPU only with --amp-cpu (config amp_cpu, bf16). Whenever it autocasts, it is also run once in fp32 (skip
with --no-fp32-check) to separate bf16 rounding from the algorithm.

Defaults depend on the device: on CUDA the Flickr30K test size (1000 images, 5000 captions, k_test 128,
ViT-B/16 at 384 px); on CPU a size that finishes in a few minutes (32 images, k_test 16, 128 px).

This file also holds the helpers that bench_train.py and bench_query.py share.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from configs.schema import DEFAULT_CONFIG, validate_config
from data import create_dataset
from data.synthetic import config_keys, make_synthetic_dataset
from engine.evaluation import evaluate
from engine.itm_rerank import ITM_PIECE, plan_itm_forwards
from models.blip_retrieval import BlipRetrieval, build_model, init_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------
# Shared helpers (also used by bench_train.py and bench_query.py)
# ----------------------------------------------------------------------------------------------------

VIT_PRESETS: dict[str, str | dict] = {
    "base": "base",  # ViT-B/16: width 768, 12 layers
    "large": "large",  # ViT-L/16: width 1024, 24 layers
    "tiny": {"width": 192, "depth": 4, "heads": 3, "patch_size": 16},  # smoke tests only
}
TINY_MED = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}


def med_config_for(text: str) -> dict:
    """The text tower as a med_config mapping (build_model then sets vocab_size from the tokenizer).

    base = configs/med_config.json (BERT-base: 12 layers, width 768) without its vocab_size.
    """
    if text == "base":
        with open(os.path.join(REPO_ROOT, "configs", "med_config.json")) as f:
            med = json.load(f)
        med.pop("vocab_size", None)
        return med
    if text == "tiny":
        return dict(TINY_MED)
    raise ValueError(f"--text must be base or tiny, got {text!r}")


H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM: the default MFU reference on CUDA


def common_parser(doc: str, ours: str, mfu: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark shares; `ours` names our side in the help texts. `mfu` adds --peak-tflops."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--vit", default="base", choices=sorted(VIT_PRESETS))
    p.add_argument("--text", default="base", choices=["base", "tiny"])
    p.add_argument(
        "--amp",
        default="bf16",
        choices=["bf16", "fp16", "none"],
        help=f"autocast of {ours} on CUDA (on CPU see --amp-cpu); the official side is fp32",
    )
    p.add_argument(
        "--amp-cpu",
        action="store_true",
        help=f"on CPU, run {ours} under bf16 autocast (config amp_cpu; needs --amp bf16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 makes process CPU time a clean measure "
        "of work on a shared machine",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    if mfu:
        p.add_argument(
            "--peak-tflops",
            type=float,
            default=None,
            help=f"peak dense TFLOP/s for model FLOP utilisation; default {H100_BF16_PEAK_TFLOPS:g} "
            "(H100 bf16) on CUDA",
        )
    return p


def parse_common(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, bool]:
    """Parse, check the shared options, and say whether the run is on CUDA (for device-dependent defaults)."""
    args = p.parse_args(argv)
    if args.amp_cpu and args.amp != "bf16":
        p.error("--amp-cpu autocasts to bf16 only; use it with --amp bf16")
    cuda = resolve_device(args.device).type == "cuda"
    if cuda and getattr(args, "peak_tflops", 0) is None:
        args.peak_tflops = H100_BF16_PEAK_TFLOPS
    return args, cuda


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_run(args: argparse.Namespace) -> tuple[torch.device, dict]:
    """Device, thread count and environment record of a benchmark run; prints the device line."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(f"device: {device_description(device)}; torch {torch.__version__}; random-init weights (timing only)")
    return device, env


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"{cpu_model_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def environment() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu": f"{cpu_model_name()} x {os.cpu_count()} cores",
        "argv": " ".join(sys.argv),
    }
    with contextlib.suppress(OSError):
        info["load_average_1_5_15min"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated on a GPU, plus the host peak RSS (ru_maxrss).

    The host peak is reset at the start of the block through /proc/self/clear_refs (Linux >= 4.0); where
    that is not possible `host_reset` is False and the figure is the peak of the whole process so far.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.device_peak_bytes: int | None = None
        self.host_peak_bytes = 0
        self.host_reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM, read back by getrusage)
            self.host_reset = True
        except OSError:
            self.host_reset = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        self.host_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def as_dict(self) -> dict:
        return {
            "device_peak_bytes": self.device_peak_bytes,
            "host_peak_rss_bytes": self.host_peak_bytes,
            "host_peak_is_per_block": self.host_reset,
        }

    def summary(self) -> str:
        host = f"host peak RSS {self.host_peak_bytes / 2**30:.2f} GiB" + ("" if self.host_reset else " (process)")
        if self.device_peak_bytes is None:
            return host
        return f"CUDA max allocated {self.device_peak_bytes / 2**30:.2f} GiB, {host}"


def make_data(
    out_dir: str, num_images: int, captions_per_image: int, image_size: int, split: str = "test", seed: int = 0
) -> dict:
    """Generate `num_images` synthetic images (+ captions) in `split`, rendered at `image_size`."""
    counts = {"num_train_images": 0, "num_val_images": 0, "num_test_images": 0}
    counts[f"num_{split}_images"] = num_images
    return make_synthetic_dataset(
        out_dir, captions_per_image=captions_per_image, image_size=image_size, seed=seed, **counts
    )


def bench_config(paths: dict, vit: str, text: str, image_size: int, **overrides) -> dict:
    """A validated config for the generated data and the chosen tower sizes."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(
        config_keys(paths),
        med_config=med_config_for(text),
        vit=copy.deepcopy(VIT_PRESETS[vit]),
        image_size=image_size,
    )
    config.update(overrides)
    return validate_config(config, "benchmark")


def make_model(config: dict, seed: int, device: torch.device) -> BlipRetrieval:
    """Random-init model (seeded) with a WordPiece tokenizer built from the generated vocab."""
    tokenizer = init_tokenizer(config["text_encoder"])
    torch.manual_seed(seed)
    return build_model(config, tokenizer).to(device)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------
# ITM FLOPs (analytic)
# ----------------------------------------------------------------------------------------------------


def itm_text_flops(med, length: int, n_image_tokens: int, cls_only: bool = False) -> int:
    """FLOPs (2 x MACs) of one (text, image) pair through the text tower in multimodal mode, per text of
    `length` tokens, without the cross-attention key/value projections of the image tokens.

    Per layer and token: self-attention Q/K/V/output projections 4H^2, self-attention scores and weighted
    sum 2LH, cross-attention query/output projections 2H^2, cross-attention scores and weighted sum 2NH,
    FFN 2HI. With `cls_only` the last layer projects keys and values (2H^2) for every token and does the rest
    for position 0 only. Embeddings, LayerNorms, softmax and the ITM head are negligible and not counted.
    """
    h, i = med.hidden_size, med.intermediate_size
    per_token = 4 * h * h + 2 * length * h + 2 * h * h + 2 * n_image_tokens * h + 2 * h * i
    if not cls_only:
        return 2 * med.num_hidden_layers * length * per_token
    last_layer = length * 2 * h * h + (per_token - 2 * h * h)
    return 2 * ((med.num_hidden_layers - 1) * length * per_token + last_layer)


def kv_projection_flops(med, n_image_tokens: int) -> int:
    """FLOPs of the cross-attention key and value projections of one image's tokens, all layers."""
    return 2 * med.num_hidden_layers * 2 * n_image_tokens * med.encoder_width * med.hidden_size


def topk_masks(result, k_test: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Re-ranked entries of a result: they hold ITM + cosine, the rest cosine - 100 (engine/itm_rerank.py)."""
    masks = result.scores_i2t > -50.0, result.scores_t2i > -50.0
    k_i2t, k_t2i = min(k_test, masks[0].shape[1]), min(k_test, masks[1].shape[1])
    if not ((masks[0].sum(1) == k_i2t).all() and (masks[1].sum(1) == k_t2i).all()):
        return None  # an ITM logit beyond +-49: cannot tell the re-ranked entries apart; skip FLOP counts
    return masks


def rerank_flops(
    model: BlipRetrieval, dataset, results: dict, k_test: int, itm_batch_size: int, device: torch.device
) -> dict | None:
    """Analytic FLOPs of the ITM re-rank phase of each mode, reconstructing the pairs each one scored."""
    med = model.med_config
    n_tok = model.visual_encoder.num_patches + 1
    ids, atts = model.tokenize(dataset.text, torch.device("cpu"))
    padded = ids.shape[1]  # official: every text padded to max_length
    lengths = atts.sum(1).numpy()
    n_img, n_txt = len(dataset.image), len(dataset.text)
    out = {}
    masks = topk_masks(results["official"], k_test)
    if masks is None:
        return None
    pairs_official = int(masks[0].sum() + masks[1].sum())
    out["official"] = {
        "pairs": pairs_official,
        "kv_projections": pairs_official,
        "flops": pairs_official * (itm_text_flops(med, padded, n_tok) + kv_projection_flops(med, n_tok)),
    }
    masks = topk_masks(results["fast"], k_test)
    if masks is None:
        return None
    union = masks[0] | masks[1].T  # (N_img, N_txt): the pairs the fast mode scores once each
    # The same forwards as rerank_fast: per image, texts shortest first, then plan_itm_forwards.
    counts = union.sum(axis=1).tolist()
    pair_lengths = [n for image in range(n_img) for n in np.sort(lengths[union[image]], kind="stable").tolist()]
    flops, rows, forwards = n_img * kv_projection_flops(med, n_tok), 0, 0
    for chunk in plan_itm_forwards(counts, pair_lengths, itm_batch_size, ITM_PIECE.get(device.type)):
        for forward in chunk:
            flops += len(forward.rows) * itm_text_flops(med, forward.max_len, n_tok, cls_only=True)
            rows, forwards = rows + len(forward.rows), forwards + 1
    out["fast"] = {"pairs": sum(counts), "kv_projections": n_img, "flops": flops, "rows": rows, "forwards": forwards}
    out["image_tokens"] = n_tok
    out["text_tokens_official"] = padded
    out["text_tokens_mean"] = float(lengths.mean())
    out["pair_forwards_official_formula"] = min(k_test, n_txt) * n_img + min(k_test, n_img) * n_txt
    return out


# ----------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------


def head_dataset(dataset, n: int):
    """The first n images of an eval dataset with their captions (for warm-up)."""
    head = copy.copy(dataset)
    head.annotation = dataset.annotation[:n]
    head.image = dataset.image[:n]
    texts = [t for i in range(n) for t in dataset.img2txt[i]]
    remap = {t: j for j, t in enumerate(texts)}
    head.text = [dataset.text[t] for t in texts]
    head.img2txt = {i: [remap[t] for t in dataset.img2txt[i]] for i in range(n)}
    head.txt2img = {remap[t]: dataset.txt2img[t] for t in texts}
    return head


RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
PHASES = ("time_text_features", "time_image_features", "time_itc", "time_rerank", "time_total")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common_parser(__doc__, "the fast mode", mfu=True)
    p.add_argument("--image-size", type=int, default=None, help="default 384 on CUDA, 128 on CPU")
    p.add_argument("--num-images", type=int, default=None, help="default 1000 on CUDA, 32 on CPU")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--k-test", type=int, default=None, help="default 128 on CUDA, 16 on CPU")
    p.add_argument("--itm-batch-size", type=int, default=DEFAULT_CONFIG["itm_batch_size"])
    p.add_argument("--batch-size-test", type=int, default=DEFAULT_CONFIG["batch_size_test"])
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers; default 4 on CUDA, 0 on CPU")
    p.add_argument("--no-fp32-check", action="store_true", help="when the fast mode autocasts, skip its extra fp32 run")
    p.add_argument(
        "--warmup-images",
        type=int,
        default=4,
        help="evaluate each mode once on this many images before timing (0: no warm-up)",
    )
    p.add_argument("--data-dir", default=None, help="where to write the generated data (default: a temp dir)")
    args, cuda = parse_common(p, argv)
    for name, gpu, cpu in (
        ("image_size", 384, 128),
        ("num_images", 1000, 32),
        ("k_test", 128, 16),
        ("num_workers", 4, 0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    return args


def run_mode(model, dataset, config: dict, device: torch.device, warmup) -> tuple:
    if warmup is not None:
        evaluate(model, warmup, config, device, desc="warm-up")
    with PeakMemory(device) as mem:
        cpu0 = time.process_time()
        result = evaluate(model, dataset, config, device, desc="benchmark")
        # Process CPU time (all threads): on a shared CPU box it is less sensitive to other load than wall time.
        result.metrics["process_cpu_time"] = time.process_time() - cpu0
    return result, mem


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, env = start_run(args)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        data_dir = args.data_dir or tmp
        t0 = time.perf_counter()
        paths = make_data(data_dir, args.num_images, args.captions_per_image, args.image_size, seed=args.seed)
        base = bench_config(
            paths,
            args.vit,
            args.text,
            args.image_size,
            k_test=args.k_test,
            itm_batch_size=args.itm_batch_size,
            batch_size_test=args.batch_size_test,
            num_workers=args.num_workers,
            device=device.type,
            seed=args.seed,
        )
        dataset = create_dataset(base, "test")
        print(
            f"data: {len(dataset.image)} images, {len(dataset.text)} captions at {args.image_size} px "
            f"(generated in {time.perf_counter() - t0:.1f}s); k_test {args.k_test}, vit {args.vit}, "
            f"text {args.text}, itm_batch_size {args.itm_batch_size}"
        )
        model = make_model(base, args.seed, device)
        warmup = head_dataset(dataset, min(args.warmup_images, len(dataset.image))) if args.warmup_images else None

        runs = {
            "official": dict(base, eval_mode="official", eval_amp="none", amp_cpu=False),
            "fast": validate_config(dict(base, eval_mode="fast", eval_amp=args.amp, amp_cpu=args.amp_cpu), "--amp"),
        }
        autocasts = args.amp != "none" and (device.type == "cuda" or args.amp_cpu)
        if autocasts and not args.no_fp32_check:
            runs["fast_fp32"] = dict(base, eval_mode="fast", eval_amp="none", amp_cpu=False)
        results, memory = {}, {}
        for name, config in runs.items():
            on = device.type == "cuda" or config["amp_cpu"]
            print(
                f"running {name}: eval_mode {config['eval_mode']}, autocast {config['eval_amp'] if on else 'none'}",
                flush=True,
            )
            results[name], memory[name] = run_mode(model, dataset, config, device, warmup)
        flops = rerank_flops(model, dataset, results, args.k_test, args.itm_batch_size, device)
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return report(args, env, device, results, memory, flops)


def report(args, env: dict, device: torch.device, results: dict, memory: dict, flops: dict | None) -> dict:
    off, fast = results["official"].metrics, results["fast"].metrics
    names = list(results)
    print("\nphase times (s)       " + "".join(f"{n:>12}" for n in names) + f"{'speed-up':>12}")
    for phase in PHASES:
        row = "".join(f"{results[n].metrics[phase]:12.3f}" for n in names)
        ratio = f"{off[phase] / fast[phase]:11.2f}x" if min(off[phase], fast[phase]) >= 1e-3 else f"{'-':>12}"
        print(f"{phase[5:]:22}{row}{ratio}")
    speedup_total = off["time_total"] / fast["time_total"]
    speedup_rerank = off["time_rerank"] / fast["time_rerank"]
    speedup_cpu_time = off["process_cpu_time"] / fast["process_cpu_time"]
    print(
        f"\nspeed-up official/fast: total {speedup_total:.2f}x, ITM re-rank {speedup_rerank:.2f}x; process CPU "
        f"time {off['process_cpu_time']:.1f}s / {fast['process_cpu_time']:.1f}s = {speedup_cpu_time:.2f}x"
    )

    print("\nrecall   " + "".join(f"{k:>9}" for k in RECALL_KEYS))
    for n in names:
        print(f"{n:9}" + "".join(f"{results[n].metrics[k]:9.2f}" for k in RECALL_KEYS))
    comparisons = {}
    for n in names[1:]:
        diff = max(
            float(np.abs(results[n].scores_i2t - results["official"].scores_i2t).max()),
            float(np.abs(results[n].scores_t2i - results["official"].scores_t2i).max()),
        )
        equal = all(results[n].metrics[k] == off[k] for k in RECALL_KEYS)
        comparisons[n] = {"max_abs_score_diff_vs_official": diff, "recalls_equal_to_official": equal}
        print(f"{n} vs official: max |score diff| {diff:.3e}; R@1/5/10 equal: {'yes' if equal else 'NO'}")

    print("\npeak memory")
    for n in names:
        print(f"  {n:10} {memory[n].summary()}")

    flop_report = None
    if flops is not None:
        flop_report = {
            "pairs": {n: flops[n]["pairs"] for n in ("official", "fast")},
            "kv_projections": {n: flops[n]["kv_projections"] for n in ("official", "fast")},
            "rerank_tflop": {n: flops[n]["flops"] / 1e12 for n in ("official", "fast")},
            "image_tokens": flops["image_tokens"],
            "text_tokens_mean": flops["text_tokens_mean"],
            "fast_forwards": flops["fast"]["forwards"],
            "fast_rows": flops["fast"]["rows"],
        }
        print(
            f"\nITM re-rank work: official {flops['official']['pairs']} pair forwards (35-token texts, K/V per "
            f"pair), fast {flops['fast']['pairs']} distinct pairs (mean text {flops['text_tokens_mean']:.1f} "
            f"tokens, shortest first, K/V once per image, last layer [ENC] only) in {flops['fast']['forwards']} "
            f"forwards of {flops['fast']['rows']} rows; {flops['image_tokens']} image tokens"
        )
        for n in ("official", "fast") + (("fast_fp32",) if "fast_fp32" in results else ()):
            key = "fast" if n == "fast_fp32" else n
            achieved = flops[key]["flops"] / results[n].metrics["time_rerank"] / 1e12
            line = f"  {n:10} {flops[key]['flops'] / 1e12:9.2f} TFLOP in re-rank, {achieved:8.3f} TFLOP/s"
            entry = {"tflop": flops[key]["flops"] / 1e12, "achieved_tflops": achieved}
            if args.peak_tflops:
                entry["mfu"] = achieved / args.peak_tflops
                line += f", MFU {100 * entry['mfu']:.1f}% of {args.peak_tflops:g}"
            # Official-equivalent: the official algorithm's FLOPs done in this mode's time.
            entry["official_equivalent_tflops"] = flops["official"]["flops"] / results[n].metrics["time_rerank"] / 1e12
            line += f"; official-equivalent {entry['official_equivalent_tflops']:.3f} TFLOP/s"
            flop_report[n] = entry
            print(line)
    else:
        print("\n(FLOP count skipped: re-ranked entries could not be identified from the score matrices)")

    payload = {
        "benchmark": "eval",
        "env": env,
        "device": device_description(device),
        "args": vars(args),
        "weights": "random init (seeded)",
        "num_images": off["num_images"],
        "num_texts": off["num_texts"],
        "metrics": {n: {k: v for k, v in results[n].metrics.items()} for n in names},
        "peak_memory": {n: memory[n].as_dict() for n in names},
        "speedup_total": speedup_total,
        "speedup_rerank": speedup_rerank,
        "speedup_process_cpu_time": speedup_cpu_time,
        "comparisons": comparisons,
        "flops": flop_report,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
