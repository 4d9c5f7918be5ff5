"""Does each finetune.method adapt a trained model to new imagery? A demo-sized run per method, side by side.

    python -m studies.peft_adapt --out output/peft_adapt [--base CKPT --base-vocab VOCAB] [--seeds 0 1]
        [--methods full lora prompt prompt_vision adapter adapter_gate_itc] [--epochs 6] [--parallel 2]
        [--threads 1] [--report-only]

The base is the demo recipe (`configs/demo.yaml` on `python -m data.synthetic` defaults, what `make demo` trains),
trained here unless --base names a checkpoint (with --base-vocab, the vocab.txt it was trained with). The target
is the same kind of scene drawn another way: `data.synthetic --style outline` (only the shapes' contours; the
captions' language is unchanged; another seed, so other scenes), 240 train and 100 val / 100 test images. Each
method continues from the base for --epochs at its own learning rate (METHODS), evaluated every epoch on the
target's val split; the test split is scored at the epoch val selects. Each run's checkpoint is also scored on
generated IMAGECODE-style sets of outline drawings (`data.imagecode --style outline`, ITM scoring, chance 10%;
1,800 descriptions by default): ContextBLIP's task. The zero-shot row is the base evaluated on the same splits and
sets; IMAGECODE gains come with their paired standard error (`paired_gain`).

Written to --out: results.json (per run: per-epoch val r_mean and ITC-only r_mean, the selected epoch's test
metrics, the IMAGECODE accuracies and which descriptions the run got right), results.md (mean over seeds and run
by run) and peft_adapt.png (val r_mean per epoch; test r_mean and IMAGECODE accuracy minus zero-shot, per method).
Runs are subprocesses of train_retrieval.py and eval_imagecode.py, --parallel at a time with --threads CPU threads
each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.schema import load_config
from data.imagecode import make_imagecode_sample
from data.synthetic import STYLES, config_keys, make_synthetic_dataset
from models.blip_retrieval import build_model
from models.peft_methods import apply_finetune, parameter_counts
from studies.itm_negatives import read_run, run_jobs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The adapter on the demo's 2-block ViT reads both blocks; a TMIM decoder sized for a 64-wide model.
DEMO_ADAPTER = [
    "finetune.method=adapter",
    "finetune.adapter.layers=[1,2]",
    "finetune.adapter.decoder_width=64",
    "finetune.adapter.decoder_depth=1",
    "finetune.adapter.decoder_heads=2",
]
# Per method: config overrides, learning rate included (cosine down to a tenth). The rates of full, lora, prompt and
# adapter come from the earlier demo-data runs (docs/notes/peft_cost_and_learning.md); the gated adapter's 1e-3
# was picked on this target's val split (at 5e-3 and 2e-2 its val r_mean fell after the first epoch).
METHODS: dict[str, list[str]] = {
    "full": ["init_lr=1e-3", "min_lr=1e-4"],
    "lora": ["finetune.method=lora", "init_lr=5e-3", "min_lr=5e-4"],
    "prompt": ["finetune.method=prompt", "init_lr=1e-2", "min_lr=1e-3"],  # 8 text tokens
    "prompt_vision": [  # 8 visual prompt tokens (VPT-shallow) instead
        "finetune.method=prompt",
        "finetune.prompt.text_tokens=0",
        "finetune.prompt.vision_tokens=8",
        "init_lr=1e-2",
        "min_lr=1e-3",
    ],
    "adapter": [*DEMO_ADAPTER, "init_lr=5e-3", "min_lr=5e-4"],  # ContextBLIP: ITM + TMIM
    "adapter_gate_itc": [
        *DEMO_ADAPTER,
        "finetune.adapter.gate=true",
        "finetune.adapter.itc_weight=1.0",
        "init_lr=1e-3",
        "min_lr=1e-4",
    ],
}
ZERO_SHOT = "zero_shot"


def train_command(config_keys_: dict, run_dir: str, options: list[str], evaluate: bool = False) -> list[str]:
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_retrieval.py"), "--config"]
    cmd += [os.path.join(REPO_ROOT, "configs", "demo.yaml"), "--output-dir", run_dir]
    cmd += ["--evaluate"] if evaluate else []
    return cmd + ["--options", *(f"{k}={v}" for k, v in config_keys_.items()), *options]


def imagecode_command(checkpoint: str, sets: dict, vocab: str, out_dir: str) -> list[str]:
    cmd = [sys.executable, os.path.join(REPO_ROOT, "eval_imagecode.py"), "--config"]
    cmd += [os.path.join(REPO_ROOT, "configs", "demo.yaml"), "--checkpoint", checkpoint]
    cmd += ["--ann-file", sets["valid_file"], "--image-root", sets["image_root"], "--scoring", "itm"]
    return cmd + ["--output-dir", out_dir, "--options", f"text_encoder={vocab}"]


def run_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


def read_zero_shot(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics_val.json")) as f:
        val = json.load(f)
    with open(os.path.join(run_dir, "metrics_test.json")) as f:
        test = json.load(f)
    keys = ("r_mean", "itc_r_mean", "txt_r1", "img_r1", "itc_txt_r1", "itc_img_r1")
    return {"val_r_mean": val["r_mean"], "val_itc_r_mean": val["itc_r_mean"], "test": {k: test[k] for k in keys}}


def read_imagecode(out_dir: str, ann_file: str) -> dict:
    """eval_imagecode.py's accuracies, plus `correct`: one "1" or "0" per description of `ann_file`, in file order
    (its leaderboard predictions against the labels), so runs can be compared description by description."""
    with open(os.path.join(out_dir, "imagecode_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out_dir, "imagecode_predictions.json")) as f:
        predictions = json.load(f)
    with open(ann_file) as f:
        labels = json.load(f)
    correct = "".join(
        "1" if predictions[name][k] == int(index) else "0"
        for name, entries in labels.items()
        for k, index in enumerate(entries)
    )
    result = {k: metrics[k] for k in ("accuracy", "accuracy_video", "accuracy_static", "num_descriptions")}
    return {**result, "correct": correct}


def paired_gain(zero_correct: str, runs_correct: list[str]) -> dict:
    """Accuracy gain over zero-shot on the same descriptions, in points, and its standard error. Each description's
    difference is the seeds' mean correctness minus zero-shot's (-1 to 1); the error is their standard deviation
    over sqrt(descriptions). Pairing removes the descriptions both get right or both get wrong, so it is much
    tighter than two independent binomial errors; it measures the description sample, not the seeds."""
    n = len(zero_correct)
    if n < 2 or any(len(c) != n for c in runs_correct):
        raise ValueError(f"paired_gain: every run needs the same {n} (>= 2) descriptions as zero-shot")
    diffs = [sum(c[i] == "1" for c in runs_correct) / len(runs_correct) - (zero_correct[i] == "1") for i in range(n)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"gain": 100.0 * mean, "se": 100.0 * (variance / n) ** 0.5}


def trainable_parameters(run_dir: str) -> int:
    """Trainable parameters of the model a run's saved config builds (momentum copies not counted)."""
    config = load_config(os.path.join(run_dir, "config.yaml"))
    model = build_model(config)
    apply_finetune(model, config, "")
    return parameter_counts(model)["trainable"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(results: dict, methods: list[str], seeds: list[int]) -> dict:
    """Per method, the seeds' mean (and min, max) of the last and best val r_mean, the selected epoch's test r_mean
    (re-ranked and ITC only) and the IMAGECODE accuracy; zero-shot as measured once."""
    zero = results[ZERO_SHOT]
    summary = {
        ZERO_SHOT: {
            "val_r_mean_last": zero["val_r_mean"],
            "val_r_mean_best": zero["val_r_mean"],
            "test_r_mean": zero["test"]["r_mean"],
            "test_itc_r_mean": zero["test"]["itc_r_mean"],
            "imagecode_accuracy": zero["imagecode"]["accuracy"],
            "imagecode_descriptions": zero["imagecode"]["num_descriptions"],
        }
    }
    for method in methods:
        runs = [results[run_name(method, seed)] for seed in seeds]
        values = {
            "val_r_mean_last": [r["curves"]["val_r_mean"][-1] for r in runs],
            "val_r_mean_best": [max(v for v in r["curves"]["val_r_mean"] if v is not None) for r in runs],
            "test_r_mean": [r["test"]["r_mean"] for r in runs],
            "test_itc_r_mean": [r["test"]["itc_r_mean"] for r in runs],
            "imagecode_accuracy": [r["imagecode"]["accuracy"] for r in runs],
        }
        summary[method] = {k: _mean(v) for k, v in values.items()}
        summary[method]["trainable"] = runs[0]["trainable"]
        summary[method]["imagecode_paired"] = paired_gain(
            zero["imagecode"]["correct"], [r["imagecode"]["correct"] for r in runs]
        )
        summary[method]["range"] = {k: [min(v), max(v)] for k, v in values.items()}
    return summary


def write_table(summary: dict, results: dict, args: argparse.Namespace, path: str) -> None:
    zero = summary[ZERO_SHOT]
    command = " ".join(a for a in args.argv if a != "--report-only")  # the command that trained the runs
    lines = [
        f"# finetune.method adapting the demo model to `--style {args.style}` drawings",
        "",
        f"`python -m studies.peft_adapt {command}`; {len(args.seeds)} seed(s) {args.seeds}, "
        f"{args.epochs} epochs per method. Mean over seeds (min..max where more than one); in brackets the "
        "difference to zero-shot, for IMAGECODE with its paired standard error over the "
        f"{summary[ZERO_SHOT]['imagecode_descriptions']} descriptions (`paired_gain`).",
        "",
        "| run | trainable | val r_mean, last epoch | best | test r_mean at the selected epoch | test, ITC only | "
        "IMAGECODE-style accuracy (ITM) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(method: str, key: str) -> str:
        value = summary[method][key]
        text = f"{value:.1f}"
        if method != ZERO_SHOT:
            paired = summary[method]["imagecode_paired"]
            error = f" ± {paired['se']:.1f}" if key == "imagecode_accuracy" else ""
            text += f" ({value - zero[key]:+.1f}{error})"
            low, high = summary[method]["range"][key]
            text += f" {low:.1f}..{high:.1f}" if len(args.seeds) > 1 else ""
        return text

    keys = ("val_r_mean_last", "val_r_mean_best", "test_r_mean", "test_itc_r_mean", "imagecode_accuracy")
    for method in [ZERO_SHOT, *args.methods]:
        trainable = f"{summary[method]['trainable']:,}" if method != ZERO_SHOT else ""
        lines.append(f"| {method} | {trainable} | " + " | ".join(cell(method, k) for k in keys) + " |")
    lines += ["", "Per run: val r_mean per epoch; test r_mean (ITC only) at the selected epoch; IMAGECODE.", ""]
    for name, run in results.items():
        if name == ZERO_SHOT:
            continue
        curve = " ".join(f"{v:.1f}" for v in run["curves"]["val_r_mean"] if v is not None)
        lines.append(
            f"- {name}: {curve}; test {run['test']['r_mean']:.1f} ({run['test']['itc_r_mean']:.1f}) at epoch "
            f"{run['test']['epoch']}; IMAGECODE {run['imagecode']['accuracy']:.1f}"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(summary: dict, results: dict, args: argparse.Namespace, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gains) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(args.methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for method in args.methods:
        runs = [results[run_name(method, seed)]["curves"]["val_r_mean"] for seed in args.seeds]
        mean = [_mean(values) for values in zip(*runs, strict=True)]
        curves.plot(range(1, len(mean) + 1), mean, marker="o", color=colours[method], label=method)
    curves.axhline(summary[ZERO_SHOT]["val_r_mean_last"], color="black", linestyle="--", label="zero-shot")
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"val r_mean (mean of {len(args.seeds)} seed(s))")
    curves.set_title(f"adapting the demo model to {args.style} drawings")
    low, high = curves.get_ylim()
    curves.set_ylim(low, high + 0.25 * (high - low))  # headroom for the legend above the curves
    curves.legend(fontsize=7, loc="upper left", ncol=3)
    width = 0.38
    for i, method in enumerate(args.methods):
        for j, (key, label) in enumerate((("test_r_mean", "test r_mean"), ("imagecode_accuracy", "IMAGECODE acc"))):
            x = i + (j - 0.5) * width
            gain = summary[method][key] - summary[ZERO_SHOT][key]
            # IMAGECODE: +-2 paired standard errors (the description sample; the dots show the seeds)
            error = 2 * summary[method]["imagecode_paired"]["se"] if key == "imagecode_accuracy" else None
            gains.bar(
                x,
                gain,
                width,
                yerr=error,
                capsize=3,
                color=colours[method],
                alpha=1.0 if j == 0 else 0.5,
                label=label if i == 0 else None,
            )
            for seed in args.seeds:  # each seed as a dot
                run = results[run_name(method, seed)]
                value = run["test"]["r_mean"] if key == "test_r_mean" else run["imagecode"]["accuracy"]
                gains.plot(x, value - summary[ZERO_SHOT][key], "k.", markersize=4)
    gains.axhline(0, color="black", linewidth=0.8)
    gains.set_xticks(range(len(args.methods)), args.methods, fontsize=8)
    gains.set_ylabel("minus zero-shot (points)")
    gains.set_title("test r_mean (solid), IMAGECODE-style accuracy (light, ±2 paired s.e.)", fontsize=10)
    gains.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="base checkpoint (default: train the demo recipe here)")
    p.add_argument("--base-vocab", default=None, help="the vocab.txt the --base checkpoint was trained with")
    p.add_argument("--base-epochs", type=int, default=20, help="epochs of the base when it is trained here")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--style", default="outline", choices=STYLES, help="data.synthetic --style of the target")
    p.add_argument("--num-train", type=int, default=240, help="target train images (5 captions each)")
    p.add_argument("--num-eval", type=int, default=100, help="target val and test images")
    p.add_argument(
        "--imagecode-sets", type=int, default=300, help="video and static IMAGECODE-style sets, each (3 descriptions)"
    )
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--options", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--report-only", action="store_true", help="no training: tabulate and plot the runs in --out")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if (args.base is None) != (args.base_vocab is None):
        p.error("--base and --base-vocab go together (a checkpoint and the vocab.txt it was trained with)")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    common = ["num_workers=1", "eval_every=1", *args.options]

    if args.base is None:
        base_data = make_synthetic_dataset(os.path.join(out, "data_base"))  # what `make demo` trains on
        base, vocab = os.path.join(out, "base", "checkpoint_best.pth"), base_data["vocab_file"]
        if args.report_only:
            pass
        elif os.path.exists(base):
            print(f"reusing the base trained in {os.path.dirname(base)}")
        else:
            base_cmd = train_command(
                config_keys(base_data), os.path.join(out, "base"), [f"max_epoch={args.base_epochs}"]
            )
            run_jobs([("base", base_cmd, os.path.join(out, "base.log"))], 1, args.threads)
    else:
        base, vocab = os.path.abspath(args.base), os.path.abspath(args.base_vocab)
    target = make_synthetic_dataset(
        os.path.join(out, "data_target"),
        num_train_images=args.num_train,
        num_val_images=args.num_eval,
        num_test_images=args.num_eval,
        seed=1,
        style=args.style,
    )
    sets = make_imagecode_sample(
        os.path.join(out, "imagecode"), args.imagecode_sets, args.imagecode_sets, 3, 64, seed=1, style=args.style
    )
    # The target's words are the demo's (the same caption templates): the base's vocabulary reads them.
    keys = {**config_keys(target), "text_encoder": vocab, "pretrained": base}
    runs = {ZERO_SHOT: (os.path.join(out, ZERO_SHOT), train_command(keys, os.path.join(out, ZERO_SHOT), common, True))}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = os.path.join(out, run_name(method, seed))
            runs[run_name(method, seed)] = (
                run_dir,
                train_command(keys, run_dir, [*common, f"max_epoch={args.epochs}", f"seed={seed}", *METHODS[method]]),
            )
    if not args.report_only:
        existing = [name for name, (run_dir, _) in runs.items() if os.path.exists(run_dir)]
        if existing:
            sys.exit(
                f"{out} already holds runs ({', '.join(existing)}): pass --report-only to tabulate them, or another "
                "--out (a trained base there is reused)"
            )
        run_jobs([(name, cmd, run_dir + ".log") for name, (run_dir, cmd) in runs.items()], args.parallel, args.threads)
        scoring = []
        for name, (run_dir, _) in runs.items():
            checkpoint = base if name == ZERO_SHOT else os.path.join(run_dir, "checkpoint_best.pth")
            scoring.append(
                (
                    f"{name} imagecode",
                    imagecode_command(checkpoint, sets, vocab, run_dir + "_imagecode"),
                    run_dir + "_imagecode.log",
                )
            )
        run_jobs(scoring, args.parallel, args.threads)

    results = {}
    for name, (run_dir, _) in runs.items():
        results[name] = read_zero_shot(run_dir) if name == ZERO_SHOT else read_run(run_dir)
        if name != ZERO_SHOT:
            results[name]["trainable"] = trainable_parameters(run_dir)
        results[name]["imagecode"] = read_imagecode(run_dir + "_imagecode", sets["valid_file"])
    summary = summarise(results, args.methods, args.seeds)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "methods": METHODS, "summary": summary, "runs": results}, f, indent=1)
    write_table(summary, results, args, os.path.join(out, "results.md"))
    plot(summary, results, args, os.path.join(out, "peft_adapt.png"))
    with open(os.path.join(out, "results.md")) as f:
        print(f.read())
    return {"summary": summary, "runs": results}


if __name__ == "__main__":
    main()
