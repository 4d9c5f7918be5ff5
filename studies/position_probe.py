"""Does a retrieval checkpoint read where things are? Positions, not only colours and shapes.

    python -m studies.position_probe --config configs/demo.yaml --checkpoint demo_output/checkpoint_best.pth \
        --ann-file demo_data/annotations/synthetic_test.json --image-root demo_data/images [--out DIR] \
        [--options key=value ...]

Every caption that names a place of the 3x3 grid (data.synthetic LOCATIONS: "at the top left", "on the right
side", ...) is scored against its own image twice: as written, and with each place moved to a phrase of another
cell (a seeded draw), every other word kept. The report is the share of captions whose true version scores
higher, by ITC (cosine) and by ITM (match logit), ties counting half, with its binomial standard error. A model
that ignores positions scores 50%. Writes DIR/position_probe.json when --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.schema import load_config
from data.retrieval import DataError, load_annotation, load_image
from data.synthetic import LOCATIONS
from data.transforms import test_transform
from data.utils import pre_caption
from models.blip_retrieval import BlipRetrieval
from models.checkpoint import apply_config_updates
from models.loading import load_model
from utils import run_cli

PHRASE_CELL = {phrase: cell for cell, phrases in LOCATIONS.items() for phrase in phrases}
# Longest phrases first, so "at the top of the image" is not read as "at the top".
_PLACE = re.compile("|".join(re.escape(p) for p in sorted(PHRASE_CELL, key=len, reverse=True)))


def move_places(caption: str, rng: random.Random) -> str | None:
    """`caption` with every place phrase replaced by a phrase of another cell; None when it names no place."""
    if not _PLACE.search(caption):
        return None

    def elsewhere(match: re.Match) -> str:
        cell = PHRASE_CELL[match.group(0)]
        return rng.choice([phrase for phrase, other in PHRASE_CELL.items() if other != cell])

    return _PLACE.sub(elsewhere, caption)


@torch.no_grad()
def position_probe(
    model: BlipRetrieval, ann_file: str, image_root: str, config: dict, seed: int = 0
) -> dict[str, float | int]:
    """Share (percent) of place-naming captions whose true version beats the moved one, by ITC and by ITM, and its
    binomial standard error. Runs where the model is (the CPU for the command)."""
    model.eval()
    records = load_annotation(ann_file)
    rng = random.Random(seed)
    transform = test_transform(config["image_size"])
    wins = {"itc": 0.0, "itm": 0.0}
    count = 0
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        pairs = []
        for caption in captions:
            true = pre_caption(caption, config["max_words"])
            moved = move_places(true, rng)
            if moved is not None:
                pairs.append((true, moved))
        if not pairs:
            continue
        image_embeds, image_feat = model.encode_image(
            transform(load_image(os.path.join(image_root, record["image"])))[None]
        )
        texts = [text for pair in pairs for text in pair]  # true0, moved0, true1, moved1, ...
        ids, atts = model.tokenize(texts, pad_to_longest=True)
        itc = (model.encode_text(ids, atts) @ image_feat.t()).view(-1, 2)
        embeds = image_embeds.expand(len(texts), -1, -1)
        itm = model.itm_logits(model.with_enc_token(ids), atts, embeds)[:, 1].view(-1, 2)
        for name, scores in (("itc", itc), ("itm", itm)):
            wins[name] += float((scores[:, 0] > scores[:, 1]).sum() + 0.5 * (scores[:, 0] == scores[:, 1]).sum())
        count += len(pairs)
    if count == 0:
        raise DataError(f"{ann_file}: no caption names a place (data.synthetic LOCATIONS phrases), nothing to probe")
    result: dict[str, float | int] = {"captions": count}
    for name, won in wins.items():
        share = won / count
        result[f"{name}_true_wins"] = 100.0 * share
        result[f"{name}_se"] = 100.0 * (share * (1 - share) / count) ** 0.5
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", default=None, help="default: the config's `pretrained`")
    parser.add_argument("--ann-file", required=True, help="a retrieval JSON (train, val or test format)")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--seed", type=int, default=0, help="draws the moved places")
    parser.add_argument("--out", default=None, help="write position_probe.json here")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.options)
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    model, report = load_model(config, source)
    apply_config_updates(config, report)
    result = {
        "checkpoint": source,
        "ann_file": args.ann_file,
        **position_probe(model, args.ann_file, args.image_root, config, args.seed),
    }
    print(
        f"{result['captions']} captions naming places; the true one beats the moved one: "
        f"ITC {result['itc_true_wins']:.1f}% ± {result['itc_se']:.1f}, "
        f"ITM {result['itm_true_wins']:.1f}% ± {result['itm_se']:.1f} (50% = blind to positions)"
    )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "position_probe.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    run_cli(main)
