"""Composed image retrieval on CIRR as a training task (CoVR's recipe): BLIP's query over the reference image with
the modification text (with `model: blip2`, BLIP-2's Q-Former's pooled queries, models/blip2_cir.py), HN-NCE
against the target images' features, selected by val (R@5 + Rs@1)/2, with the test1 submission files of the selected
epoch (engine/cir.py)."""

from __future__ import annotations

import argparse
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import utils
from data import config_train_transform, test_transform
from data.cirr import CirrSplit, CirrTrainDataset, load_cirr_split
from data.cirr_sampler import CirrBatchSampler
from engine.cir import CirResult, evaluate_cirr, format_cirr_table, gallery_features, write_cirr_outputs
from engine.trainer import StepInfo, TrainState
from models.blip2_cir import load_blip2_cir_model, load_blip2_cir_state
from models.blip_cir import check_cir_checkpoint, load_cir_model, load_cir_state_dict
from models.checkpoint import apply_config_updates
from utils import ConfigError, log

SAVE_SCORES_HELP = (
    "also write scores_<split>.npz (score matrix, per-query ranks; keys in engine.cir.write_cirr_outputs)"
)


class CirTask:
    """train_cirr.py: CIRR rc2 training on `train`, selection on `val`, submission files for `test1`."""

    name = "train_cirr.py"
    checkpoint_format = "blip-cir-train-v1"
    # Before CIR had a format of its own, its checkpoints were stamped with retrieval's; they still resume (the
    # model's keys are checked on load, so a retrieval checkpoint is still refused).
    checkpoint_formats_read = (checkpoint_format, "blip-retrieval-train-v2")
    eval_splits = ("val", "test1")
    selection_name = "r_avg"
    stat_keys = ("loss", "batch_acc")
    total_keys = ()
    sample_unit = "pairs"

    def __init__(self, config: dict, info: utils.DistInfo, args: argparse.Namespace):
        self.config, self.info, self.out_dir = config, info, args.output_dir
        self.allow_unsafe = args.unsafe_trust_checkpoint  # for `pretrained` only
        self.save_scores = args.save_scores
        self.splits: dict[str, CirrSplit] = {}
        self.train_split: CirrSplit | None = None
        self.target_feats: torch.Tensor | None = None  # unit ITC features of the train images, the HN-NCE targets

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--save-scores", action="store_true", help=SAVE_SCORES_HELP)

    def check(self, resume_path: str | None, evaluate: bool) -> None:
        config = self.config
        if config["model"] == "clip":
            raise ConfigError("config key 'model': composed retrieval is built on BLIP or BLIP-2 (blip | blip2)")
        if not evaluate and config["cir_query"] == "image" and not config["cir_train_vit"]:
            raise ConfigError(
                "cir_query: image with a frozen ViT and vision_proj has nothing to train; evaluate it with --evaluate"
            )
        if config["grad_accum_steps"] != 1:
            raise ConfigError(
                "grad_accum_steps: HN-NCE contrasts the pairs of one batch, so accumulation changes the loss"
            )
        # Read the annotation files first: data errors surface before a checkpoint download.
        galleries = {"val": config["cirr_val_gallery"], "test1": "split"}  # the server takes test1's split names
        for split in self.eval_splits:
            self.splits[split] = load_cirr_split(
                config["cirr_ann_root"], config["cirr_image_root"], split, gallery=galleries[split]
            )

    def build_model(self, ckpt: dict | None, resume_path: str | None) -> torch.nn.Module:
        config = self.config
        source = None if ckpt else (config["pretrained"] or None)
        blip2 = config["model"] == "blip2"  # BLIP-2's first stage as the backbone (models/blip2_cir.py)
        load = load_blip2_cir_model if blip2 else load_cir_model
        model, report = load(config, source, allow_unsafe=self.allow_unsafe)
        apply_config_updates(config, report)
        if ckpt and blip2:
            load_blip2_cir_state(model, ckpt["model"], resume_path)
        elif ckpt:
            check_cir_checkpoint(load_cir_state_dict(model, ckpt["model"], resume_path), resume_path)
        return model

    def build_eval_data(self, model: torch.nn.Module) -> None:
        pass  # read in check()

    def train_loader(self, model: torch.nn.Module) -> tuple[DataLoader, CirrBatchSampler]:
        config, info = self.config, self.info
        self.train_split = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "train")
        transform = (
            config_train_transform(config)
            if config["cir_train_transform"] == "train"
            else test_transform(config["image_size"])
        )
        dataset = CirrTrainDataset(self.train_split, transform, config["max_words"])
        sampler = CirrBatchSampler(
            [p.members for p in self.train_split.pairs],
            config["batch_size_train"],
            config["cir_sampler"],
            config["seed"],
            info.rank,
            info.world_size,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=config["num_workers"],
            pin_memory=torch.cuda.is_available(),
            persistent_workers=config["num_workers"] > 0,
        )
        trainable = sum(p.numel() for p in model.trainable_parameters())
        log(
            f"training on {len(dataset)} pairs, {len(sampler)} batches of {config['batch_size_train']} x "
            f"{info.world_size} per epoch ({config['cir_sampler']} sampler, {sampler.num_dropped} pairs left out), "
            f"{trainable / 1e6:.1f}M trainable parameters"
        )
        return loader, sampler

    def optimizer_params(self, model: torch.nn.Module) -> list:
        return model.trainable_parameters()

    def wrap_ddp(self, model: torch.nn.Module, device_ids: list[int] | None) -> DistributedDataParallel:
        # The text-only query skips the cross-attention, whose parameters then get no gradient.
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=self.config["cir_query"] != "multimodal"
        )

    def start_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        if self.target_feats is None or self.config["cir_train_vit"]:  # a frozen image side: targets never change
            split, device = self.train_split, self.info.device
            # With a frozen image side the features are computed once per process: at epoch 0, or at the first epoch
            # after a resume. Iterating a DataLoader draws from the global RNG, so an isolated stream keeps the
            # training draws (dropout) the same either way and a resumed run exact.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.target_feats = gallery_features(model, split, split.image_names, self.config, device, "train")

    def train_step(self, train_model: torch.nn.Module, batch, step: StepInfo) -> dict[str, torch.Tensor]:
        images, texts, target_idx = batch
        device, config = self.info.device, self.config
        target = self.target_feats[target_idx.to(device)]
        out = train_model(
            images.to(device, non_blocking=True),
            list(texts),
            target,
            config["cir_hnnce_alpha"],
            config["cir_hnnce_beta"],
        )
        return {"loss": out["loss"], "batch_acc": out["acc"]}

    def step_log(self, step: StepInfo) -> dict:
        return {}

    def evaluate(self, model: torch.nn.Module, split: str) -> CirResult:
        result = evaluate_cirr(model, self.splits[split], self.config, self.info.device)
        log(f"[{split}] " + format_cirr_table(result.metrics))
        return result

    def selection_score(self, metrics: dict) -> float | None:
        return metrics.get("r_avg")

    def write_outputs(self, result: CirResult, split: str, epoch: int | None) -> None:
        """metrics_<split>.json tagged with the checkpoint (and epoch) the scores belong to; for test1 the two
        submission files."""
        if epoch is None:
            extra = {"checkpoint": self.config["pretrained"] or "random initialisation"}
        else:
            extra = {"checkpoint": os.path.join(self.out_dir, "checkpoint_best.pth"), "epoch": epoch}
        paths = write_cirr_outputs(result, self.out_dir, extra, self.save_scores)
        if result.split == "test1" and paths:
            log(f"test1 files: {', '.join(paths[1:])}")

    def weights_payload(self, model: torch.nn.Module) -> dict:
        return {"model": model.state_dict()}

    def summary(self, state: TrainState) -> str | None:
        if state.best_val is None:
            return None
        return f"selected epoch {state.best_epoch}: " + format_cirr_table(state.best_val)
