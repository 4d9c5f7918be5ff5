"""Fine-tune BLIP's captioner (ViT + MED decoder) with the LM loss, select the epoch by val CIDEr + BLEU-4.

    python train_caption.py --config configs/caption_coco.yaml --output-dir output/caption \
        [--resume [CKPT]] [--evaluate] [--options key=value ...]
    torchrun --nproc_per_node=8 train_caption.py ...          (DDP: NCCL on GPU, gloo on CPU)

Official recipe (salesforce/BLIP train_caption.py): AdamW over all parameters, cosine LR per epoch, label
smoothing 0.1, prompt tokens outside the loss, beam search (3 beams, 20 / 5 tokens) for evaluation, the epoch with
the best val CIDEr + BLEU-4 kept. Outputs in --output-dir: config.yaml, log.jsonl, checkpoint_last.pth (everything
for an exact resume), checkpoint_best.pth, caption_metrics_{val,test}.json and captions_{val,test}.json (official
results format) of the selected epoch; test is scored only with the selected weights.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

import utils
from data import create_loader
from data.captions import caption_references, create_caption_dataset
from engine.caption_metrics import format_caption_metrics
from engine.captioning import evaluate_captions, train_caption_epoch, write_caption_outputs
from engine.training import (
    TrainState,
    last_checkpoint,
    resolve_resume,
    restore_training,
    save_last_checkpoint,
    training_arg_parser,
)
from models.caption_checkpoint import load_caption_model, load_caption_state_dict
from models.checkpoint import CheckpointError
from models.hf_blip import is_hf_directory
from utils import ConfigError, JsonlLogger, is_main_process, log

CKPT_FORMAT = "blip-caption-train-v1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    description = __doc__.split("\n\n")[0]
    writes = "checkpoints, logs, captions and metrics"
    evaluate_help = "caption and score val and test with `pretrained`"
    return training_arg_parser(description, writes, evaluate_help).parse_args(argv)


def read_resume_checkpoint(path: str) -> dict:
    """A checkpoint_last.pth written by this script (weights_only: tensors and plain containers only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"--resume: {path} is not a checkpoint_last.pth written by train_caption.py")
    return ckpt


def selection_score(metrics: dict) -> float:
    """The official model selection: val CIDEr + BLEU-4."""
    return metrics["cider"] + metrics["bleu_4"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = utils.load_config(args.config, args.options)
    utils.check_output_dir(args.output_dir, "--output-dir")
    owns_group = not utils.is_dist_initialized()
    info = utils.init_distributed(config["device"])
    try:
        return run(args, config, info)
    finally:
        if owns_group:
            utils.cleanup_distributed()


def run(args: argparse.Namespace, config: dict, info: utils.DistInfo) -> dict:
    utils.set_seed(config["seed"] + info.rank)
    if config["vit_grad_ckpt"] and config["vit_ckpt_layer"] == "auto":
        raise ConfigError("config key 'vit_ckpt_layer': auto is measured by train_retrieval.py only; give a number")
    out_dir = args.output_dir
    resume_path = resolve_resume(out_dir, args.resume, args.evaluate)
    ckpt = read_resume_checkpoint(resume_path) if resume_path else None
    source = config["pretrained"] or None
    if ckpt and not (source and is_hf_directory(os.path.expanduser(source))):
        source = None  # the weights come from the resumed checkpoint
    model, _ = load_caption_model(config, source)
    if ckpt:
        report = load_caption_state_dict(model, ckpt["model"], resume_path)
        if not report.clean or len(report.loaded) + len(report.expected_missing) != report.num_model_tensors:
            raise CheckpointError(f"--resume: {resume_path} does not match the model:\n{report.summary()}")
    model.to(info.device)
    if is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        utils.save_config(config, os.path.join(out_dir, "config.yaml"))
    jsonl = JsonlLogger(os.path.join(out_dir, "log.jsonl"))
    evals = {}
    for split in ("val", "test"):
        if config["dataset"] != "custom" or config[f"{split}_file"]:
            dataset = create_caption_dataset(config, split)
            evals[split] = (dataset, caption_references(config, split, dataset))

    def score(split: str, epoch: int | None) -> dict | None:
        if split not in evals:
            return None
        metrics, results = evaluate_captions(model, *evals[split], config, info.device, split)
        write_caption_outputs(metrics, results, out_dir, split, {"epoch": epoch})
        return metrics

    if args.evaluate:
        val, test = score("val", None), score("test", None)
        utils.barrier()
        return {"model": model, "best_epoch": None, "best_val": val, "best_test": test}

    train_set = create_caption_dataset(config, "train")
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=config["seed"])
    loader = create_loader(train_set, config["batch_size_train"], config["num_workers"], True, sampler)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["init_lr"], weight_decay=config["weight_decay"], fused=info.device.type == "cuda"
    )
    scaler = torch.amp.GradScaler("cuda", enabled=info.device.type == "cuda" and config["amp"] == "fp16")
    ddp = (
        DistributedDataParallel(model, [info.local_rank] if info.device.type == "cuda" else None)
        if info.distributed
        else None
    )
    state = TrainState()
    if ckpt:
        state = restore_training(ckpt, optimizer, scaler, config, info, resume_path, jsonl)
    max_epoch = config["max_epoch"]
    for epoch in range(state.epoch + 1, max_epoch):
        sampler.set_epoch(epoch)
        lr = utils.cosine_lr(epoch, max_epoch, config["init_lr"], config["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        stats, state.global_step = train_caption_epoch(
            ddp or model, ddp, loader, optimizer, scaler, config, epoch, state.global_step, info.device, jsonl
        )
        record = {"epoch": epoch, "step": state.global_step, "lr": lr, "train_loss": stats["loss"]}
        record["train_time_s"] = time.perf_counter() - start
        last_epoch = epoch == max_epoch - 1
        if (epoch + 1) % config["eval_every"] == 0 or last_epoch:
            val = score("val", epoch) if "val" in evals else None
            if val is not None:
                record.update({f"val_{k}": v for k, v in val.items() if isinstance(v, float)})
            # The metrics exist on the main process only: it decides, and every rank follows.
            improved = is_main_process() and (
                selection_score(val) > state.best_metric if val is not None else last_epoch
            )
            improved = bool(utils.all_reduce_sum_(torch.tensor([float(improved)], device=info.device)).item())
            if improved:
                state.best_epoch, state.best_val = epoch, val
                if val:  # the metrics exist on the main process only
                    state.best_metric = selection_score(val)
                if is_main_process():
                    best = {"format": CKPT_FORMAT + "-best", "model": model.state_dict(), "config": config}
                    utils.atomic_save(
                        {**best, "epoch": epoch, "val_metrics": val}, os.path.join(out_dir, "checkpoint_best.pth")
                    )
                state.best_test = score("test", epoch)
                if state.best_test:
                    record.update({f"test_{k}": v for k, v in state.best_test.items() if isinstance(v, float)})
        state.epoch = epoch
        record["best_epoch"] = state.best_epoch
        jsonl.log(record)
        last = last_checkpoint(model, optimizer, scaler, state, config, info)
        last["format"] = CKPT_FORMAT
        if is_main_process():
            save_last_checkpoint(last, os.path.join(out_dir, "checkpoint_last.pth"))
    if state.best_test:
        log(
            f"test, epoch {state.best_epoch} (selected by val CIDEr + BLEU-4): "
            + format_caption_metrics(state.best_test)
        )
    utils.barrier()
    return {"model": model, "best_epoch": state.best_epoch, "best_val": state.best_val, "best_test": state.best_test}


if __name__ == "__main__":
    utils.run_cli(main)
