"""Hugging Face `BlipForImageTextRetrieval` key names <-> official BLIP key names.

The bottom of the loading stack: pure renaming of state-dict keys, with no model, file or loader behind it, so
models/checkpoint.py (which converts HF-named state dicts before its key report) and models/hf_blip.py (HF
directories and export) both build on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# BlipForImageTextRetrieval (transformers) name -> official BLIP name, vision tower outside the blocks.
HF_VISION_TOP = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",  # (1, 1, D) in both
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",  # (1, 1 + N, D), CLS row first in both
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",  # the final LayerNorm
    "vision_model.post_layernorm.bias": "visual_encoder.norm.bias",
}
# Inside block N: vision_model.encoder.layers.N.<hf> <-> visual_encoder.blocks.N.<official> (+ .weight / .bias).
# qkv has the same (3 * D, D) layout (q, k, v stacked, heads contiguous) in both.
HF_VISION_BLOCK = {
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Same names on both sides: HF's BLIP text model keeps the official MED layout (embeddings.word_embeddings,
# encoder.layer.N.attention / crossattention / intermediate / output), without token types or pooler.
HF_IDENTITY_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
_HF_BLOCK_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OFFICIAL_BLOCK_RE = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_OFFICIAL_VISION_TOP = {v: k for k, v in HF_VISION_TOP.items()}
_OFFICIAL_VISION_BLOCK = {v: k for k, v in HF_VISION_BLOCK.items()}


def hf_to_official_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers BlipForImageTextRetrieval state dict to official BLIP keys.

    Keys with no official counterpart are kept under their HF name so that the loader reports them as
    unexpected. HF has no momentum encoders, queues or `temp`; the loader fills those (see LoadReport).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        new = HF_VISION_TOP.get(key)
        if new is None:
            match = _HF_BLOCK_RE.match(key)
            if match and match.group(2) in HF_VISION_BLOCK:
                new = f"visual_encoder.blocks.{match.group(1)}.{HF_VISION_BLOCK[match.group(2)]}.{match.group(3)}"
            else:
                new = key  # text_encoder.*, vision_proj, text_proj, itm_head are identical; others stay visible
        out[new] = value
    return out


def official_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official BLIP keys to transformers BlipForImageTextRetrieval keys.

    Keeps only what the HF model has: the main encoders, projections and ITM head. Dropped on purpose (HF has no
    slot for them): momentum copies (`*_m`), the queues and their pointer, `temp`, `text_decoder.*`, and the
    `position_ids` buffer (non-persistent in HF).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key in _OFFICIAL_VISION_TOP:
            out[_OFFICIAL_VISION_TOP[key]] = value
            continue
        match = _OFFICIAL_BLOCK_RE.match(key)
        if match and match.group(2) in _OFFICIAL_VISION_BLOCK:
            out[
                f"vision_model.encoder.layers.{match.group(1)}.{_OFFICIAL_VISION_BLOCK[match.group(2)]}."
                f"{match.group(3)}"
            ] = value
        elif key.startswith(HF_IDENTITY_PREFIXES):
            out[key] = value
    return out


def is_hf_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """True when `state` uses transformers names (the vision tower is `vision_model.*` there, never officially)."""
    return any(k.startswith("vision_model.") for k in state)
