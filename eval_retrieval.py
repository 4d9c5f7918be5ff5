"""Evaluate a checkpoint for image-text retrieval: ITC similarity for every pair, ITM re-ranking of the top
k_test, R@1/5/10 both ways (engine/evaluation.py does the work).

    python eval_retrieval.py --config configs/retrieval_flickr.yaml --checkpoint CKPT [--split val|test]
        [--output-dir DIR] [--save-scores] [--options key=value ...]
    torchrun --nproc_per_node=8 eval_retrieval.py ...          (queries sharded across processes)

Writes DIR/config.yaml (resolved), DIR/metrics_<split>.json (recalls, ranks, the ITC-only metrics, timings) and
with --save-scores DIR/scores_<split>.npz (the exact i2t and t2i matrices behind the metrics, and the per-query
ranks) and DIR/index_<split>.json (image paths and captions, for compare_retrieval.py). `eval_mode: official` runs
the reference re-ranking instead of the fast one; `eval_amp: bf16` evaluates in bf16 (fp32, the official numerics,
by default). With `model: clip` (configs/clip_*.yaml) a CLIP model is ranked by ITC alone (models/clip.py); with
`model: blip2` (configs/blip2_retrieval_*.yaml) BLIP-2's first stage by its query-max ITC, re-ranked by its ITM head.
"""

from __future__ import annotations

import argparse
import os

from configs.schema import load_config, save_config
from data import create_dataset
from engine.evaluation import evaluate, model_info, write_eval_outputs
from engine.metrics import format_metrics_table
from models.checkpoint import add_unsafe_trust_flag, apply_config_updates
from models.clip import dataset_transform
from models.loading import load_model
from utils import check_output_dir, init_distributed, is_main_process, log, run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/retrieval_flickr.yaml)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="official .pth, http(s) URL, Hugging Face directory or our checkpoint; default: the config's `pretrained`",
    )
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--output-dir", default=None, help="default: output/eval_<config name>")
    parser.add_argument("--save-scores", action="store_true", help="also write scores_<split>.npz")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. k_test=64 eval_mode=official",
    )
    add_unsafe_trust_flag(parser)
    args = parser.parse_args(argv)

    config = load_config(args.config, args.options, script="eval_retrieval.py")
    output_dir = args.output_dir or os.path.join("output", "eval_" + os.path.splitext(os.path.basename(args.config))[0])
    check_output_dir(output_dir, "--output-dir")  # before the evaluation, not after it
    dist_info = init_distributed(config["device"])
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    if not source:
        log("warning: no --checkpoint and no `pretrained` in the config: evaluating randomly initialised weights")
    model, report = load_model(config, source, allow_unsafe=args.unsafe_trust_checkpoint)
    apply_config_updates(config, report)
    model.to(dist_info.device)
    dataset = create_dataset(config, args.split, dataset_transform(model, train=False))
    ranking = (
        "ranked by ITC cosine alone (no ITM head)"
        if not model.has_itm
        else f"k_test {config['k_test']}, eval_mode {config['eval_mode']}"
    )
    log(
        f"evaluating {args.split}: {len(dataset.image)} images, {len(dataset.text)} texts, {ranking}, "
        f"{dist_info.world_size} process(es) on {dist_info.device}"
    )
    result = evaluate(model, dataset, config, dist_info.device, desc=args.split)
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        save_config(config, os.path.join(output_dir, "config.yaml"))
        extra = {"checkpoint": source, "model_info": model_info(model, config)}
        write_eval_outputs(result, output_dir, args.split, args.save_scores, extra=extra, dataset=dataset)
        m = result.metrics
        print(format_metrics_table(m))
        print(
            f"median rank  TR {m['txt_medr']:.1f}  IR {m['img_medr']:.1f}   mean rank  TR {m['txt_meanr']:.1f}  "
            f"IR {m['img_meanr']:.1f}   R-Precision  TR {m['txt_rprec']:.1f}  IR {m['img_rprec']:.1f}"
        )
        print(
            f"time: text features {m['time_text_features']:.1f}s, image features {m['time_image_features']:.1f}s, "
            f"ITC {m['time_itc']:.2f}s, ITM re-rank {m['time_rerank']:.1f}s; metrics in "
            f"{os.path.join(output_dir, f'metrics_{args.split}.json')}"
        )
    return result.metrics


if __name__ == "__main__":
    run_cli(main)
