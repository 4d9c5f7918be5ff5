"""Compare retrieval evaluations side by side: a metrics table, recall@K curves and rank histograms (PNG), text->image
R@1 per caption phenomenon, and an HTML gallery of the worst text->image queries (engine/report.py does the work).

    python compare_retrieval.py RUN_DIR [RUN_DIR ...] --output-dir DIR [--names NAME ...] [--split test]
        [--num-failures 20]

Each RUN_DIR is an eval_retrieval.py output directory written with --save-scores (metrics_<split>.json,
scores_<split>.npz, index_<split>.json); all must come from the same split of the same dataset. Writes DIR/metrics.md,
DIR/phenomena.md, DIR/recall_curves.png, DIR/rank_histograms.png, DIR/failure_gallery.html and DIR/summary.json.
"""

from __future__ import annotations

import argparse

from engine.report import load_run, write_report
from utils import UserError, check_output_dir, run_cli


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="eval_retrieval.py --save-scores output directories")
    parser.add_argument("--output-dir", required=True, help="where the report files go")
    parser.add_argument("--names", nargs="+", default=None, help="one label per run (default: the model's name)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--num-failures", type=int, default=20, help="worst text->image queries shown per run")
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        raise UserError(f"--names gives {len(args.names)} names for {len(args.runs)} runs; give one per run")
    check_output_dir(args.output_dir, "--output-dir")
    names = args.names or [None] * len(args.runs)
    runs = [load_run(path, args.split, name) for path, name in zip(args.runs, names, strict=True)]
    files = write_report(runs, args.output_dir, args.num_failures)
    with open(files["table"]) as f:
        print(f.read())
    with open(files["phenomena"]) as f:
        print(f.read())
    print("\n".join(f"{what}: {path}" for what, path in files.items()))
    return files


if __name__ == "__main__":
    run_cli(main)
