"""BLIP-2 beside BLIP on the generated data, on the CPU: zero-shot (random initialisation) and fine-tuned retrieval,
then composed retrieval from each fine-tuned model, with BLIP-2's mean and max pooling over several seeds.

    python -m studies.blip2_demo --out results/blip2_demo_$(date +%F) [--retrieval-epochs 10] [--cirr-epochs 10]
        [--seeds 0 1 2] [--train-images 200] [--cirr-subsets 120]

Generates the data (`data.synthetic`, `data.cirr_synthetic` over its vocabulary) under --out, then runs, as
subprocesses one after the other, with the demo configs at the same budget for both models:
- retrieval: `train_retrieval.py --evaluate` (random weights, zero-shot) and training, with configs/demo.yaml (BLIP)
  and configs/demo_blip2_train.yaml (BLIP-2); test r_mean and R@1 of the selected epoch;
- CIRR: `train_cirr.py --evaluate` and training from each fine-tuned retrieval checkpoint, configs/cirr_demo.yaml
  (BLIP) and configs/cirr_blip2_demo.yaml with cir_blip2_pooling mean and max (BLIP-2), one run per seed;
  val (R@5 + Rs@1)/2 and R@1.
Writes results.json (every run's metrics and wall time) and results.md (the table, means and spreads over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, name: str, out: str, config: str, options: list[str], evaluate: bool) -> dict:
    run_dir = os.path.join(out, "runs", name)
    cmd = [sys.executable, os.path.join(ROOT, script), "--config", config, "--output-dir", run_dir]
    cmd += ["--evaluate"] if evaluate else []
    cmd += ["--options", *options]
    start = time.perf_counter()
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    split = "val" if script == "train_cirr.py" else "test"
    with open(os.path.join(run_dir, f"metrics_{split}.json")) as f:
        metrics = json.load(f)
    metrics["wall_s"] = time.perf_counter() - start
    metrics["run_dir"] = run_dir
    print(f"{name}: {json.dumps({k: metrics.get(k) for k in ('r_mean', 'r_avg', 'wall_s')})}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--retrieval-epochs", type=int, default=10)
    parser.add_argument("--cirr-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-images", type=int, default=200, help="retrieval train images (5 captions each)")
    parser.add_argument("--cirr-subsets", type=int, default=120, help="CIRR train subsets (5 pairs each)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    data, cirr = os.path.join(out, "data"), os.path.join(out, "cirr")
    if not os.path.isdir(data):
        subprocess.run(
            [sys.executable, "-m", "data.synthetic", "--out", data, "--num-train", str(args.train_images)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    if not os.path.isdir(cirr):
        subprocess.run(
            [sys.executable, "-m", "data.cirr_synthetic", "--out", cirr, "--num-train", str(args.cirr_subsets)]
            + ["--extra-vocab", os.path.join(data, "vocab.txt")],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    ret_data = [
        f"image_root={data}/images",
        f"train_file={data}/annotations/synthetic_train.json",
        f"val_file={data}/annotations/synthetic_val.json",
        f"test_file={data}/annotations/synthetic_test.json",
        f"text_encoder={data}/vocab.txt",
        "num_workers=0",
    ]
    cirr_data = [f"cirr_ann_root={cirr}", f"cirr_image_root={cirr}/img_raw", f"text_encoder={data}/vocab.txt"]
    models = {"BLIP": ("configs/demo.yaml", "configs/cirr_demo.yaml"), "BLIP-2": ("configs/demo_blip2_train.yaml",
              "configs/cirr_blip2_demo.yaml")}  # fmt: skip
    results: dict = {"args": vars(args), "retrieval": {}, "cirr": {}}
    for model, (ret_config, cirr_config) in models.items():
        tag = model.lower().replace("-", "")
        opts = ret_data + [f"max_epoch={args.retrieval_epochs}", f"eval_every={args.retrieval_epochs}"]
        results["retrieval"][f"{model} zero-shot"] = _run(
            "train_retrieval.py", f"{tag}_ret_zs", out, ret_config, opts, evaluate=True
        )
        trained = _run("train_retrieval.py", f"{tag}_ret_ft", out, ret_config, opts, evaluate=False)
        results["retrieval"][f"{model} fine-tuned"] = trained
        checkpoint = os.path.join(trained["run_dir"], "checkpoint_best.pth")
        base = cirr_data + [f"pretrained={checkpoint}", f"max_epoch={args.cirr_epochs}"]
        poolings = ["mean", "max"] if model == "BLIP-2" else [None]
        for pooling in poolings:
            label = f"{model}" + (f" {pooling} pooling" if pooling else "")
            pool = [f"cir_blip2_pooling={pooling}"] if pooling else []
            zs = _run("train_cirr.py", f"{tag}_{pooling}_cirr_zs", out, cirr_config, base + pool, evaluate=True)
            runs = [
                _run(
                    "train_cirr.py", f"{tag}_{pooling}_cirr_s{s}", out, cirr_config, base + pool + [f"seed={s}"], False
                )
                for s in args.seeds
            ]
            results["cirr"][label] = {"zero-shot": zs, "fine-tuned": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(results))
    print(table(results))


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def table(results: dict) -> str:
    """The markdown table: retrieval test figures, then CIRR val figures (mean ± sd over seeds)."""
    a = results["args"]
    lines = [
        f"Retrieval ({a['train_images']} train images, {a['retrieval_epochs']} epochs; test split)",
        "",
        "| model | test r_mean | TR R@1 | IR R@1 | wall s |",
        "|---|---|---|---|---|",
    ]
    for name, m in results["retrieval"].items():
        lines.append(f"| {name} | {m['r_mean']:.2f} | {m['txt_r1']:.2f} | {m['img_r1']:.2f} | {m['wall_s']:.0f} |")
    lines += [
        "",
        f"CIRR ({a['cirr_subsets']} train subsets, {a['cirr_epochs']} epochs, seeds {a['seeds']}; val, split gallery)",
        "",
        "| model | zero-shot (R@5+Rs@1)/2 | fine-tuned (R@5+Rs@1)/2 | fine-tuned R@1 | fine-tuned Rs@1 |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["cirr"].items():
        runs = r["fine-tuned"]
        lines.append(
            f"| {name} | {r['zero-shot']['r_avg']:.2f} | {_spread([m['r_avg'] for m in runs])} | "
            f"{_spread([m['r1'] for m in runs])} | {_spread([m['rs1'] for m in runs])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
