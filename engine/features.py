"""Evaluation features: ITC text and image embeddings, the image tokens ITM re-ranking attends to, and the
precision and placement rules they follow.

Texts are tokenised once (max_length 35, as the official code) and encoded shortest first in batches cut to their
longest text (`length_batches`); `eval_mode: official` keeps the official batches of 256 padded to max_length.
Image tokens are stored in the autocast dtype, on the GPU when they fit (`token_home`), else in pinned host memory.
BLIP-2 (models/blip2.py) follows the same rules with its own encoders: its image ITC features are one vector per query.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm import tqdm

from data import create_loader
from models.blip2 import Blip2Retrieval
from models.blip_retrieval import BlipRetrieval
from models.clip import ClipRetrieval
from utils import autocast, autocast_dtype, log

TEXT_BATCH = 256  # texts per ITC text-encoder batch (official value)
MAX_PADDING = 0.1  # fast mode: a batch's padding to its longest text stays within 10% of its real tokens
TOKEN_MEMORY_FRACTION = 0.5  # fast mode: image tokens stay on the GPU if they take at most this much of its free memory
AVOID_CUDNN_ATTENTION = True  # see eval_autocast


def is_official(config: dict) -> bool:
    """`eval_mode: official`: the reference re-ranking (per query, fp32, max_length padding)."""
    return config["eval_mode"] == "official"


def eval_autocast_args(device: torch.device, config: dict) -> tuple[torch.device, str, bool]:
    """`eval_amp` applies to the fast mode only; the official mode is fp32 throughout, as the official code."""
    amp = "none" if is_official(config) else config["eval_amp"]
    return device, amp, config["amp_cpu"]


@contextlib.contextmanager
def eval_autocast(device: torch.device, config: dict):
    """Autocast of `eval_amp` (fast mode only), and attention without the cuDNN backend (`without_cudnn_attention`)."""
    with autocast(*eval_autocast_args(device, config)), without_cudnn_attention(device):
        yield


@contextlib.contextmanager
def without_cudnn_attention(device: torch.device):
    """On CUDA, scaled_dot_product_attention without the cuDNN backend: cuDNN builds an execution plan for every new
    input shape (tens of ms each), and evaluation's length-cut batches and every query's own text length come in
    hundreds of shapes. Flash / memory-efficient attention need no planning. A no-op elsewhere."""
    if device.type != "cuda" or not AVOID_CUDNN_ATTENTION or not hasattr(torch.nn, "attention"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def token_dtype(device: torch.device, config: dict) -> torch.dtype:
    """dtype for stored image tokens. They only feed the cross-attention key/value projections, which autocast
    casts to its own dtype anyway, so storing them in that dtype halves their memory and changes nothing."""
    return autocast_dtype(*eval_autocast_args(device, config)) or torch.float32


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
    log(
        f"image tokens need {need / 2**30:.1f} GiB, more than {TOKEN_MEMORY_FRACTION:.0%} of the "
        f"{free / 2**30:.1f} GiB free on {device}: keeping them in host memory and streaming them"
    )
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


@torch.no_grad()
def text_features(
    model: BlipRetrieval, texts: list[str], device: torch.device, config: dict, show_progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise every text (max_length padding) and embed with [CLS]; returns (ids with [ENC], mask, feats).

    Texts are encoded shortest first, each batch cut to its longest text instead of max_length (the masked
    padding does not change [CLS]). `eval_mode: official` keeps the official batches padded to max_length.
    """
    if not texts:  # a rank whose shard is empty (fewer texts than processes)
        empty_ids = torch.zeros(0, model.max_length, dtype=torch.long, device=device)
        return empty_ids, empty_ids.clone(), torch.zeros(0, model.text_proj.out_features, device=device)
    ids, atts = zip(
        *(model.tokenize(texts[start : start + TEXT_BATCH], device) for start in range(0, len(texts), TEXT_BATCH))
    )
    ids, atts = torch.cat(ids), torch.cat(atts)
    lengths = atts.sum(dim=1).cpu()
    official = is_official(config)
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
        with eval_autocast(device, config):
            feats[batch] = model.encode_text(ids[batch, :max_len], atts[batch, :max_len], cls_only=not official)
    return model.with_enc_token(ids), atts, feats  # ITC used [CLS]; every ITM call reads [ENC]


@torch.no_grad()
def image_features(
    model: BlipRetrieval,
    dataset,
    device: torch.device,
    config: dict,
    indices: range,
    keep_on: torch.device,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (for ITM, stored as `token_dtype`) and unit ITC vectors for the images `indices`."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = create_loader(subset, config["batch_size_test"], config["num_workers"], is_train=False)
    dtype = token_dtype(device, config)
    tokens, feats = [], []
    for images, _ in tqdm(loader, desc="image features", disable=not show_progress):
        with eval_autocast(device, config):
            image_embeds, image_feat = model.encode_image(images.to(device, non_blocking=True))
        tokens.append(image_embeds.to(keep_on, dtype))
        feats.append(image_feat)
    width = model.visual_encoder.embed_dim
    if not tokens:  # a rank whose shard is empty
        return torch.zeros(0, model.visual_encoder.num_patches + 1, width, dtype=dtype, device=keep_on), torch.zeros(
            0, model.vision_proj.out_features, device=device
        )
    tokens = torch.cat(tokens)
    if device.type == "cuda" and keep_on.type == "cpu":
        tokens = tokens.pin_memory()  # asynchronous chunk copies while re-ranking
    return tokens, torch.cat(feats).float()


# ----------------------------------------------------------------------------------------------------
# Dual encoders without ITM (models/clip.py): unit ITC vectors only, each model with its own tokenizer and transform
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_text_features(
    model: ClipRetrieval, texts: list[str], device: torch.device, config: dict, show_progress: bool = False
) -> torch.Tensor:
    """Unit text vectors (N, embed_dim), float32, in TEXT_BATCH batches (the model's tokenizer, context length
    and truncation)."""
    feats = torch.zeros(len(texts), model.embed_dim, device=device)
    starts = range(0, len(texts), TEXT_BATCH)
    for start in tqdm(starts, desc="text features", disable=not show_progress):
        ids, mask = model.tokenize(texts[start : start + TEXT_BATCH], device)
        with eval_autocast(device, config):
            feats[start : start + len(ids)] = model.encode_text(ids, mask)
    return feats


@torch.no_grad()
def clip_image_features(
    model: ClipRetrieval, dataset, device: torch.device, config: dict, indices: range, show_progress: bool = False
) -> torch.Tensor:
    """Unit image vectors (len(indices), embed_dim), float32; the dataset carries the model's own transform."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = create_loader(subset, config["batch_size_test"], config["num_workers"], is_train=False)
    feats = [torch.zeros(0, model.embed_dim, device=device)]  # a rank whose shard is empty
    for images, _ in tqdm(loader, desc="image features", disable=not show_progress):
        with eval_autocast(device, config):
            feats.append(model.encode_image(images.to(device, non_blocking=True)))
    return torch.cat(feats).float()


# ----------------------------------------------------------------------------------------------------
# BLIP-2 (models/blip2.py): Q-Former text [CLS] vectors, and per image its ViT tokens and one ITC vector per query
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def blip2_text_features(
    model: Blip2Retrieval, texts: list[str], device: torch.device, config: dict, show_progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, unit ITC vectors) of every text: ids padded to max_length (LAVIS), [CLS] first (BLIP-2's ITM reads
    the ids as they are). Encoded shortest first in batches cut to their longest text, or with `eval_mode: official`
    in LAVIS's batches of 256 padded to max_length."""
    if not texts:  # a rank whose shard is empty
        empty_ids = torch.zeros(0, model.max_length, dtype=torch.long, device=device)
        return empty_ids, empty_ids.clone(), torch.zeros(0, model.embed_dim, device=device)
    ids, atts = zip(
        *(model.tokenize(texts[start : start + TEXT_BATCH], device) for start in range(0, len(texts), TEXT_BATCH))
    )
    ids, atts = torch.cat(ids), torch.cat(atts)
    lengths = atts.sum(dim=1).cpu()
    official = is_official(config)
    order = torch.arange(len(texts)) if official else torch.argsort(lengths, stable=True)
    if official:
        batches = [(start, min(start + TEXT_BATCH, len(texts))) for start in range(0, len(texts), TEXT_BATCH)]
    else:
        batches = length_batches(lengths[order].tolist(), TEXT_BATCH)
    feats = torch.zeros(len(texts), model.embed_dim, device=device)
    for start, end in tqdm(batches, desc="text features", disable=not show_progress):
        batch = order[start:end]
        max_len = ids.shape[1] if official else int(lengths[batch].max())
        batch = batch.to(device)
        with eval_autocast(device, config):
            feats[batch] = model.encode_text(ids[batch, :max_len], atts[batch, :max_len])
    return ids, atts, feats


@torch.no_grad()
def blip2_image_features(
    model: Blip2Retrieval,
    dataset,
    device: torch.device,
    config: dict,
    indices: range,
    keep_on: torch.device,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT tokens (for ITM, stored as `token_dtype` on `keep_on`) and unit query vectors (n, Q, D) for `indices`."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = create_loader(subset, config["batch_size_test"], config["num_workers"], is_train=False)
    dtype = token_dtype(device, config)
    tokens = [torch.zeros(0, model.num_image_tokens, model.vision_width, dtype=dtype, device=keep_on)]
    feats = [torch.zeros(0, model.num_query_tokens, model.embed_dim, device=device)]  # a rank whose shard is empty
    for images, _ in tqdm(loader, desc="image features", disable=not show_progress):
        with eval_autocast(device, config):
            image_embeds, query_feat = model.encode_image(images.to(device, non_blocking=True))
        tokens.append(image_embeds.to(keep_on, dtype))
        feats.append(query_feat.float())
    tokens = torch.cat(tokens)
    if device.type == "cuda" and keep_on.type == "cpu":
        tokens = tokens.pin_memory()
    return tokens, torch.cat(feats)
