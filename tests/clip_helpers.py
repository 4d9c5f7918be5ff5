"""Tiny CLIP models for tests, built without a hub: an open_clip model config registered from a JSON file (weights
saved to a local file), and a Hugging Face CLIPModel directory (save_pretrained) with a CLIPTokenizer built from the
BPE merges open_clip ships, so both tokenizers hold OpenAI's vocabulary (49408 tokens)."""

from __future__ import annotations

import copy
import gzip
import json
import os
from typing import Any

import torch

from configs.schema import DEFAULT_CONFIG, validate_config

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_open_clip_config(directory: str, name: str = "tiny-clip", quick_gelu: bool = False) -> str:
    """Write an open_clip model-config JSON `<directory>/<name>.json` (config key clip_model takes its path)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**copy.deepcopy(TINY_OPEN_CLIP), "quick_gelu": quick_gelu}, f)
    return path


def spread(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Redraw every weight matrix with a large std so cosines spread (default inits make all pairs nearly equal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def save_open_clip_checkpoint(config_path: str, out_file: str, seed: int = 0) -> str:
    """Create the model of `config_path` with random (spread) weights and save its state dict to `out_file`."""
    import open_clip

    open_clip.add_model_config(config_path)
    name = os.path.splitext(os.path.basename(config_path))[0]
    torch.manual_seed(seed)
    model = spread(open_clip.create_model(name, pretrained=None), seed=seed)
    torch.save(model.state_dict(), out_file)
    return out_file


def _openai_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's BPE vocabulary and merges, rebuilt from the merges file open_clip ships (as its tokenizer does)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_hf_clip_dir(
    out_dir: str, seed: int = 0, hidden_act: str = "quick_gelu", image_size: int = 32, **processor_keys: Any
) -> str:
    """save_pretrained a tiny random CLIPModel (widths 32, 2 layers, 16-px patches) with a CLIPTokenizer and a
    CLIPImageProcessor (resize short side + centre crop at `image_size`; `processor_keys` override its settings,
    e.g. image_mean, resample) into `out_dir`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab, merges = _openai_vocab()
    # vocab.json + merges.txt, read back by from_pretrained: the one way to build a CLIPTokenizer that every
    # transformers version accepts (4.x takes file paths in the constructor, 5.x the vocabulary itself)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=16,
        hidden_act=hidden_act,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = spread(CLIPModel(config), seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    CLIPImageProcessor(**{"size": size, "crop_size": crop, **processor_keys}).save_pretrained(out_dir)
    return out_dir


def clip_config(**overrides: Any) -> dict:
    """A validated config with model: clip, CPU, no workers, fp32; `overrides` replace top-level keys."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(model="clip", device="cpu", num_workers=0, amp="none", batch_size_test=16)
    config.update(copy.deepcopy(overrides))
    return validate_config(config, "clip_config")
