"""`vit_ckpt_layer: auto`: checkpoint as few ViT blocks as let a training step fit in the GPU's memory.

Three small probe steps (batch 1 and 2 without checkpointing, batch 1 with every block checkpointed) give a
linear model of a step's peak memory in the batch size and the number of checkpointed blocks; the trainer then
checkpoints the fewest blocks whose estimated peak, plus the AdamW state, fits CKPT_MEMORY_FRACTION of the memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import utils
from utils import log

CKPT_MEMORY_FRACTION = 0.85  # vit_ckpt_layer auto: a step's estimated peak stays within this share of the GPU


def measure_step_peak(
    model: torch.nn.Module, batch_size: int, ckpt_layers: int, config: dict, device: torch.device
) -> int:
    """Peak device bytes (0 on the CPU) of one training forward + backward at `batch_size` with the last
    `ckpt_layers` ViT blocks checkpointed, on random images and captions padded to max_length (the most text
    memory a batch can take). The model is left as found: weights, momentum encoders, queues, gradients and
    every RNG are restored, and the queues are not written (their writes need the configured batch)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    rng = utils.capture_rng_state()
    saved = model.visual_encoder.ckpt_layer, model.training
    model.visual_encoder.ckpt_layer = ckpt_layers
    try:
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        size = model.visual_encoder.image_size
        images = torch.randn(batch_size, 3, size, size, device=device)
        with utils.autocast(device, config["amp"], config["amp_cpu"]):
            out = model(
                images,
                ["a photo"] * batch_size,
                config["alpha"],
                torch.arange(batch_size, device=device),
                text_compute="official",
                update_queues=False,
            )
            loss = out["loss"]
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        utils.restore_rng_state(rng)
        model.visual_encoder.ckpt_layer = saved[0]
        model.train(saved[1])
    return peak


def fit_ckpt_layers(
    peak_1: int, peak_2: int, peak_1_all: int, depth: int, batch_size: int, extra_bytes: int, budget_bytes: int
) -> tuple[int, int]:
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


def choose_vit_ckpt_layers(
    model: torch.nn.Module, config: dict, device: torch.device, measure=measure_step_peak
) -> int:
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
    blocks, estimate = fit_ckpt_layers(
        peak_1, peak_2, peak_1_all, depth, config["batch_size_train"], adamw_state, budget
    )
    if utils.is_dist_initialized():
        choice = torch.tensor([blocks], device=device)
        dist.all_reduce(choice, op=dist.ReduceOp.MAX)
        blocks = int(choice)
    log(
        f"vit_ckpt_layer auto: checkpointing the last {blocks} of {depth} ViT blocks (estimated peak "
        f"{estimate / 2**30:.1f} GiB at batch {config['batch_size_train']}, budget {budget / 2**30:.1f} GiB = "
        f"{CKPT_MEMORY_FRACTION:.0%} of the memory available)" + ("; it may not fit" if estimate > budget else "")
    )
    return blocks
