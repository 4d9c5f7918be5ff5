"""Captioning as a training task: BLIP's captioner (ViT + MED decoder) with the label-smoothed LM loss, selected
by val CIDEr + BLEU-4 (the official rule), evaluated by beam search and the COCO caption metrics
(engine/captioning.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import utils
from data import create_loader
from data.captions import caption_references, create_caption_dataset
from engine.caption_metrics import format_caption_metrics
from engine.captioning import evaluate_captions, write_caption_outputs
from engine.trainer import StepInfo, TrainState
from models.caption_checkpoint import load_caption_model, load_caption_state_dict
from models.checkpoint import CheckpointError, apply_config_updates
from models.hf_blip import is_hf_directory
from utils import ConfigError


@dataclass
class CaptionResult:
    metrics: dict  # COCO caption metrics on the main process, {} elsewhere
    captions: list[dict]  # [{"image_id": key, "caption": str}], the official results format


class CaptionTask:
    """train_caption.py: the official caption fine-tuning recipe (salesforce/BLIP train_caption.py)."""

    name = "train_caption.py"
    checkpoint_format = "blip-caption-train-v1"
    checkpoint_formats_read = (checkpoint_format,)
    eval_splits = ("val", "test")
    selection_name = "cider_bleu4"
    stat_keys = ("loss",)
    total_keys = ()
    sample_unit = "images"

    def __init__(self, config: dict, info: utils.DistInfo, args: argparse.Namespace):
        self.config, self.info, self.out_dir = config, info, args.output_dir
        self.allow_unsafe = args.unsafe_trust_checkpoint  # for `pretrained` only
        self.evals: dict = {}  # split -> (dataset, references)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass  # no flags of its own: captions_<split>.json always holds what the metrics were computed from

    def check(self, resume_path: str | None, evaluate: bool) -> None:
        if self.config["model"] != "blip":
            raise ConfigError(f"config key 'model': the captioner is BLIP's decoder; got {self.config['model']!r}")
        if self.config["vit_grad_ckpt"] and self.config["vit_ckpt_layer"] == "auto":
            raise ConfigError("config key 'vit_ckpt_layer': auto is measured by train_retrieval.py only; give a number")

    def build_model(self, ckpt: dict | None, resume_path: str | None) -> torch.nn.Module:
        source = self.config["pretrained"] or None
        if ckpt and not (source and is_hf_directory(os.path.expanduser(source))):
            source = None  # the weights come from the resumed checkpoint
        model, report = load_caption_model(self.config, source, allow_unsafe=self.allow_unsafe)
        apply_config_updates(self.config, report)
        if ckpt:
            report = load_caption_state_dict(model, ckpt["model"], resume_path)
            if not report.clean or len(report.loaded) + len(report.expected_missing) != report.num_model_tensors:
                raise CheckpointError(f"--resume: {resume_path} does not match the model:\n{report.summary()}")
        return model

    def build_eval_data(self, model: torch.nn.Module) -> None:
        config = self.config
        for split in self.eval_splits:
            if config["dataset"] != "custom" or config[f"{split}_file"]:
                dataset = create_caption_dataset(config, split)
                self.evals[split] = (dataset, caption_references(config, split, dataset))

    def train_loader(self, model: torch.nn.Module) -> tuple[DataLoader, DistributedSampler]:
        config, info = self.config, self.info
        train_set = create_caption_dataset(config, "train")
        sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=config["seed"])
        return create_loader(train_set, config["batch_size_train"], config["num_workers"], True, sampler), sampler

    def optimizer_params(self, model: torch.nn.Module) -> list:
        return list(model.parameters())  # the official recipe trains everything

    def wrap_ddp(self, model: torch.nn.Module, device_ids: list[int] | None) -> DistributedDataParallel:
        return DistributedDataParallel(model, device_ids)

    def start_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        pass

    def train_step(self, train_model: torch.nn.Module, batch, step: StepInfo) -> dict[str, torch.Tensor]:
        images, captions = batch
        return {"loss": train_model(images.to(self.info.device, non_blocking=True), list(captions))}

    def step_log(self, step: StepInfo) -> dict:
        return {}

    def evaluate(self, model: torch.nn.Module, split: str) -> CaptionResult | None:
        if split not in self.evals:
            return None
        metrics, captions = evaluate_captions(model, *self.evals[split], self.config, self.info.device, split)
        return CaptionResult(metrics, captions)

    def selection_score(self, metrics: dict) -> float | None:
        """The official model selection: val CIDEr + BLEU-4."""
        return metrics["cider"] + metrics["bleu_4"] if "cider" in metrics else None

    def write_outputs(self, result: CaptionResult, split: str, epoch: int | None) -> None:
        write_caption_outputs(result.metrics, result.captions, self.out_dir, split, {"epoch": epoch})

    def weights_payload(self, model: torch.nn.Module) -> dict:
        return {"model": model.state_dict()}

    def summary(self, state: TrainState) -> str | None:
        if not state.best_test:
            return None
        return f"test, epoch {state.best_epoch} (selected by val CIDEr + BLEU-4): " + format_caption_metrics(
            state.best_test
        )
