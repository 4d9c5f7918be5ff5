"""Can the ITM head rank what ITC shortlists? Separation of true and false candidates inside the ITC top k.

    python -m studies.itm_topk_auc --config configs/demo.yaml --checkpoint demo_output/checkpoint_best.pth
        [--split test] [--k 10] [--options key=value ...]

Re-ranking only reorders each query's ITC top k, so it helps exactly when the ITM match logit separates the
query's true candidates from the false ones inside that shortlist better than the ITC cosine does. For every
image (image->text) and every text (text->image) with a true candidate in its top k, this computes the ITM match
logit of each shortlisted pair and prints, per direction, the AUC (the chance that a true candidate outscores a
false one of the same query; 0.5 = no better than chance) of the cosine, of the ITM logit and of the official
score ITM + cosine, and the mean spread (max - min over the shortlist) of the cosine and of the ITM logit: when
the logit spreads much wider than the cosine, the official score is the ITM order.

With `--generated-data DIR` (a `python -m data.synthetic` output), it also replays the generator's scenes and
reports the share of labelled-false shortlisted candidates that are in fact true (a caption of another image
that the templates could have written for this one): ground-truth noise that no ranker can get right.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from configs.schema import load_config
from data import create_dataset
from data.synthetic import GENERATOR_FILE, generate_split, true_captions
from data.utils import pre_caption
from engine.features import image_features, text_features
from models.checkpoint import apply_config_updates
from models.loading import load_model
from utils import run_cli


def pairwise_auc(scores: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Mean over queries of P(a true candidate outscores a false one), ties counting half; queries whose
    shortlist holds only true or only false candidates are skipped."""
    aucs = []
    for s, t in zip(scores, truth):
        pos, neg = s[t], s[~t]
        if len(pos) and len(neg):
            aucs.append((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
    return float(np.mean(aucs)) if aucs else float("nan")


@torch.no_grad()
def shortlist_stats(
    model, dataset, config: dict, k: int, device: torch.device, true_texts: list[set[str]] | None = None
) -> dict:
    """Per direction: AUCs of cosine, ITM and ITM + cosine inside the ITC top k, spreads and query counts; with
    `true_texts` (per image, every caption true of it, pre_caption'd), the share of labelled-false shortlisted
    candidates that are true."""
    ids, atts, text_feat = text_features(model, dataset.text, device, config)
    tokens, image_feat = image_features(model, dataset, device, config, range(len(dataset.image)), device)
    cos = image_feat @ text_feat.t()
    stats = {}
    for direction in ("i2t", "t2i"):
        sims = cos if direction == "i2t" else cos.t()
        rows = {"cos": [], "itm": [], "truth": []}
        false_but_true = []
        for query in range(sims.shape[0]):
            top = sims[query].topk(min(k, sims.shape[1])).indices
            if direction == "i2t":
                truth = np.isin(top.cpu().numpy(), dataset.img2txt[query])
                image_embeds = tokens[query : query + 1].expand(len(top), -1, -1)
                itm = model.itm_logits(ids[top], atts[top], image_embeds)[:, 1]
            else:
                truth = top.cpu().numpy() == dataset.txt2img[query]
                itm = model.itm_logits(ids[query].expand(len(top), -1), atts[query].expand(len(top), -1), tokens[top])
                itm = itm[:, 1]
            rows["cos"].append(sims[query, top].float().cpu().numpy())
            rows["itm"].append(itm.float().cpu().numpy())
            rows["truth"].append(truth)
            if true_texts is not None:
                for candidate, labelled in zip(top.tolist(), truth):
                    image, text = (query, candidate) if direction == "i2t" else (candidate, query)
                    if not labelled:
                        false_but_true.append(dataset.text[text] in true_texts[image])
        both = [c + i for c, i in zip(rows["cos"], rows["itm"])]
        stats[direction] = {
            "auc_cosine": pairwise_auc(rows["cos"], rows["truth"]),
            "auc_itm": pairwise_auc(rows["itm"], rows["truth"]),
            "auc_itm_plus_cosine": pairwise_auc(both, rows["truth"]),
            "spread_cosine": float(np.mean([np.ptp(c) for c in rows["cos"]])),
            "spread_itm": float(np.mean([np.ptp(i) for i in rows["itm"]])),
            "queries_with_a_true_candidate": int(sum(t.any() for t in rows["truth"])),
            "queries": len(rows["truth"]),
        }
        if true_texts is not None:
            stats[direction]["labelled_false_but_true"] = float(np.mean(false_but_true))
    return stats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--k", type=int, default=None, help="shortlist size (default: the config's k_test)")
    p.add_argument("--generated-data", default=None, metavar="DIR", help="data.synthetic output: check the labels")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    config = load_config(args.config, args.options)
    device = torch.device("cuda" if config["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    model, report = load_model(config, args.checkpoint)
    apply_config_updates(config, report)
    model.to(device).eval()
    dataset = create_dataset(config, args.split)
    k = args.k or config["k_test"]
    true_texts = None
    if args.generated_data:
        with open(os.path.join(args.generated_data, GENERATOR_FILE)) as f:
            generator = json.load(f)
        scenes = [scene for scene, _, _ in generate_split(generator, args.split)]
        true_texts = [{pre_caption(c, config["max_words"]) for c in true_captions(scene)} for scene in scenes]
    stats = shortlist_stats(model, dataset, config, k, device, true_texts)
    print(f"{args.split}: {len(dataset.image)} images, {len(dataset.text)} texts, ITC top {k}")
    print(f"{'':5}{'AUC cosine':>12}{'AUC ITM':>10}{'AUC ITM+cos':>13}{'spread cos':>12}{'spread ITM':>12}")
    for direction, s in stats.items():
        print(
            f"{direction:5}{s['auc_cosine']:12.3f}{s['auc_itm']:10.3f}{s['auc_itm_plus_cosine']:13.3f}"
            f"{s['spread_cosine']:12.3f}{s['spread_itm']:12.3f}"
        )
    if true_texts is not None:
        print(
            "labelled-false shortlisted candidates that are true of the query: "
            + ", ".join(f"{direction} {s['labelled_false_but_true']:.1%}" for direction, s in stats.items())
        )
    return stats


if __name__ == "__main__":
    run_cli(main)
