"""Checkpoint loading and Hugging Face export for the caption model (BlipCaption).

Sources understood by `load_caption_model` (the same reading rules as retrieval, models/checkpoint.py):
- official caption checkpoints (`model_base_caption_capfilt_large.pth`, `model_large_caption.pth`): visual_encoder.*
  and text_decoder.*;
- official pre-trained checkpoints (`model_base.pth`, ...): also text_encoder.*, momentum copies, queues and the
  ITC/ITM heads, reported as expected and ignored;
- our own train_caption.py checkpoints, and raw state dicts under official or Hugging Face names;
- a Hugging Face `BlipForConditionalGeneration` directory: architecture and tokenizer from the directory.
Every load produces a LoadReport (loaded / expected / missing / unexpected / mismatched, each with its reason); a
shape mismatch, or a checkpoint that leaves most of the model untouched (a retrieval checkpoint has no decoder),
is a CheckpointError that says what the checkpoint looks like.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from configs.schema import DEFAULT_CONFIG
from models.blip_caption import BlipCaption, build_caption_model
from models.blip_retrieval import init_tokenizer
from models.checkpoint import (
    CheckpointError,
    LoadReport,
    _extract_state_dict,
    _normalise_keys,
    _resize_pos_embeds,
    is_url,
    read_checkpoint,
)
from models.hf_blip import (
    HF_CONFIG,
    _architecture_config,
    _hf_config_dict,
    _read_hf_weights,
    is_hf_directory,
    write_preprocessor_config,
)
from models.hf_keys import official_to_hf_state_dict
from utils import atomic_write, atomic_write_json, log

# Parts of pre-trained / retrieval checkpoints that captioning does not use.
_NOT_FOR_CAPTIONING = (
    "text_encoder.",
    "text_encoder_m.",
    "visual_encoder_m.",
    "vision_proj.",
    "vision_proj_m.",
    "text_proj.",
    "text_proj_m.",
    "itm_head.",
)
_NOT_FOR_CAPTIONING_EXACT = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp")
# Tied pairs: the model holds one tensor under two names; a checkpoint may carry either.
_TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
    "text_decoder.cls.predictions.bias": "text_decoder.cls.predictions.decoder.bias",
}


def _caption_hint(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> str:
    if not any(k.startswith("text_decoder.") for k in state):
        if any(k.startswith("text_encoder.") for k in state):
            return (
                "it has no text_decoder.* keys: it looks like a retrieval (ITC/ITM) checkpoint, which cannot caption; "
                "use a caption checkpoint (model_base_caption_capfilt_large.pth) or a pre-trained one (model_base.pth)"
            )
        return f"it has no text_decoder.* keys, so it is not a BLIP caption checkpoint (first keys: {list(state)[:3]})"
    patch = state.get("visual_encoder.patch_embed.proj.weight")
    model_patch = model_state["visual_encoder.patch_embed.proj.weight"]
    if patch is not None and patch.shape != model_patch.shape:
        named = "vit: large" if patch.shape[0] == 1024 else "vit: base" if patch.shape[0] == 768 else "a vit mapping"
        return f"its ViT is {patch.shape[0]} wide (model: {model_patch.shape[0]}); set {named}"
    words = state.get("text_decoder.bert.embeddings.word_embeddings.weight")
    model_words = model_state["text_decoder.bert.embeddings.word_embeddings.weight"]
    if words is not None and words.shape != model_words.shape:
        return (
            f"its decoder embeddings are {tuple(words.shape)} (model: {tuple(model_words.shape)}); check med_config "
            f"(hidden_size, vocab_size 30524 for bert-base-uncased + [DEC], [ENC]) and text_encoder"
        )
    return "check that the config describes the same architecture"


def load_caption_state_dict(
    model: BlipCaption, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> LoadReport:
    """Load `state` (official, our or Hugging Face key names) into the caption model, classifying every key."""
    report = LoadReport(source=source)
    model_state = model.state_dict()
    report.num_model_tensors = len(model_state)
    state = _normalise_keys(state, report)
    _resize_pos_embeds(state, model_state, report)
    to_load: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in state.items():
        if key not in model_state:
            if key.startswith(_NOT_FOR_CAPTIONING) or key in _NOT_FOR_CAPTIONING_EXACT:
                report.expected_unexpected[key] = "retrieval / pre-training part; captioning does not use it"
            else:
                report.unexpected.append(key)
        elif value.shape != model_state[key].shape:
            mismatched.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        else:
            to_load[key] = value
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:5])
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors have a different shape than in the model: {shown}. "
            f"Hint: {_caption_hint(state, model_state)}."
        )
    params = {k: p.numel() for k, p in model.named_parameters()}
    loaded = sum(n for k, n in params.items() if k in to_load or _TIED.get(k) in to_load)
    # A checkpoint without the decoder (retrieval) cannot caption, however much of the ViT it fills.
    if loaded < 0.5 * sum(params.values()) or not any(k.startswith("text_decoder.") for k in to_load):
        raise CheckpointError(
            f"{source}: only {loaded / max(sum(params.values()), 1):.0%} of the caption model's parameters are in "
            f"the checkpoint. Hint: {_caption_hint(state, model_state)}."
        )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded = sorted(to_load)
    for key in model_state:
        if key in to_load:
            continue
        if key.endswith("embeddings.position_ids"):
            report.expected_missing[key] = "constant buffer arange(max_position_embeddings): nothing is lost"
        elif _TIED.get(key) in to_load:
            report.expected_missing[key] = f"tied to {_TIED[key]}, which was loaded"
        else:
            report.missing.append(key)
    return report


def _load_hf_caption_directory(path: str, config: dict) -> tuple[BlipCaption, LoadReport]:
    """A transformers BlipForConditionalGeneration directory: architecture and tokenizer from it."""
    from transformers import BlipConfig

    try:
        hf_config = BlipConfig.from_pretrained(path)
    except Exception as err:  # a malformed config.json fails in many ways
        raise CheckpointError(f"{path}/{HF_CONFIG} is not a BLIP config: {err}") from None
    archs = getattr(hf_config, "architectures", None) or []
    if archs and "BlipForConditionalGeneration" not in archs:
        log(f"warning: {path} holds {archs}, not BlipForConditionalGeneration; loading what matches")
    updates = _architecture_config(path, hf_config)
    updates.pop("embed_dim")  # the caption model has no ITC projection
    tokenizer = init_tokenizer(path)
    model = build_caption_model({**config, **updates}, tokenizer)
    report = load_caption_state_dict(model, _read_hf_weights(path), path)
    report.config_updates = updates
    report.notes.append(f"architecture and tokenizer from {path} ([DEC] id {model.bos_token_id})")
    return model, report


def load_caption_model(
    config: dict, source: str | None = None, allow_unsafe: bool = False
) -> tuple[BlipCaption, LoadReport | None]:
    """Build the caption model for `config` and load `source` into it; the report is logged.

    `source`: a .pth path or URL, a Hugging Face directory (its architecture keys are returned in
    `report.config_updates`; apply them with `models.checkpoint.apply_config_updates`), or None / '' for random
    weights (report None). `config` is not changed. `allow_unsafe`: the user's `--unsafe-trust-checkpoint`.
    """
    if not source:
        return build_caption_model(config), None
    path = os.path.expanduser(source)
    if not is_url(source) and os.path.isdir(path):
        if not is_hf_directory(path):
            raise CheckpointError(
                f"{source} is a directory but not a Hugging Face BLIP directory (config.json + model.safetensors "
                f"or pytorch_model.bin)"
            )
        model, report = _load_hf_caption_directory(path, {**DEFAULT_CONFIG, **config})
    else:
        model = build_caption_model(config)
        obj = read_checkpoint(source, allow_unsafe=allow_unsafe)
        report = load_caption_state_dict(model, _extract_state_dict(obj, source), source)
    log(report.summary())
    return model, report


def export_hf_caption_directory(model: BlipCaption, out_dir: str) -> str:
    """Write `model` as a transformers BlipForConditionalGeneration directory (weights, config, tokenizer,
    preprocessor); returns out_dir."""
    from safetensors.torch import save

    os.makedirs(out_dir, exist_ok=True)
    official = model.state_dict()
    state = official_to_hf_state_dict({k: v for k, v in official.items() if k.startswith("visual_encoder.")})
    for key, value in official.items():  # the decoder keeps its official names in transformers
        if key.startswith("text_decoder.") and not key.endswith("position_ids"):
            state[key] = value
    # clone: tied tensors share storage, which safetensors refuses to write twice.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(save(tensors, {"format": "pt"})))
    hf_config = _hf_config_dict(model)
    hf_config["architectures"] = ["BlipForConditionalGeneration"]
    atomic_write_json(os.path.join(out_dir, HF_CONFIG), hf_config, indent=2)
    model.tokenizer.save_pretrained(out_dir)
    write_preprocessor_config(out_dir, model.visual_encoder.image_size)
    log(f"exported Hugging Face BlipForConditionalGeneration to {out_dir} ({len(state)} tensors)")
    return out_dir
