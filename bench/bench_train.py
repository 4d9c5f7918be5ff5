"""Training-step benchmark: our step (bf16 autocast on CUDA, fused AdamW) vs a straightforward fp32 step.

    python -m bench.bench_train [--device auto|cuda|cpu] [--vit base|large|tiny] [--text base|tiny]
        [--batch-size B] [--image-size N] [--warmup W] [--steps M] [--amp bf16|fp16|none]
        [--amp-cpu] [--ckpt-layer 4] [--out results.json]

One step = BlipRetrieval.forward (ITC with momentum distillation and queues + ITM with hard negatives) +
backward + AdamW step, as in train_retrieval.py. Four variants run in one process from the SAME random-init
weights (restored before each variant), the SAME batch of generated images and captions, and the same seed:

    ours       autocast (--amp on CUDA; bf16 on CPU with --amp-cpu), AdamW fused=True on CUDA (foreach
               elsewhere, as train_retrieval.py), captions padded to the batch's longest and the text tower's
               last layer for position 0 only (the model's default)
    fp32       no autocast, plain AdamW(foreach=False), captions padded to 35 and the full last layer
               (forward(..., text_compute="official"))

each with ViT activation checkpointing off and on (vit_grad_ckpt, last --ckpt-layer blocks), and on request
`ours+compile` (ours under torch.compile; its warm-up steps include the compilation). The model
uses SDPA attention in every variant. Printed per variant: median step time, images/s, peak memory, the
FLOPs of one step (torch.utils.flop_counter, in one extra untimed step), the achieved TFLOP/s and, with
--peak-tflops (default on CUDA), model FLOP utilisation, and the first step's loss (equal within a kind;
between kinds it differs by dropout noise, see run_variant); then the speed-up fp32/ours. On CPU both
variants run fp32 unless --amp-cpu, so the ratio there measures only the optimizer and the text-side trimming.

Defaults: CUDA batch 32 at 384 px, 3 warm-up + 10 timed steps; CPU batch 8 at 128 px, 1 + 3 steps.
queue_size defaults to the largest multiple of the batch that is <= 57600 (the official queue length).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_eval import (
    PeakMemory,
    bench_config,
    common_parser,
    device_description,
    make_data,
    make_model,
    parse_common,
    start_run,
    sync,
    write_json,
)
from data import create_dataset
from utils import autocast, set_seed

OFFICIAL_QUEUE = 57600


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common_parser(__doc__, "'ours'", mfu=True)
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 8 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 384 on CUDA, 128 on CPU")
    p.add_argument(
        "--queue-size", type=int, default=None, help=f"default: the largest multiple of the batch <= {OFFICIAL_QUEUE}"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant; default 3 CUDA, 1 CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 10 CUDA, 3 CPU")
    p.add_argument("--ckpt-layer", type=int, default=4, help="ViT blocks checkpointed in the 'ckpt' variants")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["ours", "fp32", "ours+ckpt", "fp32+ckpt"],
        choices=["ours", "fp32", "ours+ckpt", "fp32+ckpt", "ours+compile"],
        help="ours+compile: ours under torch.compile (captions padded to max_length, as "
        "train_retrieval.py with compile: true); not in the default set",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.4)
    args, cuda = parse_common(p, argv)
    for name, gpu, cpu in (("batch_size", 32, 8), ("image_size", 384, 128), ("warmup", 3, 1), ("steps", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.queue_size is None:
        args.queue_size = OFFICIAL_QUEUE - OFFICIAL_QUEUE % args.batch_size
    if args.queue_size % args.batch_size:
        p.error(f"--queue-size {args.queue_size} must be a multiple of --batch-size {args.batch_size}")
    return args


def make_optimizer(params: list, kind: str, device: torch.device, lr: float, weight_decay: float):
    if kind == "fp32":  # the straightforward optimizer: per-parameter loop
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False), "AdamW(foreach=False)"
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), "AdamW(fused=True)"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "AdamW(default: foreach)"


def run_variant(model, init_state: dict, batch: tuple, variant: str, args, device: torch.device) -> dict:
    kind, ckpt, compiled = variant.split("+")[0], variant.endswith("+ckpt"), variant.endswith("+compile")
    model.load_state_dict(init_state)  # same starting weights, queues and queue pointer for every variant
    model.visual_encoder.ckpt_layer = args.ckpt_layer if ckpt else 0
    # fp32: the official text work; compiled: captions padded to max_length, as training with compile: true
    text_compute = "official" if kind == "fp32" else "static" if compiled else "trimmed"
    # compiled during the warm-up steps; compile_backend (not a command-line option) lets bench/gpu_suite.py --quick
    # trace the same step with aot_eager on a CPU, where inductor's C++ build takes minutes
    step_model = torch.compile(model, backend=getattr(args, "compile_backend", "inductor")) if compiled else model
    model.train()
    amp = args.amp if kind == "ours" and (device.type == "cuda" or args.amp_cpu) else "none"
    images, captions, idx = batch
    gc.collect()
    # Same seed for dropout and hard-negative sampling. The official text compute draws dropout masks for more
    # tokens than ours, so the two kinds consume the RNG differently and their losses differ by the dropout
    # noise; with dropout off they agree to float rounding (tests/test_losses.py).
    torch.manual_seed(args.seed)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    times, cpu_times, losses = [], [], []
    with PeakMemory(device) as mem:  # includes the optimizer state, created at the first step
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, opt_name = make_optimizer(params, kind, device, args.lr, args.weight_decay)
        for step in range(args.warmup + args.steps):
            sync(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
            with autocast(device, amp, amp_cpu=True):  # `amp` is already "none" where it must not apply
                out = step_model(images, captions, args.alpha, idx, text_compute=text_compute)
                loss = out["loss_ita"] + out["loss_itm"]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - cpu0)
            losses.append(loss.detach())
    # One more, untimed, forward + backward under FlopCounterMode: the matrix FLOPs the step really does
    # (with checkpointing, the recomputed forward too; AdamW's elementwise work is not counted).
    with FlopCounterMode(display=False) as counter, autocast(device, amp, amp_cpu=True):
        out = model(images, captions, args.alpha, idx, text_compute=text_compute)
        (out["loss_ita"] + out["loss_itm"]).backward()
    model.zero_grad(set_to_none=True)
    del optimizer, params, step_model
    median = statistics.median(times)
    flops = counter.get_total_flops()
    return {
        "variant": variant,
        "autocast": amp,
        "optimizer": opt_name,
        "vit_ckpt_layer": args.ckpt_layer if ckpt else 0,
        "step_times_s": times,
        "median_step_s": median,
        "images_per_s": args.batch_size / median,
        "median_process_cpu_s": statistics.median(cpu_times),
        "losses": [float(x) for x in losses],
        "step_tflop": flops / 1e12,
        "achieved_tflops": flops / median / 1e12,
        "mfu": flops / median / 1e12 / args.peak_tflops if args.peak_tflops else None,
        "peak_memory": mem.as_dict(),
        "memory_summary": mem.summary(),
    }


def setup(args: argparse.Namespace, device: torch.device) -> tuple:
    """The model (random init, seeded), a CPU copy of its initial state, one fixed generated batch
    (images, captions, idx) on `device`, and the trainable parameter count. Also used by bench/gpu_suite.py."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        paths = make_data(tmp, args.batch_size, 1, args.image_size, split="train", seed=args.seed)
        config = bench_config(
            paths,
            args.vit,
            args.text,
            args.image_size,
            queue_size=args.queue_size,
            batch_size_train=args.batch_size,
            vit_grad_ckpt=True,
            vit_ckpt_layer=args.ckpt_layer,
            device=device.type,
            num_workers=0,
            seed=args.seed,
        )
        dataset = create_dataset(config, "train")
        set_seed(args.seed)  # the augmentations draw from python, numpy and torch RNGs: same batch in every run
        items = [dataset[i] for i in range(args.batch_size)]  # one fixed augmented batch: B distinct images
        model = make_model(config, args.seed, device)  # reads the generated vocab
    images = torch.stack([it[0] for it in items]).to(device)
    captions = [it[1] for it in items]
    idx = torch.tensor([it[2] for it in items], device=device)
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, init_state, (images, captions, idx), n_params


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, env = start_run(args)
    model, init_state, (images, captions, idx), n_params = setup(args, device)
    print(
        f"model: vit {args.vit}, text {args.text}, {n_params / 1e6:.1f}M trainable parameters; batch "
        f"{args.batch_size} at {args.image_size} px, queue {args.queue_size}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per variant"
    )

    results = {}
    for variant in args.variants:
        print(f"running {variant} ...", flush=True)
        results[variant] = r = run_variant(model, init_state, (images, captions, idx), variant, args, device)
        print(
            f"  {variant:10} {r['median_step_s']:8.3f} s/step ({r['median_process_cpu_s']:.3f} s CPU)  "
            f"{r['images_per_s']:8.2f} img/s  "
            f"autocast {r['autocast']}, {r['optimizer']}, ViT ckpt layers {r['vit_ckpt_layer']}; "
            f"{r['memory_summary']}; first loss {r['losses'][0]:.6f}",
            flush=True,
        )
        mfu = f", MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:g}" if r["mfu"] is not None else ""
        print(
            f"  {'':10} {r['step_tflop']:8.4g} TFLOP per step (FlopCounterMode), {r['achieved_tflops']:.1f} "
            f"TFLOP/s{mfu}",
            flush=True,
        )

    ratios = {}
    print("\nspeed-up fp32 / ours (step time):")
    for suffix in ("", "+ckpt"):
        ours, fp32 = results.get("ours" + suffix), results.get("fp32" + suffix)
        if ours and fp32:
            key = "ckpt" if suffix else "no_ckpt"
            ratios[key] = fp32["median_step_s"] / ours["median_step_s"]
            loss_diff = abs(ours["losses"][0] - fp32["losses"][0])
            cpu_ratio = fp32["median_process_cpu_s"] / ours["median_process_cpu_s"]
            ratios[key + "_process_cpu_time"] = cpu_ratio
            print(
                f"  ViT checkpointing {'on ' if suffix else 'off'}: {ratios[key]:.2f}x (process CPU time "
                f"{cpu_ratio:.2f}x; first-step |loss diff| {loss_diff:.2e})"
            )
    if results.get("ours") and results.get("ours+compile"):
        ratios["compile"] = results["ours"]["median_step_s"] / results["ours+compile"]["median_step_s"]
        print(f"  torch.compile, ours / ours+compile: {ratios['compile']:.2f}x")
    if device.type != "cuda":
        print("  (CPU: both variants run fp32 unless --amp-cpu: this measures foreach AdamW and text-side trimming)")
    for kind in ("ours", "fp32"):
        off, on = results.get(kind), results.get(kind + "+ckpt")
        if off and on:
            key = "device_peak_bytes" if device.type == "cuda" else "host_peak_rss_bytes"
            print(
                f"  {kind}: ViT checkpointing changes peak memory {off['peak_memory'][key] / 2**30:.2f} -> "
                f"{on['peak_memory'][key] / 2**30:.2f} GiB and step time {off['median_step_s']:.3f} -> "
                f"{on['median_step_s']:.3f} s"
            )
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "train_step",
        "env": env,
        "device": device_description(device),
        "args": vars(args),
        "weights": "random init (seeded)",
        "trainable_params": n_params,
        "variants": results,
        "speedup_fp32_over_ours": ratios,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
