"""Photo search benchmark: ITC top-k over a memory-mapped index (blocked vs naive), query latency against the
index size (ITC-only and re-ranked), and indexing throughput.

    python -m bench.bench_search [--device auto|cuda|cpu] [--vit base|large|tiny] [--text base|tiny]
        [--image-size N] [--topk-rows N] [--sizes 1000 10000 100000] [--k K] [--num-queries Q]
        [--index-images M] [--threads T] [--out results.json]

1. ITC top-k at scale: a synthetic (--topk-rows, default 1M) x 256 float16 feature file (random unit vectors,
   memory-mapped as the index keeps it), one query vector, top k:
       blocked   engine.search_index.itc_topk: `search_block_rows` rows at a time, cast to float32, multiplied,
                 top k merged (memory: one block)
       naive     the whole map cast to one float32 array (a copy of N x 256 x 4 bytes per query), one product
       resident  the features held in memory as float32 beforehand (1 GB at 1M; no per-query copy): the bound
   All three must return the same rows. Median and p90 over --num-queries queries, same queries for all.
2. Query latency against N (--sizes): an index of N random unit features whose paths cycle over a pool of
   generated images, so that re-ranking really reads, decodes and encodes the shortlisted files; the
   searcher of search.py (engine.search_query.Searcher) answers captions: ITC only, and ITC top K re-ranked by
   ITM with the image-token cache off (every shortlisted image through the ViT: the cold, worst case) and
   warm (the same query again: tokens cached, only the ITM forward left).
3. Indexing throughput: engine.search_index.build_index over --index-images generated images, images/s.

Random weights (seeded): the work does not depend on them. Defaults on CPU: tiny towers at 128 px, k 16; on
CUDA: ViT-B + BERT-base at 384 px, k 128 (the seed paper's 0.16 s per query on an A100 is the anchor).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from bench.bench_eval import bench_config, device_description, environment, make_data, make_model, resolve_device
from bench.bench_query import percentile
from engine import search_index
from engine.search_index import SearchIndex, build_index, itc_topk, model_identity
from engine.search_query import Searcher


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--vit", default=None, choices=["base", "large", "tiny"], help="default base on CUDA, tiny on CPU")
    p.add_argument("--text", default=None, choices=["base", "tiny"], help="default base on CUDA, tiny on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 384 on CUDA, 128 on CPU")
    p.add_argument("--topk-rows", type=int, default=1_000_000)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--k", type=int, default=None, help="re-ranked shortlist; default 128 on CUDA, 16 on CPU")
    p.add_argument("--num-queries", type=int, default=10)
    p.add_argument("--pool-images", type=int, default=None, help="distinct image files behind the index paths")
    p.add_argument("--index-images", type=int, default=None, help="images for the throughput part")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="eval_amp on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    for name, gpu, cpu in (
        ("vit", "base", "tiny"),
        ("text", "base", "tiny"),
        ("image_size", 384, 128),
        ("k", 128, 16),
        ("pool_images", 512, 64),
        ("index_images", 2000, 200),
    ):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    return args


def stats_ms(values: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(values), "p90_ms": 1e3 * percentile(values, 0.9)}


def _ms(s: dict) -> str:
    return f"{s['median_ms']:.1f} ({s['p90_ms']:.1f})"


def random_unit(n: int, dim: int, rng: np.random.Generator, dtype=np.float16) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def bench_topk(rows: int, dim: int, k: int, block_rows: int, queries: int, device: torch.device, tmp: str) -> dict:
    rng = np.random.default_rng(0)
    path = os.path.join(tmp, "features.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    for start in range(0, rows, 100_000):
        out[start : start + 100_000] = random_unit(min(100_000, rows - start), dim, rng)
    out.flush()
    del out
    mapped = np.load(path, mmap_mode="c")  # as SearchIndex.load maps it
    qs = torch.from_numpy(random_unit(queries + 1, dim, rng, np.float32))

    def naive(q):
        full = torch.from_numpy(mapped).to(device).float()
        return (full @ q.to(device)).topk(k)

    # What Searcher holds: on a GPU the stored float16 in GPU memory, on a CPU a float32 copy in RAM.
    resident = torch.from_numpy(mapped).to(device)
    resident = resident.float() if device.type == "cpu" else resident
    paths = {
        "blocked": lambda q: itc_topk(mapped, q[None], k, block_rows, device),
        "naive": naive,
        "resident_blocked": lambda q: itc_topk(resident, q[None], k, block_rows, device),
        "resident_full": lambda q: (resident.float() @ q.to(device)).topk(k),
    }
    times = {name: [] for name in paths}
    rows_of = {}
    for i, q in enumerate(qs):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            result = fn(q)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # query 0 warms the page cache and the allocator
                times[name].append(time.perf_counter() - t0)
            rows_of[name] = (result.indices if hasattr(result, "indices") else result[1][0]).cpu()
        for name in paths:
            assert torch.equal(rows_of[name], rows_of["naive"]), f"{name} and naive top-k differ"
    result = {name: stats_ms(v) for name, v in times.items()}
    result.update(
        rows=rows,
        dim=dim,
        k=k,
        block_rows=block_rows,
        file_mb=os.path.getsize(path) / 2**20,
        naive_copy_mb=rows * dim * 4 / 2**20,
        blocked_block_mb=min(rows, block_rows) * dim * 4 / 2**20,
        speedup_blocked_vs_naive=result["naive"]["median_ms"] / result["blocked"]["median_ms"],
        speedup_resident_vs_blocked_map=result["blocked"]["median_ms"] / result["resident_blocked"]["median_ms"],
    )
    return result


def write_index(index_dir: str, model, config: dict, n: int, pool: list[str], image_root: str, rng) -> None:
    """An index of n random unit features whose paths cycle over the pool of real files."""
    os.makedirs(index_dir, exist_ok=True)
    feats = np.lib.format.open_memmap(
        os.path.join(index_dir, "features-1.npy"), mode="w+", dtype=np.float16, shape=(n, config["embed_dim"])
    )
    for start in range(0, n, 100_000):
        feats[start : start + 100_000] = random_unit(min(100_000, n - start), config["embed_dim"], rng)
    feats.flush()
    stats = {p: os.stat(os.path.join(image_root, p)) for p in pool}
    entries = [[p, stats[p].st_size, stats[p].st_mtime_ns] for p in (pool[i % len(pool)] for i in range(n))]
    with open(os.path.join(index_dir, "entries-1.json"), "w") as f:
        json.dump(entries, f)
    manifest = {
        "format": search_index.FORMAT,
        "version": search_index.FORMAT_VERSION,
        "generation": 1,
        "model": model_identity(model, config, None),
        "image_root": image_root,
        "count": n,
        "dim": config["embed_dim"],
        "dtype": "float16",
        "features": "features-1.npy",
        "entries": "entries-1.json",
        "unreadable": {},
        "unreadable_stat": {},
        "created": "",
        "updated": "",
    }
    with open(os.path.join(index_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def bench_queries(args, model, config, device, captions, pool, image_root, tmp) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    for n in args.sizes:
        index_dir = os.path.join(tmp, f"index_{n}")
        write_index(index_dir, model, config, n, pool, image_root, rng)
        cold = Searcher(model, SearchIndex.load(index_dir), {**config, "search_cache_images": 0}, device)
        warm = Searcher(model, SearchIndex.load(index_dir), config, device)
        times = {"itc_only": [], "rerank_cold": [], "rerank_warm": []}
        parts = []
        for i, caption in enumerate(captions[: args.num_queries + 1]):
            t = {}
            for name, searcher, kwargs in (
                ("itc_only", cold, {"rerank": False}),
                ("rerank_cold", cold, {"rerank_k": args.k}),
                ("rerank_warm", warm, {"rerank_k": args.k}),
            ):
                if name == "rerank_warm":
                    warm.search_text(caption, top=10, rerank_k=args.k)  # fills the cache for this query
                t0 = time.perf_counter()
                result = searcher.search_text(caption, top=10, **kwargs)
                t[name] = time.perf_counter() - t0
                if name == "rerank_cold":
                    parts.append(result.timings_ms)
            if i > 0:  # the first query warms up
                for name, value in t.items():
                    times[name].append(value)
        out[n] = {name: stats_ms(v) for name, v in times.items()}
        out[n]["cold_parts_median_ms"] = {key: statistics.median(p[key] for p in parts[1:]) for key in parts[0]}
        print(
            f"N {n:>8}: ITC only {out[n]['itc_only']['median_ms']:8.1f} ms (p90 {out[n]['itc_only']['p90_ms']:.1f}); "
            f"re-ranked k {args.k}: cold {out[n]['rerank_cold']['median_ms']:8.1f} ms "
            f"(p90 {out[n]['rerank_cold']['p90_ms']:.1f}), warm {out[n]['rerank_warm']['median_ms']:8.1f} ms "
            f"(p90 {out[n]['rerank_warm']['p90_ms']:.1f}); cold parts {out[n]['cold_parts_median_ms']}",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = args.amp if device.type == "cuda" else "none"
    payload = {"benchmark": "search", "args": vars(args), "device": device_description(device), "env": environment()}
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        config = {"search_block_rows": 65536}
        topk = bench_topk(args.topk_rows, 256, args.k, config["search_block_rows"], args.num_queries, device, tmp)
        payload["topk"] = topk
        print(
            f"ITC top-{args.k} over {args.topk_rows} x 256 float16 ({topk['file_mb']:.0f} MB), median (p90) ms:\n"
            f"  memory map, blocked ({topk['blocked_block_mb']:.0f} MB per block): {_ms(topk['blocked'])}\n"
            f"  memory map, naive (a {topk['naive_copy_mb']:.0f} MB float32 copy per query): {_ms(topk['naive'])}\n"
            f"  resident as Searcher holds it ({'GPU float16' if device.type == 'cuda' else 'RAM float32'}), "
            f"blocked: {_ms(topk['resident_blocked'])}; one full product: {_ms(topk['resident_full'])}\n"
            f"  naive / blocked map {topk['speedup_blocked_vs_naive']:.2f}x; blocked map / resident "
            f"{topk['speedup_resident_vs_blocked_map']:.2f}x; the same rows in all four",
            flush=True,
        )

        paths = make_data(os.path.join(tmp, "data"), max(args.pool_images, args.index_images), 5, args.image_size)
        config = bench_config(
            paths, args.vit, args.text, args.image_size, device=device.type, num_workers=2, eval_amp=amp
        )
        config = copy.deepcopy(config)
        model = make_model(config, args.seed, device).eval()
        image_root = os.path.join(paths["image_root"], "test")
        files = sorted(os.listdir(image_root))
        with open(paths["test_file"]) as f:
            captions = [rec["caption"][0] for rec in json.load(f)]
        payload["queries"] = bench_queries(
            args, model, config, device, captions, files[: args.pool_images], image_root, tmp
        )

        folder = os.path.join(tmp, "index_folder")
        os.makedirs(folder)
        for name in files[: args.index_images]:
            os.link(os.path.join(image_root, name), os.path.join(folder, name))
        t0 = time.perf_counter()
        stats = build_index(model, config, None, folder, os.path.join(tmp, "built"), device, show_progress=False)
        elapsed = time.perf_counter() - t0
        payload["indexing"] = {"images": stats.total, "seconds": elapsed, "images_per_s": stats.total / elapsed}
        print(
            f"indexing: {stats.total} images at {args.image_size} px in {elapsed:.1f} s = "
            f"{stats.total / elapsed:.1f} images/s (scan, decode, ViT, chunk files, commit)"
        )
    payload["env"]["load_average_after"] = list(os.getloadavg())
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
