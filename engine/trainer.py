"""The one training loop every task runs on: epochs and the LR schedule, gradient accumulation, amp and the grad
scaler, DDP `no_sync`, clipping, step logging and TensorBoard, `compile`, evaluation and epoch selection,
checkpoint_last.pth / checkpoint_best.pth, exact resume and `--evaluate`.

A task (engine/retrieval_task.py, caption_task.py, cir_task.py) is a small object handed to `main`; this module never
imports one. What a task provides is the `Task` protocol below: build the model with its starting weights, the
training data, the loss of one batch, the evaluation of one split, the selection score and the files it writes.

checkpoint_last.pth is one file written by rank 0: {format, model (state dict incl. momentum encoders and queues,
or a parameter-efficient run's trainable part), optimizer, scaler, train_state (TrainState), config, world_size,
rng_states (one utils.capture_rng_state() per rank, gathered)}. One file rather than per-rank files, so a copied or
moved checkpoint can never lose part of its state. Resuming restores all of it, so with the same world size N epochs
equal N/2 + resume + N/2 (bitwise in fp32 on CPU with num_workers 0; with num_workers > 0 the data order is still
exact but augmentation streams of the recreated workers differ).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from configs import schema
from models.checkpoint import add_unsafe_trust_flag
from utils import ConfigError, JsonlLogger, is_main_process, log


@dataclass
class TrainState:
    """Where a training run stands, saved and restored whole with checkpoint_last.pth."""

    epoch: int = -1  # last finished epoch; -1 before the first
    global_step: int = 0  # optimizer steps taken
    best_metric: float = -1.0  # selection score of the selected epoch (every task's score is >= 0)
    best_epoch: int | None = None  # the selected epoch (best val score; the last evaluated epoch without val)
    best_val: dict | None = None  # its val metrics
    best_test: dict | None = None  # test metrics of its weights

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainState:
        """The state in a checkpoint_last.pth, of either layout (v1 kept the fields at the top level)."""
        if "train_state" in ckpt:
            return cls(**ckpt["train_state"])
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})


@dataclass
class StepInfo:
    """Where a batch sits in the run, for tasks whose loss follows a schedule (the ITC alpha ramp, ITM negatives)."""

    epoch: int
    index: int  # batch index within the epoch
    num_batches: int  # batches in the epoch
    global_step: int  # optimizer steps taken before this batch's step


class Task(Protocol):
    """What the trainer needs from a task. Attributes are read once; methods are called in the order listed."""

    name: str  # the script's name in messages ("train_retrieval.py")
    checkpoint_format: str  # the `format` stamped into checkpoint_last.pth ("-best" is appended for the best)
    checkpoint_formats_read: tuple[str, ...]  # formats --resume accepts (older versions of this task's checkpoints)
    eval_splits: tuple[str, str]  # (selection split, test split), e.g. ("val", "test")
    selection_name: str  # the name of the selection score in logs ("r_mean", "cider_bleu4", "r_avg")
    stat_keys: tuple[str, ...]  # per-batch statistics train_step returns, averaged in logs
    total_keys: tuple[str, ...]  # of those, the ones logged as totals rather than means
    sample_unit: str  # what a batch holds, for throughput ("images", "pairs")

    # Constructed as task_class(config, info, args) with the parsed command line: args.output_dir, and
    # args.unsafe_trust_checkpoint, which the task passes to the loader of `pretrained` (never to anything a
    # checkpoint names).

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The task's own command-line flags, if any."""

    def check(self, resume_path: str | None, evaluate: bool) -> None:
        """Refuse settings the task cannot run, before anything is built."""

    def build_model(self, ckpt: dict | None, resume_path: str | None) -> torch.nn.Module:
        """The model with its starting weights: `pretrained`, or the resumed checkpoint's. May update the config
        (e.g. an HF directory fixes the architecture) before the trainer writes config.yaml."""

    def build_eval_data(self, model: torch.nn.Module) -> None:
        """Load the evaluation splits (a split the config does not provide is skipped)."""

    def train_loader(self, model: torch.nn.Module) -> tuple[DataLoader, Any]:
        """(loader, sampler); the trainer calls sampler.set_epoch(epoch) before each epoch."""

    def optimizer_params(self, model: torch.nn.Module) -> list:
        """Parameters or parameter groups for AdamW."""

    def wrap_ddp(self, model: torch.nn.Module, device_ids: list[int] | None) -> DistributedDataParallel:
        """The DDP wrapper with the task's options."""

    def start_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        """Work before each training epoch (e.g. CIR's target features with a frozen image side)."""

    def train_step(self, train_model: torch.nn.Module, batch: Any, step: StepInfo) -> dict[str, torch.Tensor]:
        """Forward one batch under autocast; {'loss': scalar to backpropagate, **stat_keys}."""

    def step_log(self, step: StepInfo) -> dict:
        """Extra keys for a logged step (schedules the task follows)."""

    def evaluate(self, model: torch.nn.Module, split: str) -> Any:
        """Score one split on every rank; an object with `.metrics` (filled on the main process at least), or
        None when the split is absent."""

    def selection_score(self, metrics: dict) -> float | None:
        """The number epoch selection maximises; None for metrics without it (a split scored elsewhere)."""

    def write_outputs(self, result: Any, split: str, epoch: int | None) -> None:
        """Write a split's files (main process), tagged with the epoch the weights come from."""

    def weights_payload(self, model: torch.nn.Module) -> dict:
        """{'model': ...} and whatever else a checkpoint needs to rebuild the weights (delta checkpoints)."""

    def summary(self, state: TrainState) -> str | None:
        """The closing log line(s) for a finished run."""


# ----------------------------------------------------------------------------------------------------
# Command line and resume
# ----------------------------------------------------------------------------------------------------


def training_arg_parser(description: str, writes: str, evaluate_help: str) -> argparse.ArgumentParser:
    """The command line every training script shares (--config, --output-dir, --resume, --evaluate, --options)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (keys: configs.schema.DEFAULT_CONFIG)")
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


def read_train_checkpoint(path: str, formats: tuple[str, ...], script: str) -> dict:
    """Read a checkpoint_last.pth for --resume, refusing anything the task's trainer did not write."""
    try:
        # weights_only: our checkpoints hold only tensors and plain containers, and this refuses pickled code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            f"--resume: no checkpoint at {path}. Train without --resume first, or pass the "
            "path of a checkpoint_last.pth written by the trainer."
        ) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        # A run killed while copying, or a partial download: torch reports a broken zip archive or pickle.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--resume: {path} is not a readable checkpoint (truncated or corrupt: {first_line}); resume from "
            "an intact checkpoint_last.pth or start a new run"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in formats:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(
            f"--resume: {path} is not a checkpoint_last.pth written by {script} (format {found!r}, expected "
            f"{formats[0]!r}); to start from other weights set pretrained instead"
        )
    return ckpt


def save_last_checkpoint(contents: dict, path: str) -> None:
    """Write checkpoint_last.pth atomically (a crash mid-write keeps the previous one)."""
    utils.atomic_save(contents, path)


def gather_rng_states(distributed: bool) -> list[dict]:
    """Every rank's RNG snapshot, in rank order, on every rank (ranks draw different dropout/negatives)."""
    state = utils.capture_rng_state()
    if not distributed:
        return [state]
    states: list = [None] * utils.get_world_size()
    dist.all_gather_object(states, state)
    return states


def trim_log(path: str, state: TrainState) -> int:
    """Drop the records a killed run wrote after its last checkpoint (steps of an unfinished epoch), so a resumed
    run's log.jsonl reads as one run. Returns how many records were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("epoch", -1) <= state.epoch and record.get("step", 0) <= state.global_step:
            kept.append(line)
    if len(kept) != len(lines):
        utils.atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return len(lines) - len(kept)


# ----------------------------------------------------------------------------------------------------
# Schedules and the optimizer step
# ----------------------------------------------------------------------------------------------------


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """The official schedule: cosine from init_lr (epoch 0) towards min_lr, constant within an epoch, no warmup."""
    if max_epoch <= 0:
        return init_lr
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch))


def learning_rate(config: dict, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step `step` (0-based, counted over the run) in `epoch`, per `lr_schedule`:

    cosine_epoch: the official BLIP schedule, `cosine_lr` of the epoch (constant within it), no warmup.
    cosine_step: open_clip's: linear warmup init_lr * (step + 1) / warmup_steps, then a cosine over the remaining
        steps of the run from init_lr to min_lr (open_clip's `cosine_lr`, whose floor is 0).
    step_decay: BLIP pre-training's and ContextBLIP's: epoch e runs at max(min_lr, init_lr * lr_decay_rate ** e), and
        during epoch 0 step i is warmed up to min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps) (the
        warmup counts epoch 0's steps only, so a short epoch 0 cuts it off).
    """
    init_lr, min_lr, warmup = config["init_lr"], config["min_lr"], config["warmup_steps"]
    schedule, max_epoch = config["lr_schedule"], config["max_epoch"]
    if schedule == "cosine_epoch":
        return cosine_lr(epoch, max_epoch, init_lr, min_lr)
    if schedule == "step_decay":
        if epoch == 0 and warmup > 0:
            return min(init_lr, config["warmup_lr"] + (init_lr - config["warmup_lr"]) * step / warmup)
        return max(min_lr, init_lr * config["lr_decay_rate"] ** epoch)
    if schedule == "cosine_step":
        if step < warmup:
            return init_lr * (step + 1) / warmup
        decay_steps = max(max_epoch * steps_per_epoch - warmup, 1)
        return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay_steps))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[torch.nn.Parameter],
    clip_grad_norm: float,
) -> None:
    """The end of an accumulation group: clip the unscaled gradients (clip_grad_norm > 0), step through the grad
    scaler (a no-op scaler without fp16), clear the gradients."""
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def open_tensorboard(output_dir: str) -> Any:
    """A SummaryWriter under OUTPUT_DIR/tensorboard; a clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: an optional dependency
    except ImportError as err:
        raise ConfigError(
            "config tensorboard: true needs the tensorboard package (pip install tensorboard), "
            f"or set tensorboard: false ({err})"
        ) from None
    return SummaryWriter(os.path.join(output_dir, "tensorboard"))


def _scalars(metrics: dict | None, prefix: str) -> dict:
    """The scalar entries of a metrics dict (numbers and names, no lists or mappings), prefixed, for an epoch record."""
    return {f"{prefix}{k}": v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


class Trainer:
    """One training run of one task: built by `main`, then `fit()`."""

    def __init__(self, task: Task, model: torch.nn.Module, config: dict, info: utils.DistInfo, out_dir: str):
        self.task, self.model, self.config, self.info, self.out_dir = task, model, config, info, out_dir
        self.jsonl = JsonlLogger(os.path.join(out_dir, "log.jsonl"))
        self.tb = None
        self.loader: DataLoader | None = None
        self.sampler: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.ddp: DistributedDataParallel | None = None
        self.train_model: torch.nn.Module = model  # what the loop calls: model, DDP(model) or compiled
        self.state = TrainState()

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoint_last.pth")

    # --- building ---------------------------------------------------------------------------------

    def build_training(self) -> None:
        """The training data, optimizer, grad scaler, DDP wrapper and compilation, in that order."""
        config, info, task = self.config, self.info, self.task
        if config["tensorboard"] and is_main_process():
            self.tb = open_tensorboard(self.out_dir)
        self.loader, self.sampler = task.train_loader(self.model)
        self.optimizer = torch.optim.AdamW(
            task.optimizer_params(self.model),
            lr=config["init_lr"],
            weight_decay=config["weight_decay"],
            betas=tuple(config["optimizer_betas"]),
            eps=config["optimizer_eps"],
            fused=info.device.type == "cuda" or None,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=info.device.type == "cuda" and config["amp"] == "fp16")
        if info.distributed:
            self.ddp = task.wrap_ddp(self.model, [info.local_rank] if info.device.type == "cuda" else None)
            self.train_model = self.ddp
        if config["compile"]:
            self.train_model = torch.compile(self.train_model)

    def restore(self, ckpt: dict, resume_path: str) -> None:
        """Optimizer, scaler, RNG streams and the TrainState of a resumed run (its weights the task loaded)."""
        config, info = self.config, self.info
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = state = TrainState.from_checkpoint(ckpt)
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
        if is_main_process():
            dropped = trim_log(self.jsonl.path, state)
            if dropped:
                log(f"log.jsonl: dropped {dropped} records written after the checkpoint by the interrupted run")
        log(
            f"resumed from {resume_path}: epoch {state.epoch} done, step {state.global_step}, "
            f"best epoch {state.best_epoch}"
        )
        self.jsonl.log(
            {"event": "resume", "from": resume_path, "start_epoch": state.epoch + 1, "step": state.global_step}
        )

    # --- training ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Epochs state.epoch + 1 .. max_epoch - 1: train, evaluate and select, log, write checkpoint_last.pth."""
        config, state = self.config, self.state
        max_epoch = config["max_epoch"]
        for epoch in range(state.epoch + 1, max_epoch):
            self.task.start_epoch(self.model, epoch)
            self.sampler.set_epoch(epoch)
            lr = self.set_lr(epoch)
            epoch_start = time.perf_counter()
            train_stats = self.train_epoch(epoch)
            record = {
                "epoch": epoch,
                "step": state.global_step,
                "lr": lr,
                "train_time_s": time.perf_counter() - epoch_start,
                **{f"train_{k}": v for k, v in train_stats.items()},
            }
            if (epoch + 1) % config["eval_every"] == 0 or epoch == max_epoch - 1:
                self.select_epoch(epoch, record)
            state.epoch = epoch
            record["best_epoch"] = state.best_epoch
            self.jsonl.log(record)
            val_key = f"val_{self.task.selection_name}"
            if self.tb is not None and val_key in record:
                self.tb.add_scalar(f"val/{self.task.selection_name}", record[val_key], epoch)
            last = self.last_checkpoint()  # every rank: it gathers the RNG states
            if is_main_process():
                save_last_checkpoint(last, self.last_path)
        if self.tb is not None:
            self.tb.close()

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last accumulation group may be shorter)."""
        return math.ceil(len(self.loader) / self.config["grad_accum_steps"])

    def set_lr(self, epoch: int) -> float:
        """Set and return the learning rate of the next optimizer step."""
        lr = learning_rate(self.config, epoch, self.state.global_step, self.steps_per_epoch())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the loader. Returns the train averages over all ranks."""
        config, task, device = self.config, self.task, self.info.device
        self.train_model.train()
        n = len(self.loader)
        accum, log_every = config["grad_accum_steps"], config["log_every"]
        samples_per_batch = config["batch_size_train"] * utils.get_world_size()
        keys = task.stat_keys
        # Running sums stay on the device, one per stat key. Read only when logging, so the step never waits for
        # the device.
        epoch_sum = torch.zeros(len(keys), device=device)
        window_sum, window_batches, window_start = torch.zeros(len(keys), device=device), 0, time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        zero = torch.zeros((), device=device)
        bar = tqdm(self.loader, desc=f"train epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True)
        for i, batch in enumerate(bar):
            step = StepInfo(epoch, i, n, self.state.global_step)
            group_start = i - i % accum
            group_size = min(accum, n - group_start)  # the last group of an epoch may be shorter
            last_micro = i - group_start == group_size - 1
            if i == group_start:
                lr = self.set_lr(epoch)  # the same all epoch with the official cosine_epoch
            # Skip the gradient all-reduce on all but the last micro-batch of an accumulation group.
            no_sync = self.ddp is not None and not last_micro
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                with utils.autocast(device, config["amp"], config["amp_cpu"]):
                    out = task.train_step(self.train_model, batch, step)
                self.scaler.scale(out["loss"] / group_size).backward()
            # A statistic the model does not report this step (e.g. loss_tmim without TMIM) counts as 0.
            stats = torch.stack([out[key].detach().float() if key in out else zero for key in keys])
            epoch_sum += stats
            window_sum += stats
            window_batches += 1
            if not last_micro:
                continue
            optimizer_step(self.optimizer, self.scaler, params, config["clip_grad_norm"])
            self.state.global_step += 1
            if self.state.global_step % log_every == 0 or i == n - 1:
                window = self._means(window_sum, window_batches)  # the one host sync, every log_every steps
                elapsed = time.perf_counter() - window_start
                record = {
                    "epoch": epoch,
                    "step": self.state.global_step,
                    **window,
                    "lr": lr,
                    **task.step_log(step),
                    f"{task.sample_unit}_per_s": window_batches * samples_per_batch / max(elapsed, 1e-9),
                }
                self.jsonl.log(record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in list(window.items())[:2]} | {"lr": f"{lr:.2e}"})
                if self.tb is not None:
                    for key, value in record.items():
                        if key not in ("epoch", "step"):
                            self.tb.add_scalar(f"train/{key}", value, self.state.global_step)
                window_sum.zero_()
                window_batches, window_start = 0, time.perf_counter()
        bar.close()
        return self._means(utils.all_reduce_sum_(epoch_sum), max(n * utils.get_world_size(), 1))

    def _means(self, sums: torch.Tensor, count: int) -> dict:
        """Per-key averages of summed statistics over `count` batches; the task's total keys stay totals."""
        values = sums.tolist()
        return {
            key: int(total) if key in self.task.total_keys else total / count
            for key, total in zip(self.task.stat_keys, values, strict=True)
        }

    # --- selection --------------------------------------------------------------------------------

    def select_epoch(self, epoch: int, record: dict) -> None:
        """Evaluate the selection split; when its score improves (or, without one or with `select_epoch: last`, at
        the last epoch) save checkpoint_best.pth and score the test split with exactly these weights, so reported
        test numbers always belong to the selected epoch."""
        task, state = self.task, self.state
        val_split, test_split = task.eval_splits
        last_epoch = epoch == self.config["max_epoch"] - 1
        val = task.evaluate(self.model, val_split)
        if val is not None:
            record.update(_scalars(val.metrics, f"{val_split}_"))
        # The main process decides (some tasks score on it alone) and every rank follows.
        by_score = val is not None and self.config["select_epoch"] == "best"
        improved = is_main_process() and (
            task.selection_score(val.metrics) > state.best_metric if by_score else last_epoch
        )
        improved = bool(utils.all_reduce_sum_(torch.tensor([float(improved)], device=self.info.device)).item())
        if not improved:
            return
        state.best_epoch = epoch
        if val is not None:
            state.best_val = val.metrics
            if is_main_process():
                state.best_metric = task.selection_score(val.metrics)
        if is_main_process():
            best = {
                "format": task.checkpoint_format + "-best",
                **task.weights_payload(self.model),
                "config": self.config,
                "epoch": epoch,
                "val_metrics": state.best_val,
            }
            utils.atomic_save(best, os.path.join(self.out_dir, "checkpoint_best.pth"))
        test = task.evaluate(self.model, test_split)
        state.best_test = test.metrics if test is not None else None
        for split, result in ((val_split, val), (test_split, test)):
            if result is not None:
                task.write_outputs(result, split, epoch)
        if test is not None:
            record.update(_scalars(test.metrics, f"{test_split}_"))

    def last_checkpoint(self) -> dict:
        """The contents of checkpoint_last.pth (every rank calls it: it gathers every rank's RNG state)."""
        return {
            "format": self.task.checkpoint_format,
            **self.task.weights_payload(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": self.state.to_dict(),
            "config": self.config,
            "world_size": self.info.world_size,
            "rng_states": gather_rng_states(self.info.distributed),
        }

    def evaluate_only(self) -> dict:
        """--evaluate: both evaluation splits with the loaded weights, no training."""
        results = {split: self.task.evaluate(self.model, split) for split in self.task.eval_splits}
        for split, result in results.items():
            if result is not None:
                self.task.write_outputs(result, split, None)
        utils.barrier()
        val, test = (results[split] for split in self.task.eval_splits)
        return {
            "model": self.model,
            "best_epoch": None,
            "best_val": val and val.metrics,
            "best_test": test and test.metrics,
            "results": results,
        }


def main(task_class: type, argv: list[str] | None, description: str, writes: str, evaluate_help: str) -> dict:
    """Parse the command line, build the task and its model, then train (or --evaluate).

    Returns {'model', 'best_epoch', 'best_val', 'best_test'} (and 'results', the split results, with --evaluate)."""
    parser = training_arg_parser(description, writes, evaluate_help)
    task_class.add_arguments(parser)
    args = parser.parse_args(argv)
    config = schema.load_config(args.config, args.options, script=task_class.name)
    utils.check_output_dir(args.output_dir, "--output-dir")  # a file in the way fails now, not after an epoch
    owns_group = not utils.is_dist_initialized()
    info = utils.init_distributed(config["device"])
    try:
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes (official setting)
        utils.set_seed(config["seed"] + info.rank)  # ranks draw different augmentations, dropout and negatives
        task = task_class(config, info, args)
        resume_path = resolve_resume(args.output_dir, args.resume, args.evaluate)
        task.check(resume_path, args.evaluate)
        ckpt = read_train_checkpoint(resume_path, task.checkpoint_formats_read, task.name) if resume_path else None
        model = task.build_model(ckpt, resume_path)
        model.to(info.device)
        if is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
            schema.save_config(config, os.path.join(args.output_dir, "config.yaml"))
        task.build_eval_data(model)
        trainer = Trainer(task, model, config, info, args.output_dir)
        if args.evaluate:
            return trainer.evaluate_only()
        trainer.build_training()
        if ckpt:
            trainer.restore(ckpt, resume_path)
        trainer.fit()
        state = trainer.state
        summary = task.summary(state)
        if summary:
            log(summary)
        trainer.jsonl.log(
            {
                "event": "done",
                "best_epoch": state.best_epoch,
                f"best_val_{task.selection_name}": state.best_val and task.selection_score(state.best_val),
                f"best_test_{task.selection_name}": state.best_test and task.selection_score(state.best_test),
            }
        )
        utils.barrier()
        return {
            "model": model,
            "best_epoch": state.best_epoch,
            "best_val": state.best_val,
            "best_test": state.best_test,
        }
    finally:
        if owns_group:
            utils.cleanup_distributed()
