"""Composed image retrieval on CIRR with BLIP (CoVR's recipe): fine-tune with HN-NCE, select the epoch by val
(R@5 + Rs@1)/2, and write the test1 submission files of the selected epoch.

    python train_cirr.py --config configs/cirr.yaml --output-dir output/cirr [--resume [CKPT]] [--options k=v ...]
    python train_cirr.py --config configs/cirr.yaml --output-dir output/cirr_zs --evaluate   (the `pretrained` weights)
    torchrun --nproc_per_node=8 train_cirr.py ...

Outputs in --output-dir: config.yaml (resolved), log.jsonl, checkpoint_last.pth (exact resume, engine/training.py),
checkpoint_best.pth, metrics_val.json (R@1/5/10/50, Rs@1/2/3, r_avg, the checkpoint and epoch they belong to),
metrics_test1.json (counts only: test1 has no targets) and cirr_submission_test1_{recall,recall_subset}.json, the
two files the CIRR evaluation server takes.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import utils
from data import config_train_transform, test_transform
from data.cirr import CirrTrainDataset, load_cirr_split
from data.cirr_sampler import CirrBatchSampler
from engine.cir import (
    CirResult,
    evaluate_cirr,
    format_cirr_table,
    gallery_features,
    train_cir_epoch,
    write_cirr_outputs,
)
from engine.training import (
    CKPT_FORMAT,
    TrainState,
    last_checkpoint,
    load_train_checkpoint,
    resolve_resume,
    restore_training,
    save_last_checkpoint,
    training_arg_parser,
)
from models.blip_cir import check_cir_checkpoint, load_cir_model, load_cir_state_dict
from utils import ConfigError, JsonlLogger, is_main_process, log

EVAL_SPLITS = ("val", "test1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    description = __doc__.split("\n\n")[0]
    writes = "checkpoints, logs, metrics and submissions"
    evaluate_help = "evaluate val and test1 with `pretrained`, no training"
    return training_arg_parser(description, writes, evaluate_help).parse_args(argv)


def check_config(config: dict, evaluate: bool) -> None:
    """Refuse settings this recipe cannot run, with the key to change."""
    if not evaluate and config["cir_query"] == "image" and not config["cir_train_vit"]:
        raise ConfigError(
            "cir_query: image with a frozen ViT and vision_proj has nothing to train; evaluate it with --evaluate"
        )
    if config["grad_accum_steps"] != 1:
        raise ConfigError("grad_accum_steps: HN-NCE contrasts the pairs of one batch, so accumulation changes the loss")


def evaluate_and_write(model, splits: dict, config: dict, device, out_dir: str, extra: dict) -> dict[str, CirResult]:
    results = {}
    for name, data in splits.items():
        result = evaluate_cirr(model, data, config, device)
        paths = write_cirr_outputs(result, out_dir, extra)
        log(
            f"[{extra['checkpoint']}] "
            + format_cirr_table(result.metrics)
            + (f" -> {', '.join(paths)}" if paths else "")
        )
        results[name] = result
    return results


def main(argv: list[str] | None = None) -> dict:
    """Train (or --evaluate). Returns {'model', 'best_epoch', 'best_val', 'results'}."""
    args = parse_args(argv)
    config = utils.load_config(args.config, args.options)
    utils.check_output_dir(args.output_dir, "--output-dir")
    check_config(config, args.evaluate)
    owns_group = not utils.is_dist_initialized()
    info = utils.init_distributed(config["device"])
    try:
        utils.set_seed(config["seed"] + info.rank)
        resume_path = resolve_resume(args.output_dir, args.resume, args.evaluate)
        ckpt = load_train_checkpoint(resume_path) if resume_path else None
        ann_root, image_root = config["cirr_ann_root"], config["cirr_image_root"]
        eval_splits = {s: load_cirr_split(ann_root, image_root, s) for s in EVAL_SPLITS}  # data errors before downloads
        source = config["pretrained"] or None
        model, report = load_cir_model(config, None if ckpt else source)
        if report is not None and report.config_updates:
            config.update(report.config_updates)
        if ckpt:
            check_cir_checkpoint(load_cir_state_dict(model, ckpt["model"], resume_path), resume_path)
        model.to(info.device)
        out_dir = args.output_dir
        if is_main_process():
            os.makedirs(out_dir, exist_ok=True)
            utils.save_config(config, os.path.join(out_dir, "config.yaml"))
        jsonl = JsonlLogger(os.path.join(out_dir, "log.jsonl"))
        if args.evaluate:
            name = config["pretrained"] or "random initialisation"
            results = evaluate_and_write(model, eval_splits, config, info.device, out_dir, {"checkpoint": name})
            return {"model": model, "best_epoch": None, "best_val": results["val"].metrics, "results": results}
        return train(model, config, info, out_dir, jsonl, eval_splits, ckpt, resume_path)
    finally:
        if owns_group:
            utils.cleanup_distributed()


def train(model, config: dict, info: utils.DistInfo, out_dir: str, jsonl: JsonlLogger, eval_splits, ckpt, resume_path):
    train_split = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "train")
    transform = (
        config_train_transform(config)
        if config["cir_train_transform"] == "train"
        else test_transform(config["image_size"])
    )
    dataset = CirrTrainDataset(train_split, transform, config["max_words"])
    sampler = CirrBatchSampler(
        [p.members for p in train_split.pairs],
        config["batch_size_train"],
        config["cir_sampler"],
        config["seed"],
        info.rank,
        info.world_size,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config["num_workers"],
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config["num_workers"] > 0,
    )
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(
        params, lr=config["init_lr"], weight_decay=config["weight_decay"], fused=info.device.type == "cuda" or None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=info.device.type == "cuda" and config["amp"] == "fp16")
    ddp = None
    if info.distributed:
        ddp = DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=config["cir_query"] != "multimodal",  # text mode skips the cross-attention
        )
    state = TrainState()
    if ckpt:
        state = restore_training(ckpt, optimizer, scaler, config, info, resume_path, jsonl)
    log(
        f"training on {len(dataset)} pairs, {len(sampler)} batches of {config['batch_size_train']} x "
        f"{info.world_size} per epoch ({config['cir_sampler']} sampler, {sampler.num_dropped} pairs left out), "
        f"{sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters"
    )
    target_feats = None
    for epoch in range(state.epoch + 1, config["max_epoch"]):
        if target_feats is None or config["cir_train_vit"]:  # frozen image side: the targets never change
            target_feats = gallery_features(model, train_split, train_split.image_names, config, info.device, "train")
        sampler.set_epoch(epoch)
        lr = utils.cosine_lr(epoch, config["max_epoch"], config["init_lr"], config["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        stats, state.global_step = train_cir_epoch(
            model, ddp, loader, target_feats, optimizer, scaler, config, epoch, state.global_step, info.device, jsonl
        )
        record = {"epoch": epoch, "step": state.global_step, "lr": lr, "train_time_s": time.perf_counter() - start}
        record.update({f"train_{k}": v for k, v in stats.items()})
        if (epoch + 1) % config["eval_every"] == 0 or epoch == config["max_epoch"] - 1:
            select_epoch(model, config, info, out_dir, eval_splits, state, epoch, record)
        state.epoch = epoch
        record["best_epoch"] = state.best_epoch
        jsonl.log(record)
        last = last_checkpoint(model, optimizer, scaler, state, config, info)
        if is_main_process():
            save_last_checkpoint(last, os.path.join(out_dir, "checkpoint_last.pth"))
    if state.best_val is not None:
        log(f"selected epoch {state.best_epoch}: " + format_cirr_table(state.best_val))
    jsonl.log({"event": "done", "best_epoch": state.best_epoch, "best_val_r_avg": state.best_metric})
    utils.barrier()
    return {"model": model, "best_epoch": state.best_epoch, "best_val": state.best_val, "results": None}


def select_epoch(model, config, info, out_dir, eval_splits, state: TrainState, epoch: int, record: dict) -> None:
    """Evaluate val; when (R@5 + Rs@1)/2 improves, save checkpoint_best.pth and write its val metrics and test1
    submission files, so the files on disk always belong to the selected epoch."""
    val = evaluate_cirr(model, eval_splits["val"], config, info.device)
    log(f"[epoch {epoch}] " + format_cirr_table(val.metrics))
    record.update({f"val_{k}": v for k, v in val.metrics.items() if isinstance(v, (int, float))})
    if val.metrics["r_avg"] <= state.best_metric:
        return
    state.best_epoch, state.best_metric, state.best_val = epoch, val.metrics["r_avg"], val.metrics
    best_path = os.path.join(out_dir, "checkpoint_best.pth")
    if is_main_process():
        utils.atomic_save(
            {"format": CKPT_FORMAT + "-best", "model": model.state_dict(), "config": config, "epoch": epoch},
            best_path,
        )
    extra = {"checkpoint": best_path, "epoch": epoch}
    write_cirr_outputs(val, out_dir, extra)
    test = evaluate_cirr(model, eval_splits["test1"], config, info.device)
    paths = write_cirr_outputs(test, out_dir, extra)
    if paths:
        log(f"[epoch {epoch}] test1 submission files: {', '.join(paths[1:])}")


if __name__ == "__main__":
    utils.run_cli(main)
