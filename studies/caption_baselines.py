"""Does a trained captioner describe its images? Its metrics beside three baselines, in one run, on one split.

    python -m studies.caption_baselines --config configs/demo_caption.yaml \
        --checkpoint demo_caption_output/checkpoint_best.pth [--split test] [--out FILE.json] [--options ...]

Rows, all scored by engine.caption_metrics against the same references:
- `trained`: the checkpoint's captions (the config's generation settings, beam search by default);
- `shuffled`: the same captions given to other images (a fixed random permutation): what fluent but unrelated
  captions score; the gap to `trained` is what the captions say about their own image;
- `untrained`: a randomly initialised model of the same architecture (seeded);
- `most_frequent`: the most frequent training caption (after pre_caption) for every image.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.schema import load_config
from data.captions import caption_references, create_caption_dataset
from data.retrieval import load_annotation
from data.utils import pre_caption
from engine.caption_metrics import caption_metrics, format_caption_metrics
from engine.captioning import caption_split
from models.caption_checkpoint import load_caption_model
from models.checkpoint import apply_config_updates
from utils import init_distributed, run_cli, set_seed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation and of the untrained model")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.options)
    device = init_distributed(config["device"]).device
    dataset = create_caption_dataset(config, args.split)
    references = caption_references(config, args.split, dataset)

    def score(captions: list[str]) -> dict:
        return caption_metrics(dict(zip(dataset.keys, captions, strict=True)), references)

    rows = {}
    model, report = load_caption_model(config, args.checkpoint)
    apply_config_updates(config, report)
    trained = caption_split(model.to(device), dataset, config, device, "trained")
    rows["trained"] = score(trained)
    order = list(range(len(trained)))
    random.Random(args.seed).shuffle(order)
    rows["shuffled"] = score([trained[i] for i in order])
    set_seed(args.seed)
    untrained, _ = load_caption_model(config, None)
    rows["untrained"] = score(caption_split(untrained.to(device), dataset, config, device, "untrained"))
    train_file = config["train_file"] if config["dataset"] == "custom" else None
    if train_file:
        counts = Counter(pre_caption(r["caption"], config["max_words"]) for r in load_annotation(train_file))
        rows["most_frequent"] = score([counts.most_common(1)[0][0]] * len(trained))
    for name, metrics in rows.items():
        print(f"{name:>14}: {format_caption_metrics(metrics)}")
    examples = [
        {"image": dataset.keys[i], "trained": trained[i], "references": references[dataset.keys[i]][:2]}
        for i in range(3)
    ]
    print(json.dumps(examples, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "examples": examples}, f, indent=1)
    return rows


if __name__ == "__main__":
    run_cli(main)
