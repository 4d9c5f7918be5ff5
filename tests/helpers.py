"""Tiny shared fixtures: a WordPiece vocab, a fully resolved small config and a small BlipRetrieval.

Everything runs on CPU in well under a second. The vision width (48) deliberately differs from the text
width (32) so that any code that confuses the two (cross-attention key/value width, vision_proj input)
fails loudly instead of passing by coincidence.
"""

from __future__ import annotations

import copy
import os
import struct
import zlib
from typing import Any

import torch

from configs import schema
from configs.schema import DEFAULT_CONFIG, validate_config
from data.synthetic import config_keys
from models.blip_retrieval import BlipRetrieval, build_model

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Enough everyday words that tokenised captions are mostly whole words, not [UNK].
TINY_WORDS = [
    "a",
    "an",
    "the",
    "dog",
    "cat",
    "man",
    "woman",
    "red",
    "blue",
    "ball",
    "on",
    "in",
    "with",
    "runs",
    "sits",
    "grass",
    "street",
    "photo",
    "of",
    "two",
    "and",
    ",",
    ".",
    "##s",
]
TINY_MED = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_VIT = {"width": 48, "depth": 2, "heads": 2, "patch_size": 16}


def write_vocab(path: str | os.PathLike, words: list[str] | None = None) -> str:
    """Write a BERT WordPiece vocab.txt: [PAD]=0, [UNK], [CLS], [SEP], [MASK], then `words`. Returns the path."""
    words = TINY_WORDS if words is None else words
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(BERT_SPECIALS + list(words)) + "\n")
    return path


def tiny_config(tmp_path: str | os.PathLike, **overrides: Any) -> dict:
    """A complete, validated config for a 2-layer ViT (width 48) and 2-layer MED (width 32) at 32 px.

    `overrides` replace top-level keys (e.g. `image_size=48`, `vit={...}`); mappings replace, not merge.
    """
    vocab = os.path.join(os.fspath(tmp_path), "vocab.txt")
    if not os.path.exists(vocab):
        write_vocab(vocab)
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(
        text_encoder=vocab,
        med_config=dict(TINY_MED),
        vit=dict(TINY_VIT),
        image_size=32,
        queue_size=16,
        embed_dim=16,
        device="cpu",
        num_workers=0,
        amp="none",
    )
    config.update(copy.deepcopy(overrides))
    return validate_config(config, "tiny_config")


def for_script(config: dict, script: str) -> dict:
    """`config` with every key that `script` does not honour back at its default (tiny_config sets a small
    queue_size for retrieval, which train_caption.py and train_cirr.py would refuse)."""
    allowed = {key for group in schema.SCRIPT_GROUPS[script] for key in schema.KEY_GROUPS[group]}
    return {key: value if key in allowed else copy.deepcopy(DEFAULT_CONFIG[key]) for key, value in config.items()}


def synthetic_config(root: str | os.PathLike, paths: dict[str, str], **overrides: Any) -> dict:
    """tiny_config for a `data.synthetic.make_synthetic_dataset` output: its images, splits and vocabulary."""
    return tiny_config(root, **config_keys(paths), **overrides)


def tiny_model(tmp_path: str | os.PathLike, **overrides: Any) -> BlipRetrieval:
    """BlipRetrieval built with build_model from tiny_config(tmp_path, **overrides)."""
    return build_model(tiny_config(tmp_path, **overrides))


def spread_weights(model: BlipRetrieval, std: float = 0.3) -> BlipRetrieval:
    """Redraw the weight matrices (and ViT position/CLS embeddings) with a large std, in place.

    The default init (std 0.02) makes every cosine in a row agree to ~1e-3, so top-k sets would hinge on 1e-7
    differences; std 0.3 spreads the cosines over ~0.8 and the ITM logits over ~1, giving well separated
    top-k boundaries and an ITM term that matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith(("pos_embed", "cls_token")):
                p.normal_(0.0, std)
    return model


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares `width` x `height` 8-bit grey pixels (a decompression bomb
    when large: PIL refuses it on open, or would allocate the whole image to decode it); the pixel data is cut
    short after 16 rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
