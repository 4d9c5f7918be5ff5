"""Answer queries over a search index: text -> image with an ITC shortlist and ITM re-ranking, image -> image by ITC.

A text query is answered as the evaluation answers it (engine/evaluation.py): the ITC cosine of the query's
[CLS] feature with every indexed image, the top K by cosine, then each of those K scored by ITM match logit +
cosine, with [ENC] in place of [CLS]. Results beyond the K re-ranked ones keep their ITC order with
score = cosine - 100, as in evaluation (`rerank_score: calibrated` scores log P_ITM(match) + cosine / temp instead).

The index holds only ITC vectors; the image tokens that ITM attends to are recomputed on demand for the
shortlist (ViT forward of K images read from disk) and kept in a bounded LRU cache (`search_cache_images`),
keyed by path, size and mtime so that an edited photo is never scored with its old tokens. The cost of a
re-ranked query therefore depends on K and on how many of the K are cached, not on the index size N; only the
ITC top-k (a blocked matrix product, engine/search_index.itc_topk) grows with N.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from data.image_folder import is_inside, read_image
from data.retrieval import DataError
from data.transforms import test_transform
from engine.features import eval_autocast, text_features, token_dtype
from engine.itm_rerank import OUTSIDE_TOP_K, itm_match_one_text, rerank_score
from engine.search_index import (
    SearchIndex,
    SearchIndexError,
    check_same_model,
    itc_topk,
    model_identity,
    read_manifest,
)
from models.blip_retrieval import BlipRetrieval


@dataclass
class Hit:
    """One result: `path` relative to the image root, `score` (if re-ranked, the `rerank_score` of its ITM logits
    and cosine; else the cosine, or cosine - 100 beyond the re-ranked K), its parts (`itm`: the match logit), and
    the index row."""

    path: str
    score: float
    cosine: float
    itm: float | None
    row: int

    def as_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "cosine": self.cosine, "itm": self.itm, "row": self.row}


@dataclass
class SearchResult:
    hits: list[Hit]
    mode: str  # "rerank" | "itc" | "image"
    rerank_k: int
    timings_ms: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # shortlisted files that could no longer be read

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "rerank_k": self.rerank_k,
            "results": [h.as_dict() for h in self.hits],
            "timings_ms": self.timings_ms,
            "missing": self.missing,
        }


class Searcher:
    """A loaded model and index. Thread-safe: one query runs at a time (the model and the cache are shared)."""

    def __init__(self, model: BlipRetrieval, index: SearchIndex, config: dict, device: torch.device):
        check_same_model(index.manifest, model_identity(model, config, None), index.index_dir)
        self.model, self.index, self.config, self.device = model.eval(), index, config, device
        self.transform = test_transform(config["image_size"])
        self.cache: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self.cache_size = config["search_cache_images"]
        self.lock = threading.Lock()
        self.features = self._place_features(index)
        self.loader_threads = max(1, config["num_workers"])

    def _place_features(self, index: SearchIndex):
        """Where the ITC top-k reads the features from. On a GPU: GPU memory, as stored (1M x 256 in fp16: 512 MB).
        On a CPU: a float32 copy in RAM when it takes at most half the available memory (1 GB per 1M images),
        because casting float16 to float32 costs more than the product itself (bench/bench_search.py); else
        the memory map, read and cast block by block."""
        if self.device.type == "cuda":
            return torch.from_numpy(index.features).to(self.device)
        need = index.features.shape[0] * index.features.shape[1] * 4
        if index.features.dtype == np.float32 or need > 0.5 * available_memory():
            return index.features
        out = torch.empty(index.features.shape, dtype=torch.float32)
        block = self.config["search_block_rows"]
        for start in range(0, len(out), block):
            out[start : start + block] = torch.from_numpy(index.features[start : start + block])
        return out

    def reload_if_changed(self) -> bool:
        """Pick up a newer generation of the index (an update committed while serving). True if reloaded."""
        manifest = read_manifest(self.index.index_dir)
        if manifest is None or manifest["generation"] == self.index.manifest["generation"]:
            return False
        with self.lock:
            check_same_model(manifest, self.index.model, self.index.index_dir)
            index = SearchIndex.load(self.index.index_dir)
            self.index, self.features = index, self._place_features(index)
        return True

    # ------------------------------------------------------------------------------------------ queries

    @torch.no_grad()
    def search_text(self, text: str, top: int = 10, rerank_k: int | None = None, rerank: bool = True) -> SearchResult:
        """The `top` best images for `text`: ITC shortlist of `rerank_k` (default k_test) re-ranked by ITM."""
        rerank_k = self.config["k_test"] if rerank_k is None else rerank_k
        if top < 1 or rerank_k < 1:
            raise ValueError(f"top and rerank_k must be >= 1, got {top} and {rerank_k}")
        if not text.strip():
            raise ValueError("empty query text")  # the command line and the API refuse it first
        with self.lock:
            timings = {}
            t0 = time.perf_counter()
            ids, atts, feat = text_features(self.model, [text], self.device, self.config)
            length = int(atts[0].sum())
            enc_ids, atts = ids[:, :length], atts[:, :length]  # ITM reads the text at its own length
            timings["text"] = _ms(t0)
            t0 = time.perf_counter()
            k = min(max(top, rerank_k if rerank else top), len(self.index))
            if k == 0:
                return SearchResult([], "rerank" if rerank else "itc", rerank_k, timings)
            cos, rows = itc_topk(self.features, feat, k, self.config["search_block_rows"], self.device)
            cos, rows = cos[0].cpu().tolist(), rows[0].cpu().tolist()
            timings["itc_topk"] = _ms(t0)
            if not rerank:
                hits = [Hit(self.index.paths[r], c, c, None, r) for c, r in zip(cos, rows)]
                return SearchResult(hits[:top], "itc", rerank_k, timings)
            n_rerank = min(rerank_k, len(rows))
            t0 = time.perf_counter()
            tokens, kept, missing = self._image_tokens(rows[:n_rerank])
            timings["image_tokens"] = _ms(t0)
            t0 = time.perf_counter()
            logits = itm_match_one_text(self.model, enc_ids, atts, tokens, self.device, self.config).float().cpu()
            timings["itm"] = _ms(t0)
            kept_cos = torch.tensor([cos[i] for i in kept], dtype=torch.float32)
            scores = rerank_score(
                logits, kept_cos, self.config["rerank_score"], float(self.model.temp.detach())
            ).tolist()
            reranked = [
                Hit(self.index.paths[rows[i]], scores[j], cos[i], logits[j, 1].item(), rows[i])
                for j, i in enumerate(kept)
            ]
            reranked.sort(key=lambda h: -h.score)
            rest = [
                Hit(self.index.paths[r], c + OUTSIDE_TOP_K, c, None, r) for c, r in zip(cos[n_rerank:], rows[n_rerank:])
            ]
            return SearchResult((reranked + rest)[:top], "rerank", rerank_k, timings, missing)

    @torch.no_grad()
    def search_image(self, path: str, top: int = 10) -> SearchResult:
        """The `top` indexed images closest to the image file `path` by ITC cosine (image -> image)."""
        try:
            image = self.transform(read_image(path))
        except DataError as err:
            raise SearchIndexError(f"--image: {err}") from None
        with self.lock:
            t0 = time.perf_counter()
            with eval_autocast(self.device, self.config):
                _, feat = self.model.encode_image(image[None].to(self.device))
            cos, rows = itc_topk(
                self.features, feat, min(top, len(self.index)), self.config["search_block_rows"], self.device
            )
            hits = [Hit(self.index.paths[r], c, c, None, r) for c, r in zip(cos[0].tolist(), rows[0].tolist())]
            return SearchResult(hits, "image", 0, {"total": _ms(t0)})

    # ------------------------------------------------------------------------------------------ image tokens

    def _image_tokens(self, rows: list[int]) -> tuple[torch.Tensor, list[int], list[str]]:
        """Tokens (n, 1+P, D) for the shortlist `rows`, from the cache or computed now; the positions in `rows`
        they belong to, and the paths that could not be read (deleted or broken since indexing)."""
        keys = [self._key(r) for r in rows]
        todo = [i for i, key in enumerate(keys) if key not in self.cache]
        fresh, missing = {}, []
        if todo:
            with ThreadPoolExecutor(self.loader_threads) as pool:  # decoding releases the GIL
                images = list(pool.map(self._load, [rows[i] for i in todo]))
            loaded = [(i, img) for i, img in zip(todo, images) if isinstance(img, torch.Tensor)]
            missing = [self.index.paths[rows[i]] for i, img in zip(todo, images) if not isinstance(img, torch.Tensor)]
            dtype = token_dtype(self.device, self.config)
            batch = self.config["batch_size_test"]
            for start in range(0, len(loaded), batch):
                part = loaded[start : start + batch]
                with eval_autocast(self.device, self.config):
                    embeds, _ = self.model.encode_image(torch.stack([img for _, img in part]).to(self.device))
                for (i, _), tokens in zip(part, embeds.to(dtype)):
                    fresh[i] = tokens
        cached = {i: self.cache[key] for i, key in enumerate(keys) if i not in fresh and key in self.cache}
        kept = [i for i in range(len(rows)) if i in fresh or i in cached]
        out = [fresh[i] if i in fresh else cached[i] for i in kept]
        for i in cached:  # only now touch the LRU: evicting earlier would lose tokens this query needs
            self.cache.move_to_end(keys[i])
        for i in fresh:
            self._remember(keys[i], fresh[i])
        if not out:
            vit = self.model.visual_encoder
            return torch.zeros(0, vit.num_patches + 1, vit.embed_dim, device=self.device), kept, missing
        return torch.stack(out), kept, missing

    def _key(self, row: int) -> tuple[str, int, int]:
        return self.index.paths[row], self.index.sizes[row], self.index.mtimes[row]

    def _load(self, row: int) -> torch.Tensor | str:
        path = os.path.join(self.index.image_root, self.index.paths[row])
        if not is_inside(self.index.image_root, path):  # swapped for a link out of the folder since indexing
            return f"{path} now points outside {self.index.image_root}"
        try:
            return self.transform(read_image(path))
        except DataError as err:
            return str(err)

    def _remember(self, key: tuple[str, int, int], tokens: torch.Tensor) -> None:
        if self.cache_size <= 0:
            return
        self.cache[key] = tokens
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (Linux); 0 elsewhere, which keeps the memory map."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ms(t0: float) -> float:
    return round(1e3 * (time.perf_counter() - t0), 2)
