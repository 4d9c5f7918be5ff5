"""Does ITM re-ranking help when BLIP is trained from scratch? The ITM negative schedules side by side.

    python -m studies.itm_negatives --out output/itm_negatives [--parallel 2] [--threads 1]
        [--schedules hard uniform warmup:150 anneal:300] [--datasets demo two_shapes] [--seeds 42 43 44]
        [--epochs 20] [--report-only]

Each run is `train_retrieval.py --config configs/demo.yaml` (the demo recipe) with `itm_negatives` set to one
schedule and seed, on generated data: `demo` is the demo's own dataset (`python -m data.synthetic` defaults) and
`two_shapes` is one neither the demo nor the tests use (two shapes in every image, another seed, 240 train and 48
val/test images). Runs go in parallel as subprocesses, `--threads` CPU threads each. Written to --out:
- results.json: per run, the per-epoch train ITM loss and accuracies and val r_mean, and the test metrics of the
  epoch selected by val (re-ranked and ITC-only; with the demo's `rerank_score: calibrated`, also re-ranked with
  the official score, `official_*`);
- results.md: those test metrics, mean over the seeds (min and max of the re-ranking gain), then run by run;
- itm_negatives.png: per dataset, the ITM loss per epoch (the dashed line is 0.6365, the loss of a head that
  always answers the prior, 1 match in 3 pairs) and the val r_mean that re-ranking adds over ITC alone (dashed:
  with the official score), both averaged over the seeds.
`--report-only` reads finished runs in --out (for instance seeds run in two batches) and writes the three files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from data.synthetic import config_keys, make_synthetic_dataset

DATASETS = {  # make_synthetic_dataset arguments
    "demo": {},
    "two_shapes": {"num_shapes": 2, "seed": 1, "num_train_images": 240, "num_val_images": 48, "num_test_images": 48},
}
PRIOR_LOSS = -(math.log(1 / 3) + 2 * math.log(2 / 3)) / 3  # cross-entropy of the constant 1/3 "match" answer


def parse_schedule(text: str) -> tuple[str, int]:
    """'hard' -> ('hard', 0); 'warmup:150' -> ('warmup', 150)."""
    name, _, steps = text.partition(":")
    return name, int(steps or 0)


def run_name(dataset: str, schedule: str, seed: int) -> str:
    return f"{dataset}_{schedule.replace(':', '')}_seed{seed}"


def train_job(
    out: str, dataset: str, paths: dict, schedule: str, seed: int, args: argparse.Namespace
) -> tuple[str, list[str], str]:
    """(run name, train_retrieval.py command, log path) of one run, for run_jobs."""
    name, steps = parse_schedule(schedule)
    options = [
        *(f"{key}={value}" for key, value in config_keys(paths).items()),
        f"itm_negatives={name}",
        f"itm_negatives_steps={steps}",
        f"max_epoch={args.epochs}",
        f"eval_every={args.eval_every}",
        f"device={args.device}",
        f"seed={seed}",
        "num_workers=1",
        *args.options,
    ]
    run_dir = os.path.join(out, run_name(dataset, schedule, seed))
    cmd = [
        sys.executable,
        "train_retrieval.py",
        "--config",
        args.config,
        "--output-dir",
        run_dir,
        "--options",
        *options,
    ]
    return run_name(dataset, schedule, seed), cmd, run_dir + ".log"


def run_jobs(jobs: list[tuple[str, list[str], str]], parallel: int, threads: int) -> None:
    """Run (name, command, log path) jobs as subprocesses, `parallel` at a time; exit naming the failed ones."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start, running, failed = time.perf_counter(), [], []
    jobs = list(jobs)
    while jobs or running:
        while jobs and len(running) < parallel:
            name, cmd, log_path = jobs.pop(0)
            with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
                running.append((name, log_path, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(0.5)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            print(f"[{time.perf_counter() - start:6.0f}s] {job[0]} exited {job[2].returncode}", flush=True)
            if job[2].returncode:
                failed.append(f"{job[0]} ({job[1]})")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def read_run(run_dir: str) -> dict:
    """Per-epoch curves and the selected epoch's test metrics from a finished run's log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    epochs = [r for r in records if "train_loss_itm" in r]
    curves = {
        key: [r.get(key) for r in epochs]
        for key in (
            "epoch",
            "train_loss_itm",
            "train_itm_acc_pos",
            "train_itm_acc_neg",
            "val_r_mean",
            "val_itc_r_mean",
            "val_official_r_mean",  # only with rerank_score: calibrated (None otherwise)
        )
    }
    with open(os.path.join(run_dir, "metrics_test.json")) as f:
        test = json.load(f)
    keep = ("r_mean", "itc_r_mean", "txt_r1", "img_r1", "itc_txt_r1", "itc_img_r1", "epoch")
    # With rerank_score: calibrated the evaluation also reports the official score (official_*).
    keep += tuple(k for k in ("official_r_mean", "official_txt_r1", "official_img_r1") if k in test)
    return {"curves": curves, "test": {k: test[k] for k in keep}}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(results: dict) -> dict:
    """Per (dataset, schedule): the seeds' mean of the final ITM statistics and test metrics, and the
    re-ranking gain (re-ranked minus ITC-only test r_mean) of every seed."""
    groups: dict = {}
    for run in results.values():
        groups.setdefault((run["dataset"], run["schedule"]), []).append(run)
    summary = {}
    for (dataset, schedule), runs in groups.items():
        final = {
            key: _mean([r["curves"][key][-1] for r in runs])
            for key in ("train_loss_itm", "train_itm_acc_pos", "train_itm_acc_neg")
        }
        test = {key: _mean([r["test"][key] for r in runs]) for key in runs[0]["test"] if key != "epoch"}
        gains = [r["test"]["r_mean"] - r["test"]["itc_r_mean"] for r in runs]
        summary[f"{dataset} {schedule}"] = {
            "dataset": dataset,
            "schedule": schedule,
            "seeds": len(runs),
            **final,
            **test,
            "rerank_gains": gains,
        }
    return summary


def write_table(summary: dict, results: dict, path: str) -> None:
    lines = [
        "| data | itm_negatives | seeds | final ITM loss | ITM acc pos / neg | test r_mean ITC only | "
        "test r_mean re-ranked | re-rank gain mean (min, max) | R@1 TR / IR ITC only | "
        "R@1 TR / IR re-ranked |",
        "|---" * 10 + "|",
    ]
    for row in summary.values():
        gains = row["rerank_gains"]
        official = f" (official score {row['official_r_mean']:.1f})" if "official_r_mean" in row else ""
        lines.append(
            f"| {row['dataset']} | {row['schedule']} | {row['seeds']} | {row['train_loss_itm']:.3f} | "
            f"{row['train_itm_acc_pos']:.2f} / {row['train_itm_acc_neg']:.2f} | {row['itc_r_mean']:.1f} | "
            f"{row['r_mean']:.1f}{official} | {_mean(gains):+.1f} ({min(gains):+.1f}, {max(gains):+.1f}) | "
            f"{row['itc_txt_r1']:.1f} / {row['itc_img_r1']:.1f} | {row['txt_r1']:.1f} / {row['img_r1']:.1f} |"
        )
    lines += [
        "",
        "Run by run (test metrics of the epoch selected by val r_mean):",
        "",
        "| run | final ITM loss | test r_mean ITC only | re-ranked | R@1 TR / IR ITC only | re-ranked |",
        "|---" * 6 + "|",
    ]
    for name, run in results.items():
        t = run["test"]
        official = f" (official score {t['official_r_mean']:.1f})" if "official_r_mean" in t else ""
        lines.append(
            f"| {name} | {run['curves']['train_loss_itm'][-1]:.3f} | {t['itc_r_mean']:.1f} | "
            f"{t['r_mean']:.1f}{official} | {t['itc_txt_r1']:.1f} / {t['itc_img_r1']:.1f} | "
            f"{t['txt_r1']:.1f} / {t['img_r1']:.1f} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, datasets: list[str], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 7), squeeze=False)
    for col, dataset in enumerate(datasets):
        loss_ax, gain_ax = axes[0][col], axes[1][col]
        by_schedule: dict = {}
        for run in results.values():
            if run["dataset"] == dataset:
                by_schedule.setdefault(run["schedule"], []).append(run["curves"])
        for schedule, curves in by_schedule.items():
            epochs = [e + 1 for e in curves[0]["epoch"]]
            loss = [_mean(values) for values in zip(*(c["train_loss_itm"] for c in curves))]
            loss_ax.plot(epochs, loss, marker=".", label=f"{schedule} ({len(curves)} seeds)")
            evaluated = [i for i, v in enumerate(curves[0]["val_r_mean"]) if v is not None]
            gain = [_mean([c["val_r_mean"][i] - c["val_itc_r_mean"][i] for c in curves]) for i in evaluated]
            line = gain_ax.plot([epochs[i] for i in evaluated], gain, marker="o", label=schedule)[0]
            if all(c["val_official_r_mean"][i] is not None for c in curves for i in evaluated):
                official = [
                    _mean([c["val_official_r_mean"][i] - c["val_itc_r_mean"][i] for c in curves]) for i in evaluated
                ]
                evaluated_epochs = [epochs[i] for i in evaluated]
                gain_ax.plot(
                    evaluated_epochs,
                    official,
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{schedule}, official score",
                )
        loss_ax.axhline(PRIOR_LOSS, color="grey", linestyle="--", linewidth=1)
        loss_ax.set(
            title=f"{dataset}: train ITM loss (dashed: the prior, {PRIOR_LOSS:.4f})", xlabel="epoch", ylabel="loss_itm"
        )
        gain_ax.axhline(0, color="grey", linewidth=1)
        gain_ax.set(title=f"{dataset}: val r_mean, re-ranked minus ITC only", xlabel="epoch", ylabel="points")
        loss_ax.legend(fontsize=8)
        gain_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument(
        "--schedules",
        nargs="+",
        default=["hard", "uniform", "warmup:150", "anneal:300"],
        help="itm_negatives values, with :STEPS for warmup and anneal",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--options", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--report-only", action="store_true", help="no training: tabulate and plot the runs in --out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    jobs = []
    for dataset in [] if args.report_only else args.datasets:
        paths = make_synthetic_dataset(os.path.join(args.out, "data_" + dataset), **DATASETS[dataset])
        jobs += [train_job(args.out, dataset, paths, s, seed, args) for s in args.schedules for seed in args.seeds]
    run_jobs(jobs, args.parallel, args.threads)

    results = {}
    for dataset in args.datasets:
        for schedule in args.schedules:
            for seed in args.seeds:
                name = run_name(dataset, schedule, seed)
                results[name] = {
                    "dataset": dataset,
                    "schedule": schedule,
                    "seed": seed,
                    **read_run(os.path.join(args.out, name)),
                }
    summary = summarise(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "prior_loss": PRIOR_LOSS, "summary": summary, "runs": results}, f, indent=1)
    write_table(summary, results, os.path.join(args.out, "results.md"))
    plot(results, args.datasets, os.path.join(args.out, "itm_negatives.png"))
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    return results


if __name__ == "__main__":
    main()
