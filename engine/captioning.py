"""Captioning at dataset scale: caption a split (sharded across ranks) and score it.

`caption_split` splits the images into one contiguous shard per rank, so every image is captioned exactly once
(the official evaluation relies on a DistributedSampler and de-duplicates afterwards). `evaluate_captions`
writes the official results format `[{"image_id": ..., "caption": ...}]` and the COCO caption metrics.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import utils
from data.captions import CaptionEvalDataset
from engine.caption_metrics import caption_metrics, format_caption_metrics
from engine.generation import GenerationSettings, generate
from utils import atomic_write_json, get_rank, get_world_size, is_main_process, log, shard_range


@torch.no_grad()
def caption_split(model, dataset: CaptionEvalDataset, config: dict, device: torch.device, desc: str = "val") -> list:
    """One caption per image of `dataset`, in dataset order, on every rank."""
    was_training = model.training
    model.eval()
    settings = GenerationSettings.from_config(config)
    start, end = shard_range(len(dataset), get_rank(), get_world_size())
    loader = DataLoader(
        Subset(dataset, range(start, end)),
        batch_size=config["batch_size_test"],
        num_workers=config["num_workers"],
        pin_memory=device.type == "cuda",
    )
    captions: list[str] = []
    for images, _ in tqdm(loader, desc=f"caption {desc}", disable=not is_main_process(), dynamic_ncols=True):
        with utils.autocast(device, config["eval_amp"], config["amp_cpu"]):
            captions += model.decode(generate(model, images.to(device, non_blocking=True), settings))
    model.train(was_training)
    if get_world_size() == 1:
        return captions
    shards: list = [None] * get_world_size()
    dist.all_gather_object(shards, captions)
    return [caption for shard in shards for caption in shard]


def evaluate_captions(
    model, dataset: CaptionEvalDataset, references: dict, config: dict, device: torch.device, desc: str = "val"
) -> tuple[dict, list[dict]]:
    """(metrics, results) of one split: captions for every image, scored against `references` on the main
    process (the other ranks get {} metrics). Results are [{"image_id": key, "caption": str}], official format."""
    t0 = time.perf_counter()
    captions = caption_split(model, dataset, config, device, desc)
    results = [{"image_id": key, "caption": caption} for key, caption in zip(dataset.keys, captions, strict=True)]
    metrics: dict = {}
    if is_main_process():
        generation_s = time.perf_counter() - t0
        metrics = caption_metrics({r["image_id"]: r["caption"] for r in results}, references)
        metrics["time_generation_s"] = generation_s
        log(f"[{desc}] {format_caption_metrics(metrics)}")
    return metrics, results


def write_caption_outputs(metrics: dict, results: list[dict], output_dir: str, split: str, extra: dict | None = None):
    """caption_metrics_<split>.json and captions_<split>.json (main process only)."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, f"caption_metrics_{split}.json"), {**metrics, **(extra or {})}, indent=2)
    atomic_write_json(os.path.join(output_dir, f"captions_{split}.json"), results, indent=1)


@torch.no_grad()
def itm_match_probability(retrieval_model, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """P(match) of each (image i, caption i) pair from a retrieval model's ITM head ([ENC] first, as in retrieval).

    The CapFilt filter: BLIP keeps a web caption or a generated one when its ITM head calls the pair a match."""
    image_embeds, _ = retrieval_model.encode_image(images)
    ids, mask = retrieval_model.tokenize(captions, images.device, pad_to_longest=True)
    logits = retrieval_model.itm_logits(retrieval_model.with_enc_token(ids), mask, image_embeds)
    return logits.softmax(dim=-1)[:, 1]
