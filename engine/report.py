"""Compare evaluation runs (compare_retrieval.py): metrics side by side, recall@K curves and rank histograms (PNG),
R@1 per caption phenomenon, and an HTML gallery of the worst text->image queries with thumbnails.

A run is an eval_retrieval.py output directory written with --save-scores: metrics_<split>.json (with
`model_info`), scores_<split>.npz (score matrices and per-query ranks) and index_<split>.json (image paths and
captions in matrix order). Runs compared together must have evaluated the same images and captions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.metrics import metrics_from_ranks, query_ranks
from utils import UserError, atomic_write, atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------------------------------
# Caption phenomena: word lists matched on whole lower-case words (multi-word phrases as phrases)
# ----------------------------------------------------------------------------------------------------

PHENOMENA: dict[str, tuple[str, ...]] = {
    "counting": (
        *"one two three four five six seven eight nine ten eleven twelve dozen".split(),
        *"several couple pair both many few multiple group single lone alone".split(),
    ),
    "colour/attribute": (
        *"red orange yellow green blue purple pink brown black white grey gray silver gold golden dark light".split(),
        *"colorful colourful striped plaid large small big little tiny huge tall short long old young wooden".split(),
    ),
    "spatial": (
        *"left right above below under over beneath behind beside between near top bottom inside outside".split(),
        *"across along around middle center centre corner upper lower".split(),
        "in front of",
        "next to",
        "on top of",
    ),
    "negation": (
        *"no not none without nobody nothing never neither nor".split(),
        # contractions, with and without the apostrophe (pre_caption may have removed it)
        *"don't doesn't isn't aren't can't won't didn't wasn't weren't".split(),
        *"dont doesnt isnt arent cant wont didnt wasnt werent".split(),
    ),
}
LENGTH_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("length <= 8 words", 0, 8),
    ("length 9-14 words", 9, 14),
    ("length >= 15 words", 15, 10**9),
)
_DIGIT = re.compile(r"\b\d+\b")


def _has(caption: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w']){re.escape(phrase)}(?![\w'])", caption) is not None


def caption_phenomena(caption: str) -> list[str]:
    """The buckets a caption falls in: any of PHENOMENA whose words it contains (digits count as numbers), and
    exactly one length bucket."""
    text = caption.lower()
    found = [name for name, words in PHENOMENA.items() if any(_has(text, w) for w in words)]
    if "counting" not in found and _DIGIT.search(text):
        found.insert(0, "counting")
    words = len(text.split())
    found += [name for name, lo, hi in LENGTH_BUCKETS if lo <= words <= hi]
    return found


def bucket_names() -> list[str]:
    return [*PHENOMENA, *(name for name, _, _ in LENGTH_BUCKETS)]


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One evaluation output directory, loaded."""

    name: str
    path: str
    metrics: dict
    info: dict
    t2i: np.ndarray  # (N_txt, N_img) scores
    ranks: dict  # engine.metrics.query_ranks
    index: dict  # images, texts, txt2img


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run eval_retrieval.py with --save-scores into that directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON (UTF-8 text): {err}") from None


def _read_scores(path: str) -> dict[str, np.ndarray]:
    """Every array of a scores_<split>.npz, read now: a truncated or corrupt file fails here, naming it."""
    try:
        with np.load(path) as scores:
            arrays = {key: scores[key] for key in scores.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise UserError(
            f"{path} cannot be read ({type(err).__name__}: {err}); it is truncated or not an eval_retrieval.py "
            "--save-scores file: rerun that evaluation"
        ) from None
    missing = [key for key in ("i2t", "t2i") if key not in arrays]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)} array: not an eval_retrieval.py --save-scores file")
    return arrays


def load_run(path: str, split: str, name: str | None = None) -> Run:
    """Read one eval directory; the message names the missing file and the command that writes it."""
    if not os.path.isdir(path):
        raise UserError(f"run directory not found: {path}")
    metrics = _read_json(os.path.join(path, f"metrics_{split}.json"))
    index = _read_json(os.path.join(path, f"index_{split}.json"))
    scores_path = os.path.join(path, f"scores_{split}.npz")
    if not os.path.isfile(scores_path):
        raise UserError(f"{scores_path} not found: run eval_retrieval.py with --save-scores into that directory")
    scores = _read_scores(scores_path)
    t2i = scores["t2i"]
    if t2i.shape != (len(index["texts"]), len(index["images"])):
        raise UserError(
            f"{scores_path}: t2i is {t2i.shape}, but index_{split}.json lists {len(index['texts'])} texts and "
            f"{len(index['images'])} images; the files come from different evaluations"
        )
    if "t2i_rank" in scores:
        ranks = {key: scores[key] for key in ("i2t_rank", "i2t_rprec", "t2i_rank")}
    else:  # scores written before per-query ranks were saved: recompute them from the matrices
        txt2img = dict(enumerate(index["txt2img"]))
        img2txt: dict[int, list[int]] = {i: [] for i in range(len(index["images"]))}
        for t, i in txt2img.items():
            img2txt[i].append(t)
        ranks = query_ranks(scores["i2t"], t2i, txt2img, img2txt)
    info = metrics.get("model_info", {})  # older metrics files have none: the directory name stands in
    label = name or info.get("name") or os.path.basename(os.path.normpath(path))
    return Run(label, path, metrics, info, t2i, ranks, index)


def check_comparable(runs: list[Run]) -> None:
    """Every run must have ranked the same captions against the same images (else the comparison means nothing)."""
    first = runs[0]
    for run in runs[1:]:
        same_texts = run.index["texts"] == first.index["texts"]
        if not same_texts or len(run.index["images"]) != len(first.index["images"]):
            raise UserError(
                f"{run.path} and {first.path} evaluated different data ({len(run.index['images'])} vs "
                f"{len(first.index['images'])} images, captions {'equal' if same_texts else 'differ'}); "
                "compare runs of the same split of the same dataset"
            )


def unique_names(runs: list[Run]) -> None:
    """Make run names unique (two runs of one model get #2, #3 ...)."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"


# ----------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------

TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("TR R@1", "txt_r1", ".1f"),
    ("TR R@5", "txt_r5", ".1f"),
    ("TR R@10", "txt_r10", ".1f"),
    ("TR R-Precision", "txt_rprec", ".1f"),
    ("TR MedR", "txt_medr", ".1f"),
    ("TR MeanR", "txt_meanr", ".1f"),
    ("IR R@1", "img_r1", ".1f"),
    ("IR R@5", "img_r5", ".1f"),
    ("IR R@10", "img_r10", ".1f"),
    ("IR R-Precision", "img_rprec", ".1f"),
    ("IR MedR", "img_medr", ".1f"),
    ("IR MeanR", "img_meanr", ".1f"),
    ("r_mean", "r_mean", ".2f"),
)


def _ranking(run: Run) -> str:
    if run.metrics.get("eval_mode") == "itc" or run.info.get("model") == "clip":
        return "ITC"
    return f"ITC + ITM top {run.metrics.get('k_test', '?')}"


def metrics_table(runs: list[Run]) -> str:
    """Markdown table: one column per run; model rows (resolution, context, activation, ranking) then metrics.
    Metrics come from the per-query ranks (so R-Precision exists for runs evaluated before it was added)."""
    header = "| | " + " | ".join(run.name for run in runs) + " |"
    lines = [header, "|---" * (len(runs) + 1) + "|"]
    info_rows = (
        ("image size (px)", lambda r: r.info.get("image_size", "?")),
        ("text context (tokens)", lambda r: r.info.get("context_length", "?")),
        ("activation", lambda r: r.info.get("activation", "-")),
        ("ranking", _ranking),
        ("images / texts", lambda r: f"{len(r.index['images'])} / {len(r.index['texts'])}"),
    )
    for title, get in info_rows:
        lines.append(f"| {title} | " + " | ".join(str(get(run)) for run in runs) + " |")
    derived = [metrics_from_ranks(run.ranks) for run in runs]
    for title, key, fmt in TABLE_ROWS:
        lines.append(f"| {title} | " + " | ".join(format(m[key], fmt) for m in derived) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def recall_curves(runs: list[Run], path: str) -> None:
    """Recall@K against K (log axis, 1 .. number of candidates), one line per run, both directions."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "t2i_rank", "text -> image"), (axes[1], "i2t_rank", "image -> text")):
        for run in runs:
            ranks = np.asarray(run.ranks[key])
            n = run.t2i.shape[1] if key == "t2i_rank" else run.t2i.shape[0]
            ks = np.unique(np.geomspace(1, n, num=min(n, 60)).astype(int))
            ax.plot(ks, [100.0 * np.mean(ranks <= k) for k in ks], marker=".", label=run.name)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (%)")
        ax.set_ylim(0, 101)
        ax.set_title(f"{title} recall@K")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def rank_buckets(largest: int) -> list[tuple[str, int, int]]:
    """Labelled inclusive rank ranges covering 1..largest, upper bounds on the 1-2-5 series: 1, 2, 3-5, 6-10,
    11-20, 21-50, 51-100, 101-200, ..."""
    bounds, bound = [1], 2
    while bounds[-1] < largest:
        bounds.append(bound)
        bound = bound * 5 // 2 if str(bound)[0] == "2" else bound * 2  # 2 -> 5 -> 10 -> 20 -> 50 -> 100 ...
    buckets, low = [], 1
    for high in bounds:
        high = min(high, largest)
        buckets.append((str(low) if low == high else f"{low}-{high}", low, high))
        low = high + 1
    return buckets


def rank_histograms(runs: list[Run], path: str) -> None:
    """Share of queries whose ground truth lands in each rank range (1, 2, 3-5, 6-10, ...), grouped bars per run,
    both directions. Ranges rather than log bins, so a bar's height never depends on its width."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, title in ((axes[0], "t2i_rank", "text -> image"), (axes[1], "i2t_rank", "image -> text")):
        n = runs[0].t2i.shape[1] if key == "t2i_rank" else runs[0].t2i.shape[0]
        buckets = rank_buckets(n)
        width = 0.8 / len(runs)
        for j, run in enumerate(runs):
            ranks = np.asarray(run.ranks[key])
            shares = [100.0 * float(np.mean((ranks >= lo) & (ranks <= hi))) for _, lo, hi in buckets]
            ax.bar(np.arange(len(buckets)) + (j - (len(runs) - 1) / 2) * width, shares, width, label=run.name)
        ax.set_xticks(np.arange(len(buckets)), [label for label, _, _ in buckets], rotation=30)
        ax.set_xlabel("rank of the ground truth (1 = first)")
        ax.set_ylabel("queries (%)")
        ax.set_title(f"{title}: where the ground truth ranks")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Phenomena
# ----------------------------------------------------------------------------------------------------


def phenomenon_buckets(texts: list[str]) -> dict[str, list[int]]:
    """Bucket name -> indices of the captions in it (a caption may be in several phenomenon buckets)."""
    buckets: dict[str, list[int]] = {name: [] for name in bucket_names()}
    for t, caption in enumerate(texts):
        for name in caption_phenomena(caption):
            buckets[name].append(t)
    return buckets


def phenomenon_table(runs: list[Run]) -> tuple[str, dict]:
    """Markdown table of text->image R@1 per caption bucket per run, and the same numbers as a dict."""
    buckets = {"all captions": list(range(len(runs[0].index["texts"]))), **phenomenon_buckets(runs[0].index["texts"])}
    numbers: dict[str, dict] = {}
    lines = ["| bucket | captions | " + " | ".join(f"{run.name} R@1" for run in runs) + " |"]
    lines.append("|---" * (len(runs) + 2) + "|")
    for name, members in buckets.items():
        row = {"captions": len(members)}
        for run in runs:
            ranks = np.asarray(run.ranks["t2i_rank"])[members]
            row[run.name] = 100.0 * float(np.mean(ranks == 1)) if len(members) else None
        numbers[name] = row
        cells = ["-" if row[run.name] is None else f"{row[run.name]:.1f}" for run in runs]
        lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), numbers


# ----------------------------------------------------------------------------------------------------
# Failure gallery
# ----------------------------------------------------------------------------------------------------


def _thumbnail(path: str, side: int, cache: dict) -> str:
    """A data: URI of a JPEG thumbnail (the HTML file stands alone)."""
    if path not in cache:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((side, side))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
            cache[path] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        except OSError:
            cache[path] = ""
    return cache[path]


_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; }
.query { border-top: 1px solid #ccc; padding: 8px 0; }
.caption { font-size: 15px; margin-bottom: 4px; }
.ranks { font-size: 12px; color: #555; margin-bottom: 4px; }
.row { display: flex; gap: 6px; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: 11px; }
figure img { display: block; border: 3px solid transparent; }
figure.gt img { border-color: #1a9850; }
figure.hit img { border-color: #1a9850; }
figure.gt { margin-left: 18px; }
.tags { font-size: 11px; color: #4575b4; }
"""


def failure_gallery(runs: list[Run], path: str, num_queries: int = 20, thumb: int = 96) -> None:
    """HTML: per run, its `num_queries` worst text->image queries (largest ground-truth rank), each with the caption,
    its phenomenon buckets, the ground-truth rank under every run, the run's top 5 images (score under each) and the
    ground-truth image (green border)."""
    cache: dict = {}
    images, texts, txt2img = runs[0].index["images"], runs[0].index["texts"], runs[0].index["txt2img"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Failure gallery</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Worst text&rarr;image queries ({len(texts)} captions, {len(images)} images)</h1>",
        "<p>Green border: the ground-truth image. Ranks are 1-based; the top 5 are the run's own.</p>",
    ]
    for run in runs:
        ranks = np.asarray(run.ranks["t2i_rank"])
        worst = np.argsort(-ranks, kind="stable")[:num_queries]
        parts.append(f"<h2>{html.escape(run.name)}: {len(worst)} worst queries</h2>")
        for t in worst:
            t = int(t)
            gt = txt2img[t]
            others = ", ".join(f"{html.escape(r.name)}: {int(r.ranks['t2i_rank'][t])}" for r in runs)
            tags = ", ".join(caption_phenomena(texts[t]))
            parts.append("<div class='query'>")
            parts.append(f"<div class='caption'>&ldquo;{html.escape(texts[t])}&rdquo;</div>")
            parts.append(f"<div class='ranks'>ground-truth rank &mdash; {others}</div>")
            parts.append(f"<div class='tags'>{html.escape(tags)}</div><div class='row'>")
            top = np.argsort(run.t2i[t])[::-1][:5]  # the official tie order
            for position, i in enumerate(top, 1):
                cls = "hit" if int(i) == gt else ""
                parts.append(
                    f"<figure class='{cls}'><img src='{_thumbnail(images[int(i)], thumb, cache)}' width='{thumb}'>"
                    f"#{position} &middot; {run.t2i[t, int(i)]:.3f}</figure>"
                )
            parts.append(
                f"<figure class='gt'><img src='{_thumbnail(images[gt], thumb, cache)}' width='{thumb}'>"
                f"ground truth &middot; rank {int(ranks[t])}</figure>"
            )
            parts.append("</div></div>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))


# ----------------------------------------------------------------------------------------------------
# All together
# ----------------------------------------------------------------------------------------------------


def write_report(runs: list[Run], out_dir: str, num_queries: int = 20) -> dict[str, str]:
    """Every output of the comparison in `out_dir`; returns {what: path}."""
    check_comparable(runs)
    unique_names(runs)
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "table": os.path.join(out_dir, "metrics.md"),
        "phenomena": os.path.join(out_dir, "phenomena.md"),
        "recall_curves": os.path.join(out_dir, "recall_curves.png"),
        "rank_histograms": os.path.join(out_dir, "rank_histograms.png"),
        "gallery": os.path.join(out_dir, "failure_gallery.html"),
        "summary": os.path.join(out_dir, "summary.json"),
    }
    table = metrics_table(runs)
    phenomena, phenomenon_numbers = phenomenon_table(runs)
    atomic_write_text(files["table"], table + "\n")
    atomic_write_text(
        files["phenomena"],
        "Text->image R@1 (%) per caption bucket (a caption can be in several phenomenon buckets).\n\n"
        + phenomena
        + "\n",
    )
    recall_curves(runs, files["recall_curves"])
    rank_histograms(runs, files["rank_histograms"])
    failure_gallery(runs, files["gallery"], num_queries)
    summary = {
        "runs": [{"name": r.name, "path": os.path.abspath(r.path), "model_info": r.info} for r in runs],
        "metrics": {r.name: metrics_from_ranks(r.ranks) for r in runs},
        "phenomena_t2i_r1": phenomenon_numbers,
    }
    atomic_write_json(files["summary"], summary, indent=2)
    return files
