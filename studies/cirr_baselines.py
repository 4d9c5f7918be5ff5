"""Does composed-retrieval fine-tuning learn? Zero-shot, text-only and image-only baselines beside the fine-tuned
model, in one run on the same data and checkpoint.

    python -m studies.cirr_baselines --config configs/cirr_demo.yaml --out output/cirr_baselines
        [--samplers random contrastive similar] [--options key=value ...]

Runs `train_cirr.py` (as subprocesses, one after the other) with the config's `pretrained` checkpoint:
- `--evaluate` with cir_query multimodal (CoVR's query, zero-shot), text (the modification text's ITC feature
  alone) and image (the reference image's ITC feature alone);
- fine-tuning with cir_query text (a text-only model trained the same way) and with cir_query multimodal, once per
  `--samplers` entry.
Writes results.json and results.md (val R@1/5/10/50, Rs@1/2/3 and (R@5 + Rs@1)/2 of the selected epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

KEYS = ("r1", "r5", "r10", "r50", "rs1", "rs2", "rs3", "r_avg")


def run(name: str, out: str, config: str, options: list[str], evaluate: bool) -> dict:
    run_dir = os.path.join(out, name)
    cmd = [sys.executable, "train_cirr.py", "--config", config, "--output-dir", run_dir]
    cmd += ["--evaluate"] if evaluate else []
    cmd += ["--options", *options] if options else []
    start = time.perf_counter()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(run_dir, "metrics_val.json")) as f:
        metrics = json.load(f)
    metrics["wall_s"] = time.perf_counter() - start
    print(
        f"{name}: R@1 {metrics['r1']:.2f}  (R@5+Rs@1)/2 {metrics['r_avg']:.2f}  ({metrics['wall_s']:.0f} s)", flush=True
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cirr_demo.yaml")
    parser.add_argument("--out", default="output/cirr_baselines")
    parser.add_argument("--samplers", nargs="+", default=["random"], choices=["random", "contrastive", "similar"])
    parser.add_argument("--options", nargs="*", default=[], help="overrides for every run")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows: dict[str, dict] = {}
    for query in ("multimodal", "text", "image"):
        rows[f"zero-shot, {query} query"] = run(
            f"zeroshot_{query}", args.out, args.config, [*args.options, f"cir_query={query}"], True
        )
    rows["fine-tuned, text query"] = run(
        "finetune_text", args.out, args.config, [*args.options, "cir_query=text"], False
    )
    for sampler in args.samplers:
        options = [*args.options, "cir_query=multimodal", f"cir_sampler={sampler}"]
        rows[f"fine-tuned, multimodal query, {sampler} sampler"] = run(
            f"finetune_{sampler}", args.out, args.config, options, False
        )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [
        f"`python -m studies.cirr_baselines {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| run | R@1 | R@5 | R@10 | R@50 | Rs@1 | Rs@2 | Rs@3 | (R@5+Rs@1)/2 | selected epoch | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        cells = " | ".join(f"{m[k]:.2f}" for k in KEYS)
        lines.append(f"| {name} | {cells} | {m.get('epoch', '-')} | {m['wall_s']:.0f} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
