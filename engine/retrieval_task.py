"""Image-text retrieval as a training task: BLIP with ITC + ITM (or a CLIP dual encoder with InfoNCE), selected by
val r_mean, evaluated with ITC ranking and top-k ITM re-ranking (engine/evaluation.py).

The schedules below are retrieval's alone: the momentum-distillation alpha ramps over epoch 0, and the share of
hard ITM negatives may follow a schedule (`itm_negatives`).
"""

from __future__ import annotations

import argparse
import os
import re

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import utils
from data import blip2_train_transform, create_dataset, create_loader
from engine.evaluation import EvalResult, evaluate, write_eval_outputs
from engine.memory import choose_vit_ckpt_layers
from engine.metrics import format_metrics_table
from engine.trainer import StepInfo, TrainState
from models.blip_retrieval import check_queue_size
from models.checkpoint import CheckpointError, apply_config_updates, load_state_dict_checked
from models.clip import dataset_transform, load_clip_state
from models.hf_blip import is_hf_directory
from models.loading import load_model
from models.peft_methods import (
    apply_finetune,
    is_delta_checkpoint,
    load_delta,
    model_payload,
    parameter_counts,
    resume_base,
)
from utils import ConfigError, JsonlLogger, log

# Statistics the model returns per batch. The ITM accuracies show whether the ITM head learns or sits at the prior
# (~0.64 loss, everything called mismatch); num_neg_fallback counts rows without a valid hard negative.
STAT_KEYS = ("loss_ita", "loss_itm", "itm_acc_pos", "itm_acc_neg", "num_neg_fallback", "loss_tmim")


def alpha_at(step_in_epoch: int, steps_per_epoch: int, epoch: int, alpha: float) -> float:
    """Distillation weight: ramps linearly from 0 to alpha over epoch 0, then stays at alpha (official)."""
    if epoch > 0:
        return alpha
    return alpha * min(1.0, step_in_epoch / max(steps_per_epoch, 1))


def itm_hard_fraction(step: int, schedule: str, steps: int) -> float:
    """Share of hard ITM negatives at optimizer step `step` (0-based), the rest drawn uniformly among other images.

    hard: 1 (official). uniform: 0. warmup: 0 for the first `steps` steps, then 1. anneal: rises linearly from 0
    at step 0 to 1 at step `steps`. From scratch, the hardest negatives arrive before ITM can tell anything
    apart and the head collapses to the prior; easy negatives first let it learn (docs/notes/itm_from_scratch.md).
    """
    if schedule == "hard":
        return 1.0
    if schedule == "uniform":
        return 0.0
    if schedule == "warmup":
        return 0.0 if step < steps else 1.0
    if schedule == "anneal":
        return min(1.0, step / steps)
    raise ValueError(f"unknown ITM negative schedule {schedule!r}")


def is_retrieval_finetuned(source: str) -> bool:
    """True for official fine-tuned retrieval checkpoints (model_base_retrieval_coco.pth, blip_coco_retrieval.pth)."""
    # Official .pth names contain "retrieval"; the HF ports are Salesforce/blip-itm-{base,large}-{coco,flickr}.
    name = os.path.basename(source.rstrip("/")).lower()
    return bool(re.search(r"retrieval|itm-(base|large)-(coco|flickr)", name))


def has_split(config: dict, split: str) -> bool:
    """Whether the config provides `split` (val/test)."""
    # flickr/coco always have every split (downloaded when missing); custom only those it names.
    return config["dataset"] != "custom" or bool(config[f"{split}_file"])


SAVE_SCORES_HELP = "also write scores_<split>.npz and index_<split>.json of the selected epoch (as eval_retrieval.py)"


class RetrievalTask:
    """train_retrieval.py: BLIP (ITC + ITM), BLIP-2's first stage (ITC + ITM, LAVIS's retrieval fine-tuning) or CLIP
    (InfoNCE) on Flickr30K, COCO or a custom retrieval JSON."""

    name = "train_retrieval.py"
    checkpoint_format = "blip-retrieval-train-v2"
    # v1 (before TrainState) kept the same fields at the top level of the checkpoint; it still resumes.
    checkpoint_formats_read = (checkpoint_format, "blip-retrieval-train-v1")
    eval_splits = ("val", "test")
    selection_name = "r_mean"
    stat_keys = STAT_KEYS
    total_keys = ("num_neg_fallback",)
    sample_unit = "images"

    def __init__(self, config: dict, info: utils.DistInfo, args: argparse.Namespace):
        self.config, self.info, self.out_dir = config, info, args.output_dir
        self.allow_unsafe = args.unsafe_trust_checkpoint  # for `pretrained` only
        self.save_scores = args.save_scores
        self.datasets: dict = {}
        self.jsonl = JsonlLogger(os.path.join(self.out_dir, "log.jsonl"))
        # Under torch.compile captions are padded to max_length: one graph, no recompiles for new caption lengths.
        self.text_compute = "static" if config["compile"] else "trimmed"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--save-scores", action="store_true", help=SAVE_SCORES_HELP)

    def check(self, resume_path: str | None, evaluate: bool) -> None:
        config = self.config
        if evaluate or config["model"] != "blip":  # CLIP has no queue
            return
        try:
            check_queue_size(config["queue_size"], config["batch_size_train"] * self.info.world_size)
        except ValueError as err:
            raise ConfigError(f"config key 'queue_size': {err}") from None
        if is_retrieval_finetuned(config["pretrained"]) and resume_path is None:
            log(
                "=" * 100 + f"\nWARNING: pretrained={config['pretrained']} is already fine-tuned for retrieval "
                "(the official configs point there for EVALUATION).\nFine-tuning it again does not reproduce the "
                "paper; start from a pre-trained checkpoint such as model_base.pth.\n" + "=" * 100
            )

    def build_model(self, ckpt: dict | None, resume_path: str | None) -> torch.nn.Module:
        config = self.config
        # On resume the weights come from the checkpoint, so `pretrained` is only read when it also defines the
        # architecture and tokenizer (a Hugging Face directory).
        source = config["pretrained"] or None
        delta = ckpt is not None and is_delta_checkpoint(ckpt)  # a parameter-efficient run: base + trainable part
        if delta:
            source = resume_base(ckpt, config, resume_path)
        elif ckpt and not (source and is_hf_directory(os.path.expanduser(source))):
            resume_base(ckpt, config, resume_path)  # refuses a method change
            source = None
        # A resumed delta run's base is recorded in its checkpoint: read safely, whatever the command line says.
        model, report = load_model(config, source, allow_unsafe=self.allow_unsafe and not delta)
        apply_config_updates(config, report)  # an HF directory fixes the architecture (e.g. image_size)
        apply_finetune(model, config, source)  # finetune.method: adapters in, frozen weights out of training
        if config["finetune"]["method"] != "full":
            counts = parameter_counts(model)
            log(
                f"finetune.method {config['finetune']['method']}: {counts['trainable']:,} trainable parameters of "
                f"{counts['online']:,} (momentum copies not counted)"
            )
        if ckpt and config["model"] == "clip":
            load_clip_state(model, ckpt["model"], resume_path)  # strict: every key must match
        elif ckpt and config["model"] == "blip2":
            model.load_state_dict(ckpt["model"], strict=True)  # our own keys: every one must match
        elif delta:
            load_delta(model, ckpt, resume_path)
        elif ckpt:
            # The checked loader raises on any shape mismatch (architecture changed) and names the differing keys.
            report = load_state_dict_checked(model, ckpt["model"], resume_path)
            if report.missing or report.unexpected or report.expected_missing or report.expected_mismatched:
                raise CheckpointError(
                    f"--resume: {resume_path} does not match the model built from the config:\n{report.summary()}"
                )
        return model

    def build_eval_data(self, model: torch.nn.Module) -> None:
        for split in self.eval_splits:
            if has_split(self.config, split):
                self.datasets[split] = create_dataset(self.config, split, dataset_transform(model, train=False))
            else:
                log(f"no {split} split configured (dataset custom without {split}_file): skipping {split} evaluation")

    def train_loader(self, model: torch.nn.Module) -> tuple[DataLoader, DistributedSampler]:
        config, info = self.config, self.info
        # BLIP-2 trains with LAVIS's blip2_image_train (crop + flip, no RandomAugment) under train_augment official.
        transform = blip2_train_transform(config) if config["model"] == "blip2" else dataset_transform(model, True)
        train_set = create_dataset(config, "train", transform)
        # DistributedSampler with explicit replicas/rank needs no process group, and its order is a pure function
        # of (seed, epoch): the same code serves one process and N, and a resumed epoch sees the same batches.
        sampler = DistributedSampler(
            train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config["seed"]
        )
        loader = create_loader(train_set, config["batch_size_train"], config["num_workers"], True, sampler)
        if config["vit_grad_ckpt"] and config["vit_ckpt_layer"] == "auto":
            model.visual_encoder.ckpt_layer = choose_vit_ckpt_layers(model, config, info.device)
            self.jsonl.log({"event": "vit_ckpt_layer_auto", "blocks": model.visual_encoder.ckpt_layer})
        return loader, sampler

    def optimizer_params(self, model: torch.nn.Module) -> list:
        # open_clip's rule for CLIP (no weight decay on gains, biases and the logit scale), LAVIS's for BLIP-2
        if self.config["model"] in ("clip", "blip2"):
            return model.optimizer_groups(self.config["weight_decay"])
        return [p for p in model.parameters() if p.requires_grad]  # momentum encoders have requires_grad False

    def wrap_ddp(self, model: torch.nn.Module, device_ids: list[int] | None) -> DistributedDataParallel:
        # broadcast_buffers=False: the only buffers are the queues and their pointer, which every rank fills with
        # the same all-gathered features, so they stay identical without a per-step broadcast.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def start_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        pass

    def train_step(self, train_model: torch.nn.Module, batch, step: StepInfo) -> dict[str, torch.Tensor]:
        image, caption, idx = batch
        device = self.info.device
        image, idx = image.to(device, non_blocking=True), idx.to(device, non_blocking=True)
        config = self.config
        alpha = alpha_at(step.index, step.num_batches, step.epoch, config["alpha"])
        hard_fraction = itm_hard_fraction(step.global_step, config["itm_negatives"], config["itm_negatives_steps"])
        # out["loss"] is loss_ita + loss_itm, or what finetune.method optimises.
        return train_model(image, caption, alpha, idx, hard_fraction, text_compute=self.text_compute)

    def step_log(self, step: StepInfo) -> dict:
        config = self.config
        return {
            "itm_hard_fraction": itm_hard_fraction(
                step.global_step, config["itm_negatives"], config["itm_negatives_steps"]
            )
        }

    def evaluate(self, model: torch.nn.Module, split: str) -> EvalResult | None:
        """One split on every rank (evaluate() shards the queries); None when the split is absent."""
        if self.datasets.get(split) is None:
            return None
        result = evaluate(model, self.datasets[split], self.config, self.info.device, desc=split)
        m = result.metrics
        official = f", official score {m['official_r_mean']:.2f}" if "official_r_mean" in m else ""
        log(
            f"[{split}] r_mean {m['r_mean']:.2f} (ITC only {m['itc_r_mean']:.2f}{official})  "
            f"txt_r1 {m['txt_r1']:.2f}  img_r1 {m['img_r1']:.2f}"
        )
        return result

    def selection_score(self, metrics: dict) -> float | None:
        return metrics.get("r_mean")

    def write_outputs(self, result: EvalResult, split: str, epoch: int | None) -> None:
        """metrics_<split>.json, tagged with the epoch the weights come from (None: the loaded weights)."""
        dataset = self.datasets[split]
        write_eval_outputs(result, self.out_dir, split, self.save_scores, extra={"epoch": epoch}, dataset=dataset)
        if epoch is None and split == "test":
            log("test (loaded weights):\n" + format_metrics_table(result.metrics))

    def weights_payload(self, model: torch.nn.Module) -> dict:
        return model_payload(model)  # the whole state dict, or a parameter-efficient run's trainable part

    def summary(self, state: TrainState) -> str | None:
        if state.best_test is None:
            return None
        return f"test, epoch {state.best_epoch} (selected by val r_mean):\n" + format_metrics_table(state.best_test)
