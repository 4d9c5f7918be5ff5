"""Fine-tune BLIP for image-text retrieval (ITC + ITM), then select the epoch by val r_mean.

    python train_retrieval.py --config configs/retrieval_flickr.yaml --output-dir output/flickr \
        [--resume [CKPT]] [--evaluate] [--options key=value ...]
    torchrun --nproc_per_node=8 train_retrieval.py ...          (DDP: NCCL on GPU, gloo on CPU)

Outputs in --output-dir: config.yaml (resolved), log.jsonl (one object per logged step and per epoch),
checkpoint_last.pth (everything for an exact resume), checkpoint_best.pth (by val r_mean), and
metrics_val.json / metrics_test.json of the selected epoch. Test is scored only with the weights of the
epoch that val selected, and re-scored whenever the selection changes, so test numbers are never stale.

checkpoint_last.pth is one file written by rank 0: {format, model (state dict incl. momentum encoders and
queues), optimizer, scaler, epoch (last finished), global_step, best_metric, best_epoch, best_val, best_test,
config, world_size, rng_states (one capture_rng_state() per rank, gathered)}. One file rather than per-rank
files, so a copied or moved checkpoint can never lose part of its state. Resuming restores all of it, so with
the same world size N epochs equal N/2 + resume + N/2 (bitwise in fp32 on CPU with num_workers 0; with
num_workers > 0 the data order is still exact but augmentation streams of the recreated workers differ).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import utils
from data import DataError, create_dataset, create_loader
from models.blip_retrieval import check_queue_size
from models.checkpoint import CheckpointError, load_model, load_state_dict_checked
from models.hf_blip import is_hf_directory
from utils import ConfigError, JsonlLogger, is_main_process, log

if TYPE_CHECKING:
    from eval_retrieval import EvalResult

CKPT_FORMAT = "blip-retrieval-train-v1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (keys: utils.DEFAULT_CONFIG)")
    parser.add_argument("--output-dir", required=True, help="where checkpoints, logs and metrics go")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                        help="continue from CKPT (default: OUTPUT_DIR/checkpoint_last.pth)")
    parser.add_argument("--evaluate", action="store_true", help="evaluate val and test with `pretrained`, no training")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, YAML values, dotted keys (init_lr=5e-6 vit.depth=2)")
    return parser.parse_args(argv)


def is_retrieval_finetuned(source: str) -> bool:
    """True for official fine-tuned retrieval checkpoints (model_base_retrieval_coco.pth, blip_coco_retrieval.pth)."""
    # Official .pth names contain "retrieval"; the HF ports are Salesforce/blip-itm-{base,large}-{coco,flickr}.
    name = os.path.basename(source.rstrip("/")).lower()
    return bool(re.search(r"retrieval|itm-(base|large)-(coco|flickr)", name))


def has_split(config: dict, split: str) -> bool:
    """Whether the config provides `split` (val/test)."""
    # flickr/coco always have every split (downloaded when missing); custom only those it names.
    return config["dataset"] != "custom" or bool(config.get(f"{split}_file"))


def gather_rng_states(distributed: bool) -> list[dict]:
    """Every rank's RNG snapshot, in rank order, on every rank (ranks draw different dropout/negatives)."""
    state = utils.capture_rng_state()
    if not distributed:
        return [state]
    states: list = [None] * utils.get_world_size()
    dist.all_gather_object(states, state)
    return states


CKPT_MEMORY_FRACTION = 0.85  # vit_ckpt_layer auto: a step's estimated peak stays within this share of the GPU


def measure_step_peak(model: torch.nn.Module, batch_size: int, ckpt_layers: int, config: dict,
                      device: torch.device) -> int:
    """Peak device bytes (0 on the CPU) of one training forward + backward at `batch_size` with the last
    `ckpt_layers` ViT blocks checkpointed, on random images and captions padded to max_length (the most text
    memory a batch can take). The model is left as found: weights, momentum encoders, queues, gradients and
    every RNG are restored, and the queues are not written (their writes need the configured batch)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    rng = utils.capture_rng_state()
    saved = model.visual_encoder.ckpt_layer, model.official_text_compute, model.training
    model.visual_encoder.ckpt_layer, model.official_text_compute = ckpt_layers, True
    model._dequeue_and_enqueue = lambda *args: None
    try:
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        size = model.visual_encoder.image_size
        images = torch.randn(batch_size, 3, size, size, device=device)
        with utils.autocast(device, config["amp"], config["amp_cpu"]):
            out = model(images, ["a photo"] * batch_size, config["alpha"], torch.arange(batch_size, device=device))
            loss = out["loss_ita"] + out["loss_itm"]
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    finally:
        del model._dequeue_and_enqueue
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        utils.restore_rng_state(rng)
        model.visual_encoder.ckpt_layer, model.official_text_compute = saved[:2]
        model.train(saved[2])
    return peak


def fit_ckpt_layers(peak_1: int, peak_2: int, peak_1_all: int, depth: int, batch_size: int, extra_bytes: int,
                    budget_bytes: int) -> tuple[int, int]:
    """Fewest checkpointed ViT blocks whose estimated peak at `batch_size` fits `budget_bytes`.

    Memory grows linearly with the batch: peak(B, n) = fixed + B * (per_image - n * saved_per_block), with
    per_image from the peaks at batch 1 and 2 without checkpointing (peak_1, peak_2), and saved_per_block
    from batch 1 with all `depth` blocks checkpointed (peak_1_all). `extra_bytes` is memory the step will
    hold that the probes did not (the AdamW state). Returns (blocks, estimated peak); all blocks when even
    that does not fit.
    """
    per_image = peak_2 - peak_1
    fixed = peak_1 - per_image + extra_bytes
    saved_per_block = max(peak_1 - peak_1_all, 0) / depth
    for blocks in range(depth + 1):
        estimate = int(fixed + batch_size * (per_image - blocks * saved_per_block))
        if estimate <= budget_bytes:
            return blocks, estimate
    return depth, estimate


def choose_vit_ckpt_layers(model: torch.nn.Module, config: dict, device: torch.device,
                           measure=measure_step_peak) -> int:
    """`vit_ckpt_layer: auto`: checkpoint as few ViT blocks as let a step fit in CKPT_MEMORY_FRACTION of the
    GPU memory available to this process. Three small probe steps (batch 1 and 2 without checkpointing, batch
    1 with every block checkpointed) give the model of fit_ckpt_layers. Every rank takes the largest choice."""
    depth = len(model.visual_encoder.blocks)
    if device.type != "cuda":
        log("vit_ckpt_layer auto: no GPU memory to fit on the CPU; ViT checkpointing off")
        return 0
    peak_1, peak_2, peak_1_all = (measure(model, b, n, config, device) for b, n in ((1, 0), (2, 0), (1, depth)))
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(CKPT_MEMORY_FRACTION * (free + torch.cuda.memory_reserved(device)))
    adamw_state = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32 exp_avg, exp_avg_sq
    blocks, estimate = fit_ckpt_layers(peak_1, peak_2, peak_1_all, depth, config["batch_size_train"], adamw_state,
                                       budget)
    if utils.is_dist_initialized():
        choice = torch.tensor([blocks], device=device)
        dist.all_reduce(choice, op=dist.ReduceOp.MAX)
        blocks = int(choice)
    log(f"vit_ckpt_layer auto: checkpointing the last {blocks} of {depth} ViT blocks (estimated peak "
        f"{estimate / 2**30:.1f} GiB at batch {config['batch_size_train']}, budget {budget / 2**30:.1f} GiB = "
        f"{CKPT_MEMORY_FRACTION:.0%} of the memory available)" + ("; it may not fit" if estimate > budget else ""))
    return blocks


def load_train_checkpoint(path: str) -> dict:
    """Read a checkpoint_last.pth for --resume, refusing anything train_retrieval.py did not write."""
    try:
        # weights_only: our checkpoints hold only tensors and plain containers, and this refuses pickled code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume: no checkpoint at {path}. Train without --resume first, or pass the "
                          "path of a checkpoint_last.pth written by train_retrieval.py.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"--resume: {path} is not a checkpoint_last.pth written by train_retrieval.py "
                          f"(no format={CKPT_FORMAT!r}); to start from other weights set pretrained instead")
    return ckpt


def save_last_checkpoint(state: dict, path: str) -> None:
    """Write checkpoint_last.pth atomically (a crash mid-write keeps the previous one)."""
    utils.atomic_save(state, path)


def open_tensorboard(output_dir: str) -> Any:
    """A SummaryWriter under OUTPUT_DIR/tensorboard; a clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: an optional dependency
    except ImportError as err:
        raise ConfigError("config tensorboard: true needs the tensorboard package (pip install tensorboard), "
                          f"or set tensorboard: false ({err})") from None
    return SummaryWriter(os.path.join(output_dir, "tensorboard"))


def evaluate_split(model: torch.nn.Module, datasets: dict, config: dict, device: torch.device,
                   split: str) -> EvalResult | None:
    """Evaluate one split on every rank (evaluate() shards the queries); None when the split is absent."""
    from eval_retrieval import evaluate  # entry point module; imported here to keep startup light

    if datasets.get(split) is None:
        return None
    result = evaluate(model, datasets[split], config, device, desc=split)
    log(f"[{split}] r_mean {result.metrics['r_mean']:.2f}  txt_r1 {result.metrics['txt_r1']:.2f}  "
        f"img_r1 {result.metrics['img_r1']:.2f}")
    return result


def write_outputs(result: EvalResult | None, output_dir: str, split: str, epoch: int | None) -> None:
    """metrics_<split>.json (main process), tagged with the epoch the weights come from."""
    from eval_retrieval import write_eval_outputs

    if result is not None:
        write_eval_outputs(result, output_dir, split, save_scores=False, extra={"epoch": epoch})


# Per-step training statistics returned by the model, summed on the device and averaged when logged (the
# ITM accuracies show whether the ITM head learns or sits at the prior: ~0.64 loss, everything called mismatch).
STAT_KEYS = ("loss_ita", "loss_itm", "itm_acc_pos", "itm_acc_neg", "num_neg_fallback")


def _stat_means(sums: list[float], count: int) -> dict:
    """Averages of the STAT_KEYS sums over `count` micro-steps; num_neg_fallback stays a total."""
    means = {key: total / count for key, total in zip(STAT_KEYS, sums, strict=True)}
    means["num_neg_fallback"] = int(sums[STAT_KEYS.index("num_neg_fallback")])
    return means


def train_one_epoch(model: torch.nn.Module, ddp: DistributedDataParallel | None, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: dict, epoch: int,
                    global_step: int, device: torch.device, jsonl: JsonlLogger, tb: Any) -> tuple[dict, int]:
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
                out = model(image, caption, alpha, idx, hard_fraction)
                loss = out["loss_ita"] + out["loss_itm"]
            scaler.scale(loss / group_size).backward()
        stats = torch.stack([out[key].detach().float() for key in STAT_KEYS])
        epoch_sum += stats
        window_sum += stats
        window_micro += 1
        if not last_micro:
            continue
        if config["clip_grad_norm"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config["clip_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        if global_step % log_every == 0 or i == n - 1:
            window = _stat_means(window_sum.tolist(), window_micro)  # the one host sync, every log_every steps
            elapsed = time.perf_counter() - window_start
            record = {"epoch": epoch, "step": global_step, **window, "lr": lr, "itm_hard_fraction": hard_fraction,
                      "images_per_s": window_micro * images_per_micro / max(elapsed, 1e-9)}
            jsonl.log(record)
            bar.set_postfix(loss=f"{window['loss_ita'] + window['loss_itm']:.3f}", lr=f"{lr:.2e}",
                            img_s=f"{record['images_per_s']:.1f}")
            if tb is not None:
                for key in (*STAT_KEYS, "lr", "images_per_s", "itm_hard_fraction"):
                    tb.add_scalar(f"train/{key}", record[key], global_step)
            window_sum.zero_()
            window_micro, window_start = 0, time.perf_counter()
    bar.close()
    return _stat_means(utils.all_reduce_sum_(epoch_sum).tolist(), n * utils.get_world_size()), global_step


def main(argv: list[str] | None = None) -> dict:
    """Run training (or --evaluate). Returns {'model', 'best_epoch', 'best_val', 'best_test'}."""
    args = parse_args(argv)
    config = utils.load_config(args.config, args.options)
    owns_group = not utils.is_dist_initialized()
    info = utils.init_distributed(config["device"])
    try:
        return _run(args, config, info)
    finally:
        if owns_group:
            utils.cleanup_distributed()


def _run(args: argparse.Namespace, config: dict, info: utils.DistInfo) -> dict:
    device, out_dir = info.device, args.output_dir
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes (official setting)
    utils.set_seed(config["seed"] + info.rank)  # ranks draw different augmentations, dropout and negatives
    last_path = os.path.join(out_dir, "checkpoint_last.pth")
    resume_path = None
    if args.resume is not None and args.evaluate:
        raise ConfigError("--evaluate scores the `pretrained` weights; to evaluate a checkpoint pass "
                          "--options pretrained=PATH instead of --resume")
    if args.resume is not None:
        resume_path = args.resume or last_path
        if not os.path.isfile(resume_path):
            raise ConfigError(f"--resume: no checkpoint at {resume_path}. Train without --resume first, or pass "
                              "the path of a checkpoint_last.pth written by train_retrieval.py.")
    elif not args.evaluate and os.path.isfile(last_path):
        raise ConfigError(f"{out_dir} already holds a training run (checkpoint_last.pth). Pass --resume to "
                          "continue it, or choose another --output-dir.")
    if not args.evaluate:
        global_batch = config["batch_size_train"] * info.world_size
        try:
            check_queue_size(config["queue_size"], global_batch)
        except ValueError as err:
            raise ConfigError(f"config key 'queue_size': {err}") from None
        if is_retrieval_finetuned(config["pretrained"]) and resume_path is None:
            log("=" * 100 + f"\nWARNING: pretrained={config['pretrained']} is already fine-tuned for retrieval "
                "(the official configs point there for EVALUATION).\nFine-tuning it again does not reproduce the "
                "paper; start from a pre-trained checkpoint such as model_base.pth.\n" + "=" * 100)
    tb = open_tensorboard(out_dir) if (config["tensorboard"] and is_main_process() and not args.evaluate) else None
    ckpt = load_train_checkpoint(resume_path) if resume_path else None
    # On resume the weights come from the checkpoint, so `pretrained` is only read when it also defines the
    # architecture and tokenizer (a Hugging Face directory).
    source = config["pretrained"] or None
    if ckpt and not (source and is_hf_directory(os.path.expanduser(source))):
        source = None
    model, report = load_model(config, source)
    if report is not None and report.config_updates:
        config.update(report.config_updates)  # an HF directory fixes the architecture (e.g. image_size)
    if ckpt:
        # The checked loader raises on any shape mismatch (architecture changed) and names the differing keys.
        report = load_state_dict_checked(model, ckpt["model"], resume_path)
        if report.missing or report.unexpected or report.expected_missing or report.expected_mismatched:
            raise CheckpointError(f"--resume: {resume_path} does not match the model built from the config:\n"
                                  f"{report.summary()}")
    model.to(device)

    if is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        utils.save_config(config, os.path.join(out_dir, "config.yaml"))
    jsonl = JsonlLogger(os.path.join(out_dir, "log.jsonl"))
    datasets = {}
    for split in ("val", "test"):
        if has_split(config, split):
            datasets[split] = create_dataset(config, split)
        else:
            log(f"no {split} split configured (dataset custom without {split}_file): skipping {split} evaluation")

    if args.evaluate:
        results = {split: evaluate_split(model, datasets, config, device, split) for split in ("val", "test")}
        for split, result in results.items():
            write_outputs(result, out_dir, split, None)
        if results["test"] is not None:
            log("test (loaded weights):\n" + utils.format_metrics_table(results["test"].metrics))
        utils.barrier()
        return {"model": model, "best_epoch": None, "best_val": results["val"] and results["val"].metrics,
                "best_test": results["test"] and results["test"].metrics}

    train_set = create_dataset(config, "train")
    # DistributedSampler with explicit replicas/rank needs no process group, and its order is a pure function
    # of (seed, epoch): the same code serves one process and N, and a resumed epoch sees the same batches.
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=config["seed"])
    loader = create_loader(train_set, config["batch_size_train"], config["num_workers"], True, sampler)

    if config["vit_grad_ckpt"] and config["vit_ckpt_layer"] == "auto":
        model.visual_encoder.ckpt_layer = choose_vit_ckpt_layers(model, config, device)
        jsonl.log({"event": "vit_ckpt_layer_auto", "blocks": model.visual_encoder.ckpt_layer})
    params = [p for p in model.parameters() if p.requires_grad]  # momentum encoders have requires_grad False
    optimizer = torch.optim.AdamW(params, lr=config["init_lr"], weight_decay=config["weight_decay"],
                                  fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config["amp"] == "fp16")
    ddp = None
    train_model = model
    if info.distributed:
        # broadcast_buffers=False: the only buffers are the queues and their pointer, which every rank fills
        # with the same all-gathered features, so they stay identical without a per-step broadcast.
        ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
        train_model = ddp
    if config["compile"]:
        model.static_caption_shape = True  # captions padded to max_length: one graph, no recompiles for new lengths
        train_model = torch.compile(train_model)

    start_epoch, global_step, best, best_epoch, best_val, best_test = 0, 0, -1.0, None, None, None
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_step = ckpt["epoch"] + 1, ckpt["global_step"]
        best, best_epoch, best_val, best_test = ckpt["best_metric"], ckpt["best_epoch"], ckpt["best_val"], \
            ckpt["best_test"]
        if len(ckpt["rng_states"]) == info.world_size:
            utils.restore_rng_state(ckpt["rng_states"][info.rank])
        else:
            log(f"WARNING: the checkpoint was written by {len(ckpt['rng_states'])} processes, this run has "
                f"{info.world_size}: RNG streams are re-seeded, so the continuation is not bit-exact")
            utils.set_seed(config["seed"] + info.rank + 1000 * start_epoch)
        old_config = ckpt["config"]
        changed = [f"{k}: {old_config.get(k)!r} -> {v!r}" for k, v in config.items() if old_config.get(k) != v]
        if changed:  # e.g. a longer max_epoch, which also changes the rest of the cosine schedule
            log("resuming with config changes: " + ", ".join(changed))
        log(f"resumed from {resume_path}: epoch {ckpt['epoch']} done, step {global_step}, best epoch {best_epoch}")
        jsonl.log({"event": "resume", "from": resume_path, "start_epoch": start_epoch, "step": global_step})

    max_epoch = config["max_epoch"]
    for epoch in range(start_epoch, max_epoch):
        sampler.set_epoch(epoch)
        lr = utils.cosine_lr(epoch, max_epoch, config["init_lr"], config["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start = time.perf_counter()
        train_stats, global_step = train_one_epoch(train_model, ddp, loader, optimizer, scaler, config, epoch,
                                                   global_step, device, jsonl, tb)
        record = {"epoch": epoch, "step": global_step, "lr": lr, "train_time_s": time.perf_counter() - epoch_start,
                  **{f"train_{k}": v for k, v in train_stats.items()}}

        if (epoch + 1) % config["eval_every"] == 0 or epoch == max_epoch - 1:
            val = evaluate_split(model, datasets, config, device, "val")
            # Without a val split there is nothing to select by: the last epoch is the one reported.
            improved = val.metrics["r_mean"] > best if val is not None else epoch == max_epoch - 1
            if val is not None:
                record.update({f"val_{k}": v for k, v in val.metrics.items()})
            if improved:
                best, best_epoch = (val.metrics["r_mean"] if val is not None else best), epoch
                best_val = val.metrics if val is not None else None
                if is_main_process():
                    utils.atomic_save({"format": CKPT_FORMAT + "-best", "model": model.state_dict(),
                                       "config": config, "epoch": epoch, "val_metrics": best_val},
                                      os.path.join(out_dir, "checkpoint_best.pth"))
                # Score test now, with exactly these weights, so reported test numbers match the selection.
                test = evaluate_split(model, datasets, config, device, "test")
                best_test = test.metrics if test is not None else None
                write_outputs(val, out_dir, "val", epoch)
                write_outputs(test, out_dir, "test", epoch)
                if test is not None:
                    record.update({f"test_{k}": v for k, v in test.metrics.items()})
        record["best_epoch"] = best_epoch
        jsonl.log(record)
        if tb is not None and "val_r_mean" in record:
            tb.add_scalar("val/r_mean", record["val_r_mean"], epoch)

        # Every rank takes part in the gather; rank 0 writes one file with all of them.
        rng_states = gather_rng_states(info.distributed)
        if is_main_process():
            save_last_checkpoint({
                "format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step, "best_metric": best,
                "best_epoch": best_epoch, "best_val": best_val, "best_test": best_test, "config": config,
                "world_size": info.world_size, "rng_states": rng_states}, last_path)

    if tb is not None:
        tb.close()
    if best_test is not None:
        log(f"test, epoch {best_epoch} (selected by val r_mean):\n" + utils.format_metrics_table(best_test))
    jsonl.log({"event": "done", "best_epoch": best_epoch, "best_val_r_mean": best_val and best_val["r_mean"],
               "best_test_r_mean": best_test and best_test["r_mean"]})
    utils.barrier()
    return {"model": model, "best_epoch": best_epoch, "best_val": best_val, "best_test": best_test}


def cli() -> None:
    """Console entry point: user errors end in one line on stderr instead of a traceback."""
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
