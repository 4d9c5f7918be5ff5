"""Retrieval evaluation: ITC similarity for every pair, ITM re-ranking of the top k_test, R@1/5/10.

    python eval_retrieval.py --config configs/retrieval_flickr.yaml --checkpoint CKPT [--split val|test]
        [--output-dir DIR] [--save-scores] [--options key=value ...]

The score of a re-ranked pair is the ITM "match" logit plus the ITC cosine (blip_facts.md 6.4). Pairs outside
a query's top k get `cosine - 100`: every re-ranked pair stays above them, as with the official flat -100, and
their ITC order is kept so that mean and median ranks mean something (the official ties make them arbitrary).
R@K for K <= k_test is identical to the official definition.

Two implementations of the re-ranking, chosen by the config key `eval_mode`:
- `official`: the reference algorithm, one ITM batch of k_test pairs per query, fp32, text padded to
  max_length, image tokens on the CPU, every layer computed for every token. Kept for verification and as
  the benchmark baseline.
- `fast` (default): the union of the image->text and text->image top-k pairs is scored once per pair, grouped
  by image: each image's cross-attention keys/values are projected once per layer and shared by all texts
  scored against it; texts are scored shortest first, in batches whose padding to their longest text stays
  within 10% of the real tokens (`length_batches`); the last layer computes only the [ENC] position (the only
  one ITM reads); image tokens stay on the device; optional bf16 autocast (config `eval_amp`; on CPU also
  `amp_cpu`); images are sharded across ranks. Text features for ITC get the same length batching. On a GPU,
  where launching a forward's kernels costs more than computing a few hundred short texts, texts of up to
  KV_CHUNK images share one forward (`plan_itm_forwards`), and attention avoids the cuDNN backend, which
  plans every new shape.
Both give the same scores up to float rounding (tests/test_eval.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from data import create_dataset, create_loader
from models.blip_retrieval import BlipRetrieval
from models.checkpoint import load_model
from utils import (
    all_gather_concat,
    all_reduce_sum_,
    autocast,
    autocast_dtype,
    format_metrics_table,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    load_config,
    log,
    save_config,
)

OUTSIDE_TOP_K = -100.0
TEXT_BATCH = 256  # texts per ITC text-encoder batch (official value)
MAX_PADDING = 0.1  # fast mode: a batch's padding to its longest text stays within 10% of its real tokens
TOKEN_MEMORY_FRACTION = 0.5  # fast mode: image tokens stay on the GPU if they take at most this much of its free memory
KV_CHUNK = 32  # fast mode: images whose cross-attention keys/values are projected (and streamed) together
# Fast mode on a GPU: one ITM forward of a few hundred short texts costs less than launching its ~400 kernels,
# so texts of several images share a forward, in pieces of ITM_PIECE texts per image (see plan_itm_forwards).
# On a CPU the arithmetic dominates, and each forward holds the texts of one image (no filler rows).
ITM_PIECE = {"cuda": 16}


@dataclass
class EvalResult:
    scores_i2t: np.ndarray  # (N_img, N_txt) float32
    scores_t2i: np.ndarray  # (N_txt, N_img) float32
    metrics: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _official(config: dict) -> bool:
    return config.get("eval_mode", "fast") == "official"


def _autocast_args(device: torch.device, config: dict) -> tuple[torch.device, str, bool]:
    """`eval_amp` applies to the fast mode only; the official mode is fp32 throughout, as the official code."""
    amp = "none" if _official(config) else config["eval_amp"]
    return device, amp, config.get("amp_cpu", False)


AVOID_CUDNN_ATTENTION = True  # see _autocast


@contextlib.contextmanager
def _autocast(device: torch.device, config: dict):
    """Autocast of `amp` (fast mode only), and on CUDA attention without the cuDNN backend: cuDNN builds an
    execution plan for every new input shape, and the fast mode's length-cut batches come in hundreds of shapes."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(autocast(*_autocast_args(device, config)))
        if device.type == "cuda" and AVOID_CUDNN_ATTENTION and hasattr(torch.nn, "attention"):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                             SDPBackend.MATH]))
        yield


def token_dtype(device: torch.device, config: dict) -> torch.dtype:
    """dtype for stored image tokens. They only feed the cross-attention key/value projections, which autocast
    casts to its own dtype anyway, so storing them in that dtype halves their memory and changes nothing."""
    return autocast_dtype(*_autocast_args(device, config)) or torch.float32


def token_home(device: torch.device, num_values: int, dtype: torch.dtype) -> torch.device:
    """Where the fast mode keeps this rank's image tokens: on the GPU when they take at most
    TOKEN_MEMORY_FRACTION of its free memory, otherwise in pinned host memory, streamed to the GPU KV_CHUNK
    images at a time during re-ranking (ViT-L on COCO 5K needs 5.9 GB in bf16)."""
    if device.type != "cuda":
        return device
    need = num_values * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if need <= TOKEN_MEMORY_FRACTION * free:
        return device
    log(f"image tokens need {need / 2**30:.1f} GiB, more than {TOKEN_MEMORY_FRACTION:.0%} of the "
        f"{free / 2**30:.1f} GiB free on {device}: keeping them in host memory and streaming them")
    return torch.device("cpu")


def length_batches(lengths: list[int], max_batch: int, max_padding: float = MAX_PADDING) -> list[tuple[int, int]]:
    """Split texts sorted by ascending length into [start, end) batches for padded forwards.

    A batch holds at most `max_batch` texts and is closed early when padding every text to the batch's longest
    would add more than `max_padding` x its real tokens. Fewer, fuller batches would waste FLOPs on padding;
    smaller ones run the matrix multiplies less efficiently, which costs much less on a CPU than the padding.
    """
    batches, start, tokens = [], 0, 0
    for end, length in enumerate(lengths):
        size = end - start + 1
        if size > max_batch or size * length > (1 + max_padding) * (tokens + length):
            batches.append((start, end))
            start, tokens = end, 0
        tokens += length
    if start < len(lengths):
        batches.append((start, len(lengths)))
    return batches


@dataclass
class ItmForward:
    """One ITM forward of the fast re-ranking: `images[p]` is the image of piece p (an index within its KV chunk),
    `rows` the pair positions, `len(rows) // len(images)` per piece, pieces contiguous; `real` the indices into
    `rows` of the rows that are scored (the others are filler repeating a real row); `max_len` the text length
    every row is padded to."""
    images: list[int]
    rows: list[int]
    real: list[int]
    max_len: int


def plan_itm_forwards(counts: list[int], lengths: list[int], max_batch: int, piece: int | None = None,
                      max_padding: float = MAX_PADDING) -> Iterator[list[ItmForward]]:
    """The ITM forwards of the fast re-ranking, chunk by chunk of KV_CHUNK images (a generator: the host plans
    the next chunk while the GPU runs the current one, and COCO's millions of pairs are never listed at once).

    `counts[j]` is the number of pairs of image j; pairs are numbered image by image, and `lengths` gives each
    pair's text length, ascending within an image. Without `piece`, a forward holds texts of one image,
    `length_batches` of them. With `piece`, each image's texts are cut into pieces of `piece` texts (its last piece
    filled up by repeating its longest text, whose score is discarded); the pieces of a chunk are sorted by their
    longest text and `length_batches` groups them, at most max_batch // piece per forward. Each row of a
    piece attends to its own image's keys/values (BertSelfAttention folds a piece into one query sequence).
    """
    first = 0
    for chunk_start in range(0, len(counts), KV_CHUNK):
        forwards = []
        if piece is None:
            for local, count in enumerate(counts[chunk_start:chunk_start + KV_CHUNK]):
                for start, end in length_batches(lengths[first:first + count], max_batch, max_padding):
                    rows = list(range(first + start, first + end))
                    forwards.append(ItmForward([local], rows, list(range(len(rows))), lengths[rows[-1]]))
                first += count
        else:
            pieces = []  # (longest text, image, rows)
            for local, count in enumerate(counts[chunk_start:chunk_start + KV_CHUNK]):
                for start in range(first, first + count, piece):
                    rows = list(range(start, min(start + piece, first + count)))
                    pieces.append((lengths[rows[-1]], local, rows + rows[-1:] * (piece - len(rows))))
                first += count
            pieces.sort(key=lambda p: p[0])
            for start, end in length_batches([p[0] for p in pieces], max(1, max_batch // piece), max_padding):
                group = pieces[start:end]
                rows = [row for p in group for row in p[2]]
                real = [i for i, row in enumerate(rows) if i % piece == 0 or row != rows[i - 1]]
                forwards.append(ItmForward([p[1] for p in group], rows, real, group[-1][0]))
        yield forwards


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) slice of n items for this rank (sizes differ by at most one)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def _gather_rows(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate each rank's contiguous shard of rows (shards from _shard) into the full (n_total, ...) tensor."""
    world = get_world_size()
    if world == 1:
        return x
    largest = _shard(n_total, 0, world)[1]  # rank 0 holds the largest shard
    padded = torch.zeros((largest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = all_gather_concat(padded).view(world, largest, *x.shape[1:])
    sizes = [end - start for start, end in (_shard(n_total, r, world) for r in range(world))]
    return torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])


@torch.no_grad()
def text_features(model: BlipRetrieval, texts: list[str], device: torch.device, config: dict,
                  show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise every text (max_length padding) and embed with [CLS]; returns (ids with [ENC], mask, feats).

    Texts are encoded shortest first, each batch cut to its longest text instead of max_length (the masked
    padding does not change [CLS]). `eval_mode: official` keeps the official batches padded to max_length.
    """
    if not texts:  # a rank whose shard is empty (fewer texts than processes)
        empty_ids = torch.zeros(0, model.max_length, dtype=torch.long, device=device)
        return empty_ids, empty_ids.clone(), torch.zeros(0, model.text_proj.out_features, device=device)
    ids, atts = zip(*(model.tokenize(texts[start:start + TEXT_BATCH], device)
                      for start in range(0, len(texts), TEXT_BATCH)))
    ids, atts = torch.cat(ids), torch.cat(atts)
    lengths = atts.sum(dim=1).cpu()
    official = _official(config)
    order = torch.arange(len(texts)) if official else torch.argsort(lengths, stable=True)
    feats = torch.zeros(len(texts), model.text_proj.out_features, device=device)
    if official:
        batches = [(start, min(start + TEXT_BATCH, len(texts))) for start in range(0, len(texts), TEXT_BATCH)]
    else:
        batches = length_batches(lengths[order].tolist(), TEXT_BATCH)
    for start, end in tqdm(batches, desc="text features", disable=not show_progress):
        batch = order[start:end]
        max_len = ids.shape[1] if official else int(lengths[batch].max())
        batch = batch.to(device)
        with _autocast(device, config):
            feats[batch] = model.encode_text(ids[batch, :max_len], atts[batch, :max_len], cls_only=not official)
    return model.with_enc_token(ids), atts, feats  # ITC used [CLS]; every ITM call reads [ENC]


@torch.no_grad()
def image_features(model: BlipRetrieval, dataset, device: torch.device, config: dict, indices: range,
                   keep_on: torch.device, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (for ITM, stored as `token_dtype`) and unit ITC vectors for the images `indices`."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = create_loader(subset, config["batch_size_test"], config["num_workers"], is_train=False)
    dtype = token_dtype(device, config)
    tokens, feats = [], []
    for images, _ in tqdm(loader, desc="image features", disable=not show_progress):
        with _autocast(device, config):
            image_embeds, image_feat = model.encode_image(images.to(device, non_blocking=True))
        tokens.append(image_embeds.to(keep_on, dtype))
        feats.append(image_feat)
    width = model.visual_encoder.embed_dim
    if not tokens:  # a rank whose shard is empty
        return torch.zeros(0, model.visual_encoder.num_patches + 1, width, dtype=dtype, device=keep_on), \
            torch.zeros(0, model.vision_proj.out_features, device=device)
    tokens = torch.cat(tokens)
    if device.type == "cuda" and keep_on.type == "cpu":
        tokens = tokens.pin_memory()  # asynchronous chunk copies while re-ranking
    return tokens, torch.cat(feats).float()


def _to_device(index_lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Host index lists as device tensors, through one pinned buffer and one non-blocking copy on CUDA."""
    flat = torch.tensor([i for lst in index_lists for i in lst], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(torch.split(flat, [len(lst) for lst in index_lists]))


def _fill_outside(sims: torch.Tensor) -> torch.Tensor:
    return sims + OUTSIDE_TOP_K


@torch.no_grad()
def rerank_official(model: BlipRetrieval, sims: torch.Tensor, image_tokens: torch.Tensor, text_ids: torch.Tensor,
                    text_atts: torch.Tensor, k_test: int, device: torch.device,
                    show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference algorithm: one ITM batch of k_test pairs per query, queries split across ranks."""
    rank, world = get_rank(), get_world_size()
    n_img, n_txt = sims.shape
    scores_i2t = torch.zeros(n_img, n_txt, device=device)  # summed across ranks: each row filled by one rank
    scores_t2i = torch.zeros(n_txt, n_img, device=device)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    start, end = _shard(n_img, rank, world)
    for i in tqdm(range(start, end), desc="ITM i2t", disable=not show_progress):
        topk_sim, topk_idx = sims[i].topk(k_i2t)
        encoder_states = image_tokens[i].repeat(k_i2t, 1, 1).to(device)
        itm = model.itm_logits(text_ids[topk_idx], text_atts[topk_idx], encoder_states, cls_only=False)[:, 1]
        scores_i2t[i] = _fill_outside(sims[i])
        scores_i2t[i, topk_idx] = itm + topk_sim
    sims_t = sims.t()
    start, end = _shard(n_txt, rank, world)
    for t in tqdm(range(start, end), desc="ITM t2i", disable=not show_progress):
        topk_sim, topk_idx = sims_t[t].topk(k_t2i)
        encoder_states = image_tokens[topk_idx.cpu()].to(device)
        itm = model.itm_logits(text_ids[t].repeat(k_t2i, 1), text_atts[t].repeat(k_t2i, 1), encoder_states,
                               cls_only=False)[:, 1]
        scores_t2i[t] = _fill_outside(sims_t[t])
        scores_t2i[t, topk_idx] = itm + topk_sim
    return all_reduce_sum_(scores_i2t), all_reduce_sum_(scores_t2i)


@torch.no_grad()
def rerank_fast(model: BlipRetrieval, sims: torch.Tensor, image_tokens: torch.Tensor, image_offset: int,
                text_ids: torch.Tensor, text_atts: torch.Tensor, k_test: int, itm_batch_size: int,
                device: torch.device, config: dict, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the union of both directions' top-k pairs once, grouped by image, with cached image K/V.

    `image_tokens` holds this rank's images [image_offset, image_offset + len), on the device or in host memory
    (then streamed KV_CHUNK images at a time).
    """
    n_img, n_txt = sims.shape
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    topk_i2t = sims.topk(k_i2t, dim=1).indices  # (N_img, k) text ids
    topk_t2i = sims.t().topk(k_t2i, dim=1).indices  # (N_txt, k) image ids
    # Pair key = image * N_txt + text; sorting the unique keys groups every image's pairs contiguously.
    img_of_i2t = torch.arange(n_img, device=device)[:, None].expand(-1, k_i2t)
    txt_of_t2i = torch.arange(n_txt, device=device)[:, None].expand(-1, k_t2i)
    keys_i2t = (img_of_i2t * n_txt + topk_i2t).flatten()
    keys_t2i = (topk_t2i * n_txt + txt_of_t2i).flatten()
    pair_keys = torch.unique(torch.cat([keys_i2t, keys_t2i]))  # sorted
    pair_img, pair_txt = pair_keys // n_txt, pair_keys % n_txt
    pair_scores = torch.zeros(len(pair_keys), device=device)

    # Within each image, score its texts shortest first, so that a batch padded to its longest text carries
    # little padding. The order is computed on the host, so the loop below never waits for the device.
    lengths = text_atts.sum(dim=1).cpu()
    pair_txt_host = pair_txt.cpu()
    length_order = torch.argsort(pair_img.cpu() * (int(lengths.max()) + 1) + lengths[pair_txt_host], stable=True)
    pair_txt_host = pair_txt_host[length_order]
    length_order = length_order.to(device)
    pair_txt_sorted = pair_txt[length_order]
    sorted_scores = torch.zeros(len(pair_keys), device=device)
    first = int(torch.searchsorted(pair_img, torch.tensor(image_offset, device=device)))
    last = int(torch.searchsorted(pair_img, torch.tensor(image_offset + len(image_tokens), device=device)))
    counts = torch.bincount(pair_img[first:last] - image_offset, minlength=len(image_tokens)).tolist()
    plan = plan_itm_forwards(counts, lengths[pair_txt_host[first:last]].tolist(), itm_batch_size,
                             ITM_PIECE.get(device.type))
    progress = tqdm(total=last - first, desc="ITM pairs", disable=not show_progress)
    with _autocast(device, config):  # one autocast region: weights are cast to bf16 once, not per forward
        for chunk, forwards in enumerate(plan):
            chunk_tokens = image_tokens[chunk * KV_CHUNK:(chunk + 1) * KV_CHUNK].to(device, non_blocking=True)
            chunk_kv = model.text_encoder.cross_attention_kv(chunk_tokens)
            # Every index of the chunk goes to the device in one asynchronous copy; the loop never waits for it.
            rows, images, real = _to_device([[first + r for f in forwards for r in f.rows],
                                             [i for f in forwards for i in f.images],
                                             [r for f in forwards for r in f.real]], device)
            at_row = at_image = at_real = 0
            for f in forwards:
                f_rows = rows[at_row:at_row + len(f.rows)]
                f_real = real[at_real:at_real + len(f.real)]
                if len(f.images) == 1:  # one image: its keys/values as a view, no gather
                    image_kv = [(k[f.images[0]:f.images[0] + 1], v[f.images[0]:f.images[0] + 1]) for k, v in chunk_kv]
                else:
                    f_images = images[at_image:at_image + len(f.images)]
                    image_kv = [(k[f_images], v[f_images]) for k, v in chunk_kv]
                texts = pair_txt_sorted[f_rows]
                ids, atts = text_ids[texts, :f.max_len], text_atts[texts, :f.max_len]  # pad to the longest, not 35
                sorted_scores[f_rows[f_real]] = model.itm_logits(ids, atts, image_kv=image_kv)[f_real, 1]
                at_row, at_image, at_real = at_row + len(f.rows), at_image + len(f.images), at_real + len(f.real)
                progress.update(len(f.real))
    progress.close()
    pair_scores[length_order] = sorted_scores
    all_reduce_sum_(pair_scores)  # each pair was scored by the rank that owns its image
    pair_scores += sims[pair_img, pair_txt]

    def lookup(keys: torch.Tensor) -> torch.Tensor:
        return pair_scores[torch.searchsorted(pair_keys, keys)]

    scores_i2t = _fill_outside(sims.clone())
    scores_i2t.scatter_(1, topk_i2t, lookup(keys_i2t).view(n_img, k_i2t))
    scores_t2i = _fill_outside(sims.t().contiguous())
    scores_t2i.scatter_(1, topk_t2i, lookup(keys_t2i).view(n_txt, k_t2i))
    return scores_i2t, scores_t2i


def compute_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """Official recall definitions (percentages) plus 1-based median and mean ranks, both directions.

    Image->text: the rank of an image is the best rank among its ground-truth captions. Rows are ordered with
    `argsort(...)[::-1]`, the official tie order.
    """
    def gt_ranks(scores: np.ndarray, gts: list[list[int]]) -> np.ndarray:
        ranks = np.empty(len(scores), dtype=np.int64)
        for start in range(0, len(scores), 1024):  # row chunks bound the memory of the argsort
            order = np.argsort(scores[start:start + 1024], axis=1)[:, ::-1]
            position = np.empty_like(order)
            np.put_along_axis(position, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
            for row in range(len(order)):
                ranks[start + row] = position[row, gts[start + row]].min()
        return ranks

    txt_ranks = gt_ranks(scores_i2t, [img2txt[i] for i in range(len(scores_i2t))])
    img_ranks = gt_ranks(scores_t2i, [[txt2img[t]] for t in range(len(scores_t2i))])
    metrics = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        metrics[f"{prefix}_r_mean"] = (metrics[f"{prefix}_r1"] + metrics[f"{prefix}_r5"] + metrics[f"{prefix}_r10"]) / 3
        metrics[f"{prefix}_medr"] = float(np.median(ranks + 1))
        metrics[f"{prefix}_meanr"] = float(np.mean(ranks + 1))
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


@torch.no_grad()
def evaluate(model: BlipRetrieval, dataset, config: dict, device: torch.device, desc: str = "val") -> EvalResult:
    """Full evaluation of one split; every rank calls it and every rank gets the full result."""
    was_training = model.training
    model.eval()
    show = is_main_process()
    mode, k_test = config["eval_mode"], config["k_test"]
    rank, world = get_rank(), get_world_size()
    n_img, n_txt = len(dataset.image), len(dataset.text)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"the {desc} split has {n_img} images and {n_txt} texts; nothing to evaluate")
    timings = {}

    _sync(device)
    t0 = time.perf_counter()
    if mode == "fast":  # texts and images are sharded across ranks, ITC features gathered
        t_start, t_end = _shard(n_txt, rank, world)
        ids, atts, text_feat = text_features(model, dataset.text[t_start:t_end], device, config, show)
        text_ids, text_atts = _gather_rows(ids, n_txt), _gather_rows(atts, n_txt)
        text_feat = _gather_rows(text_feat, n_txt)
    else:
        text_ids, text_atts, text_feat = text_features(model, dataset.text, device, config, show)
    _sync(device)
    timings["time_text_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if mode == "fast":
        i_start, i_end = _shard(n_img, rank, world)
        vit = model.visual_encoder
        keep_on = token_home(device, (i_end - i_start) * (vit.num_patches + 1) * vit.embed_dim,
                             token_dtype(device, config))
        image_tokens, image_feat = image_features(model, dataset, device, config, range(i_start, i_end),
                                                  keep_on=keep_on, show_progress=show)
        image_feat = _gather_rows(image_feat, n_img)
    else:  # official: every rank embeds every image and keeps the tokens on the CPU
        image_tokens, image_feat = image_features(model, dataset, device, config, range(n_img),
                                                  keep_on=torch.device("cpu"), show_progress=show)
    _sync(device)
    timings["time_image_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sims = image_feat @ text_feat.t()  # plain cosines, no temperature
    _sync(device)
    timings["time_itc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if mode == "fast":
        scores_i2t, scores_t2i = rerank_fast(model, sims, image_tokens, i_start, text_ids, text_atts, k_test,
                                             config["itm_batch_size"], device, config, show)
    else:
        scores_i2t, scores_t2i = rerank_official(model, sims, image_tokens, text_ids, text_atts, k_test, device,
                                                 show)
    _sync(device)
    timings["time_rerank"] = time.perf_counter() - t0
    timings["time_total"] = sum(timings.values())

    result = EvalResult(scores_i2t.float().cpu().numpy(), scores_t2i.float().cpu().numpy())
    result.metrics = compute_metrics(result.scores_i2t, result.scores_t2i, dataset.txt2img, dataset.img2txt)
    # The same metrics on the ITC cosines alone (keys itc_*): what re-ranking adds, and what an ITC-only index gives.
    cosines = sims.float().cpu().numpy()
    itc = compute_metrics(cosines, np.ascontiguousarray(cosines.T), dataset.txt2img, dataset.img2txt)
    result.metrics.update({f"itc_{key}": value for key, value in itc.items()})
    result.metrics.update(num_images=n_img, num_texts=n_txt, k_test=k_test, eval_mode=mode, **timings)
    model.train(was_training)
    return result


def write_eval_outputs(result: EvalResult, output_dir: str, split: str, save_scores: bool = False,
                       extra: dict | None = None) -> None:
    """metrics_<split>.json and, with save_scores, scores_<split>.npz (the exact matrices behind the metrics)."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"metrics_{split}.json"), "w") as f:
        json.dump({**result.metrics, **(extra or {})}, f, indent=2)
    if save_scores:
        np.savez(os.path.join(output_dir, f"scores_{split}.npz"), i2t=result.scores_i2t, t2i=result.scores_t2i)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/retrieval_flickr.yaml)")
    parser.add_argument("--checkpoint", default=None,
                        help="official .pth, http(s) URL, Hugging Face directory or our checkpoint; "
                             "default: the config's `pretrained`")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--output-dir", default=None, help="default: output/eval_<config name>")
    parser.add_argument("--save-scores", action="store_true", help="also write scores_<split>.npz")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. k_test=64 eval_mode=official")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.options)
    output_dir = args.output_dir or os.path.join(
        "output", "eval_" + os.path.splitext(os.path.basename(args.config))[0])
    dist_info = init_distributed(config["device"])
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    if not source:
        log("warning: no --checkpoint and no `pretrained` in the config: evaluating randomly initialised weights")
    model, _ = load_model(config, source)
    model.to(dist_info.device)
    dataset = create_dataset(config, args.split)
    log(f"evaluating {args.split}: {len(dataset.image)} images, {len(dataset.text)} texts, k_test {config['k_test']}, "
        f"eval_mode {config['eval_mode']}, {dist_info.world_size} process(es) on {dist_info.device}")
    result = evaluate(model, dataset, config, dist_info.device, desc=args.split)
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        save_config(config, os.path.join(output_dir, "config.yaml"))
        write_eval_outputs(result, output_dir, args.split, args.save_scores, extra={"checkpoint": source})
        m = result.metrics
        print(format_metrics_table(m))
        print(f"median rank  TR {m['txt_medr']:.1f}  IR {m['img_medr']:.1f}   mean rank  TR {m['txt_meanr']:.1f}  "
              f"IR {m['img_meanr']:.1f}")
        print(f"time: text features {m['time_text_features']:.1f}s, image features {m['time_image_features']:.1f}s, "
              f"ITC {m['time_itc']:.2f}s, ITM re-rank {m['time_rerank']:.1f}s; metrics in "
              f"{os.path.join(output_dir, f'metrics_{args.split}.json')}")
    return result.metrics


def cli() -> None:
    """Command-line entry: user errors (config, data, checkpoint) end with their message, not a traceback."""
    from data import DataError
    from models.checkpoint import CheckpointError
    from utils import ConfigError

    try:
        main()
    except (ConfigError, DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
