"""The search index over a photo folder: build and update it (incremental, crash-safe, sharded under torchrun),
load it memory-mapped, and the exact blocked ITC top-k over it.

Format (a directory; `FORMAT_VERSION`):

    manifest.json      the commit point, replaced atomically: format, version, generation g, the model identity,
                       image_root, count N, dim D, dtype, the names of the files below, the unreadable files
    features-<g>.npy   (N, D) unit ITC image vectors (`search_feature_dtype`, float16 by default), memory-mapped
    entries-<g>.json   [[path relative to image_root, size, mtime_ns, inode], ...], row i describes features row i
                       (indexes written before inodes were recorded have 3 fields; they still load)
    config.yaml        the resolved config the model was built from (paths absolute), for query and serve
    pending/           chunks of a run in progress: chunk-<model id>-r<rank>-<uuid>.npz, each written whole
                       (temporary name, then rename), holding paths, sizes, mtimes, features and read errors

A run never modifies a committed file. It embeds what is new or changed into pending chunks, then rank 0 writes
features-<g+1>.npy and entries-<g+1>.json beside the old ones, fsyncs them and replaces manifest.json, and only
then deletes generation g and the chunks. Killed at any point, the directory holds generation g intact plus
whole chunks; the next run takes every chunk row whose (size, mtime, inode) equals the file's current one as done
and embeds only the rest. Chunk rows for any other version of a file (the folder changed after the kill) are
ignored, so the result of any sequence of kills and edits is the index of the folder as it is at the last run.

The model identity is a SHA-256 of the weights that produce or score features (every tensor except the momentum
copies and the ITC queues) plus the config keys that change the features without changing a weight's shape
(image_size) and the architecture; an index built with another model is refused, at build and at query time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from configs.schema import save_config
from data import create_loader
from data.image_folder import ImageFile, ImageFolderDataset, same_version, scan_image_folder
from data.transforms import test_transform
from engine.features import eval_autocast
from models.blip_retrieval import BlipRetrieval
from utils import UserError, atomic_write, barrier, get_rank, get_world_size, is_main_process, log, shard_range

FORMAT = "blip-search-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PENDING = "pending"
NOT_FEATURE_WEIGHTS = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "image_queue")
NOT_FEATURE_WEIGHTS += ("text_queue", "idx_queue", "ptr_queue")
MANIFEST_KEYS = ("generation", "model", "image_root", "count", "dim", "dtype", "features", "entries", "unreadable")
NO_INODE = -1  # how a chunk stores an unknown inode


class SearchIndexError(UserError):
    """An index directory that cannot be used as asked; the message names it and what to do."""


# ----------------------------------------------------------------------------------------------------
# Model identity
# ----------------------------------------------------------------------------------------------------


def weights_sha256(model: BlipRetrieval) -> str:
    """SHA-256 over the name, shape, dtype and bytes of every tensor that produces or scores features."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(NOT_FEATURE_WEIGHTS):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_identity(model: BlipRetrieval, config: dict, source: str | None) -> dict:
    """What an index records about the model that built it; `id` is the part that must match to use it."""
    features = {
        "image_size": config["image_size"],
        "vit": config["vit"],
        "med_config": model.med_config.to_dict(),
        "embed_dim": config["embed_dim"],
    }
    weights = weights_sha256(model)
    key = json.dumps({"weights": weights, "features": features}, sort_keys=True)
    return {
        "id": hashlib.sha256(key.encode()).hexdigest()[:16],
        "checkpoint": describe_source(source),
        "weights_sha256": weights,
        "features": features,
    }


def describe_source(source: str | None) -> str:
    """The checkpoint as recorded: an absolute path for a local file or directory, a URL as given, '' for none."""
    if not source:
        return ""
    path = os.path.expanduser(source)
    return os.path.abspath(path) if os.path.exists(path) else source


def check_same_model(manifest: dict, identity: dict, index_dir: str) -> None:
    built = manifest["model"]
    if built["id"] != identity["id"]:
        settings = [
            f"{key} {built['features'].get(key)!r} vs {value!r}"
            for key, value in identity["features"].items()
            if built["features"].get(key) != value
        ]
        what = f"feature settings ({'; '.join(settings)})" if settings else "weights"
        raise SearchIndexError(
            f"the index {index_dir} was built with another model (checkpoint {built['checkpoint'] or 'random init'!r}, "
            f"model id {built['id']}); this run's model (checkpoint {identity['checkpoint'] or 'random init'!r}, "
            f"model id {identity['id']}) differs in its {what}. Features of two models cannot be compared: use "
            f"the same checkpoint and config, or build a new index in another folder (or delete {index_dir})"
        )


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, separators=(",", ":")).encode()))


def read_manifest(index_dir: str) -> dict | None:
    """The committed manifest, None if the directory holds no index yet; SearchIndexError if it is not one of ours."""
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SearchIndexError(
            f"{path} is not a readable index manifest ({err}): the index is damaged; delete {index_dir} and build "
            f"it again with `search.py index`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchIndexError(f"{path} is not a search index manifest (no 'format': {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise SearchIndexError(
            f"{path} has index format version {manifest.get('version')!r}; this code reads version "
            f"{FORMAT_VERSION}: rebuild the index in a new folder"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise SearchIndexError(
            f"{path} lacks {missing}: the index is damaged; delete {index_dir} and build it again with "
            f"`search.py index`"
        )
    return manifest


def _write_chunk(pending: str, model_id: str, rank: int, rows: list[tuple[ImageFile, np.ndarray | None, str]]) -> None:
    dim = next((f.shape[0] for _, f, _ in rows if f is not None), 0)
    feats = np.stack([f if f is not None else np.zeros(dim, np.float32) for _, f, _ in rows]) if dim else None
    arrays = {
        "paths": np.array([r[0].path for r in rows]),
        "sizes": np.array([r[0].size for r in rows], dtype=np.int64),
        "mtimes": np.array([r[0].mtime_ns for r in rows], dtype=np.int64),
        "inos": np.array([NO_INODE if r[0].ino is None else r[0].ino for r in rows], dtype=np.int64),
        "errors": np.array([r[2] for r in rows]),
        "features": feats if feats is not None else np.zeros((len(rows), 0), np.float32),
    }
    name = f"chunk-{model_id}-r{rank}-{uuid.uuid4().hex[:12]}.npz"
    atomic_write(os.path.join(pending, name), lambda f: np.savez(f, **arrays))


def _read_chunks(
    pending: str, model_id: str, current: dict[str, tuple]
) -> dict[str, tuple[tuple, np.ndarray | None, str]]:
    """path -> (version, feature or None, error) from this model's whole chunks, for the rows that describe the
    `current` version (size, mtime_ns, inode) of a file. Rows for another version of a file (embedded before it
    was edited, replaced or deleted) are ignored, whatever order the chunks are read in."""
    done = {}
    if not os.path.isdir(pending):
        return done
    for name in sorted(os.listdir(pending)):
        if not (name.startswith(f"chunk-{model_id}-") and name.endswith(".npz")):
            continue
        try:
            with np.load(os.path.join(pending, name), allow_pickle=False) as z:
                paths, sizes, mtimes = z["paths"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist()
                inos = z["inos"].tolist() if "inos" in z.files else [NO_INODE] * len(paths)
                errors, feats = z["errors"].tolist(), z["features"]
        except (OSError, ValueError, KeyError, EOFError) as err:  # renamed whole, so only a disk fault gets here
            log(f"warning: ignoring unreadable chunk {name}: {err}")
            continue
        for i, path in enumerate(paths):
            version = (sizes[i], mtimes[i], None if inos[i] == NO_INODE else inos[i])
            if path in current and same_version(version, current[path]):
                done[path] = (version, None if errors[i] else feats[i], errors[i])
    return done


# ----------------------------------------------------------------------------------------------------
# Build / update
# ----------------------------------------------------------------------------------------------------


@dataclass
class IndexStats:
    """What a build or update did (the same on every rank, except `embedded`: this rank's share)."""

    total: int = 0  # images in the committed index
    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    resumed: int = 0  # taken from the chunks of an interrupted run
    embedded: int = 0  # images this rank ran through the ViT
    unreadable: list[str] = field(default_factory=list)  # "path: why", listed and left out
    skipped: list[str] = field(default_factory=list)  # found by the scan but not indexable (links out, ...)


@torch.no_grad()
def embed_files(
    model: BlipRetrieval,
    image_root: str,
    files: list[ImageFile],
    config: dict,
    device: torch.device,
    on_batch: Callable[[list[tuple[ImageFile, np.ndarray | None, str]]], None],
    show_progress: bool,
) -> None:
    """Unit ITC vectors of `files`, batch by batch: `on_batch` gets (file, feature or None, read error) rows."""
    dataset = ImageFolderDataset(
        image_root, [f.path for f in files], test_transform(config["image_size"]), config["image_size"]
    )
    loader = create_loader(dataset, config["batch_size_test"], config["num_workers"], is_train=False)
    progress = tqdm(total=len(files), desc="embedding images", unit="img", disable=not show_progress)
    for images, positions, errors in loader:
        with eval_autocast(device, config):
            _, feats = model.encode_image(images.to(device, non_blocking=True))
        feats = feats.float().cpu().numpy()
        on_batch([(files[p], None if e else feats[i], e) for i, (p, e) in enumerate(zip(positions.tolist(), errors))])
        progress.update(len(errors))
    progress.close()


def build_index(
    model: BlipRetrieval,
    config: dict,
    source: str | None,
    image_root: str,
    index_dir: str,
    device: torch.device,
    show_progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> IndexStats:
    """Create or update the index of `image_root` in `index_dir`; every rank calls it (torchrun shards the work).

    Files whose size and mtime match the committed index, or a whole chunk of an interrupted run, are not read
    again. `on_chunk(n)` is called after this rank writes its n-th chunk (tests interrupt a run there).
    """
    model.eval()
    rank, world = get_rank(), get_world_size()
    image_root = os.path.abspath(image_root)
    if os.path.isdir(index_dir) and os.path.realpath(index_dir) == os.path.realpath(image_root):
        raise SearchIndexError(f"--index {index_dir} is the image folder itself; choose another folder for the index")
    os.makedirs(os.path.join(index_dir, PENDING), exist_ok=True)
    lock = _lock(index_dir) if is_main_process() else None
    try:
        # Rank 0 scans and plans; the others get the files to embed, so that all ranks shard one and the same list.
        plan = _plan(model, config, source, image_root, index_dir) if is_main_process() else None
        identity, todo, stats = _broadcast(plan[:3] if plan else None)
        start, end = shard_range(len(todo), rank, world)
        pending_dir = os.path.join(index_dir, PENDING)
        buffer, written = [], 0

        def flush() -> None:
            nonlocal buffer, written
            if buffer:
                _write_chunk(pending_dir, identity["id"], rank, buffer)
                buffer, written = [], written + 1
                if on_chunk is not None:
                    on_chunk(written)

        def on_batch(rows: list) -> None:
            buffer.extend(rows)
            if len(buffer) >= config["search_chunk_images"]:
                flush()

        embed_files(model, image_root, todo[start:end], config, device, on_batch, show_progress and rank == 0)
        flush()
        stats.embedded = end - start
        barrier()
        if is_main_process():
            manifest, files, committed = plan[3:]
            _commit(index_dir, manifest, identity, config, image_root, files, committed, stats)
        barrier()
        result = read_manifest(index_dir)
        stats.total = result["count"]
        stats.unreadable = [f"{path}: {err}" for path, err in sorted(result["unreadable"].items())]
        return stats
    finally:
        if lock is not None:
            lock.close()


def _plan(model: BlipRetrieval, config: dict, source: str | None, image_root: str, index_dir: str) -> tuple:
    """Rank 0: check the model, scan the folder, compare with the index and the chunks. Returns (identity, files
    to embed, stats) for every rank, then (manifest, files found, committed entries) for the commit."""
    identity = model_identity(model, config, source)
    manifest = read_manifest(index_dir)
    if manifest is not None:
        check_same_model(manifest, identity, index_dir)
        if manifest["image_root"] != image_root:
            raise SearchIndexError(
                f"the index {index_dir} covers {manifest['image_root']}, not {image_root}; "
                f"use another index folder for another image folder"
            )
    files, skipped = scan_image_folder(image_root)
    committed = _committed_entries(index_dir, manifest)
    resumed = _read_chunks(os.path.join(index_dir, PENDING), identity["id"], {f.path: f.version for f in files})
    todo, stats = [], IndexStats(skipped=skipped)
    for f in files:
        old = committed.get(f.path)
        if old is not None and same_version(old[0], f.version):
            stats.unchanged += 1
            continue
        if old is None:
            stats.new += 1
        else:
            stats.changed += 1
        if f.path in resumed:
            stats.resumed += 1  # this very version embedded by an interrupted run
        else:
            todo.append(f)
    present = {f.path for f in files}
    stats.deleted = sum(1 for path in committed if path not in present)
    log(
        f"{image_root}: {len(files)} images; {stats.unchanged} unchanged, {stats.new} new, {stats.changed} "
        f"changed, {stats.deleted} deleted; {stats.resumed} of those embedded by an interrupted run; embedding "
        f"{len(todo)} on {get_world_size()} process(es)"
    )
    return identity, todo, stats, manifest, files, committed


def _broadcast(obj):
    """Rank 0's object on every rank (identity in a single process)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def _lock(index_dir: str):
    handle = open(os.path.join(index_dir, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SearchIndexError(f"another `search.py index` is updating {index_dir}; wait for it to finish") from None
    return handle


def _committed_entries(index_dir: str, manifest: dict | None) -> dict[str, tuple]:
    """path -> (version, row or None, error) of the committed index, unreadable files included. A committed
    generation whose files are missing or damaged is reported and treated as empty: this run rebuilds it."""
    if manifest is None:
        return {}
    try:
        index = SearchIndex.load(index_dir, manifest)
    except SearchIndexError as err:
        log(f"warning: {err}; embedding every image again")
        return {}
    out = {path: (index.version(row), row, "") for row, path in enumerate(index.paths)}
    for path, stat in manifest.get("unreadable_stat", {}).items():
        size, mtime, err = stat[:3]
        out[path] = ((size, mtime, stat[3] if len(stat) > 3 else None), None, err)
    return out


def _commit(
    index_dir: str,
    manifest: dict | None,
    identity: dict,
    config: dict,
    image_root: str,
    files: list[ImageFile],
    committed: dict[str, tuple],
    stats: IndexStats,
) -> None:
    """Rank 0: write generation g+1 from the committed rows and the chunks, then replace the manifest."""
    pending_dir = os.path.join(index_dir, PENDING)
    # Every rank's chunks, this run's and resumed ones, for the versions of the files this run planned with.
    fresh = _read_chunks(pending_dir, identity["id"], {f.path: f.version for f in files})
    dtype = np.dtype(config["search_feature_dtype"])
    dim = config["embed_dim"]
    rows, unreadable = [], {}  # rows: (file, committed row or None, fresh feature or None)
    for f in files:
        chunk, old = fresh.get(f.path), committed.get(f.path)
        if chunk is not None:
            feature, row, err = chunk[1], None, chunk[2]
        elif old is not None and same_version(old[0], f.version):
            feature, row, err = None, old[1], old[2]
        else:  # _plan put it in this run's work, so a chunk must hold it
            raise RuntimeError(f"{f.path} was neither embedded nor in the index")  # a bug, not a user error
        if err:
            unreadable[f.path] = (f.size, f.mtime_ns, err, f.ino)
        else:
            rows.append((f, row, feature))
    generation = (manifest["generation"] + 1) if manifest else 1
    features_name, entries_name = f"features-{generation}.npy", f"entries-{generation}.json"
    features_path = os.path.join(index_dir, features_name)
    old_features = (
        np.load(os.path.join(index_dir, manifest["features"]), mmap_mode="r")
        if any(r[1] is not None for r in rows)
        else None
    )
    out = np.lib.format.open_memmap(features_path, mode="w+", dtype=dtype, shape=(len(rows), dim))
    block = config["search_block_rows"]
    for start in range(0, len(rows), block):  # bounded memory: one block of rows at a time
        part = rows[start : start + block]
        old_rows = [i for i, r in enumerate(part) if r[1] is not None]
        if old_rows:
            out[start + np.array(old_rows)] = old_features[np.array([part[i][1] for i in old_rows])]
        new_rows = [i for i, r in enumerate(part) if r[2] is not None]
        if new_rows:
            out[start + np.array(new_rows)] = np.stack([part[i][2] for i in new_rows]).astype(dtype)
    out.flush()
    del out
    with open(features_path, "rb") as f:
        os.fsync(f.fileno())
    _write_json(os.path.join(index_dir, entries_name), [[f.path, f.size, f.mtime_ns, f.ino] for f, _, _ in rows])
    save_config(_portable_config(config), os.path.join(index_dir, "config.yaml"))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new_manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": generation,
        "model": identity,
        "image_root": image_root,
        "count": len(rows),
        "dim": dim,
        "dtype": dtype.name,
        "features": features_name,
        "entries": entries_name,
        "unreadable": {path: err for path, (_, _, err, _) in unreadable.items()},
        "unreadable_stat": {path: list(v) for path, v in unreadable.items()},
        "created": manifest["created"] if manifest else now,
        "updated": now,
    }
    _fsync_dir(index_dir)
    _write_manifest(index_dir, new_manifest)  # the commit point
    _fsync_dir(index_dir)
    keep = {MANIFEST, "config.yaml", features_name, entries_name, PENDING, ".lock"}
    for name in os.listdir(index_dir):  # the previous generation and leftovers of failed commits
        if name not in keep and (name.startswith(("features-", "entries-", MANIFEST, "config.yaml"))):
            os.remove(os.path.join(index_dir, name))
    for name in os.listdir(pending_dir):
        os.remove(os.path.join(pending_dir, name))


def _write_manifest(index_dir: str, manifest: dict) -> None:
    _write_json(os.path.join(index_dir, MANIFEST), manifest)


def _portable_config(config: dict) -> dict:
    """The config with relative paths made absolute, so that query and serve work from any directory."""
    out = dict(config)
    for key in ("text_encoder", "med_config"):
        value = out[key]
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            out[key] = os.path.abspath(os.path.expanduser(value))
    return out


# ----------------------------------------------------------------------------------------------------
# Load and top-k
# ----------------------------------------------------------------------------------------------------


@dataclass
class SearchIndex:
    """A committed index: `features` (N, D) memory-mapped, `paths[i]` / `sizes[i]` / `mtimes[i]` / `inos[i]` of
    row i (an inode is None in indexes written before inodes were recorded)."""

    index_dir: str
    manifest: dict
    features: np.ndarray
    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    inos: list[int | None]
    _path_set: frozenset[str] | None = field(default=None, repr=False)
    _rows: dict[str, int] | None = field(default=None, repr=False)

    def path_set(self) -> frozenset[str]:
        """The indexed relative paths, for membership tests (the web server serves only these)."""
        if self._path_set is None:
            self._path_set = frozenset(self.paths)
        return self._path_set

    def row_of(self, path: str) -> int | None:
        """The row of the indexed relative path `path`, None if it is not indexed."""
        if self._rows is None:
            self._rows = {p: i for i, p in enumerate(self.paths)}
        return self._rows.get(path)

    @property
    def image_root(self) -> str:
        return self.manifest["image_root"]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def __len__(self) -> int:
        return len(self.paths)

    def version(self, row: int) -> tuple[int, int, int | None]:
        """(size, mtime_ns, inode) of the file row `row` was computed from."""
        return self.sizes[row], self.mtimes[row], self.inos[row]

    @classmethod
    def load(cls, index_dir: str, manifest: dict | None = None) -> SearchIndex:
        """The committed index in `index_dir` (`manifest`: the one already read). Missing, truncated or
        inconsistent files end in a SearchIndexError that names the file and says to rebuild."""
        manifest = read_manifest(index_dir) if manifest is None else manifest
        if manifest is None:
            raise SearchIndexError(
                f"no search index in {index_dir!r} (no {MANIFEST}); build one with "
                f"`python search.py index --config CFG --checkpoint SRC --images DIR --index {index_dir}`"
            )
        rebuild = (
            f"the index is incomplete or damaged; run `search.py index` with --index {index_dir} again "
            f"to rebuild it (or delete {index_dir} and build a new one)"
        )
        entries_path = os.path.join(index_dir, str(manifest["entries"]))
        try:
            with open(entries_path, encoding="utf-8") as f:
                entries = json.load(f)
            if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) in (3, 4) and isinstance(e[0], str) for e in entries
            ):
                raise ValueError("not a list of [path, size, mtime_ns, inode] entries")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SearchIndexError(f"{entries_path}: {getattr(err, 'strerror', None) or err}; {rebuild}") from None
        features_path = os.path.join(index_dir, str(manifest["features"]))
        try:
            if manifest["count"]:
                # Copy-on-write: torch can wrap its pages without a copy, and nothing can ever write to the file.
                features = np.load(features_path, mmap_mode="c", allow_pickle=False)
            else:
                features = np.zeros((0, manifest["dim"]), dtype=manifest["dtype"])
        except (OSError, ValueError, EOFError, TypeError) as err:  # missing, truncated (mmap longer than the file)
            raise SearchIndexError(f"{features_path}: {getattr(err, 'strerror', None) or err}; {rebuild}") from None
        if features.shape != (manifest["count"], manifest["dim"]) or len(entries) != manifest["count"]:
            raise SearchIndexError(
                f"{index_dir}: {manifest['features']} holds {features.shape} and {manifest['entries']} {len(entries)} "
                f"entries, but the manifest says {manifest['count']} x {manifest['dim']}; {rebuild}"
            )
        return cls(
            index_dir,
            manifest,
            features,
            [e[0] for e in entries],
            [e[1] for e in entries],
            [e[2] for e in entries],
            [e[3] if len(e) > 3 else None for e in entries],
        )


@torch.no_grad()
def itc_topk(
    features: np.ndarray | torch.Tensor,
    query: torch.Tensor,
    k: int,
    block_rows: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosines of `query` (Q, D) over `features` (N, D) rows: (scores (Q, k), rows (Q, k)) on `device`.

    The rows are read `block_rows` at a time (from a memory map, or a tensor already on the device), cast to
    float32 and multiplied; each block's top k is merged with the running top k. Memory stays at one block
    whatever N, and the result equals one full matrix product followed by topk (ties aside).
    """
    n = features.shape[0]
    k = min(k, n)
    query = query.to(device, torch.float32)
    best_scores = torch.full((query.shape[0], 0), float("-inf"), device=device)
    best_rows = torch.zeros((query.shape[0], 0), dtype=torch.long, device=device)
    for start in range(0, n, block_rows):
        block = features[start : start + block_rows]
        if isinstance(block, np.ndarray):  # a memory-mapped block (copy-on-write map: no copy here)
            block = torch.from_numpy(block if block.flags.writeable else np.array(block))
        scores = query @ block.to(device, non_blocking=True).float().t()
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_rows = torch.cat([best_rows, top.indices + start], dim=1)
        if best_scores.shape[1] > k:
            keep = best_scores.topk(k, dim=1).indices
            best_scores, best_rows = best_scores.gather(1, keep), best_rows.gather(1, keep)
    order = best_scores.argsort(dim=1, descending=True)
    return best_scores.gather(1, order), best_rows.gather(1, order)
