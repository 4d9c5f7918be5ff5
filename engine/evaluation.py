"""Evaluate a retrieval model on one split: ITC similarity for every pair, ITM re-ranking of the top k_test,
R@1/5/10 and ranks, the same metrics on ITC alone, and the files that hold them.

`eval_mode` picks the re-ranking: `fast` (default) or `official` (engine/itm_rerank.py). Both give the same
scores up to float rounding (tests/test_eval.py). Every rank calls `evaluate` and gets the full result.

Three kinds of model: BLIP (ITC + ITM re-ranking), BLIP-2 (the same flow with its own features: the ITC similarity
is the maximum over its 32 queries, models/blip2.py) and CLIP (ITC alone, `evaluate_itc_only`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.features import (
    blip2_image_features,
    blip2_text_features,
    clip_image_features,
    clip_text_features,
    image_features,
    text_features,
    token_dtype,
    token_home,
)
from engine.itm_rerank import rerank_blip2, rerank_fast, rerank_official
from engine.metrics import metrics_from_ranks, query_ranks
from models.blip2 import Blip2Retrieval, query_max_similarity
from models.blip_retrieval import BlipRetrieval
from models.clip import ClipRetrieval
from utils import atomic_write, atomic_write_json, gather_shards, get_rank, get_world_size, is_main_process, shard_range


@dataclass
class EvalResult:
    scores_i2t: np.ndarray  # (N_img, N_txt) float32
    scores_t2i: np.ndarray  # (N_txt, N_img) float32
    metrics: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)  # engine.metrics.query_ranks of the scores: per-query ranks, R-Precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: BlipRetrieval | Blip2Retrieval | ClipRetrieval,
    dataset,
    config: dict,
    device: torch.device,
    desc: str = "val",
) -> EvalResult:
    """Full evaluation of one split; every rank calls it and every rank gets the full result. A model without an
    ITM head (CLIP) is ranked by its ITC cosines alone (`evaluate_itc_only`)."""
    if not model.has_itm:
        return evaluate_itc_only(model, dataset, config, device, desc)
    was_training = model.training
    model.eval()
    show = is_main_process()
    mode, k_test = config["eval_mode"], config["k_test"]
    rank, world = get_rank(), get_world_size()
    n_img, n_txt = len(dataset.image), len(dataset.text)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"the {desc} split has {n_img} images and {n_txt} texts; nothing to evaluate")
    timings = {}
    blip2 = isinstance(model, Blip2Retrieval)
    text_features_of = blip2_text_features if blip2 else text_features
    image_features_of = blip2_image_features if blip2 else image_features

    _sync(device)
    t0 = time.perf_counter()
    if mode == "fast":  # texts and images are sharded across ranks, ITC features gathered
        t_start, t_end = shard_range(n_txt, rank, world)
        ids, atts, text_feat = text_features_of(model, dataset.text[t_start:t_end], device, config, show)
        text_ids, text_atts = gather_shards(ids, n_txt), gather_shards(atts, n_txt)
        text_feat = gather_shards(text_feat, n_txt)
    else:
        text_ids, text_atts, text_feat = text_features_of(model, dataset.text, device, config, show)
    _sync(device)
    timings["time_text_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if mode == "fast":
        i_start, i_end = shard_range(n_img, rank, world)
        if blip2:
            values_per_image = model.num_image_tokens * model.vision_width
        else:
            values_per_image = (model.visual_encoder.num_patches + 1) * model.visual_encoder.embed_dim
        keep_on = token_home(device, (i_end - i_start) * values_per_image, token_dtype(device, config))
        image_tokens, image_feat = image_features_of(
            model, dataset, device, config, range(i_start, i_end), keep_on=keep_on, show_progress=show
        )
        image_feat = gather_shards(image_feat, n_img)
    else:  # official: every rank embeds every image and keeps the tokens on the CPU
        image_tokens, image_feat = image_features_of(
            model, dataset, device, config, range(n_img), keep_on=torch.device("cpu"), show_progress=show
        )
    _sync(device)
    timings["time_image_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # plain cosines, no temperature; BLIP-2: the maximum over each image's queries
    sims = query_max_similarity(image_feat, text_feat) if blip2 else image_feat @ text_feat.t()
    _sync(device)
    timings["time_itc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Fast mode with another score than the official one also reports the official score's metrics (official_*),
    # from the same ITM forwards: what the option changes.
    also_official = mode == "fast" and config["rerank_score"] != "official"
    if mode == "fast":
        scores_i2t, scores_t2i, *official_scores = (rerank_blip2 if blip2 else rerank_fast)(
            model,
            sims,
            image_tokens,
            i_start,
            text_ids,
            text_atts,
            k_test,
            config["itm_batch_size"],
            device,
            config,
            show,
            also_score="official" if also_official else None,
        )
    else:
        scores_i2t, scores_t2i = rerank_official(
            model, sims, image_tokens, text_ids, text_atts, k_test, device, show, config["rerank_score"]
        )
    _sync(device)
    timings["time_rerank"] = time.perf_counter() - t0
    timings["time_total"] = sum(timings.values())

    result = _result(scores_i2t, scores_t2i, dataset)
    # The same metrics on the ITC cosines alone (keys itc_*): what re-ranking adds, and what an ITC-only index gives.
    cosines = sims.float().cpu().numpy()
    itc = metrics_from_ranks(query_ranks(cosines, np.ascontiguousarray(cosines.T), dataset.txt2img, dataset.img2txt))
    result.metrics.update({f"itc_{key}": value for key, value in itc.items()})
    if also_official:
        official = _result(*official_scores, dataset).metrics
        result.metrics.update({f"official_{key}": value for key, value in official.items()})
    result.metrics.update(num_images=n_img, num_texts=n_txt, k_test=k_test, eval_mode=mode, **timings)
    model.train(was_training)
    return result


def _result(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, dataset) -> EvalResult:
    """EvalResult of the final score matrices: their metrics and per-query ranks."""
    result = EvalResult(scores_i2t.float().cpu().numpy(), scores_t2i.float().cpu().numpy())
    result.ranks = query_ranks(result.scores_i2t, result.scores_t2i, dataset.txt2img, dataset.img2txt)
    result.metrics = metrics_from_ranks(result.ranks)
    return result


@torch.no_grad()
def evaluate_itc_only(model: ClipRetrieval, dataset, config: dict, device: torch.device, desc: str) -> EvalResult:
    """A dual encoder (no ITM head): the cosine of every pair is the score. The metrics sit under the usual keys
    and, identical, under itc_* (so tables and reports read every model alike); k_test is 0 and time_rerank 0.

    Texts and images are sharded across ranks and their features gathered, as in the fast mode.
    """
    was_training = model.training
    model.eval()
    show = is_main_process()
    rank, world = get_rank(), get_world_size()
    n_img, n_txt = len(dataset.image), len(dataset.text)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"the {desc} split has {n_img} images and {n_txt} texts; nothing to evaluate")
    timings = {}
    _sync(device)
    t0 = time.perf_counter()
    t_start, t_end = shard_range(n_txt, rank, world)
    text_feat = gather_shards(clip_text_features(model, dataset.text[t_start:t_end], device, config, show), n_txt)
    _sync(device)
    timings["time_text_features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    i_start, i_end = shard_range(n_img, rank, world)
    image_feat = clip_image_features(model, dataset, device, config, range(i_start, i_end), show)
    image_feat = gather_shards(image_feat, n_img)
    _sync(device)
    timings["time_image_features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sims = image_feat @ text_feat.t()
    _sync(device)
    timings["time_itc"] = time.perf_counter() - t0
    timings["time_rerank"] = 0.0
    timings["time_total"] = sum(timings.values())
    result = _result(sims, sims.t(), dataset)
    result.metrics.update({f"itc_{key}": value for key, value in result.metrics.items()})
    result.metrics.update(num_images=n_img, num_texts=n_txt, k_test=0, eval_mode="itc", **timings)
    model.train(was_training)
    return result


def write_eval_outputs(
    result: EvalResult,
    output_dir: str,
    split: str,
    save_scores: bool = False,
    extra: dict | None = None,
    dataset=None,
) -> None:
    """metrics_<split>.json and, with save_scores, scores_<split>.npz (the exact matrices behind the metrics, and
    the per-query `i2t_rank`, `i2t_rprec`, `t2i_rank` of engine.metrics.query_ranks). With save_scores and
    `dataset`, also index_<split>.json: what a report needs to show the queries (write_eval_index)."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, f"metrics_{split}.json"), {**result.metrics, **(extra or {})}, indent=2)
    if save_scores:
        arrays = {"i2t": result.scores_i2t, "t2i": result.scores_t2i, **result.ranks}
        atomic_write(os.path.join(output_dir, f"scores_{split}.npz"), lambda f: np.savez(f, **arrays))
        if dataset is not None:
            write_eval_index(dataset, os.path.join(output_dir, f"index_{split}.json"))


def write_eval_index(dataset, path: str) -> None:
    """index_<split>.json: the evaluated split's image paths (absolute), captions as evaluated, and txt2img, in the
    row and column order of the score matrices, so a report can show any query without the config or data code."""
    index = {
        "image_root": os.path.abspath(dataset.image_root),
        "images": [os.path.abspath(os.path.join(dataset.image_root, rel)) for rel in dataset.image],
        "texts": list(dataset.text),
        "txt2img": [dataset.txt2img[t] for t in range(len(dataset.text))],
    }
    atomic_write_json(path, index)


def model_info(model: BlipRetrieval | Blip2Retrieval | ClipRetrieval, config: dict) -> dict:
    """What the evaluated model is, for metrics_<split>.json (`model_info`) and reports: family, name, activation,
    input resolution and text context length."""
    if not model.has_itm or isinstance(model, Blip2Retrieval):
        return dict(model.identity)
    return {
        "model": "blip",
        "name": f"BLIP ViT-{config['vit']}" if isinstance(config["vit"], str) else "BLIP (custom ViT)",
        "activation": "gelu",  # BLIP's ViT and BERT
        "image_size": config["image_size"],
        "context_length": config["max_length"],
    }
