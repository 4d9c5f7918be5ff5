"""Merge a LoRA run's delta checkpoint into its base weights and write one ordinary checkpoint for export.

    python export_merged.py --config CFG --checkpoint OUTPUT_DIR/checkpoint_best.pth --output merged.pth

The delta is applied to its base (finetune.base, or the source recorded in the checkpoint, checked by SHA-256),
every LoRA update is folded into its weight (W + alpha / rank x B A), and the result is saved as {'model': state
dict with the official key names, 'config': the resolved config with finetune.method full}: it loads anywhere a
full checkpoint does (eval_retrieval.py --checkpoint, pretrained:, models/hf_blip.py export).
"""

from __future__ import annotations

import argparse

import utils
from configs.schema import load_config
from models.checkpoint import add_unsafe_trust_flag, apply_config_updates
from models.loading import load_model
from models.peft_methods import merge_lora
from utils import UserError, log, run_cli


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config of the run (architecture, tokenizer)")
    parser.add_argument("--checkpoint", required=True, help="a LoRA run's checkpoint_best.pth or checkpoint_last.pth")
    parser.add_argument("--output", required=True, help="where to write the merged checkpoint (.pth)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    add_unsafe_trust_flag(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.options, script="export_merged.py")
    utils.check_output_file(args.output, "--output")  # before the merge, not after it
    model, report = load_model(config, args.checkpoint, allow_unsafe=args.unsafe_trust_checkpoint)
    apply_config_updates(config, report)
    if getattr(model, "finetune", None) is None:
        raise UserError(f"{args.checkpoint} is not a parameter-efficient (delta) checkpoint; nothing to merge")
    merge_lora(model)
    config["finetune"] = {**config["finetune"], "method": "full", "base": ""}
    utils.atomic_save({"model": model.state_dict(), "config": config}, args.output)
    log(f"merged LoRA into the base weights: {args.output}")
    return args.output


if __name__ == "__main__":
    run_cli(main)
