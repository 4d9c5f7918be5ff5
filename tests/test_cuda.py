"""The CUDA code paths, run only where a GPU is present (CI has none; run them on a GPU machine with
`python -m pytest tests/test_cuda.py`).

What only a GPU exercises: bf16/fp16 autocast in evaluation and training, image tokens stored in bf16 on
the device or streamed from pinned host memory, fused AdamW, the GradScaler of fp16 training, and
torch.compile. Each test compares against an independent computation (the official fp32 algorithm, the same
evaluation on the CPU, the resident-token path) rather than checking that something merely ran.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

import models.blip_retrieval as br
import train_retrieval
from configs.schema import save_config
from data import create_dataset
from data.synthetic import make_synthetic_dataset
from engine import evaluation, features, itm_rerank, memory
from models.blip_retrieval import build_model
from tests.helpers import spread_weights, synthetic_config
from utils import autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
VIT = {"width": 48, "depth": 2, "heads": 2, "patch_size": 8}  # 17 image tokens at 32 px
RECALL_KEYS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("synth_cuda")
    paths = make_synthetic_dataset(
        str(out), num_train_images=24, num_val_images=8, num_test_images=16, captions_per_image=5, image_size=32, seed=5
    )
    paths["root"] = str(out)
    return paths


@pytest.fixture(scope="module")
def config(synth: dict[str, str]) -> dict:
    return synthetic_config(
        synth["root"], synth, vit=dict(VIT), batch_size_test=6, k_test=6, itm_batch_size=7, device="cuda"
    )


@pytest.fixture(scope="module")
def model(config: dict):
    """Random weights with std 0.3 (as in test_eval.py) so cosines and ITM logits are well separated."""
    torch.manual_seed(0)
    return spread_weights(build_model(config)).eval()


@pytest.fixture(scope="module")
def test_ds(config: dict):
    return create_dataset(config, "test")


def _evaluate(model, dataset, config: dict, device: torch.device, **overrides):
    model.to(device)
    try:
        return evaluation.evaluate(model, dataset, {**config, **overrides}, device)
    finally:
        model.to(CPU)


@pytest.fixture(scope="module")
def official_cpu(model, test_ds, config):
    return _evaluate(model, test_ds, config, CPU, eval_mode="official", eval_amp="none")


def test_fast_and_official_on_cuda_match_the_cpu_reference(model, test_ds, config, official_cpu):
    fast = _evaluate(model, test_ds, config, CUDA, eval_mode="fast", eval_amp="none")
    official = _evaluate(model, test_ds, config, CUDA, eval_mode="official", eval_amp="bf16")  # ignored there
    for result in (fast, official):
        np.testing.assert_allclose(result.scores_i2t, official_cpu.scores_i2t, atol=2e-3, rtol=0)
        np.testing.assert_allclose(result.scores_t2i, official_cpu.scores_t2i, atol=2e-3, rtol=0)
        for key in RECALL_KEYS:
            assert result.metrics[key] == official_cpu.metrics[key], key


def test_fast_bf16_on_cuda_stays_close_to_fp32(model, test_ds, config, official_cpu):
    bf16 = _evaluate(model, test_ds, config, CUDA, eval_mode="fast", eval_amp="bf16")
    assert bf16.scores_i2t.dtype == np.float32
    reference = official_cpu.scores_i2t
    both = (reference > -50) & (bf16.scores_i2t > -50)
    assert both.sum() >= 0.9 * (reference > -50).sum()  # the ITC top k barely moves
    diff = np.abs(bf16.scores_i2t[both] - reference[both])
    assert diff.mean() < 0.05 and diff.max() < 0.25  # bf16 keeps about 3 significant digits
    assert diff.max() > 0  # it really ran in bf16


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_streamed_image_tokens_give_the_resident_scores(model, test_ds, config, monkeypatch, amp):
    """Tokens that do not fit stay in pinned host memory and are copied KV_CHUNK images at a time; forcing that
    path (and chunks that do not divide the image count) must not change a single score."""
    resident = _evaluate(model, test_ds, config, CUDA, eval_mode="fast", eval_amp=amp)
    monkeypatch.setattr(features, "TOKEN_MEMORY_FRACTION", 0.0)
    monkeypatch.setattr(itm_rerank, "KV_CHUNK", 3)
    streamed = _evaluate(model, test_ds, config, CUDA, eval_mode="fast", eval_amp=amp)
    np.testing.assert_allclose(streamed.scores_i2t, resident.scores_i2t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(streamed.scores_t2i, resident.scores_t2i, atol=1e-5, rtol=0)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _train(config: dict, out_dir, **options) -> list[dict]:
    """Three epochs of train_retrieval on the GPU; returns the per-step log records."""
    cfg = {
        **config,
        "batch_size_train": 8,
        "queue_size": 16,
        "max_epoch": 3,
        "log_every": 1,
        "init_lr": 3e-4,
        "med_config": {**config["med_config"], **NO_DROPOUT},
        **options,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.yaml")
    save_config(cfg, path)
    out = train_retrieval.main(["--config", path, "--output-dir", os.path.join(out_dir, "run")])
    assert next(out["model"].parameters()).device.type == "cuda"
    for split in ("val", "test"):  # the fast evaluation ran on the GPU after training
        with open(os.path.join(out_dir, "run", f"metrics_{split}.json")) as f:
            assert 0 <= json.load(f)["r_mean"] <= 100
    steps = [r for r in _read_jsonl(os.path.join(out_dir, "run", "log.jsonl")) if "loss_ita" in r]
    assert len(steps) == 3 * 15  # 24 images x 5 captions / batch 8, every step logged
    assert np.isfinite([[r["loss_ita"], r["loss_itm"]] for r in steps]).all()
    return steps


def test_training_on_cuda_bf16_and_fp16(config, tmp_path):
    """The real loop on the GPU: fused AdamW under bf16 autocast, and fp16 with the GradScaler."""
    _train(config, str(tmp_path / "bf16"), amp="bf16")
    _train(config, str(tmp_path / "fp16"), amp="fp16")
    scaler = torch.load(tmp_path / "fp16" / "run" / "checkpoint_last.pth", weights_only=False)["scaler"]
    assert scaler and scaler["scale"] > 0  # the GradScaler was enabled and its state is saved for resume


def test_compiled_training_on_cuda_matches_eager(config, tmp_path):
    """`compile: true`. Dropout is off, so the compiled run's first ITC loss (which does not depend on sampled
    negatives) must equal the eager one up to bf16 rounding."""
    eager = _train(config, str(tmp_path / "eager"), amp="bf16")
    compiled = _train(config, str(tmp_path / "compiled"), amp="bf16", compile=True)
    assert compiled[0]["loss_ita"] == pytest.approx(eager[0]["loss_ita"], rel=2e-2)


def test_memory_probe_on_cuda_measures_and_restores(config):
    """vit_ckpt_layer auto on a GPU: the probe's peaks grow with the batch and shrink with checkpointing, the
    model comes back unchanged, and the choice is a block count."""
    torch.manual_seed(0)
    model = build_model({**config, "med_config": {**config["med_config"], **NO_DROPOUT}}).to(CUDA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    depth = len(model.visual_encoder.blocks)
    peak_1, peak_2, peak_1_all = (
        memory.measure_step_peak(model, b, n, config, CUDA) for b, n in ((1, 0), (2, 0), (1, depth))
    )
    assert 0 < peak_1 <= peak_2
    assert peak_1_all <= 1.01 * peak_1  # tiny blocks: checkpointing saves little, but never adds to the peak
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 0 <= memory.choose_vit_ckpt_layers(model, {**config, "batch_size_train": 8}, CUDA) <= depth


def _deterministic_negatives(
    sim: torch.Tensor, positive: torch.Tensor, hard_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hardest negative of each row instead of a multinomial draw, whose RNG differs between devices."""
    return sim.float().masked_fill(positive, float("-inf")).argmax(dim=1), torch.zeros((), device=sim.device)


def test_training_step_on_cuda_matches_the_cpu(config, monkeypatch):
    """One ITC+ITM step, dropout off and hard negatives chosen deterministically: the losses and gradients on the
    GPU in fp32 equal the CPU's, and under bf16 autocast they stay within bf16 rounding."""
    monkeypatch.setattr(br, "sample_hard_negatives", _deterministic_negatives)
    torch.manual_seed(0)
    cfg = {**config, "med_config": {**config["med_config"], **NO_DROPOUT}, "queue_size": 16}
    reference = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(8, 3, 32, 32, generator=gen)
    caption = [
        "a dog runs on the grass",
        "a red ball",
        "two cats sit in the street",
        "a man with a blue ball",
        "the woman sits",
        "a photo of a cat",
        "a blue ball on the grass",
        "a man and a woman",
    ]
    idx = torch.tensor([0, 1, 0, 2, 3, 2, 4, 5])
    results = {}
    for name, device, amp in (("cpu", CPU, "none"), ("cuda", CUDA, "none"), ("cuda_bf16", CUDA, "bf16")):
        model = copy.deepcopy(reference).to(device)
        with autocast(device, amp):
            out = model(image.to(device), caption, 0.4, idx.to(device))
        loss = out["loss_ita"] + out["loss_itm"]
        loss.backward()
        grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
        results[name] = (torch.stack([out["loss_ita"], out["loss_itm"]]).detach().float().cpu(), grads)
    cpu_losses, cpu_grads = results["cpu"]
    torch.testing.assert_close(results["cuda"][0], cpu_losses, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["cuda"][1], cpu_grads, atol=1e-4, rtol=1e-3)
    bf16_losses, bf16_grads = results["cuda_bf16"]
    torch.testing.assert_close(bf16_losses, cpu_losses, atol=0.05, rtol=0.02)
    cosine = torch.nn.functional.cosine_similarity(bf16_grads, cpu_grads, dim=0)
    assert cosine > 0.99, cosine
    assert not torch.equal(bf16_grads, cpu_grads)  # autocast really changed the arithmetic


def test_fused_adamw_matches_the_reference_update():
    """The fused optimizer the trainer selects on CUDA computes the same update as the for-loop AdamW."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for device, fused in ((CUDA, True), (CPU, None)):
        params = [w.clone().to(device).requires_grad_() for w in weights]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, fused=fused, foreach=False if not fused else None)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.to(device)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for fused_p, loop_p in zip(*results):
        torch.testing.assert_close(fused_p, loop_p, atol=1e-5, rtol=1e-5)
