"""`load_model`: which loader a model source needs, for the retrieval model (BLIP or CLIP).

Sources understood by `load_model`:
- official BLIP `.pth` files (pre-trained or retrieval fine-tuned, base or large), local or http(s) URL;
- our own training checkpoints (`{'model': ..., 'optimizer': ..., 'config': ..., 'epoch': ...}`, same keys);
- a raw state dict (official key names, or Hugging Face names, which are converted);
- a Hugging Face `BlipForImageTextRetrieval` directory (config.json + model.safetensors / pytorch_model.bin +
  tokenizer files): the architecture and the tokenizer come from the directory (models/hf_blip.py);
- a parameter-efficient run's delta checkpoint: its recorded base, then the method and its trained tensors
  (models/peft_methods.py);
- with `model: clip`, whatever models/clip.py loads.

This module sits above the load-report layer (models/checkpoint.py) and the loaders built on it (hf_blip,
peft_methods, clip); none of them imports it. Loaders never change the config they are given: what a load implies
for the config (an HF directory's architecture, a delta checkpoint's finetune settings, CLIP's image size) is
returned in `LoadReport.config_updates`, and scripts apply it with `models.checkpoint.apply_config_updates`.
"""

from __future__ import annotations

import os
import re

from configs.schema import check_finetune
from models.blip2 import Blip2Retrieval, load_blip2_model
from models.blip_retrieval import BlipRetrieval, build_model
from models.checkpoint import (
    CheckpointError,
    LoadReport,
    _extract_state_dict,
    is_url,
    load_checkpoint,
    load_state_dict_checked,
    read_checkpoint,
)
from models.clip import ClipRetrieval, load_clip_model
from models.hf_blip import load_hf_directory
from models.peft_methods import apply_finetune, is_delta_checkpoint, load_delta, parameter_counts
from utils import log


def load_model(
    config: dict, source: str | None = None, cache_dir: str | None = None, allow_unsafe: bool = False
) -> tuple[BlipRetrieval | ClipRetrieval | Blip2Retrieval, LoadReport | None]:
    """Build the retrieval model for `config` and load `source` into it (the entry point of train and eval).

    With `model: clip` the CLIP loader does it all (models/clip.py load_clip_model; None / '' = `pretrained`), and
    the report carries only the config updates; with `model: blip2` the BLIP-2 one (models/blip2.py).
    `source`: an HF directory (architecture and tokenizer from it; see
    load_hf_directory), a .pth path or http(s) URL (model from `config`, then load_checkpoint), or None / '' for a
    randomly initialised model (report None). `config` is not changed; apply `report.config_updates` with
    `apply_config_updates`. `allow_unsafe`: the user's `--unsafe-trust-checkpoint` (never passed on to the base of
    a delta checkpoint).
    """
    if config["model"] == "clip":  # a CLIP dual encoder: its own sources and loader (models/clip.py)
        model = load_clip_model(config, source or None, allow_unsafe=allow_unsafe)
        label = source or config["pretrained"] or f"CLIP {model.identity['name']} (random init)"
        return model, LoadReport(source=label, config_updates={"image_size": model.image_size})
    if config["model"] == "blip2":  # BLIP-2 first stage: HF directories, LAVIS and our .pth (models/blip2.py)
        return load_blip2_model(config, source or None, allow_unsafe=allow_unsafe)
    if not source:
        return build_model(config), None
    if is_url(source):
        model = build_model(config)
        return model, load_checkpoint(model, source, cache_dir, allow_unsafe)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return load_hf_directory(path, config)
    if not os.path.isfile(path):
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            hint = (
                f"; if this is a Hugging Face hub id, download it first (e.g. `huggingface-cli download {source} "
                f"--local-dir DIR`) and pass DIR"
            )
        raise CheckpointError(f"checkpoint not found: {source!r} (no such file or directory){hint}")
    obj = read_checkpoint(path, cache_dir, allow_unsafe)
    if is_delta_checkpoint(obj):  # a parameter-efficient run's checkpoint: its base, then its trainable part
        return load_delta_checkpoint(config, obj, path)
    model = build_model(config)
    report = load_state_dict_checked(model, _extract_state_dict(obj, path), path)
    log(report.summary())
    return model, report


def load_delta_checkpoint(config: dict, ckpt: dict, source: str) -> tuple[BlipRetrieval, LoadReport]:
    """Build base + delta from a delta checkpoint (what load_model does with one).

    The method's settings come from the checkpoint, the base from finetune.base or the recorded source; the base
    is always read with the safe loader (a delta checkpoint someone hands you must not be able to point at a file
    that runs code). The report is the base's (None for a random base becomes an empty one) with
    `config_updates['finetune']` set to the checkpoint's method settings, plus the base's own updates.
    """
    # Merged over today's defaults and checked: a key added after the checkpoint was written (e.g. adapter.gate)
    # takes its default, which is the behaviour the checkpoint was trained with.
    stored = check_finetune(ckpt["finetune"]["config"], f"in checkpoint {source}")
    finetune = {**stored, "base": config["finetune"]["base"]}
    base = config["finetune"]["base"] or ckpt["finetune"]["base"]["source"]
    if base and not os.path.exists(os.path.expanduser(base)) and "://" not in base:
        raise CheckpointError(
            f"{source}: its base checkpoint {base!r} does not exist here; pass the base with "
            "--options finetune.base=PATH"
        )
    model, report = load_model({**config, "finetune": finetune}, base or None, allow_unsafe=False)
    if getattr(model, "finetune", None) is not None:
        raise CheckpointError(f"{source}: its base {base!r} is itself a delta checkpoint; use the original base")
    report = report or LoadReport(source=base or "(random init)")
    report.config_updates = {**report.config_updates, "finetune": finetune}
    apply_finetune(model, {**config, "finetune": finetune}, base)
    load_delta(model, ckpt, source)
    counts = parameter_counts(model)
    log(
        f"{source}: {finetune['method']} delta ({counts['trainable']:,} trainable parameters) applied "
        f"to base {base or '(random init)'}"
    )
    return model, report
