"""Composed image retrieval on CIRR: gallery and query features, CIRR's metrics, the test1 submission files, and
the HN-NCE training epoch.

Protocol (CIRR, as its evaluation server computes it):
- the gallery of a split is the image names of `image_splits/split.rc2.<split>.json` (not every image on disk);
- each query (reference image + modification text) scores every gallery image by cosine; the reference image
  itself gets -100, so it is never retrieved;
- Recall@K (K = 1, 5, 10, 50): the share of queries whose target_hard is among the top K;
- Recall_subset@K (K = 1, 2, 3): the same, ranking only the query's img_set.members without the reference;
- the main number is (Recall@5 + Recall_subset@1) / 2 (`r_avg`), used to select the epoch;
- test1 has no targets: its scores go to the server as `{"version": "rc2", "metric": "recall" | "recall_subset",
  "<pairid>": [top 50 | top 3 image names]}`.
A query whose target is not among its members misses in Recall_subset (counted in `num_target_outside_subset`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from data import create_loader, pre_caption, test_transform
from data.cirr import CIRR_VERSION, CirrImageDataset, CirrSplit
from engine.training import optimizer_step
from models.blip_cir import BlipCir
from utils import JsonlLogger, atomic_write_json, gather_shards, get_rank, get_world_size, is_main_process, shard_range

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
REFERENCE_SCORE = -100.0
SUBMISSION_TOP = {"recall": 50, "recall_subset": 3}


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def gallery_features(
    model: BlipCir, data: CirrSplit, names: list[str], config: dict, device: torch.device, desc: str = "gallery"
) -> torch.Tensor:
    """Unit ITC image features (len(names), embed_dim) of the named images; sharded over ranks, gathered."""
    start, end = shard_range(len(names), get_rank(), get_world_size())
    dataset = CirrImageDataset(data, names[start:end], test_transform(config["image_size"]))
    loader = create_loader(dataset, config["batch_size_test"], config["num_workers"], is_train=False)
    feats = [torch.zeros(0, model.vision_proj.out_features, device=device)]
    for images, _ in tqdm(loader, desc=f"{desc} features", disable=not is_main_process()):
        with utils.autocast(device, config["eval_amp"], config["amp_cpu"]):
            feats.append(model.image_feat(model.image_tokens(images.to(device, non_blocking=True))))
    return gather_shards(torch.cat(feats).float(), len(names))


@torch.no_grad()
def query_features(model: BlipCir, data: CirrSplit, config: dict, device: torch.device) -> torch.Tensor:
    """Unit query features (num_pairs, embed_dim), in pair order. Each reference image goes through the ViT once
    and serves every pair that uses it; pairs are sharded over ranks and gathered."""
    pairs = data.pairs
    start, end = shard_range(len(pairs), get_rank(), get_world_size())
    shard = pairs[start:end]
    references = list(dict.fromkeys(p.reference for p in shard))
    pairs_of: dict[str, list[int]] = {}
    for i, p in enumerate(shard):
        pairs_of.setdefault(p.reference, []).append(i)
    dataset = CirrImageDataset(data, references, test_transform(config["image_size"]))
    loader = create_loader(dataset, config["batch_size_test"], config["num_workers"], is_train=False)
    out = torch.zeros(len(shard), model.text_proj.out_features, device=device)
    for images, ref_idx in tqdm(loader, desc=f"{data.split} queries", disable=not is_main_process()):
        rows = [(i, int(r)) for r in ref_idx for i in pairs_of[references[int(r)]]]
        with utils.autocast(device, config["eval_amp"], config["amp_cpu"]):
            tokens = None if model.query_mode == "text" else model.image_tokens(images.to(device, non_blocking=True))
            position = {int(r): n for n, r in enumerate(ref_idx)}
            if tokens is not None:
                tokens = tokens[torch.tensor([position[r] for _, r in rows], device=device)]
            texts = [shard[i].caption for i, _ in rows]
            out[torch.tensor([i for i, _ in rows], device=device)] = model.query_feat(tokens, _pre(texts, config))
    return gather_shards(out, len(pairs))


def _pre(texts: list[str], config: dict) -> list[str]:
    return [pre_caption(t, config["max_words"]) for t in texts]


# ----------------------------------------------------------------------------------------------------
# Scores and metrics
# ----------------------------------------------------------------------------------------------------


def cirr_scores(query: torch.Tensor, gallery: torch.Tensor, reference_index: torch.Tensor) -> torch.Tensor:
    """Cosine scores (Q, N) with each query's reference image set to -100 (reference_index -1: not in gallery)."""
    scores = query.float() @ gallery.float().t()
    rows = torch.nonzero(reference_index >= 0).squeeze(1)
    scores[rows, reference_index[rows]] = REFERENCE_SCORE
    return scores


def recall_at_k(scores: torch.Tensor, target_index: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """Recall@K in percent: the target is in the top K when fewer than K gallery images score above it."""
    target_score = scores.gather(1, target_index[:, None])
    rank = (scores > target_score).sum(dim=1)
    return {f"r{k}": 100.0 * (rank < k).float().mean().item() for k in ks}


def subset_matrix(data: CirrSplit, name_index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, M) gallery indices of each query's members without its reference (-1 padding), and (Q,) the target's
    position among them (-1 when the target is not a member)."""
    width = max(len(p.members) for p in data.pairs)
    members = torch.full((len(data.pairs), width), -1, dtype=torch.long)
    target_pos = torch.full((len(data.pairs),), -1, dtype=torch.long)
    for q, pair in enumerate(data.pairs):
        candidates = [m for m in dict.fromkeys(pair.members) if m != pair.reference]
        members[q, : len(candidates)] = torch.tensor([name_index[m] for m in candidates], dtype=torch.long)
        if pair.target in candidates:
            target_pos[q] = candidates.index(pair.target)
    return members, target_pos


def recall_subset_at_k(
    scores: torch.Tensor, members: torch.Tensor, target_pos: torch.Tensor, ks=SUBSET_KS
) -> dict[str, float]:
    """Recall_subset@K in percent: rank the target among the query's members (reference excluded)."""
    member_scores = scores.gather(1, members.clamp_min(0)).masked_fill(members < 0, float("-inf"))
    target_score = member_scores.gather(1, target_pos.clamp_min(0)[:, None])
    rank = (member_scores > target_score).sum(dim=1)
    hit = target_pos >= 0
    return {f"rs{k}": 100.0 * ((rank < k) & hit).float().mean().item() for k in ks}


def submissions(
    scores: torch.Tensor, data: CirrSplit, members: torch.Tensor, names: list[str]
) -> dict[str, dict[str, Any]]:
    """The two server files: {'recall': {...top 50...}, 'recall_subset': {...top 3 members...}}."""
    top = scores.topk(min(SUBMISSION_TOP["recall"], scores.shape[1]), dim=1).indices.tolist()
    member_scores = scores.gather(1, members.clamp_min(0)).masked_fill(members < 0, float("-inf"))
    order = member_scores.argsort(dim=1, descending=True, stable=True)
    ranked_members = members.gather(1, order).tolist()
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for q, pair in enumerate(data.pairs):
        recall[str(pair.pairid)] = [names[j] for j in top[q]]
        subset[str(pair.pairid)] = [names[j] for j in ranked_members[q] if j >= 0][: SUBMISSION_TOP["recall_subset"]]
    return {"recall": recall, "recall_subset": subset}


@dataclass
class CirResult:
    split: str
    scores: torch.Tensor  # (num_pairs, num_gallery), reference at -100
    metrics: dict = field(default_factory=dict)  # empty for test1 except counts and timings
    submissions: dict = field(default_factory=dict)  # {'recall', 'recall_subset'}


@torch.no_grad()
def evaluate_cirr(model: BlipCir, data: CirrSplit, config: dict, device: torch.device) -> CirResult:
    """Score every query of `data` against its gallery; every rank calls it and gets the full result."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    names = data.image_names
    name_index = {n: i for i, n in enumerate(names)}
    gallery = gallery_features(model, data, names, config, device, desc=data.split)
    query = query_features(model, data, config, device)
    reference_index = torch.tensor([name_index.get(p.reference, -1) for p in data.pairs], device=device)
    scores = cirr_scores(query, gallery, reference_index).cpu()
    members, target_pos = subset_matrix(data, name_index)
    metrics: dict[str, Any] = {}
    if data.has_targets:
        target_index = torch.tensor([name_index[p.target] for p in data.pairs])
        metrics.update(recall_at_k(scores, target_index))
        metrics.update(recall_subset_at_k(scores, members, target_pos))
        metrics["r_avg"] = (metrics["r5"] + metrics["rs1"]) / 2
        metrics["num_target_outside_subset"] = int((target_pos < 0).sum())
    metrics.update(
        split=data.split,
        query_mode=model.query_mode,
        num_queries=len(data.pairs),
        num_gallery=len(names),
        time_eval_s=time.perf_counter() - t0,
    )
    model.train(was_training)
    return CirResult(data.split, scores, metrics, submissions(scores, data, members, names))


def format_cirr_table(metrics: dict) -> str:
    """One-line CIRR table: R@1/5/10/50, Rs@1/2/3 and their average."""
    if "r1" not in metrics:
        return f"{metrics['split']}: no targets (scored by the CIRR server from the submission files)"
    recall = " / ".join(f"{metrics[f'r{k}']:.2f}" for k in RECALL_KS)
    subset = " / ".join(f"{metrics[f'rs{k}']:.2f}" for k in SUBSET_KS)
    return f"{metrics['split']}: R@1/5/10/50 {recall} | Rs@1/2/3 {subset} | (R@5+Rs@1)/2 {metrics['r_avg']:.2f}"


def write_cirr_outputs(result: CirResult, output_dir: str, extra: dict) -> list[str]:
    """metrics_<split>.json (with `extra`, e.g. the checkpoint and epoch), and for test1 the two submission files
    cirr_submission_test1_{recall,recall_subset}.json. Main process only; returns the written paths."""
    if not is_main_process():
        return []
    os.makedirs(output_dir, exist_ok=True)
    written = [os.path.join(output_dir, f"metrics_{result.split}.json")]
    atomic_write_json(written[0], {**result.metrics, **extra}, indent=1)
    if result.split == "test1":
        for metric, content in result.submissions.items():
            path = os.path.join(output_dir, f"cirr_submission_{result.split}_{metric}.json")
            atomic_write_json(path, content)
            written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def train_cir_epoch(
    model: BlipCir,
    ddp: DistributedDataParallel | None,
    loader: DataLoader,
    target_feats: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: dict,
    epoch: int,
    global_step: int,
    device: torch.device,
    jsonl: JsonlLogger,
) -> tuple[dict, int]:
    """One pass of HN-NCE over the loader. target_feats: (num_train_images, embed_dim) unit features, indexed by
    the loader's target indices. Returns (averages over all ranks, updated global step)."""
    model.train()
    train_model = ddp if ddp is not None else model
    params = model.trainable_parameters()
    lr = optimizer.param_groups[0]["lr"]
    sums = torch.zeros(2, device=device)
    window, window_n, window_start = torch.zeros(2, device=device), 0, time.perf_counter()
    bar = tqdm(loader, desc=f"train epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True)
    for images, texts, target_idx in bar:
        images = images.to(device, non_blocking=True)
        target = target_feats[target_idx.to(device)]
        with utils.autocast(device, config["amp"], config["amp_cpu"]):
            out = train_model(images, list(texts), target, config["cir_hnnce_alpha"], config["cir_hnnce_beta"])
        scaler.scale(out["loss"]).backward()
        optimizer_step(optimizer, scaler, params, config["clip_grad_norm"])
        global_step += 1
        stats = torch.stack([out["loss"].detach().float(), out["acc"].float()])
        sums += stats
        window += stats
        window_n += 1
        if global_step % config["log_every"] == 0:
            loss, acc = (window / window_n).tolist()
            elapsed = time.perf_counter() - window_start
            jsonl.log(
                {
                    "epoch": epoch,
                    "step": global_step,
                    "loss": loss,
                    "batch_acc": acc,
                    "lr": lr,
                    "pairs_per_s": window_n * len(texts) * get_world_size() / max(elapsed, 1e-9),
                }
            )
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}", lr=f"{lr:.2e}")
            window.zero_()
            window_n, window_start = 0, time.perf_counter()
    bar.close()
    loss, acc = (utils.all_reduce_sum_(sums) / max(len(loader) * get_world_size(), 1)).tolist()
    return {"loss": loss, "batch_acc": acc}, global_step
