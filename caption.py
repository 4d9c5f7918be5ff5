"""Caption images with a BLIP captioner: beam search (official defaults), greedy or nucleus sampling.

    python caption.py --config configs/caption_coco.yaml --checkpoint SRC --images DIR_OR_FILES [...] \
        --output captions.json [--num-beams N --max-length N --min-length N --prompt TEXT --sample --top-p P
        --batch-size N] [--options key=value ...]

SRC: an official caption .pth (path or URL), a pre-trained one (model_base.pth carries the decoder), one of our
train_caption.py checkpoints, or a Hugging Face BlipForConditionalGeneration directory; default: the config's
`pretrained`. Folders are searched recursively for images. Writes `[{"image": "<path relative to DIR>", "caption":
"..."}]` (files given one by one are named as given). An unreadable image is reported and skipped; such images are
listed at the end and the exit status is then 1. The length limits count [DEC] and the prompt's tokens, as
transformers' max_length / min_length do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import test_transform
from data.captions import ImageFileDataset, collate_images, list_images
from engine.generation import GenerationSettings, generate
from models.caption_checkpoint import load_caption_model
from utils import UserError, autocast, init_distributed, load_config, log, run_cli, validate_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/caption_coco.yaml)")
    parser.add_argument("--checkpoint", default=None, help="weights; default: the config's `pretrained`")
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE", help="folders and/or image files")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--num-beams", type=int, default=None, help="beam width (config num_beams; 1 = greedy)")
    parser.add_argument("--max-length", type=int, default=None, help="config gen_max_length (prompt included)")
    parser.add_argument("--min-length", type=int, default=None, help="config gen_min_length (prompt included)")
    parser.add_argument("--prompt", default=None, help="config prompt (official 'a picture of ')")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling (repetition penalty 1.1, official)")
    parser.add_argument("--top-p", type=float, default=None, help="config top_p for --sample")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (config batch_size_test)")
    parser.add_argument("--seed", type=int, default=None, help="seed for --sample (config seed)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    """The config with the command-line generation flags applied over it (and checked again)."""
    config = load_config(args.config, args.options)
    flags = {
        "num_beams": args.num_beams,
        "gen_max_length": args.max_length,
        "gen_min_length": args.min_length,
        "prompt": args.prompt,  # set directly: a YAML override would strip the prompt's trailing space
        "top_p": args.top_p,
        "batch_size_test": args.batch_size,
        "seed": args.seed,
    }
    config.update({key: value for key, value in flags.items() if value is not None})
    if args.sample:
        config["sample"] = True
    return validate_config(config, "command line")


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    config = resolve_config(args)
    device = init_distributed(config["device"]).device
    paths, names = list_images(args.images)
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    if not source:
        log("warning: no --checkpoint and no `pretrained` in the config: captioning with random weights")
    model, _ = load_caption_model(config, source)
    model.to(device).eval()
    settings = GenerationSettings.from_config(config)
    torch.manual_seed(config["seed"])
    log(f"captioning {len(paths)} images on {device}: {settings}")
    loader = DataLoader(
        ImageFileDataset(paths, test_transform(config["image_size"])),
        batch_size=config["batch_size_test"],
        num_workers=config["num_workers"],
        collate_fn=collate_images,
    )
    captions: dict[int, str] = {}
    failed: list[tuple[str, str]] = []
    with tqdm(total=len(paths), desc="caption", unit="img", dynamic_ncols=True) as bar:
        for images, indices, errors in loader:
            for index, message in errors:
                tqdm.write(f"skipped {names[index]}: {message}", file=sys.stderr)
                failed.append((names[index], message))
            if images is not None:
                with autocast(device, config["eval_amp"], config["amp_cpu"]):
                    ids = generate(model, images.to(device), settings)
                captions.update(zip(indices, model.decode(ids), strict=True))
            bar.update(len(indices) + len(errors))
    results = [{"image": names[i], "caption": captions[i]} for i in sorted(captions)]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {len(results)} captions to {args.output}")
    if failed:
        listed = "\n".join(f"  {name}: {message}" for name, message in failed)
        raise UserError(
            f"{len(failed)} of {len(paths)} images could not be read (the other captions are in {args.output}):\n"
            + listed
        )
    return results


if __name__ == "__main__":
    run_cli(main)
