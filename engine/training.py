"""The ITC+ITM training loop and the state a run carries from epoch to epoch.

checkpoint_last.pth is one file written by rank 0: {format, model (state dict incl. momentum encoders and
queues), optimizer, scaler, train_state (TrainState), config, world_size, rng_states (one capture_rng_state() per
rank, gathered)}. One file rather than per-rank files, so a copied or moved checkpoint can never lose part of its
state. Resuming restores all of it, so with the same world size N epochs equal N/2 + resume + N/2 (bitwise in fp32
on CPU with num_workers 0; with num_workers > 0 the data order is still exact but augmentation streams of the
recreated workers differ).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from models.checkpoint import add_unsafe_trust_flag
from models.peft_methods import model_payload
from utils import ConfigError, JsonlLogger, is_main_process, log

CKPT_FORMAT = "blip-retrieval-train-v2"
# v1 (before TrainState) kept the same fields at the top level of the checkpoint; it still resumes.
CKPT_FORMATS_READ = (CKPT_FORMAT, "blip-retrieval-train-v1")


@dataclass
class TrainState:
    """Where a training run stands, saved and restored whole with checkpoint_last.pth."""

    epoch: int = -1  # last finished epoch; -1 before the first
    global_step: int = 0  # optimizer steps taken
    best_metric: float = -1.0  # val r_mean of the selected epoch
    best_epoch: int | None = None  # the selected epoch (best val r_mean; the last epoch without a val split)
    best_val: dict | None = None  # its val metrics
    best_test: dict | None = None  # test metrics of its weights

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainState:
        """The state in a checkpoint_last.pth, of either format."""
        if "train_state" in ckpt:
            return cls(**ckpt["train_state"])
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})


def gather_rng_states(distributed: bool) -> list[dict]:
    """Every rank's RNG snapshot, in rank order, on every rank (ranks draw different dropout/negatives)."""
    state = utils.capture_rng_state()
    if not distributed:
        return [state]
    states: list = [None] * utils.get_world_size()
    dist.all_gather_object(states, state)
    return states


def training_arg_parser(description: str, writes: str, evaluate_help: str) -> argparse.ArgumentParser:
    """The command line every training script shares (--config, --output-dir, --resume, --evaluate, --options);
    a script adds its own flags to the parser it gets. `writes` names what goes into the output directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (keys: utils.DEFAULT_CONFIG)")
    parser.add_argument("--output-dir", required=True, help=f"where {writes} go")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CKPT",
        help="continue from CKPT (default: OUTPUT_DIR/checkpoint_last.pth)",
    )
    parser.add_argument("--evaluate", action="store_true", help=evaluate_help)
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, YAML values, dotted keys (init_lr=5e-6 vit.depth=2)",
    )
    add_unsafe_trust_flag(parser)
    return parser


def resolve_resume(output_dir: str, resume: str | None, evaluate: bool) -> str | None:
    """The checkpoint to resume from (`resume` "" means OUTPUT_DIR/checkpoint_last.pth), or None; refuses
    --resume with --evaluate, a missing checkpoint, and a fresh run over an existing one."""
    last_path = os.path.join(output_dir, "checkpoint_last.pth")
    if resume is not None and evaluate:
        raise ConfigError(
            "--evaluate scores the `pretrained` weights; to evaluate a checkpoint pass "
            "--options pretrained=PATH instead of --resume"
        )
    if resume is None:
        if not evaluate and os.path.isfile(last_path):
            raise ConfigError(
                f"{output_dir} already holds a training run (checkpoint_last.pth). Pass --resume to "
                "continue it, or choose another --output-dir."
            )
        return None
    resume_path = resume or last_path
    if not os.path.isfile(resume_path):
        raise ConfigError(
            f"--resume: no checkpoint at {resume_path}. Train without --resume first, or pass "
            "the path of a checkpoint_last.pth written by the trainer."
        )
    return resume_path


def restore_training(
    ckpt: dict,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: dict,
    info: utils.DistInfo,
    resume_path: str,
    jsonl: JsonlLogger,
) -> TrainState:
    """Optimizer, scaler, RNG streams and the TrainState of a resumed run (its weights are loaded elsewhere)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = TrainState.from_checkpoint(ckpt)
    if len(ckpt["rng_states"]) == info.world_size:
        utils.restore_rng_state(ckpt["rng_states"][info.rank])
    else:
        log(
            f"WARNING: the checkpoint was written by {len(ckpt['rng_states'])} processes, this run has "
            f"{info.world_size}: RNG streams are re-seeded, so the continuation is not bit-exact"
        )
        utils.set_seed(config["seed"] + info.rank + 1000 * (state.epoch + 1))
    old_config = ckpt["config"]
    changed = [f"{k}: {old_config.get(k)!r} -> {v!r}" for k, v in config.items() if old_config.get(k) != v]
    if changed:  # e.g. a longer max_epoch, which also changes the rest of the cosine schedule
        log("resuming with config changes: " + ", ".join(changed))
    log(
        f"resumed from {resume_path}: epoch {state.epoch} done, step {state.global_step}, best epoch {state.best_epoch}"
    )
    jsonl.log({"event": "resume", "from": resume_path, "start_epoch": state.epoch + 1, "step": state.global_step})
    return state


def last_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    config: dict,
    info: utils.DistInfo,
) -> dict:
    """The contents of checkpoint_last.pth. Every rank must call it (it gathers every rank's RNG state); rank 0
    writes the result with save_last_checkpoint."""
    return {
        "format": CKPT_FORMAT,
        **model_payload(model),  # the whole state dict, or a parameter-efficient run's trainable part
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": state.to_dict(),
        "config": config,
        "world_size": info.world_size,
        "rng_states": gather_rng_states(info.distributed),
    }


def load_train_checkpoint(path: str) -> dict:
    """Read a checkpoint_last.pth for --resume, refusing anything the trainer did not write."""
    try:
        # weights_only: our checkpoints hold only tensors and plain containers, and this refuses pickled code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            f"--resume: no checkpoint at {path}. Train without --resume first, or pass the "
            "path of a checkpoint_last.pth written by the trainer."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in CKPT_FORMATS_READ:
        raise ConfigError(
            f"--resume: {path} is not a checkpoint_last.pth written by the trainer "
            f"(no format={CKPT_FORMAT!r}); to start from other weights set pretrained instead"
        )
    return ckpt


def save_last_checkpoint(state: dict, path: str) -> None:
    """Write checkpoint_last.pth atomically (a crash mid-write keeps the previous one)."""
    utils.atomic_save(state, path)


# Per-step training statistics returned by the model, summed on the device and averaged when logged (the
# ITM accuracies show whether the ITM head learns or sits at the prior: ~0.64 loss, everything called mismatch).
STAT_KEYS = ("loss_ita", "loss_itm", "itm_acc_pos", "itm_acc_neg", "num_neg_fallback", "loss_tmim")


def _stat_means(sums: list[float], count: int) -> dict:
    """Averages of the STAT_KEYS sums over `count` micro-steps; num_neg_fallback stays a total."""
    means = {key: total / count for key, total in zip(STAT_KEYS, sums, strict=True)}
    means["num_neg_fallback"] = int(sums[STAT_KEYS.index("num_neg_fallback")])
    return means


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[torch.nn.Parameter],
    clip_grad_norm: float,
) -> None:
    """The end of an accumulation group, shared by every trainer: clip the unscaled gradients (clip_grad_norm > 0),
    step through the grad scaler (a no-op scaler without fp16), clear the gradients."""
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: torch.nn.Module,
    ddp: DistributedDataParallel | None,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: dict,
    epoch: int,
    global_step: int,
    device: torch.device,
    jsonl: JsonlLogger,
    tb: Any,
) -> tuple[dict, int]:
    """One pass over the loader. Returns (train averages over all ranks, updated global step)."""
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    n = len(loader)
    accum, log_every = config["grad_accum_steps"], config["log_every"]
    images_per_micro = config["batch_size_train"] * utils.get_world_size()
    # Running sums stay on the device, one per STAT_KEYS entry. Read only when logging, so the step never waits
    # for the device.
    epoch_sum = torch.zeros(len(STAT_KEYS), device=device)
    window_sum, window_micro, window_start = torch.zeros(len(STAT_KEYS), device=device), 0, time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    zero = torch.zeros((), device=device)
    # Under torch.compile captions are padded to max_length: one graph, no recompiles for new caption lengths.
    text_compute = "static" if config["compile"] else "trimmed"
    bar = tqdm(loader, desc=f"train epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True)
    for i, (image, caption, idx) in enumerate(bar):
        image, idx = image.to(device, non_blocking=True), idx.to(device, non_blocking=True)
        alpha = utils.alpha_at(i, n, epoch, config["alpha"])
        hard_fraction = utils.itm_hard_fraction(global_step, config["itm_negatives"], config["itm_negatives_steps"])
        group_start = i - i % accum
        group_size = min(accum, n - group_start)  # the last group of an epoch may be shorter
        last_micro = i - group_start == group_size - 1
        # Skip the gradient all-reduce on all but the last micro-batch of an accumulation group.
        sync = ddp.no_sync() if (ddp is not None and not last_micro) else contextlib.nullcontext()
        with sync:
            with utils.autocast(device, config["amp"], config["amp_cpu"]):
                out = model(image, caption, alpha, idx, hard_fraction, text_compute=text_compute)
                loss = out["loss"]  # loss_ita + loss_itm, or what finetune.method optimises
            scaler.scale(loss / group_size).backward()
        # A model without TMIM may omit loss_tmim: it is logged as 0.
        stats = torch.stack([out[key].detach().float() if key in out else zero for key in STAT_KEYS])
        epoch_sum += stats
        window_sum += stats
        window_micro += 1
        if not last_micro:
            continue
        optimizer_step(optimizer, scaler, params, config["clip_grad_norm"])
        global_step += 1
        if global_step % log_every == 0 or i == n - 1:
            window = _stat_means(window_sum.tolist(), window_micro)  # the one host sync, every log_every steps
            elapsed = time.perf_counter() - window_start
            record = {
                "epoch": epoch,
                "step": global_step,
                **window,
                "lr": lr,
                "itm_hard_fraction": hard_fraction,
                "images_per_s": window_micro * images_per_micro / max(elapsed, 1e-9),
            }
            jsonl.log(record)
            bar.set_postfix(
                loss=f"{window['loss_ita'] + window['loss_itm']:.3f}",
                lr=f"{lr:.2e}",
                img_s=f"{record['images_per_s']:.1f}",
            )
            if tb is not None:
                for key in (*STAT_KEYS, "lr", "images_per_s", "itm_hard_fraction"):
                    tb.add_scalar(f"train/{key}", record[key], global_step)
            window_sum.zero_()
            window_micro, window_start = 0, time.perf_counter()
    bar.close()
    return _stat_means(utils.all_reduce_sum_(epoch_sum).tolist(), n * utils.get_world_size()), global_step
