"""Fine-tune BLIP for image-text retrieval (ITC + ITM), then select the epoch by val r_mean.

    python train_retrieval.py --config configs/retrieval_flickr.yaml --output-dir output/flickr \
        [--resume [CKPT]] [--evaluate] [--options key=value ...]
    torchrun --nproc_per_node=8 train_retrieval.py ...          (DDP: NCCL on GPU, gloo on CPU)

Outputs in --output-dir: config.yaml (resolved), log.jsonl (one object per logged step and per epoch),
checkpoint_last.pth (everything for an exact resume, engine/training.py), checkpoint_best.pth (by val r_mean),
and metrics_val.json / metrics_test.json of the selected epoch. Test is scored only with the weights of the epoch
that val selected, and re-scored whenever the selection changes, so test numbers are never stale.

The run in phases: check the command and config (`check_run`), build the model and the eval data (`build_run`),
build the training pieces (`build_training`), restore a resumed run (engine.training.restore_training), then train
epoch by epoch (`train`), evaluating and selecting as it goes (`select_epoch`).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import utils
from data import create_dataset, create_loader
from engine.evaluation import EvalResult, evaluate, write_eval_outputs
from engine.memory import choose_vit_ckpt_layers
from engine.metrics import format_metrics_table
from engine.training import (
    CKPT_FORMAT,
    TrainState,
    last_checkpoint,
    load_train_checkpoint,
    resolve_resume,
    restore_training,
    save_last_checkpoint,
    train_one_epoch,
    training_arg_parser,
)
from models.blip_retrieval import BlipRetrieval, check_queue_size
from models.checkpoint import CheckpointError, load_model, load_state_dict_checked
from models.clip import dataset_transform, load_clip_state
from models.hf_blip import is_hf_directory
from models.peft_methods import (
    apply_finetune,
    is_delta_checkpoint,
    load_delta,
    model_payload,
    parameter_counts,
    resume_base,
)
from utils import ConfigError, JsonlLogger, is_main_process, log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    description = __doc__.split("\n\n")[0]
    writes = "checkpoints, logs and metrics"
    evaluate_help = "evaluate val and test with `pretrained`, no training"
    return training_arg_parser(description, writes, evaluate_help).parse_args(argv)


def is_retrieval_finetuned(source: str) -> bool:
    """True for official fine-tuned retrieval checkpoints (model_base_retrieval_coco.pth, blip_coco_retrieval.pth)."""
    # Official .pth names contain "retrieval"; the HF ports are Salesforce/blip-itm-{base,large}-{coco,flickr}.
    name = os.path.basename(source.rstrip("/")).lower()
    return bool(re.search(r"retrieval|itm-(base|large)-(coco|flickr)", name))


def has_split(config: dict, split: str) -> bool:
    """Whether the config provides `split` (val/test)."""
    # flickr/coco always have every split (downloaded when missing); custom only those it names.
    return config["dataset"] != "custom" or bool(config[f"{split}_file"])


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


def evaluate_split(
    model: torch.nn.Module, datasets: dict, config: dict, device: torch.device, split: str
) -> EvalResult | None:
    """Evaluate one split on every rank (evaluate() shards the queries); None when the split is absent."""
    if datasets.get(split) is None:
        return None
    result = evaluate(model, datasets[split], config, device, desc=split)
    m = result.metrics
    official = f", official score {m['official_r_mean']:.2f}" if "official_r_mean" in m else ""
    log(
        f"[{split}] r_mean {m['r_mean']:.2f} (ITC only {m['itc_r_mean']:.2f}{official})  txt_r1 {m['txt_r1']:.2f}  "
        f"img_r1 {m['img_r1']:.2f}"
    )
    return result


def write_outputs(result: EvalResult | None, output_dir: str, split: str, epoch: int | None) -> None:
    """metrics_<split>.json (main process), tagged with the epoch the weights come from."""
    if result is not None:
        write_eval_outputs(result, output_dir, split, save_scores=False, extra={"epoch": epoch})


@dataclass
class TrainingRun:
    """What the phases build and share: the model, its data and the training machinery."""

    config: dict
    info: utils.DistInfo
    out_dir: str
    model: BlipRetrieval
    datasets: dict  # val / test evaluation datasets (a split may be absent)
    jsonl: JsonlLogger
    tb: Any = None  # TensorBoard SummaryWriter, main process only
    train_model: torch.nn.Module | None = None  # the module the loop calls: model, DDP(model) or compiled
    ddp: DistributedDataParallel | None = None
    sampler: DistributedSampler | None = None
    loader: DataLoader | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoint_last.pth")


def check_run(args: argparse.Namespace, config: dict, info: utils.DistInfo) -> str | None:
    """Refuse contradictory or unsafe runs before anything is built. Returns the checkpoint to resume from."""
    resume_path = resolve_resume(args.output_dir, args.resume, args.evaluate)
    if not args.evaluate and config["model"] == "blip":  # CLIP has no queue
        try:
            check_queue_size(config["queue_size"], config["batch_size_train"] * info.world_size)
        except ValueError as err:
            raise ConfigError(f"config key 'queue_size': {err}") from None
        if is_retrieval_finetuned(config["pretrained"]) and resume_path is None:
            log(
                "=" * 100 + f"\nWARNING: pretrained={config['pretrained']} is already fine-tuned for retrieval "
                "(the official configs point there for EVALUATION).\nFine-tuning it again does not reproduce the "
                "paper; start from a pre-trained checkpoint such as model_base.pth.\n" + "=" * 100
            )
    return resume_path


def build_run(
    args: argparse.Namespace, config: dict, info: utils.DistInfo, ckpt: dict | None, resume_path: str | None
) -> TrainingRun:
    """The model with its starting weights (pretrained, or the resumed run's), the resolved config written to
    OUTPUT_DIR/config.yaml, and the val/test datasets."""
    out_dir = args.output_dir
    tb = open_tensorboard(out_dir) if (config["tensorboard"] and is_main_process() and not args.evaluate) else None
    # On resume the weights come from the checkpoint, so `pretrained` is only read when it also defines the
    # architecture and tokenizer (a Hugging Face directory).
    source = config["pretrained"] or None
    delta = ckpt is not None and is_delta_checkpoint(ckpt)  # a parameter-efficient run: base + trainable part
    if delta:
        source = resume_base(ckpt, config, resume_path)
    elif ckpt and not (source and is_hf_directory(os.path.expanduser(source))):
        resume_base(ckpt, config, resume_path)  # refuses a method change
        source = None
    model, report = load_model(config, source)
    if report is not None and report.config_updates:
        config.update(report.config_updates)  # an HF directory fixes the architecture (e.g. image_size)
    apply_finetune(model, config, source)  # finetune.method: adapters in, frozen weights out of training
    if config["finetune"]["method"] != "full":
        counts = parameter_counts(model)
        log(
            f"finetune.method {config['finetune']['method']}: {counts['trainable']:,} trainable parameters of "
            f"{counts['online']:,} (momentum copies not counted)"
        )
    if ckpt and config["model"] == "clip":
        load_clip_state(model, ckpt["model"], resume_path)  # strict: every key must match
    elif delta:
        load_delta(model, ckpt, resume_path)
    elif ckpt:
        # The checked loader raises on any shape mismatch (architecture changed) and names the differing keys.
        report = load_state_dict_checked(model, ckpt["model"], resume_path)
        if report.missing or report.unexpected or report.expected_missing or report.expected_mismatched:
            raise CheckpointError(
                f"--resume: {resume_path} does not match the model built from the config:\n{report.summary()}"
            )
    model.to(info.device)
    if is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        utils.save_config(config, os.path.join(out_dir, "config.yaml"))
    datasets = {}
    for split in ("val", "test"):
        if has_split(config, split):
            datasets[split] = create_dataset(config, split, dataset_transform(model, train=False))
        else:
            log(f"no {split} split configured (dataset custom without {split}_file): skipping {split} evaluation")
    return TrainingRun(config, info, out_dir, model, datasets, JsonlLogger(os.path.join(out_dir, "log.jsonl")), tb)


def build_training(run: TrainingRun) -> None:
    """The training data, optimizer, grad scaler, DDP wrapper and compilation, in that order."""
    config, info, model = run.config, run.info, run.model
    train_set = create_dataset(config, "train", dataset_transform(model, train=True))
    # DistributedSampler with explicit replicas/rank needs no process group, and its order is a pure function
    # of (seed, epoch): the same code serves one process and N, and a resumed epoch sees the same batches.
    run.sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config["seed"]
    )
    run.loader = create_loader(train_set, config["batch_size_train"], config["num_workers"], True, run.sampler)
    if config["vit_grad_ckpt"] and config["vit_ckpt_layer"] == "auto":
        model.visual_encoder.ckpt_layer = choose_vit_ckpt_layers(model, config, info.device)
        run.jsonl.log({"event": "vit_ckpt_layer_auto", "blocks": model.visual_encoder.ckpt_layer})
    params = [p for p in model.parameters() if p.requires_grad]  # momentum encoders have requires_grad False
    if config["model"] == "clip":  # open_clip's rule: no weight decay on gains, biases and the logit scale
        params = model.optimizer_groups(config["weight_decay"])
    run.optimizer = torch.optim.AdamW(
        params, lr=config["init_lr"], weight_decay=config["weight_decay"], fused=info.device.type == "cuda" or None
    )
    run.scaler = torch.amp.GradScaler("cuda", enabled=info.device.type == "cuda" and config["amp"] == "fp16")
    run.train_model = model
    if info.distributed:
        # broadcast_buffers=False: the only buffers are the queues and their pointer, which every rank fills
        # with the same all-gathered features, so they stay identical without a per-step broadcast.
        run.ddp = DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None, broadcast_buffers=False
        )
        run.train_model = run.ddp
    if config["compile"]:
        run.train_model = torch.compile(run.train_model)


def select_epoch(run: TrainingRun, state: TrainState, epoch: int, record: dict) -> None:
    """Evaluate val; when it improves (or, without val, at the last epoch) save checkpoint_best.pth and score test
    with exactly these weights, so reported test numbers always belong to the selected epoch."""
    config, model, device = run.config, run.model, run.info.device
    last_epoch = epoch == config["max_epoch"] - 1
    val = evaluate_split(model, run.datasets, config, device, "val")
    # Without a val split there is nothing to select by: the last epoch is the one reported.
    improved = val.metrics["r_mean"] > state.best_metric if val is not None else last_epoch
    if val is not None:
        record.update({f"val_{k}": v for k, v in val.metrics.items()})
    if not improved:
        return
    state.best_epoch = epoch
    if val is not None:
        state.best_metric, state.best_val = val.metrics["r_mean"], val.metrics
    if is_main_process():
        utils.atomic_save(
            {
                "format": CKPT_FORMAT + "-best",
                **model_payload(model),
                "config": config,
                "epoch": epoch,
                "val_metrics": state.best_val,
            },
            os.path.join(run.out_dir, "checkpoint_best.pth"),
        )
    test = evaluate_split(model, run.datasets, config, device, "test")
    state.best_test = test.metrics if test is not None else None
    write_outputs(val, run.out_dir, "val", epoch)
    write_outputs(test, run.out_dir, "test", epoch)
    if test is not None:
        record.update({f"test_{k}": v for k, v in test.metrics.items()})


def train(run: TrainingRun, state: TrainState) -> None:
    """Epochs state.epoch + 1 .. max_epoch - 1: train, select, log, write checkpoint_last.pth."""
    config = run.config
    max_epoch = config["max_epoch"]
    for epoch in range(state.epoch + 1, max_epoch):
        run.sampler.set_epoch(epoch)
        lr = utils.cosine_lr(epoch, max_epoch, config["init_lr"], config["min_lr"])
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        epoch_start = time.perf_counter()
        train_stats, state.global_step = train_one_epoch(
            run.train_model,
            run.ddp,
            run.loader,
            run.optimizer,
            run.scaler,
            config,
            epoch,
            state.global_step,
            run.info.device,
            run.jsonl,
            run.tb,
        )
        record = {
            "epoch": epoch,
            "step": state.global_step,
            "lr": lr,
            "train_time_s": time.perf_counter() - epoch_start,
            **{f"train_{k}": v for k, v in train_stats.items()},
        }
        if (epoch + 1) % config["eval_every"] == 0 or epoch == max_epoch - 1:
            select_epoch(run, state, epoch, record)
        state.epoch = epoch
        record["best_epoch"] = state.best_epoch
        run.jsonl.log(record)
        if run.tb is not None and "val_r_mean" in record:
            run.tb.add_scalar("val/r_mean", record["val_r_mean"], epoch)
        last = last_checkpoint(run.model, run.optimizer, run.scaler, state, config, run.info)  # every rank
        if is_main_process():
            save_last_checkpoint(last, run.last_path)


def evaluate_only(run: TrainingRun) -> dict:
    """--evaluate: val and test with the loaded weights, no training."""
    results = {
        split: evaluate_split(run.model, run.datasets, run.config, run.info.device, split) for split in ("val", "test")
    }
    for split, result in results.items():
        write_outputs(result, run.out_dir, split, None)
    if results["test"] is not None:
        log("test (loaded weights):\n" + format_metrics_table(results["test"].metrics))
    utils.barrier()
    return {
        "model": run.model,
        "best_epoch": None,
        "best_val": results["val"] and results["val"].metrics,
        "best_test": results["test"] and results["test"].metrics,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run training (or --evaluate). Returns {'model', 'best_epoch', 'best_val', 'best_test'}."""
    args = parse_args(argv)
    config = utils.load_config(args.config, args.options)
    utils.check_output_dir(args.output_dir, "--output-dir")
    owns_group = not utils.is_dist_initialized()
    info = utils.init_distributed(config["device"])
    try:
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes (official setting)
        utils.set_seed(config["seed"] + info.rank)  # ranks draw different augmentations, dropout and negatives
        resume_path = check_run(args, config, info)
        ckpt = load_train_checkpoint(resume_path) if resume_path else None
        run = build_run(args, config, info, ckpt, resume_path)
        if args.evaluate:
            return evaluate_only(run)
        build_training(run)
        state = TrainState()
        if ckpt:
            state = restore_training(ckpt, run.optimizer, run.scaler, config, info, resume_path, run.jsonl)
        train(run, state)
        if run.tb is not None:
            run.tb.close()
        if state.best_test is not None:
            log(f"test, epoch {state.best_epoch} (selected by val r_mean):\n" + format_metrics_table(state.best_test))
        run.jsonl.log(
            {
                "event": "done",
                "best_epoch": state.best_epoch,
                "best_val_r_mean": state.best_val and state.best_val["r_mean"],
                "best_test_r_mean": state.best_test and state.best_test["r_mean"],
            }
        )
        utils.barrier()
        return {
            "model": run.model,
            "best_epoch": state.best_epoch,
            "best_val": state.best_val,
            "best_test": state.best_test,
        }
    finally:
        if owns_group:
            utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(main)
