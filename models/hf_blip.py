"""Hugging Face `BlipForImageTextRetrieval` directories: loading one, exporting one.

A transformers BLIP retrieval directory holds config.json, model.safetensors or pytorch_model.bin (possibly
sharded) and the tokenizer files. Loading one takes the architecture and the tokenizer from the directory, builds
the model with `build_model`, and loads the converted weights (key names: models/hf_keys.py) through
`models.checkpoint.load_state_dict_checked`, so the same key report and errors apply as for official `.pth` files.
A `pytorch_model.bin` is read with `models.checkpoint.safe_torch_load`: tensors only, never full unpickling.
Exporting writes such a directory (safetensors weights).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from configs.schema import DEFAULT_CONFIG
from models.blip_retrieval import BlipRetrieval, build_model, init_tokenizer
from models.checkpoint import CheckpointError, LoadReport, load_state_dict_checked, safe_torch_load
from models.hf_keys import hf_to_official_state_dict, official_to_hf_state_dict
from models.vit import VIT_SIZES
from utils import atomic_write, atomic_write_json, log

if TYPE_CHECKING:  # transformers is imported only when a directory is read (it is slow to import)
    from transformers import BlipConfig, BlipVisionConfig

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# The official constants carried by med_config.json; Hugging Face BLIP configs store dropout 0 (inference only),
# so a model built from an HF directory keeps these for fine-tuning.
_OFFICIAL_TEXT_DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------------------------------


def _hf_missing_files(path: str) -> list[str]:
    missing = []
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        missing.append(HF_CONFIG)
    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS):
        missing.append(" or ".join(HF_WEIGHTS[::2]))
    return missing


def is_hf_directory(path: str) -> bool:
    """True for a directory holding config.json and HF weights (model.safetensors or pytorch_model.bin)."""
    return os.path.isdir(path) and not _hf_missing_files(path)


def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """The directory's state dict, under HF names (a sharded save is read shard by shard and merged)."""
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):  # sharded save: load every shard the index names
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = os.path.join(path, shard)
                state.update(safe_torch_load(shard_path) if single else load_file(shard_path))
            return state
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    return safe_torch_load(os.path.join(path, "pytorch_model.bin"))


def _vit_from_hf(vision: BlipVisionConfig) -> str | dict:
    """Our `vit` config value for HF's vision config: 'base' / 'large' when it is an official size, else a mapping."""
    spec = {
        "width": vision.hidden_size,
        "depth": vision.num_hidden_layers,
        "heads": vision.num_attention_heads,
        "patch_size": vision.patch_size,
    }
    for name, size in VIT_SIZES.items():
        if all(size[k] == v for k, v in spec.items()) and vision.intermediate_size == 4 * vision.hidden_size:
            return name  # the official sizes, which also bring the official drop-path default
    if vision.intermediate_size != 4 * vision.hidden_size:
        spec["mlp_ratio"] = vision.intermediate_size / vision.hidden_size
    return spec


def _read_hf_config(path: str) -> BlipConfig:
    """The directory's transformers BlipConfig, after checking that the directory is complete and supported."""
    from transformers import BlipConfig

    if not os.path.isdir(path):
        raise CheckpointError(f"Hugging Face directory not found: {path!r}")
    missing = _hf_missing_files(path)
    if missing:
        raise CheckpointError(
            f"{path} is not a Hugging Face BlipForImageTextRetrieval directory: missing {' and '.join(missing)}"
        )
    try:
        hf_config = BlipConfig.from_pretrained(path)
    except Exception as err:  # a malformed config.json can fail in many ways
        raise CheckpointError(f"{path}/{HF_CONFIG} is not a BLIP config: {err}") from None
    archs = getattr(hf_config, "architectures", None) or []
    if archs and "BlipForImageTextRetrieval" not in archs:
        log(f"warning: {path} holds {archs}, not BlipForImageTextRetrieval; loading what matches")
    if hf_config.vision_config.hidden_act != "gelu":  # the text activation is checked when the model is built
        raise CheckpointError(
            f"{path}: vision hidden_act {hf_config.vision_config.hidden_act!r} is not supported "
            f"(the BLIP ViT uses exact gelu)"
        )
    return hf_config


def _architecture_config(path: str, hf_config: BlipConfig) -> dict:
    """The config keys that describe the directory's architecture, in our config's terms (see configs/schema.py).

    HF's vision LayerNorm eps (1e-5) differs from the official 1e-6, so the directory's value is carried over.
    """
    vision, text = hf_config.vision_config, hf_config.text_config
    med_config = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "intermediate_size": text.intermediate_size,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "layer_norm_eps": text.layer_norm_eps,
        "pad_token_id": text.pad_token_id if text.pad_token_id is not None else 0,
        **_OFFICIAL_TEXT_DROPOUT,
    }
    return {
        "vit": _vit_from_hf(vision),
        "image_size": vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0],
        "embed_dim": hf_config.image_text_hidden_size,
        "text_encoder": path,
        "vit_layer_norm_eps": vision.layer_norm_eps,
        "med_config": med_config,
    }


def load_hf_directory(path: str, config: dict | None = None) -> tuple[BlipRetrieval, LoadReport]:
    """Build a BlipRetrieval from a transformers BlipForImageTextRetrieval directory and load its weights.

    Architecture (widths, depths, heads, patch and image size, vocabulary, activation, LayerNorm eps) and tokenizer
    come from the directory and replace those keys of `config` (see `_architecture_config`); the other keys
    (queue_size, momentum, negative_all_rank, vit_grad_ckpt, vit_ckpt_layer, drop_path_rate, max_length) are used
    as given. The architecture keys are returned in `report.config_updates`. The momentum encoders are copies of
    the main ones; `temp` stays 0.07.
    """
    config = {**DEFAULT_CONFIG, **(config or {})}
    hf_config = _read_hf_config(path)
    text_vocab = hf_config.text_config.vocab_size
    tokenizer = init_tokenizer(path)  # adds [DEC] / [ENC] only when the directory's tokenizer lacks them
    if len(tokenizer) > text_vocab:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens (with [DEC] and [ENC]) but the "
            f"text model only {text_vocab} embeddings"
        )
    updates = _architecture_config(path, hf_config)
    model = build_model({**config, **updates}, tokenizer)
    report = load_state_dict_checked(model, hf_to_official_state_dict(_read_hf_weights(path)), path)
    report.config_updates = updates
    if config["image_size"] != updates["image_size"]:
        report.notes.append(
            f"image_size {updates['image_size']} from the directory (config had "
            f"{config['image_size']}); the data transforms must use {updates['image_size']}"
        )
    report.notes.append(
        f"architecture and tokenizer from {path} ([ENC] id {tokenizer.enc_token_id}, vocab "
        f"{text_vocab}, vision LayerNorm eps {updates['vit_layer_norm_eps']:g})"
    )
    log(report.summary())
    return model, report


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def _hf_config_dict(model: BlipRetrieval) -> dict:
    """transformers' BlipConfig (as a config.json mapping) describing `model`."""
    vit = model.visual_encoder
    med = model.med_config
    tok = model.tokenizer
    width = vit.embed_dim
    # Caption models have no ITC projection; transformers' default projection size then fills the field.
    embed_dim = model.vision_proj.out_features if hasattr(model, "vision_proj") else 256
    first_block = vit.blocks[0]
    dec_id = tok.convert_tokens_to_ids("[DEC]")
    return {
        "architectures": ["BlipForImageTextRetrieval"],
        "model_type": "blip",
        "image_text_hidden_size": embed_dim,
        "projection_dim": embed_dim,
        "vision_config": {
            "model_type": "blip_vision_model",
            "hidden_size": width,
            "intermediate_size": first_block.mlp.fc1.out_features,
            "num_hidden_layers": len(vit.blocks),
            "num_attention_heads": first_block.attn.num_heads,
            "image_size": vit.image_size,
            "patch_size": vit.patch_embed.proj.kernel_size[0],
            "hidden_act": "gelu",
            "layer_norm_eps": vit.norm.eps,  # 1e-6 for official models; written so HF computes the same
            "attention_dropout": 0.0,
        },
        "text_config": {
            "model_type": "blip_text_model",
            "vocab_size": med.vocab_size,
            "hidden_size": med.hidden_size,
            "encoder_hidden_size": width,
            "intermediate_size": med.intermediate_size,
            "num_hidden_layers": med.num_hidden_layers,
            "num_attention_heads": med.num_attention_heads,
            "max_position_embeddings": med.max_position_embeddings,
            "hidden_act": med.hidden_act,
            "layer_norm_eps": med.layer_norm_eps,
            "hidden_dropout_prob": med.hidden_dropout_prob,
            "attention_probs_dropout_prob": med.attention_probs_dropout_prob,
            "initializer_range": med.initializer_range,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": dec_id,
            "sep_token_id": tok.sep_token_id,
            "eos_token_id": tok.sep_token_id,
            "is_decoder": True,  # HF builds the cross-attention layers only when this is set
            "projection_dim": embed_dim,
        },
    }


def write_preprocessor_config(out_dir: str, size: int) -> None:
    """preprocessor_config.json for transformers' BlipProcessor: CLIP mean/std, square bicubic resize."""
    preprocessor = {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "BlipProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    atomic_write_json(os.path.join(out_dir, "preprocessor_config.json"), preprocessor, indent=2)


def export_hf_directory(model: BlipRetrieval, out_dir: str) -> str:
    """Write `model` as a transformers BlipForImageTextRetrieval directory; returns out_dir.

    Files: config.json, model.safetensors, the tokenizer files and preprocessor_config.json (CLIP mean/std,
    square bicubic resize). Not exported, because HF has no slot for them: momentum encoders, queues, `temp`.
    Note that HF's ITM forward reads whatever first token it is given; BLIP retrieval puts [ENC] there.
    """
    from safetensors.torch import save

    os.makedirs(out_dir, exist_ok=True)
    state = official_to_hf_state_dict(model.state_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(save(tensors, {"format": "pt"})))
    atomic_write_json(os.path.join(out_dir, HF_CONFIG), _hf_config_dict(model), indent=2)
    model.tokenizer.save_pretrained(out_dir)
    write_preprocessor_config(out_dir, model.visual_encoder.image_size)
    log(
        f"exported Hugging Face BlipForImageTextRetrieval to {out_dir} ({len(state)} tensors; not exported: "
        f"momentum encoders, queues, temp={model.temp.item():.4f})"
    )
    return out_dir
