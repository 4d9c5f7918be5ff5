"""IMAGECODE-style evaluation of any retrieval checkpoint: one description, 10 candidate images, accuracy.

    python eval_imagecode.py --config CFG --checkpoint CKPT --ann-file DATA/valid_data.json \
        --image-root DATA/image-sets [--scoring both|itm|itc|itm_prob] [--text-cleaning blip|albef] \
        [--output-dir DIR] [--options key=value ...]

--scoring and --text-cleaning default to the config keys imagecode_scoring (both) and imagecode_text_cleaning
(blip). ContextBLIP's zero-shot script ranks by the ITM softmax P(match) (itm_prob) of descriptions cleaned by
ALBEF's rule (albef) at 224 px with text length 30: configs/imagecode_contextblip.yaml sets all four.

Labelled files ({set: {index: description}}) give DIR/imagecode_metrics.json: accuracy overall, on video frames
and on static (open-images) sets. The unlabelled test file ({set: [description, ...]}) gives
DIR/imagecode_predictions.json in the leaderboard's format ({set: [index, ...]}); labelled files get one too.
The model comes from the config (architecture, tokenizer, image_size) and CKPT (any checkpoint eval_retrieval.py
takes, delta checkpoints of finetune.method runs included).
"""

from __future__ import annotations

import argparse
import os

from configs.schema import load_config, save_config
from data.imagecode import ImagecodeSet
from data.utils import TEXT_CLEANINGS
from engine.imagecode import SCORINGS, imagecode_accuracy, imagecode_predictions, imagecode_scores
from models.checkpoint import add_unsafe_trust_flag, apply_config_updates
from models.loading import load_model
from utils import atomic_write_json, check_output_dir, init_distributed, log, run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (architecture, tokenizer, image_size)")
    parser.add_argument("--checkpoint", default=None, help="default: the config's `pretrained`")
    parser.add_argument(
        "--ann-file", required=True, help="valid_data.json, train_data.json or test_data_unlabeled.json"
    )
    parser.add_argument("--image-root", required=True, help="the unzipped image-sets/ directory")
    parser.add_argument(
        "--scoring",
        default=None,
        choices=SCORINGS,
        help="both: ITM match logit + ITC cosine; itm: the logit; itc: the cosine; itm_prob: the ITM softmax P(match) "
        "(ContextBLIP); default: config imagecode_scoring",
    )
    parser.add_argument(
        "--text-cleaning",
        default=None,
        choices=tuple(TEXT_CLEANINGS),
        help="blip: BLIP's pre_caption; albef: ALBEF's rule (ContextBLIP); default: config imagecode_text_cleaning",
    )
    parser.add_argument("--output-dir", default="output/imagecode")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    add_unsafe_trust_flag(parser)
    args = parser.parse_args(argv)

    config = load_config(args.config, args.options, script="eval_imagecode.py")
    check_output_dir(args.output_dir, "--output-dir")  # before the scoring, not after it
    scoring = args.scoring or config["imagecode_scoring"]
    cleaning = args.text_cleaning or config["imagecode_text_cleaning"]
    config.update(imagecode_scoring=scoring, imagecode_text_cleaning=cleaning)  # what ran, in DIR/config.yaml
    info = init_distributed(config["device"])
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    model, report = load_model(config, source, allow_unsafe=args.unsafe_trust_checkpoint)
    apply_config_updates(config, report)
    model.to(info.device)
    dataset = ImagecodeSet(args.ann_file, args.image_root, config["image_size"], config["max_words"], cleaning)
    log(f"IMAGECODE {args.ann_file}: {len(dataset.set_names)} sets, {len(dataset.descriptions)} descriptions")
    scores = imagecode_scores(model, dataset, config, info.device, scoring)
    os.makedirs(args.output_dir, exist_ok=True)
    save_config(config, os.path.join(args.output_dir, "config.yaml"))
    predictions = imagecode_predictions(scores, dataset)
    atomic_write_json(os.path.join(args.output_dir, "imagecode_predictions.json"), predictions, indent=1)
    result = {"checkpoint": source, "scoring": scoring, "text_cleaning": cleaning}
    if dataset.labelled:
        result.update(imagecode_accuracy(scores, dataset))
        atomic_write_json(os.path.join(args.output_dir, "imagecode_metrics.json"), result, indent=1)

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        log(
            f"accuracy ({scoring}, {cleaning} text): all {fmt(result['accuracy'])}  "
            f"video {fmt(result['accuracy_video'])} "
            f"({result['num_video']})  static {fmt(result['accuracy_static'])} ({result['num_static']})"
        )
    return result


if __name__ == "__main__":
    run_cli(main)
