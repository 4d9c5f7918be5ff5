"""Shared helpers: config loading and validation, distributed helpers, schedules, seeding, logging.

Everything here also works in a single process without torch.distributed initialised.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import random
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml


class UserError(Exception):
    """Input a user can fix (a config, data or checkpoint problem). `run_cli` prints its message as one line; the
    message names the file, key or value and what was expected."""


class ConfigError(UserError, ValueError):
    """A config file, override or value that cannot be used; the message says where and why."""


# OS errors that mean "this path cannot be used as given" or "the disk is full": the user's to fix, so run_cli
# reports them in one line. Any other OSError (a bad file descriptor, a broken pipe inside a library ...) is a bug
# or an environment failure and keeps its traceback.
_USER_OS_ERRORS: dict[int, str] = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOTDIR: "a part of the path is a file, expected a folder",
    errno.EEXIST: "already exists and is in the way",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device; free some space (or choose another location) and rerun",
    errno.EDQUOT: "disk quota exceeded; free some space (or choose another location) and rerun",
    errno.ENAMETOOLONG: "file name too long",
}


def describe_os_error(err: OSError) -> str | None:
    """One line for an OSError that is the user's to fix (see _USER_OS_ERRORS), naming the path; None otherwise.

    A path error only counts with a path attached (open, stat, makedirs ... set `filename`); disk full and quota
    count without one (a failing write() carries none), the path being added by atomic_write where it can."""
    reason = _USER_OS_ERRORS.get(err.errno) if err.errno is not None else None
    if reason is None:
        return None
    if err.filename is None:
        return f"{reason} ({err.strerror})" if err.errno in (errno.ENOSPC, errno.EDQUOT) else None
    path = os.fsdecode(err.filename)
    if err.filename2 is not None:
        path += f" -> {os.fsdecode(err.filename2)}"
    return f"{path}: {reason}"


def _user_error_line(err: UserError) -> str:
    """The message of a UserError; one raised in a DataLoader worker arrives re-raised in this process with the
    worker's whole traceback as its text, of which only the original message is kept."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        cls = type(err)
        for marker in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__name__}: "):
            if marker in text:
                return text.rsplit(marker, 1)[1].rstrip("\n")
    return text


def run_cli(main: Callable[[], Any]) -> None:
    """A script's console entry point: a UserError ends the process with `error: <message>` on stderr (exit
    status 1) instead of a traceback, and so do OS errors that are the user's (a path that is missing, unreadable,
    unwritable or of the wrong kind, a full disk: describe_os_error) and YAML that does not parse. Anything else is
    a bug and keeps its traceback."""
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {_user_error_line(err)}")
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        sys.exit(f"error: {message}")
    except yaml.YAMLError as err:
        sys.exit(f"error: not valid YAML: {' '.join(str(err).split())}")


# ----------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device {device!r} is not one of auto, cuda, cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' requested but torch.cuda.is_available() is False; set device: cpu or device: auto"
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun or SLURM; otherwise run as a single process."""
    kind = _resolve_device(device)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "MASTER_ADDR" in env:  # srun with a rendezvous address set by the script
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1))
        ngpu = max(torch.cuda.device_count(), 1)
        local = int(env.get("SLURM_LOCALID", rank % ngpu))
        env.setdefault("MASTER_PORT", "29500")
    else:
        return DistInfo(0, 1, 0, torch.device(kind), False)
    if kind == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not is_dist_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        extra = {"device_id": dev} if kind == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **extra)
    return DistInfo(rank, world, local, dev, True)


def is_dist_initialized() -> bool:
    """True when a torch.distributed process group is active."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks; a no-op in a single process."""
    if is_dist_initialized():
        dist.barrier()


def log(msg: str) -> None:
    """Print on the main process only."""
    if is_main_process():
        print(msg, flush=True)


@torch.no_grad()
def all_gather_concat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate same-shaped tensors from all ranks along dim 0, in rank order (no gradient)."""
    if get_world_size() == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = t.shape[0]
        return all_gather_concat(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every slice, so this rank's slice gets the sum over all ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate same-shaped tensors from all ranks along dim 0, keeping the gradient path."""
    if get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place and return it; identity in a single process."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) slice of n items for `rank` of `world` (sizes differ by at most one)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def gather_shards(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate the ranks' contiguous row shards (from shard_range) into the full (n_total, ...) tensor."""
    world = get_world_size()
    if world == 1:
        return x
    largest = shard_range(n_total, 0, world)[1]  # rank 0 holds the largest shard
    padded = torch.zeros((largest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = all_gather_concat(padded).view(world, largest, *x.shape[1:])
    sizes = [end - start for start, end in (shard_range(n_total, r, world) for r in range(world))]
    return torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])


def cleanup_distributed() -> None:
    """Tear down the process group if one is active."""
    if is_dist_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Schedules, seeding, saving, logging
# ----------------------------------------------------------------------------------------------------


def autocast_dtype(device: torch.device, amp: str, amp_cpu: bool = False) -> torch.dtype | None:
    """The dtype `autocast` runs in, or None where it does not autocast (see there)."""
    if device.type == "cuda" and amp != "none":
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "bf16" and amp_cpu:
        return torch.bfloat16
    return None


def autocast(device: torch.device, amp: str, amp_cpu: bool = False):
    """Mixed precision (`amp`: bf16 | fp16 | none) on CUDA; on CPU only bf16 and only with `amp_cpu`.

    CPU bf16 is opt-in: it roughly doubles matmul throughput where the CPU has bf16 instructions (AVX512-BF16,
    AMX) and is slower than fp32 where it has to be emulated.
    """
    dtype = autocast_dtype(device, amp, amp_cpu)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def capture_rng_state() -> dict:
    """Snapshot every RNG this process uses, for an exact resume.

    Only tensors, ints, floats and tuples, so torch.load(weights_only=True) can read it back.
    """
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    """Restore a capture_rng_state() snapshot."""
    random.setstate(state["python"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# When this process started (close enough: utils is imported before anything is written). A temporary file of ours
# older than that cannot belong to a write of this process; see remove_stale_temporaries.
_PROCESS_STARTED = time.time()
_TMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{12}")  # atomic_write's temporary names: <target>.tmp-<12 hex digits>


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporary files a killed atomic_write to `path` left behind (`<path>.tmp-<12 hex>`, regular files
    last modified before this process started) and return their paths. Nothing else is touched: not other
    targets' temporaries, not names that merely look alike, and not a temporary a live writer is still filling
    (its modification time is recent)."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet: nothing to clean
        return removed
    for entry in entries:
        if not (entry.name.startswith(name) and _TMP_SUFFIX.fullmatch(entry.name[len(name) :])):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < _PROCESS_STARTED:
                os.remove(entry.path)
                removed.append(entry.path)
        except OSError:  # gone already, or not ours to delete: leave it
            continue
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by an interrupted write of {path}: {', '.join(removed)}")
    return removed


def atomic_write(path: str, write: Callable[[Any], Any]) -> None:
    """Write through `write(binary_file)` to a temporary name beside `path`, fsync, rename: a crash never leaves a
    half-written file under `path` (it is whole or absent). The temporary name is unique per process and call;
    those a killed earlier run left for the same `path` are deleted first (remove_stale_temporaries)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"  # uuid4 reads os.urandom: the seeded RNGs stay untouched
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None and err.errno is not None:  # a failing write() names no file: name the target
            raise OSError(err.errno, err.strerror, path) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` atomically (atomic_write); tensors and numpy values become plain numbers."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default))


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically (temp file in the same directory, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _blocking_file(path: str) -> str | None:
    """The first component of `path` (from the root down) that exists and is not a folder, or None."""
    parts = os.path.abspath(path)
    prefix = os.sep
    for part in parts.split(os.sep)[1:]:
        prefix = os.path.join(prefix, part)
        if not os.path.exists(prefix):
            return None
        if not os.path.isdir(prefix):
            return prefix
    return None


def check_output_dir(path: str, what: str) -> None:
    """Make sure the output folder `path` (named `what` in messages, e.g. "--output-dir") exists and can be
    written, before any work: create it, write and delete a probe file. Raises UserError naming the folder and
    why (a file in the way, a parent that is a file, no permission, a read-only or full disk)."""
    blocker = _blocking_file(path)
    if blocker is not None:
        where = "is a file" if os.path.abspath(blocker) == os.path.abspath(path) else f"lies under the file {blocker}"
        raise UserError(f"{what} {path} cannot be an output folder: it {where}; expected a folder (or a new name)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = _USER_OS_ERRORS.get(err.errno, err.strerror) if err.errno is not None else str(err)
        raise UserError(f"{what} {path} cannot be written: {reason}") from err


def check_output_file(path: str, what: str) -> None:
    """check_output_dir for the folder of the output file `path`, and `path` itself must not be a folder."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; expected the name of a file to write")
    check_output_dir(os.path.dirname(os.path.abspath(path)), f"{what} {path}: its folder")


DOWNLOAD_TIMEOUT_S = 60  # seconds without data before a download fails


def download_file(url: str, dest: str, progress: bool = True) -> None:
    """Download `url` to `dest`, creating its folder, with a progress bar on stderr.

    torch.hub.download_url_to_file writes a temporary file beside `dest` and renames it at the end, so an
    interrupted download never leaves a partial file under `dest`. Raises OSError (urllib.error.HTTPError and
    URLError for HTTP and connection failures, and disk errors) or ValueError (an unusable URL); callers turn them
    into their own error type.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    # torch.hub takes no timeout; its urlopen uses the socket default, so a stalled connection fails instead of
    # hanging forever.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, dest, progress=progress)
    except http.client.HTTPException as err:  # a malformed response; unlike the other network errors, no OSError
        raise OSError(f"{type(err).__name__}: {err}") from err
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return str(value)


class JsonlLogger:
    """Append one JSON object per line to a file, on the main process only."""

    def __init__(self, path: str) -> None:
        self.path = path

    def log(self, record: dict) -> None:
        """Append `record` as one line; tensors and numpy values become plain numbers or lists."""
        if not is_main_process():
            return
        # Open per call: records are rare (per epoch / every log_every steps) and this survives crashes.
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
