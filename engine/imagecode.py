"""IMAGECODE-style evaluation: score each description against the 10 images of its set, pick the best.

Scoring (`scoring`, config key imagecode_scoring): `itm` the ITM "match" logit, `itc` the ITC cosine, `both` their
sum (the score BLIP's retrieval evaluation gives re-ranked pairs), `itm_prob` the ITM softmax P(match) (ContextBLIP's
zero-shot script). P(match) orders pairs by match - no-match logit, not by the match logit alone, so `itm` and
`itm_prob` can pick different images. Any retrieval checkpoint works zero-shot. Each batch holds whole
sets: their images are encoded once, and every description of those sets is scored against its 10 images.
Accuracy: the share of descriptions whose target has the highest score (ties go to the lower index), overall, on
video sets and on static (`open-images`) sets.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs.schema import CONFIG_CHOICES
from data.imagecode import IMAGES_PER_SET, ImagecodeSet, is_static
from engine.features import eval_autocast
from models.blip_retrieval import BlipRetrieval

SCORINGS = CONFIG_CHOICES["imagecode_scoring"]


@torch.no_grad()
def imagecode_scores(
    model: BlipRetrieval, dataset: ImagecodeSet, config: dict, device: torch.device, scoring: str = "both"
) -> torch.Tensor:
    """(num_descriptions, 10) float32 scores, on the CPU, rows in `dataset.descriptions` order."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    model.eval()
    sets_per_batch = max(1, config["batch_size_test"] // IMAGES_PER_SET)
    loader = DataLoader(
        dataset, batch_size=sets_per_batch * IMAGES_PER_SET, shuffle=False, num_workers=config["num_workers"]
    )
    by_set: dict[int, list[int]] = {}
    for row, description in enumerate(dataset.descriptions):
        by_set.setdefault(description.set_index, []).append(row)
    scores = torch.zeros(len(dataset.descriptions), IMAGES_PER_SET)
    pairs_per_forward = max(IMAGES_PER_SET, config["itm_batch_size"])
    for images, index in tqdm(loader, desc="imagecode", leave=False):
        first_set = int(index[0]) // IMAGES_PER_SET
        num_sets = images.shape[0] // IMAGES_PER_SET
        rows = [r for s in range(first_set, first_set + num_sets) for r in by_set.get(s, [])]
        if not rows:
            continue
        with eval_autocast(device, config):
            embeds, image_feat = model.encode_image(images.to(device))
            ids, atts = model.tokenize([dataset.descriptions[r].text for r in rows], device, pad_to_longest=True)
            # every description against the 10 images of its own set: pair p = (description p // 10, image p % 10)
            local_set = torch.tensor([dataset.descriptions[r].set_index - first_set for r in rows], device=device)
            image_rows = (local_set[:, None] * IMAGES_PER_SET + torch.arange(IMAGES_PER_SET, device=device)).flatten()
            batch_scores = torch.zeros(len(rows), IMAGES_PER_SET, device=device)
            if scoring in ("itc", "both"):
                text_feat = model.encode_text(ids, atts)
                batch_scores += (
                    text_feat[:, None, :] * image_feat[image_rows].view(len(rows), IMAGES_PER_SET, -1)
                ).sum(-1)
            if scoring in ("itm", "both", "itm_prob"):
                enc_ids = model.with_enc_token(ids).repeat_interleave(IMAGES_PER_SET, dim=0)
                pair_atts = atts.repeat_interleave(IMAGES_PER_SET, dim=0)
                logits = []
                for start in range(0, enc_ids.shape[0], pairs_per_forward):
                    piece = slice(start, start + pairs_per_forward)
                    pair_logits = model.itm_logits(enc_ids[piece], pair_atts[piece], embeds[image_rows[piece]])
                    logits.append(pair_logits.softmax(dim=1)[:, 1] if scoring == "itm_prob" else pair_logits[:, 1])
                batch_scores += torch.cat(logits).view(len(rows), IMAGES_PER_SET)
        scores[rows] = batch_scores.float().cpu()
    return scores


def imagecode_accuracy(scores: torch.Tensor, dataset: ImagecodeSet) -> dict:
    """Accuracy (percent) overall, on video and on static sets, and the counts behind them."""
    if not dataset.labelled:
        raise ValueError("the unlabelled test split has no targets; write predictions instead")
    predicted = scores.argmax(dim=1)
    targets = torch.tensor([d.target for d in dataset.descriptions])
    static = torch.tensor([is_static(dataset.set_names[d.set_index]) for d in dataset.descriptions])
    correct = (predicted == targets).float()
    result = {"accuracy": 100.0 * correct.mean().item(), "num_descriptions": len(targets)}
    for name, mask in (("video", ~static), ("static", static)):
        result[f"accuracy_{name}"] = 100.0 * correct[mask].mean().item() if mask.any() else None
        result[f"num_{name}"] = int(mask.sum())
    return result


def imagecode_predictions(scores: torch.Tensor, dataset: ImagecodeSet) -> dict[str, list[int]]:
    """`{set_name: [predicted index, ...]}`, descriptions in file order: the leaderboard's submission format."""
    predictions: dict[str, list[int]] = {}
    for description, row in zip(dataset.descriptions, scores.argmax(dim=1).tolist(), strict=True):
        predictions.setdefault(dataset.set_names[description.set_index], []).append(row)
    return predictions
