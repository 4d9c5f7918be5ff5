"""Composed image retrieval on CIRR: gallery and query features, CIRR's metrics and the test1 submission files.

Protocol:
- the gallery of a split is the image names of `image_splits/split.rc2.<split>.json` (CIRR's own code; not every
  image on disk); `cirr_val_gallery: folder` ranks every .png of img_raw/dev instead, as CoVR's validation does
  (its figures are not comparable with the split gallery's); metrics and log lines name the gallery used;
- each query (reference image + modification text) scores every gallery image by cosine; the reference image
  itself gets -100, so it is never retrieved (and never listed in a submission file);
- Recall@K (K = 1, 5, 10, 50): the share of queries whose target is among the top K;
- Recall_subset@K (K = 1, 2, 3): the same, ranking only the query's img_set.members without the reference;
- on val, `cirr_val_targets` says which images count as the target (VAL_TARGETS): by default CoVR's validation
  (src/test/blip/cirr_val.py): Recall@K by target_hard, Recall_subset@K by target_soft graded, a query scoring the
  best grade (1.0, 0.5, 0.2; at least 0) among its target_soft images in the top K. `soft` grades both metrics
  that way (the CIRR authors' CIRPLANT validation), `hard` counts target_hard alone in both;
- the main number is (Recall@5 + Recall_subset@1) / 2 (`r_avg`), used to select the epoch;
- test1 has no targets: its scores go to the server as `{"version": "rc2", "metric": "recall" | "recall_subset",
  "<pairid>": [top 50 | top 3 image names]}`. The server holds test1's labels and its scoring code is not
  published: which of target_hard / target_soft it counts cannot be checked from the files it takes.
A target_hard that is not among the members misses in Recall_subset (counted in `num_target_outside_subset`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import utils
from data import create_loader, pre_caption, test_transform
from data.cirr import CIRR_VERSION, CirrImageDataset, CirrSplit
from models.blip_cir import BlipCir
from utils import atomic_write_json, gather_shards, get_rank, get_world_size, is_main_process, shard_range

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


def positive_matrix(data: CirrSplit, name_index: dict[str, int], soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, P) gallery indices of each query's positives (-1 padding) and (Q, P) their grades (0 padding).

    soft False: target_hard with grade 1. soft True: every image of target_soft with its grade (1.0, 0.5, 0.2 or
    -1.0 in rc2), as CIRR's and CoVR's validation code read it; target_hard counts only when target_soft lists it."""
    rows = [{p.target: 1.0} if not soft else p.target_soft for p in data.pairs]
    width = max(1, max(len(r) for r in rows))
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    grade = torch.zeros(len(rows), width)
    for q, row in enumerate(rows):
        kept = [(name_index[n], g) for n, g in row.items() if n in name_index]
        if kept:
            index[q, : len(kept)] = torch.tensor([i for i, _ in kept], dtype=torch.long)
            grade[q, : len(kept)] = torch.tensor([g for _, g in kept])
    return index, grade


def _as_positives(
    positive_index: torch.Tensor, positive_grade: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if positive_index.dim() == 1:  # one target per query, grade 1
        positive_index = positive_index[:, None]
    if positive_grade is None:
        positive_grade = torch.ones(positive_index.shape, device=positive_index.device)
    return positive_index, positive_grade.to(positive_index.device).float()


def _graded_recall(hit: torch.Tensor, grade: torch.Tensor, index: torch.Tensor) -> float:
    """CIRR's rule: a query scores the best grade among its positives that are hits, and at least 0 (so a hit on a
    -1.0 image scores 0, not -1); with one grade-1 positive this is plain recall. In percent."""
    credit = torch.where(hit & (index >= 0), grade, torch.zeros_like(grade)).amax(dim=1).clamp_min(0)
    return 100.0 * credit.mean().item()


def recall_at_k(
    scores: torch.Tensor,
    positive_index: torch.Tensor,
    positive_grade: torch.Tensor | None = None,
    ks=RECALL_KS,
) -> dict[str, float]:
    """Recall@K in percent over the whole gallery. positive_index: (Q,) each query's target, or (Q, P) graded
    positives (-1 padding) with positive_grade (Q, P) (see positive_matrix and _graded_recall). A positive is in
    the top K when fewer than K gallery images score above it."""
    index, grade = _as_positives(positive_index, positive_grade)
    ascending = scores.sort(dim=1).values
    positive_score = scores.gather(1, index.clamp_min(0)).contiguous()
    rank = scores.shape[1] - torch.searchsorted(ascending, positive_score, right=True)  # images scored above
    return {f"r{k}": _graded_recall(rank < k, grade, index) for k in ks}


def subset_matrix(data: CirrSplit, name_index: dict[str, int]) -> torch.Tensor:
    """(Q, M) gallery indices of each query's img_set.members without its reference (-1 padding)."""
    width = max(len(p.members) for p in data.pairs)
    members = torch.full((len(data.pairs), width), -1, dtype=torch.long)
    for q, pair in enumerate(data.pairs):
        candidates = [m for m in dict.fromkeys(pair.members) if m != pair.reference]
        members[q, : len(candidates)] = torch.tensor([name_index[m] for m in candidates], dtype=torch.long)
    return members


def recall_subset_at_k(
    scores: torch.Tensor,
    members: torch.Tensor,
    positive_index: torch.Tensor,
    positive_grade: torch.Tensor | None = None,
    ks=SUBSET_KS,
) -> dict[str, float]:
    """Recall_subset@K in percent: rank each positive among the query's members (reference excluded); a positive
    that is not a member never counts. positive_index / positive_grade as for recall_at_k."""
    index, grade = _as_positives(positive_index, positive_grade)
    member_scores = scores.gather(1, members.clamp_min(0)).masked_fill(members < 0, float("-inf"))
    positive_score = scores.gather(1, index.clamp_min(0))
    rank = (member_scores[:, None, :] > positive_score[:, :, None]).sum(dim=2)  # (Q, P) members scored above
    is_member = ((members[:, None, :] == index[:, :, None]) & (members[:, None, :] >= 0)).any(dim=2)
    return {f"rs{k}": _graded_recall((rank < k) & is_member, grade, index) for k in ks}


def submissions(
    scores: torch.Tensor,
    data: CirrSplit,
    members: torch.Tensor,
    names: list[str],
    reference_index: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """The two server files: {'recall': {...top 50...}, 'recall_subset': {...top 3 members...}}. The reference
    image is never listed, also when the gallery has 50 images or fewer (its -100 score would put it last)."""
    top = scores.topk(min(SUBMISSION_TOP["recall"] + 1, scores.shape[1]), dim=1).indices.tolist()
    member_scores = scores.gather(1, members.clamp_min(0)).masked_fill(members < 0, float("-inf"))
    order = member_scores.argsort(dim=1, descending=True, stable=True)
    ranked_members = members.gather(1, order).tolist()
    references = reference_index.tolist()
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for q, pair in enumerate(data.pairs):
        listed = [names[j] for j in top[q] if j != references[q]]
        recall[str(pair.pairid)] = listed[: SUBMISSION_TOP["recall"]]
        subset[str(pair.pairid)] = [names[j] for j in ranked_members[q] if j >= 0][: SUBMISSION_TOP["recall_subset"]]
    return {"recall": recall, "recall_subset": subset}


# Which positives each val metric counts, per cirr_val_targets: (Recall@K soft?, Recall_subset@K soft?).
VAL_TARGETS = {
    "soft_subset": (False, True),  # CoVR src/test/blip/cirr_val.py
    "soft": (True, True),  # CIRPLANT model/OSCAR/OSCAR_CIRPLANT.py, eval_test_scoring_step_CIRR
    "hard": (False, False),  # binary, target_hard only
}


@dataclass
class CirResult:
    split: str
    scores: torch.Tensor  # (num_pairs, num_gallery), reference at -100
    metrics: dict = field(default_factory=dict)  # empty for test1 except counts and timings
    submissions: dict = field(default_factory=dict)  # {'recall', 'recall_subset'}
    arrays: dict = field(default_factory=dict)  # what scores_<split>.npz holds beside the scores (write_cirr_outputs)


@torch.no_grad()
def evaluate_cirr(model: BlipCir, data: CirrSplit, config: dict, device: torch.device) -> CirResult:
    """Score every query of `data` against its gallery (data.gallery: the split file's images, or every image of
    their folder); every rank calls it and gets the full result. On val, config cirr_val_targets picks the
    positives of each metric (VAL_TARGETS)."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    names = data.image_names
    name_index = {n: i for i, n in enumerate(names)}
    gallery = gallery_features(model, data, names, config, device, desc=data.split)
    query = query_features(model, data, config, device)
    reference_index = torch.tensor([name_index.get(p.reference, -1) for p in data.pairs], device=device)
    scores = cirr_scores(query, gallery, reference_index).cpu()
    reference_index = reference_index.cpu()
    members = subset_matrix(data, name_index)
    metrics: dict[str, Any] = {}
    arrays: dict[str, Any] = {
        "pairids": torch.tensor([p.pairid for p in data.pairs]),
        "gallery": list(names),
        "reference_index": reference_index,
        "members": members,
    }
    if data.has_targets:
        targets = config["cirr_val_targets"]
        recall_soft, subset_soft = VAL_TARGETS[targets]
        hard = positive_matrix(data, name_index, soft=False)
        soft = positive_matrix(data, name_index, soft=True)
        metrics.update(recall_at_k(scores, *(soft if recall_soft else hard)))
        metrics.update(recall_subset_at_k(scores, members, *(soft if subset_soft else hard)))
        metrics["r_avg"] = (metrics["r5"] + metrics["rs1"]) / 2
        metrics["targets"] = targets
        metrics["num_target_outside_subset"] = sum(p.target not in p.members for p in data.pairs)
        target_index = hard[0][:, 0]
        member_scores = scores.gather(1, members.clamp_min(0)).masked_fill(members < 0, float("-inf"))
        target_score = scores.gather(1, target_index[:, None])
        subset_rank = (member_scores > target_score).sum(dim=1)
        arrays.update(
            target_index=target_index,
            target_rank=(scores > target_score).sum(dim=1),
            target_subset_rank=subset_rank.masked_fill(~(members == target_index[:, None]).any(dim=1), -1),
            soft_index=soft[0],
            soft_grade=soft[1],
        )
    metrics.update(
        split=data.split,
        gallery=data.gallery,
        query_mode=model.query_mode,
        num_queries=len(data.pairs),
        num_gallery=len(names),
        time_eval_s=time.perf_counter() - t0,
    )
    model.train(was_training)
    return CirResult(data.split, scores, metrics, submissions(scores, data, members, names, reference_index), arrays)


def format_cirr_table(metrics: dict) -> str:
    """One-line CIRR table: R@1/5/10/50, Rs@1/2/3 and their average, labelled with the gallery and positives."""
    where = f"{metrics['split']} ({metrics['gallery']} gallery, {metrics['num_gallery']} images"
    if "r1" not in metrics:
        return f"{where}): no targets (scored by the CIRR server from the submission files)"
    recall = " / ".join(f"{metrics[f'r{k}']:.2f}" for k in RECALL_KS)
    subset = " / ".join(f"{metrics[f'rs{k}']:.2f}" for k in SUBSET_KS)
    return (
        f"{where}, {metrics['targets']} targets): R@1/5/10/50 {recall} | Rs@1/2/3 {subset} | "
        f"(R@5+Rs@1)/2 {metrics['r_avg']:.2f}"
    )


def write_cirr_outputs(result: CirResult, output_dir: str, extra: dict, save_scores: bool = False) -> list[str]:
    """metrics_<split>.json (with `extra`, e.g. the checkpoint and epoch), for test1 the two submission files
    cirr_submission_test1_{recall,recall_subset}.json, and with save_scores scores_<split>.npz:
      scores (Q, N) float32 cosines, the reference at -100; pairids (Q,); gallery (N,) image names (the columns);
      reference_index (Q,) its column (-1: not in the gallery); members (Q, M) columns of img_set.members without
      the reference (-1 padding); on val also target_index (Q,) target_hard's column, target_rank (Q,) gallery
      images scored above it (0 = first), target_subset_rank (Q,) members scored above it (-1: not a member),
      soft_index / soft_grade (Q, P) target_soft's columns and grades (-1 / 0 padding).
    Main process only; returns the written paths."""
    if not is_main_process():
        return []
    os.makedirs(output_dir, exist_ok=True)
    written = [os.path.join(output_dir, f"metrics_{result.split}.json")]
    atomic_write_json(written[0], {**result.metrics, **extra}, indent=1)
    if save_scores:
        written.append(os.path.join(output_dir, f"scores_{result.split}.npz"))
        arrays = {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in result.arrays.items()}
        np.savez(written[-1], scores=result.scores.float().numpy(), **arrays)
    if result.split == "test1":
        for metric, content in result.submissions.items():
            path = os.path.join(output_dir, f"cirr_submission_{result.split}_{metric}.json")
            atomic_write_json(path, content)
            written.append(path)
    return written
