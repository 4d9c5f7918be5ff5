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

CapFilt (`--filter --filter-checkpoint RETRIEVAL_SRC [--filter-config CFG] [--threshold 0.5] [--existing ANN]
[--beam-search]`), as in the BLIP paper (sections 3.3 and 4.3): the captioner writes one synthetic caption per
image by nucleus sampling (top_p 0.9, repetition penalty 1.1, seeded by --seed; --beam-search: beam search instead).
That caption, and each caption of --existing (the web captions, retrieval train format, images named like ours), is
scored with the retrieval model's ITM head; every pair with P(match) above the threshold is kept (0.5: the pairs
the ITM head calls a match, the paper's filter), so an image keeps 0 or 1 synthetic caption plus its existing
captions that pass. They are written to --output in the retrieval training format `{"image", "caption",
"image_id", "itm", "source"}`, ready for `dataset: custom` (`train_file`, with `image_root` the folder the names are
relative to: --image-root).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs.schema import load_config, validate_config
from data import test_transform
from data.captions import ImageFileDataset, collate_images, list_images
from data.retrieval import DataError, load_annotation, load_image
from data.utils import pre_caption
from engine.captioning import itm_match_probability
from engine.generation import GenerationSettings, generate
from models.caption_checkpoint import load_caption_model
from models.checkpoint import add_unsafe_trust_flag, apply_config_updates
from models.loading import load_model
from utils import UserError, atomic_write_json, autocast, check_output_file, init_distributed, log, run_cli


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
    parser.add_argument("--image-root", default=None, help="name images relative to this folder (default: DIR)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    capfilt = parser.add_argument_group("CapFilt: keep the (image, caption) pairs a retrieval model's ITM accepts")
    capfilt.add_argument(
        "--filter",
        action="store_true",
        help="CapFilt: one caption per image by nucleus sampling (BLIP section 4.3), then keep every generated and "
        "--existing pair whose ITM P(match) > --threshold; written in the retrieval train format",
    )
    capfilt.add_argument(
        "--beam-search",
        action="store_true",
        help="with --filter: caption by beam search (config num_beams) instead of nucleus sampling",
    )
    capfilt.add_argument("--filter-checkpoint", default=None, help="retrieval checkpoint whose ITM head filters")
    capfilt.add_argument("--filter-config", default=None, help="the retrieval model's config (default: --config)")
    capfilt.add_argument("--threshold", type=float, default=0.5, help="keep pairs with ITM P(match) above this")
    capfilt.add_argument("--existing", default=None, help="retrieval-format JSON of existing captions to filter too")
    add_unsafe_trust_flag(parser)
    args = parser.parse_args(argv)
    if args.filter and not args.filter_checkpoint:
        parser.error("--filter needs --filter-checkpoint (a retrieval checkpoint with an ITM head)")
    if args.beam_search and not args.filter:
        parser.error("--beam-search only applies to --filter (plain captioning uses beam search unless --sample)")
    if args.beam_search and args.sample:
        parser.error("--beam-search and --sample contradict each other; give one")
    if not 0.0 <= args.threshold < 1.0:
        parser.error(f"--threshold must be in [0, 1), got {args.threshold}")
    return args


def resolve_config(args: argparse.Namespace) -> dict:
    """The config with the command-line generation flags applied over it (and checked again)."""
    config = load_config(args.config, args.options, script="caption.py")
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
    if args.filter:  # CapFilt samples (BLIP section 4.3: more diverse captions train a better model than beam search)
        config["sample"] = not args.beam_search
    return validate_config(config, "command line")


@torch.no_grad()
def filter_pairs(
    args: argparse.Namespace,
    results: list[dict],
    path_of: dict[str, str],
    device,
    unreadable: frozenset[str] = frozenset(),
) -> list[dict]:
    """CapFilt: score every generated (and --existing) pair with the retrieval model's ITM head and keep those
    above --threshold, as retrieval training records {image, caption, image_id, itm, source}. --existing pairs of
    the `unreadable` images (already reported by the captioning) are left out."""
    # The filter is a retrieval model: --filter-config is a retrieval config; without it the caption config's
    # model keys build it.
    config = (
        load_config(args.filter_config, script="eval_retrieval.py") if args.filter_config else load_config(args.config)
    )
    model, report = load_model(config, args.filter_checkpoint, allow_unsafe=args.unsafe_trust_checkpoint)
    apply_config_updates(config, report)
    model.to(device).eval()
    pairs = [(r["image"], r["caption"], "generated") for r in results]
    if args.existing:
        for i, rec in enumerate(load_annotation(args.existing)):
            if not isinstance(rec.get("image"), str) or not isinstance(rec.get("caption"), str):
                raise DataError(
                    f"{args.existing}: record {i} needs string 'image' and 'caption' (retrieval train format)"
                )
            if rec["image"] not in path_of:
                raise DataError(
                    f"{args.existing}: record {i} names image {rec['image']!r}, which is not among the captioned "
                    f"images (names are relative to --image-root or to the folder given to --images)"
                )
            if rec["image"] not in unreadable:
                pairs.append((rec["image"], rec["caption"], "existing"))
    transform = test_transform(config["image_size"])
    kept, batch = [], config["batch_size_test"]
    for start in tqdm(range(0, len(pairs), batch), desc="filter (ITM)", unit="batch", dynamic_ncols=True):
        chunk = pairs[start : start + batch]
        images = torch.stack([transform(load_image(path_of[name])) for name, _, _ in chunk]).to(device)
        texts = [pre_caption(caption, config["max_words"]) for _, caption, _ in chunk]
        probs = itm_match_probability(model, images, texts).tolist()
        for (name, caption, source), p in zip(chunk, probs, strict=True):
            if p > args.threshold:
                kept.append({"image": name, "caption": caption, "image_id": name, "itm": p, "source": source})
    by_source = {s: sum(r["source"] == s for r in kept) for s in ("generated", "existing")}
    log(f"CapFilt kept {len(kept)} of {len(pairs)} pairs with ITM P(match) > {args.threshold} ({by_source})")
    if not kept:
        raise UserError(f"no pair passed the ITM threshold {args.threshold}; lower --threshold")
    return kept


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    config = resolve_config(args)
    check_output_file(args.output, "--output")  # before the captioning, not after it
    device = init_distributed(config["device"]).device
    paths, names = list_images(args.images, args.image_root)
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    if not source:
        log("warning: no --checkpoint and no `pretrained` in the config: captioning with random weights")
    model, report = load_caption_model(config, source, allow_unsafe=args.unsafe_trust_checkpoint)
    apply_config_updates(config, report)
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
    if args.filter:
        path_of = dict(zip(names, paths, strict=True))
        results = filter_pairs(args, results, path_of, device, frozenset(name for name, _ in failed))
    atomic_write_json(args.output, results, indent=1)
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
