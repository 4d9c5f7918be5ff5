"""Caption decoding speed: engine.generation vs transformers' BlipForConditionalGeneration.generate, same weights,
same settings, same batch, in one run; the token ids must agree.

    python -m bench.caption_decode_speed [--device cpu|cuda] [--vit base|tiny] [--text base|tiny] [--image-size 224]
        [--batch 8] [--num-beams 3] [--max-length 20] [--min-length 5] [--repeats 3] [--threads N] [--out FILE.json]

Weights are random (seeded; a random model still runs every step up to max_length, which is the worst case).
The vocabulary has BLIP's 30524 entries, so the LM head costs what it costs in the real model. Both sides get the
images, not image tokens: the ViT forward is in both timings. Reported: median seconds per batch of each side,
the ratio (transformers / ours), process CPU time, and whether the generated ids are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from configs.schema import DEFAULT_CONFIG
from engine.generation import GenerationSettings, generate
from models.blip_caption import build_caption_model
from models.caption_checkpoint import load_caption_state_dict
from utils import run_cli

VITS = {"base": {"width": 768, "depth": 12, "heads": 12}, "tiny": {"width": 192, "depth": 4, "heads": 3}}
TEXTS = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
}


def _vocab_file(folder: str) -> str:
    """A WordPiece vocab of bert-base-uncased's size (30522); [DEC] and [ENC] make 30524."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of"]
    words += [f"w{i}" for i in range(30522 - len(words))]
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")
    return path


def _trim(ids: torch.Tensor, prompt_len: int, eos: int) -> list[int]:
    """Ids up to the first [SEP] after the prompt (the two sides pad differently after it)."""
    out = ids.tolist()[:prompt_len]
    for token in ids.tolist()[prompt_len:]:
        out.append(token)
        if token == eos:
            break
    return out


def _timed(fn, device: torch.device, repeats: int) -> tuple[list[float], float, torch.Tensor]:
    walls, cpu0, out = [], time.process_time(), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - start)
    return walls, (time.process_time() - cpu0) / repeats, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--vit", default="base", choices=list(VITS))
    parser.add_argument("--text", default="base", choices=list(TEXTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        config = {**DEFAULT_CONFIG, "text_encoder": _vocab_file(folder), "image_size": args.image_size}
        config.update(vit={**VITS[args.vit], "patch_size": 16}, med_config=dict(TEXTS[args.text]))
        ours = build_caption_model(config).eval()
    tok = ours.tokenizer
    vit, text = VITS[args.vit], TEXTS[args.text]
    hf_config = transformers.BlipConfig(
        vision_config={
            "hidden_size": vit["width"],
            "intermediate_size": 4 * vit["width"],
            "num_hidden_layers": vit["depth"],
            "num_attention_heads": vit["heads"],
            "image_size": args.image_size,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        text_config={
            **text,
            "vocab_size": len(tok),
            "bos_token_id": ours.bos_token_id,
            "sep_token_id": tok.sep_token_id,
            "eos_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
        },
    )
    hf = transformers.BlipForConditionalGeneration(hf_config).eval()
    report = load_caption_state_dict(ours, hf.state_dict(), "transformers model")
    assert report.clean, report.summary()
    ours.to(device)
    hf.to(device)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    prompt = tok(["a picture of "] * args.batch, return_tensors="pt").input_ids.to(device)
    settings = GenerationSettings(num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length)
    kwargs = {"num_beams": args.num_beams, "max_length": args.max_length, "min_length": args.min_length}
    with torch.no_grad():
        generate(ours, images, settings)  # warm-up
        hf.generate(pixel_values=images, input_ids=prompt.clone(), **kwargs)
        hf_walls, hf_cpu, hf_ids = _timed(
            lambda: hf.generate(pixel_values=images, input_ids=prompt.clone(), **kwargs), device, args.repeats
        )
        our_walls, our_cpu, our_ids = _timed(lambda: generate(ours, images, settings), device, args.repeats)
    prompt_len = prompt.shape[1] - 1
    same = [
        _trim(r, prompt_len, tok.sep_token_id) == _trim(o, prompt_len, tok.sep_token_id)
        for r, o in zip(hf_ids, our_ids)
    ]
    result = {
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_s": statistics.median(hf_walls),
        "ours_s": statistics.median(our_walls),
        "ratio_wall": statistics.median(hf_walls) / statistics.median(our_walls),
        "transformers_cpu_s": hf_cpu,
        "ours_cpu_s": our_cpu,
        "ratio_cpu": hf_cpu / our_cpu,
        "identical_ids": all(same),
        "generated_length": int(our_ids.shape[1]),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    run_cli(main)
