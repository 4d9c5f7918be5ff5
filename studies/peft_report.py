"""Parameter-efficient fine-tuning report: what each finetune.method trains and costs, and whether it fits a batch.

    python -m studies.peft_report [--part cost|fit] [--device auto|cuda|cpu] [--vit base|large|tiny]
        [--text base|tiny] [--image-size N] [--batch-size B] [--steps M] [--out-dir DIR]

cost: for full, lora, prompt (8 text tokens), prompt (vision: 8 visual tokens), adapter (ITM + TMIM) and adapter
    without TMIM, from the SAME random-init weights and the SAME batch: trainable parameters, AdamW state, peak
    memory (CUDA max allocated, or the host peak RSS of the block on CPU) and the median time of a training step
    (BlipRetrieval.forward + backward + AdamW step, as train_retrieval.py), each also as a ratio to full
    fine-tuning measured in the same process.
fit: each method fits one fixed batch of 16 generated pairs from the same random-init demo-sized model; the loss it
    optimises at the first and the last of --fit-steps AdamW steps. Whether each method adapts a trained model to
    new data, held out: studies/peft_adapt.py.

Writes DIR/peft_cost.json or DIR/peft_fit.json, and DIR/peft_report.md (the table).
Defaults on CPU: ViT-B/16 + BERT-base at 128 px, batch 4, 1 warm-up + 2 timed steps; on CUDA 384 px, batch 32.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import yaml

from bench.bench_eval import (
    VIT_PRESETS,
    PeakMemory,
    bench_config,
    device_description,
    environment,
    make_data,
    make_model,
    sync,
)
from configs.schema import DEFAULT_CONFIG, validate_config
from data import create_dataset
from models.blip_retrieval import build_model
from models.peft_methods import apply_finetune, parameter_counts
from utils import autocast, set_seed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "full": {"method": "full"},
    "lora": {"method": "lora"},
    "prompt": {"method": "prompt"},
    "prompt (vision)": {"method": "prompt", "prompt": {"text_tokens": 0, "vision_tokens": 8}},
    "adapter": {"method": "adapter"},
    "adapter (no TMIM)": {"method": "adapter", "adapter": {"tmim_weight": 0.0}},
}


def _adapter_layers(depth: int) -> list[int]:
    """ContextBLIP's blocks 3, 6, 9, 12 for a 12-block ViT; evenly spread ones (every depth/4-th) otherwise."""
    step = max(depth // 4, 1)
    return list(range(step, depth + 1, step))[:4]


def _finetune(variant: dict, depth: int, small_decoder: bool) -> dict:
    finetune = copy.deepcopy(variant)
    if finetune["method"] == "adapter":
        finetune["adapter"] = {**finetune.get("adapter", {}), "layers": _adapter_layers(depth)}
        if small_decoder:
            finetune["adapter"].update(decoder_width=64, decoder_depth=1, decoder_heads=2)
    return finetune


# ----------------------------------------------------------------------------------------------------
# Cost: parameters, memory, step time
# ----------------------------------------------------------------------------------------------------


def measure_cost(args: argparse.Namespace, device: torch.device) -> dict:
    tmp = tempfile.mkdtemp(prefix="peft_cost_")
    paths = make_data(tmp, args.batch_size, 1, args.image_size, split="train")
    rows = {}
    for name, variant in VARIANTS.items():
        depth = {"base": 12, "large": 24}.get(args.vit) or VIT_PRESETS[args.vit]["depth"]
        config = bench_config(
            paths,
            args.vit,
            args.text,
            args.image_size,
            batch_size_train=args.batch_size,
            queue_size=args.batch_size * 8,
            amp=args.amp,
            device=device.type,
            num_workers=0,
            finetune=_finetune(variant, depth, small_decoder=False),
        )
        images, captions, idx = next(
            iter(torch.utils.data.DataLoader(create_dataset(config, "train"), args.batch_size))
        )
        images, idx = images.to(device), idx.to(device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = make_model(config, args.seed, device)
        apply_finetune(model, config, "")
        model.train()
        counts = parameter_counts(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        times, cpu_times = [], []
        set_seed(args.seed)
        with PeakMemory(device) as peak:
            for step in range(args.warmup + args.steps):
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                with autocast(device, config["amp"], False):
                    out = model(images, captions, 0.4, idx)
                out["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        rows[name] = {
            **counts,
            "optimizer_state_bytes": state_bytes,
            # weights (momentum copies included) + gradients + AdamW state: exact, whatever the device
            "train_state_bytes": param_bytes + grad_bytes + state_bytes,
            **peak.as_dict(),
            "step_s": statistics.median(times),
            "step_cpu_s": statistics.median(cpu_times),
        }
        print(
            f"{name:18s} trainable {counts['trainable']:>12,}  step {rows[name]['step_s']:.2f}s  {peak.summary()}",
            flush=True,
        )
        del model, optimizer, out
    full = rows["full"]
    peak_key = "device_peak_bytes" if device.type == "cuda" else "host_peak_rss_bytes"
    for row in rows.values():
        row["trainable_vs_full"] = row["trainable"] / full["trainable"]
        row["peak_vs_full"] = row[peak_key] / full[peak_key]
        row["train_state_vs_full"] = row["train_state_bytes"] / full["train_state_bytes"]
        # on the CPU the process time (one torch thread by default) measures the work; wall time on a shared
        # machine also measures the neighbours
        time_key = "step_s" if device.type == "cuda" else "step_cpu_s"
        row["step_time_vs_full"] = row[time_key] / full[time_key]
    return {"peak_key": peak_key, "time_key": time_key, "rows": rows}


# ----------------------------------------------------------------------------------------------------
# Fit: does each method lower its loss?
# ----------------------------------------------------------------------------------------------------


def measure_fit(args: argparse.Namespace) -> dict:
    """Each method fits one fixed batch of generated pairs from the same random-init demo-sized model: the training
    loss (what the method optimises) at the first and the last of --fit-steps AdamW steps (lr --fit-lr)."""
    from data.synthetic import config_keys, make_synthetic_dataset

    work = tempfile.mkdtemp(prefix="peft_fit_")
    data = make_synthetic_dataset(work, num_train_images=16, num_val_images=0, num_test_images=0, image_size=64)
    with open(os.path.join(REPO_ROOT, "configs", "demo.yaml")) as f:
        demo = yaml.safe_load(f)
    rows = {}
    for name, variant in VARIANTS.items():
        config = {**copy.deepcopy(DEFAULT_CONFIG), **demo, **config_keys(data), "num_workers": 0, "queue_size": 16}
        config["finetune"] = _finetune(variant, 2, small_decoder=True)
        config = validate_config(config, "peft_report fit")
        loader = torch.utils.data.DataLoader(create_dataset(config, "train"), batch_size=16, shuffle=False)
        images, captions, idx = next(iter(loader))
        set_seed(args.seed)
        model = build_model(config)
        apply_finetune(model, config, "")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.fit_lr)
        losses = []
        for _ in range(args.fit_steps):
            out = model(images, captions, 0.4, idx, 0.0)  # uniform ITM negatives, as the demo config
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append({k: float(out[k]) for k in ("loss", "loss_ita", "loss_itm", "loss_tmim")})
        rows[name] = {"first": losses[0], "last": losses[-1], "trainable": parameter_counts(model)["trainable"]}
        print(f"{name:18s} loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}", flush=True)
    return {"steps": args.fit_steps, "lr": args.fit_lr, "rows": rows}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def markdown(cost: dict | None, header: str) -> str:
    lines = [header, ""]
    if cost:
        peak = "CUDA max allocated" if cost["peak_key"] == "device_peak_bytes" else "host peak RSS"
        lines += [
            "| method | trainable params | x full | weights+grads+AdamW GiB | x full | "
            f"{peak} GiB | x full | step s (wall) | step s ({'wall' if cost['time_key'] == 'step_s' else 'CPU'}) "
            "| x full |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in cost["rows"].items():
            lines.append(
                f"| {name} | {r['trainable']:,} | {r['trainable_vs_full']:.4f} | {_gib(r['train_state_bytes'])} | "
                f"{r['train_state_vs_full']:.2f} | {_gib(r[cost['peak_key']])} | {r['peak_vs_full']:.2f} | "
                f"{r['step_s']:.2f} | {r[cost['time_key']]:.2f} | {r['step_time_vs_full']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="cost", choices=["cost", "fit"])
    p.add_argument("--fit-steps", type=int, default=30, help="fit: AdamW steps on one fixed batch")
    p.add_argument("--fit-lr", type=float, default=1e-3, help="fit: learning rate of every method")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--vit", default="base", choices=["base", "large", "tiny"])
    p.add_argument("--text", default="base", choices=["base", "tiny"])
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="training autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    cuda = device.type == "cuda"
    args.image_size = args.image_size or (384 if cuda else 128)
    args.batch_size = args.batch_size or (32 if cuda else 4)
    args.steps = args.steps or (10 if cuda else 2)
    out_dir = args.out_dir or os.path.join(REPO_ROOT, "bench", "results", f"peft_{time.strftime('%Y-%m-%d')}")
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    if not cuda:  # one thread: the process CPU time of a step is then a clean measure of its work
        torch.set_num_threads(args.threads or 1)
    env = {**environment(), "device": device_description(device), "args": vars(args)}  # threads of the cost part
    cost = measure_cost(args, device) if args.part == "cost" else None
    torch.set_num_threads(threads)
    fit = measure_fit(args) if args.part == "fit" else None
    for name, payload in (("peft_cost.json", cost), ("peft_fit.json", fit)):
        if payload is not None:
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump({"environment": env, **payload}, f, indent=2, default=str)
    header = (
        f"## finetune.method on {env['device']}\n\n`python -m studies.peft_report {' '.join(argv or sys.argv[1:])}`; "
        f"cost: ViT {args.vit}, text {args.text}, {args.image_size} px, batch {args.batch_size}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    report = markdown(cost, header)
    if fit:
        report += (
            f"\n| fit: one batch of 16, {fit['steps']} steps, lr {fit['lr']:g} | trainable | loss first | loss last "
        )
        report += "| loss_ita | loss_itm | loss_tmim |\n|---|---|---|---|---|---|---|\n"
        for name, r in fit["rows"].items():
            a, b = r["first"], r["last"]
            report += (
                f"| {name} | {r['trainable']:,} | {a['loss']:.3f} | {b['loss']:.3f} | {a['loss_ita']:.3f} -> "
                f"{b['loss_ita']:.3f} | {a['loss_itm']:.3f} -> {b['loss_itm']:.3f} | {a['loss_tmim']:.3f} -> "
                f"{b['loss_tmim']:.3f} |\n"
            )
    with open(os.path.join(out_dir, "peft_report.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    return {"cost": cost, "fit": fit, "out_dir": out_dir}


if __name__ == "__main__":
    main()
