"""Parameter-efficient fine-tuning: LoRA (peft), prompt tuning, ContextBLIP's adapter + TMIM, delta checkpoints."""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import eval_retrieval
import train_retrieval
from configs import schema
from configs.schema import save_config
from data.imagecode import (
    POSITIONAL_TEMPLATES,
    ImagecodeSet,
    is_static,
    make_imagecode_sample,
    placement,
    sample_set_scenes,
    sorted_set_images,
)
from data.retrieval import DataError, load_image
from data.synthetic import COLOURS, LOCATIONS, _groups, _t_picture_of, make_synthetic_dataset
from data.transforms import test_transform
from engine import trainer
from engine.imagecode import imagecode_accuracy, imagecode_scores
from models.blip_retrieval import build_model
from models.checkpoint import CheckpointError
from models.context_adapter import MultiScaleAdapter, select_masked_patches, text_cross_attention
from models.loading import load_model
from models.peft_methods import (
    apply_finetune,
    delta_state_dict,
    merge_lora,
    parameter_counts,
    trainable_names,
)
from tests.helpers import spread_weights, synthetic_config, tiny_config
from utils import ConfigError, UserError

TINY_ADAPTER = {"layers": [1, 2], "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
METHODS = {
    "lora": {"method": "lora", "lora": {"rank": 4}},
    "prompt": {"method": "prompt", "prompt": {"text_tokens": 3, "vision_tokens": 2}},  # text and visual prompts
    "adapter": {"method": "adapter", "adapter": TINY_ADAPTER},
}
CAPTIONS = ["a red ball", "a dog on grass", "two cats", "a man in the street"]
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _model(tmp_path, finetune: dict | None = None, seed: int = 0):
    config = tiny_config(tmp_path, finetune=finetune or {"method": "full"})
    torch.manual_seed(seed)
    model = spread_weights(build_model(config))
    model.eval()
    return model, config


def _scores(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """ITC cosines and ITM logits of every image-caption pair (4 x 4)."""
    with torch.no_grad():
        embeds, image_feat = model.encode_image(images)
        ids, atts = model.tokenize(CAPTIONS)
        text_feat = model.encode_text(ids, atts)
        n = images.shape[0]
        rows = torch.arange(n).repeat_interleave(len(CAPTIONS))
        cols = torch.arange(len(CAPTIONS)).repeat(n)
        itm = model.itm_logits(model.with_enc_token(ids)[cols], atts[cols], embeds[rows])
    return {"itc": image_feat @ text_feat.t(), "itm": itm.view(n, len(CAPTIONS), 2)}


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "finetune, message",
    [
        ({"method": "lorra"}, "expected one of full, lora, prompt, adapter"),
        ({"lora": {"rnak": 4}}, "did you mean 'rank'"),
        ({"lora": {"rank": 0}}, "'finetune.lora.rank'"),
        ({"lora": {"target_modules": []}}, "non-empty list of module-name suffixes"),
        ({"adapter": {"layers": [0, 3]}}, "1-based ViT block numbers"),
        ({"adapter": {"mask_ratio": 1.0}}, "'finetune.adapter.mask_ratio'"),
        ({"prompt": {"text_tokens": "many"}}, "'finetune.prompt.text_tokens'"),
        ("lora", "expected a mapping"),
    ],
)
def test_finetune_config_errors_name_the_key(tmp_path, finetune, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, finetune=finetune)


def test_clip_with_a_blip_only_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="with model: clip use finetune.method: full"):
        tiny_config(tmp_path, model="clip", finetune={"method": "lora"})


def test_partial_finetune_mapping_is_merged_over_the_defaults(tmp_path):
    config = tiny_config(tmp_path, finetune={"method": "lora", "lora": {"rank": 2}})
    assert config["finetune"]["lora"]["rank"] == 2
    assert config["finetune"]["lora"]["alpha"] == schema.DEFAULT_CONFIG["finetune"]["lora"]["alpha"]
    assert config["finetune"]["adapter"] == schema.DEFAULT_CONFIG["finetune"]["adapter"]


def test_model_dependent_errors_are_clear(tmp_path):
    model, config = _model(tmp_path, {"method": "adapter", "adapter": {**TINY_ADAPTER, "layers": [1, 5]}})
    with pytest.raises(ConfigError, match="only 2 blocks"):
        apply_finetune(model, config, "")
    model, config = _model(tmp_path, {"method": "lora", "lora": {"target_modules": ["attn.qkv", "attn.qvk"]}})
    with pytest.raises(UserError, match="attn.qvk"):
        apply_finetune(model, config, "")
    model, config = _model(tmp_path, {"method": "lora", "extra_trainable": ["itm_hed"]})
    with pytest.raises(UserError, match="itm_hed"):
        apply_finetune(model, config, "")


# ----------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_only_adapters_train(tmp_path):
    base, _ = _model(tmp_path)
    model, config = _model(tmp_path, METHODS["lora"])
    images = torch.randn(4, 3, 32, 32)
    before = _scores(base, images)
    apply_finetune(model, config, "")
    after = _scores(model, images)
    for key in before:  # B = 0 at initialisation: the adapted model is the base model
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any(n.startswith(("visual_encoder_m.", "text_encoder_m.")) for n in names)
    # every targeted module of both towers has an adapter, online and momentum alike
    for tower in ("visual_encoder", "visual_encoder_m"):
        assert f"{tower}.blocks.1.attn.qkv.lora_A.default.weight" in dict(model.named_parameters())
    for tower in ("text_encoder", "text_encoder_m"):
        assert f"{tower}.encoder.layer.0.crossattention.self.value.lora_B.default.weight" in dict(
            model.named_parameters()
        )
    counts = parameter_counts(model)
    assert counts["trainable"] == counts["method"] < 0.1 * counts["online"]


def test_momentum_pairing_is_checked_by_name(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    model, _ = _model(tmp_path)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["attn.qkv"]), model.visual_encoder)  # online only
    with pytest.raises(RuntimeError, match="different parameters"):
        model._momentum_update()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_frozen_weights_stay_bitwise_and_the_optimizer_holds_only_trainables(tmp_path, method):
    model, config = _model(tmp_path, METHODS[method])
    apply_finetune(model, config, "")
    model.train()
    delta = delta_state_dict(model)  # trainable parameters, their momentum (EMA) copies, buffers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in delta}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    params = [p for p in model.parameters() if p.requires_grad]  # what build_training gives AdamW
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in set(trainable_names(model))
    }
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        out = model(torch.randn(4, 3, 32, 32), CAPTIONS, 0.4, torch.arange(4))
        optimizer.zero_grad()
        out["loss"].backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name  # frozen weights get no gradient at all
        optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # online and momentum frozen weights, bit for bit
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    # the frozen momentum weights equal their online originals exactly (no EMA drift of m*x + (1-m)*x)
    online, momentum = model.momentum_param_pairs()
    for p, p_m in zip(online, momentum, strict=True):
        if not p.requires_grad:
            assert torch.equal(p, p_m)


def test_momentum_adapters_are_an_ema_of_the_online_adapters(tmp_path):
    model, config = _model(tmp_path, METHODS["lora"])
    apply_finetune(model, config, "")
    online, momentum = model.momentum_param_pairs(trainable_only=True)
    assert online and all(p.requires_grad and not p_m.requires_grad for p, p_m in zip(online, momentum))
    for p, p_m in zip(online, momentum):
        assert torch.equal(p, p_m)  # copies at the start
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    expected = [model.momentum * p_m + (1 - model.momentum) * p for p, p_m in zip(online, momentum)]
    model._momentum_update()
    for p_m, want in zip(momentum, expected):
        torch.testing.assert_close(p_m, want)


def test_lora_merge_gives_the_same_scores_as_the_unmerged_model(tmp_path):
    model, config = _model(tmp_path, METHODS["lora"])
    images = torch.randn(4, 3, 32, 32)
    base_scores = _scores(model, images)
    apply_finetune(model, config, "")
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    unmerged = _scores(model, images)
    assert (unmerged["itm"] - base_scores["itm"]).abs().max() > 1e-2  # the adapters do change the model
    merge_lora(model)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert model.state_dict().keys() == build_model(config).state_dict().keys()  # official key names again
    merged = _scores(model, images)
    for key in unmerged:  # equal up to float32 rounding of W + BA, which varies with peft's merge (4e-5 with 0.14)
        torch.testing.assert_close(merged[key], unmerged[key], rtol=1e-4, atol=1e-4)


def test_merge_refuses_methods_that_cannot_merge(tmp_path):
    model, config = _model(tmp_path, METHODS["prompt"])
    apply_finetune(model, config, "")
    with pytest.raises(UserError, match="only LoRA"):
        merge_lora(model)


# ----------------------------------------------------------------------------------------------------
# Prompt tuning
# ----------------------------------------------------------------------------------------------------


def test_text_prompts_keep_position_zero_and_only_the_prompts_train(tmp_path):
    model, config = _model(tmp_path, {"method": "prompt", "prompt": {"text_tokens": 3}})
    ids, atts = model.tokenize(CAPTIONS)
    plain = model.text_encoder(ids, atts, mode="text")
    apply_finetune(model, config, "")
    prompted = model.text_encoder(ids, atts, mode="text")
    assert prompted.shape[1] == plain.shape[1] + 3
    assert trainable_names(model) == ["text_encoder.prompt.tokens"]
    assert not torch.allclose(prompted[:, 0], plain[:, 0])  # [CLS] now attends to the prompts
    # with the prompts' attention masked out, the real tokens see exactly the unprompted sequence
    model.text_encoder.prompt.tokens.data.zero_()
    hidden = model.text_encoder.embeddings(ids)
    hidden_p, mask_p = model.text_encoder.prompt(hidden, atts)
    assert torch.equal(hidden_p[:, 0], hidden[:, 0]) and torch.equal(hidden_p[:, 4:], hidden[:, 1:])
    assert torch.equal(mask_p[:, 1:4], torch.ones(4, 3, dtype=mask_p.dtype))


def test_vision_prompts_keep_the_image_token_shape_and_only_the_prompts_train(tmp_path):
    finetune = {"method": "prompt", "prompt": {"text_tokens": 0, "vision_tokens": 2}}
    model, config = _model(tmp_path, finetune)
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain = model.visual_encoder(images)
        apply_finetune(model, config, "")
        prompted = model.visual_encoder(images)
    assert prompted.shape == plain.shape  # the prompts' outputs are dropped after the last block
    assert not torch.allclose(prompted, plain)  # every token attended to the prompts
    assert trainable_names(model) == ["visual_encoder.prompt.tokens"]
    assert model.text_encoder.prompt is None  # text_tokens 0: the text side is untouched
    assert torch.equal(model.visual_encoder_m.prompt.tokens, model.visual_encoder.prompt.tokens)
    # Brute force: the ViT's own layers run on [CLS, prompts, patches] by hand, prompts then removed.
    vit = model.visual_encoder
    with torch.no_grad():
        x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_embed
        x = torch.cat([x[:, :1], vit.prompt.tokens[None].expand(2, -1, -1), x[:, 1:]], dim=1)
        for block in vit.blocks:
            x = block(x)
        x = vit.norm(x)
    assert torch.allclose(prompted, torch.cat([x[:, :1], x[:, 3:]], dim=1), atol=1e-6)
    # trains: one step moves the prompts and nothing else (their momentum copy moves by EMA)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(images, CAPTIONS[:2], 0.4, torch.tensor([0, 1]))["loss"]
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "visual_encoder.prompt.tokens" in changed
    assert set(changed) <= {"visual_encoder.prompt.tokens", "visual_encoder_m.prompt.tokens"}


def test_prompt_tuning_needs_at_least_one_token(tmp_path):
    with pytest.raises(ConfigError, match="both are 0"):
        schema.check_finetune({"method": "prompt", "prompt": {"text_tokens": 0}}, "in test")


# ----------------------------------------------------------------------------------------------------
# ContextBLIP adapter and TMIM
# ----------------------------------------------------------------------------------------------------


def test_adapter_has_the_papers_size_for_vit_b():
    adapter = MultiScaleAdapter(768, [3, 6, 9, 12], reduction=2)
    assert sum(p.numel() for p in adapter.parameters()) == 4 * 768 * 384 + 4 * 384 * 768 == 2_359_296
    assert adapter.block_indices == [2, 5, 8, 11]


def test_adapter_reads_the_chosen_blocks_and_adds_to_the_vit_output(tmp_path):
    model, config = _model(tmp_path, METHODS["adapter"])
    vit = model.visual_encoder
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(images)
        apply_finetune(model, config, "")
        adapted = vit(images)
        # by hand: the blocks' outputs, normalised, through the DPALs, concatenated, UPAL, added
        x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(images)], 1) + vit.pos_embed
        taps = []
        for block in vit.blocks:
            x = block(x)
            taps.append(vit.norm(x))
        latent = torch.cat([torch.relu(d(t)) for d, t in zip(vit.adapter.down, taps)], -1)
        torch.testing.assert_close(adapted, plain + torch.relu(vit.adapter.up(latent)))
    assert trainable_names(model)[:3] == [
        "visual_encoder.adapter.down.0.weight",
        "visual_encoder.adapter.down.1.weight",
        "visual_encoder.adapter.up.weight",
    ]
    assert all(n.startswith(("visual_encoder.adapter.", "tmim.")) for n in trainable_names(model))


def test_gated_adapter_starts_as_the_base_model_and_its_gate_trains(tmp_path):
    """finetune.adapter.gate: the UPAL output is scaled by a scalar that starts at 0, so the adapted model starts
    as the base model (every score unchanged), and the gate gets a gradient from the first step."""
    base, _ = _model(tmp_path)
    gated = copy.deepcopy(METHODS["adapter"])
    gated["adapter"] = {**gated.get("adapter", {}), "gate": True}
    model, config = _model(tmp_path, gated)
    images = torch.randn(4, 3, 32, 32)
    before = _scores(base, images)
    apply_finetune(model, config, "")
    after = _scores(model, images)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    assert "visual_encoder.adapter.gate" in trainable_names(model)
    vit = model.visual_encoder
    vit(images).square().sum().backward()
    assert vit.adapter.gate.grad is not None and vit.adapter.gate.grad.abs() > 0
    with pytest.raises(ConfigError, match="finetune.adapter.gate"):
        schema.validate_config({**config, "finetune": {**config["finetune"], "adapter": {"gate": "yes"}}})


def test_vit_on_kept_patches_equals_the_same_tokens_selected_up_front(tmp_path):
    model, _ = _model(tmp_path)
    vit = model.visual_encoder
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 2, 3], [1, 2, 3]])
    with torch.no_grad():
        got = vit(images, keep=keep)
        x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(images)], 1) + vit.pos_embed
        x = torch.stack([torch.cat([x[i, :1], x[i, 1:][keep[i]]]) for i in range(2)])
        for block in vit.blocks:
            x = block(x)
        torch.testing.assert_close(got, vit.norm(x))
        torch.testing.assert_close(vit(images, keep=torch.arange(4).expand(2, -1)), vit(images))


def test_tmim_masks_the_patches_with_the_highest_attention():
    attention = torch.tensor(
        [
            [0.01, 0.30, 0.02, 0.25, 0.05, 0.04, 0.20, 0.03],
            [0.50, 0.00, 0.00, 0.00, 0.10, 0.10, 0.00, 0.30],
        ]
    )
    masked, visible = select_masked_patches(attention, 0.25)  # 2 of 8 patches
    assert masked.tolist() == [[1, 3], [0, 7]]
    assert visible.tolist() == [[0, 2, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]
    masked, _ = select_masked_patches(attention, 0.5)
    assert masked.tolist() == [[1, 3, 4, 6], [0, 4, 5, 7]]  # ties (0.10, 0.10) go to the lower index


def test_text_cross_attention_matches_an_explicit_computation(tmp_path):
    model, _ = _model(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    ids, atts = model.tokenize(CAPTIONS[:2], pad_to_longest=True)
    enc = model.with_enc_token(ids)
    with torch.no_grad():
        embeds = model.visual_encoder(images)
        attention, _ = text_cross_attention(model, enc, atts, embeds)
        # explicit: hidden states entering each layer's cross-attention, softmax(q k^T / sqrt(d))
        hidden = model.text_encoder.embeddings(enc)
        bias = (1.0 - atts[:, None, None, :].float()) * -10000.0
        maps = []
        for layer in model.text_encoder.encoder.layer:
            x = layer.attention(hidden, attn_bias=bias)
            cross = layer.crossattention.self
            q = cross.query(x).view(2, -1, cross.num_heads, cross.head_dim).transpose(1, 2)
            k = cross.key(embeds).view(2, -1, cross.num_heads, cross.head_dim).transpose(1, 2)
            maps.append(torch.softmax(q @ k.transpose(-1, -2) / cross.head_dim**0.5, -1).mean(1))
            hidden = layer(hidden, bias, False, encoder_hidden_states=embeds)
        probs = torch.stack(maps).mean(0)
        weights = atts.float() / atts.sum(1, keepdim=True)
        expected = (probs * weights[:, :, None]).sum(1)[:, 1:]
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-6)


def test_tmim_loss_trains_the_adapter_and_decoder_only(tmp_path):
    model, config = _model(tmp_path, METHODS["adapter"])
    apply_finetune(model, config, "")
    model.train()
    out = model(torch.randn(4, 3, 32, 32), CAPTIONS, 0.4, torch.arange(4))
    assert out["loss_tmim"] > 0
    torch.testing.assert_close(out["loss"], out["loss_itm"] + out["loss_tmim"])  # ITC off, as in ContextBLIP
    out["loss"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "visual_encoder.adapter.up.weight" in grads and "tmim.head.weight" in grads
    assert all(n.startswith(("visual_encoder.adapter.", "tmim.")) for n in grads)


# ----------------------------------------------------------------------------------------------------
# Training, delta checkpoints, resume, evaluation
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """Synthetic data and a base checkpoint (a tiny model with spread weights) saved as base.pth."""
    root = tmp_path_factory.mktemp("peft_data")
    paths = make_synthetic_dataset(
        str(root), num_train_images=16, num_val_images=8, num_test_images=8, captions_per_image=2, image_size=32, seed=0
    )
    config = synthetic_config(
        root, paths, batch_size_train=8, batch_size_test=8, k_test=4, queue_size=16, max_epoch=2, init_lr=1e-3
    )
    torch.manual_seed(1)
    torch.save({"model": spread_weights(build_model(config)).state_dict()}, os.path.join(root, "base.pth"))
    config["pretrained"] = os.path.join(root, "base.pth")
    return str(root), config


def _config_file(data_root, tmp_path, finetune: dict) -> str:
    root, config = data_root
    config = copy.deepcopy(config)
    config["finetune"] = finetune
    path = os.path.join(tmp_path, "config.yaml")
    save_config(schema.validate_config(config), path)
    return path


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", sorted(METHODS))
def test_delta_checkpoints_resume_exactly_and_evaluate(data_root, tmp_path, monkeypatch, method):
    config_path = _config_file(data_root, tmp_path, METHODS[method])
    straight = tmp_path / "straight"
    train_retrieval.main(["--config", config_path, "--output-dir", str(straight)])
    last = torch.load(straight / "checkpoint_last.pth", weights_only=True)
    model = train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path / "e"), "--evaluate"])["model"]
    assert last["format_model"] == "blip-retrieval-delta-v1"
    assert last["finetune"]["base"]["source"].endswith("base.pth")
    params = dict(model.named_parameters())
    saved_params = [k for k in last["model"] if k in params]
    assert saved_params and all(
        "_m." in k or params[k].requires_grad for k in saved_params
    )  # trainable weights and their momentum copies only
    assert len(saved_params) == 2 * len(trainable_names(model)) - sum(n.startswith("tmim.") for n in params)

    # resume: crash after epoch 0, resume, and get the straight run's weights and losses bit for bit
    resumed = tmp_path / "resumed"
    save = trainer.save_last_checkpoint

    def save_then_crash(state: dict, path: str) -> None:
        save(state, path)
        raise _Interrupted

    monkeypatch.setattr(trainer, "save_last_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        train_retrieval.main(["--config", config_path, "--output-dir", str(resumed)])
    monkeypatch.setattr(trainer, "save_last_checkpoint", save)
    train_retrieval.main(["--config", config_path, "--output-dir", str(resumed), "--resume"])
    again = torch.load(resumed / "checkpoint_last.pth", weights_only=True)
    assert last["model"].keys() == again["model"].keys()
    for key in last["model"]:
        assert torch.equal(last["model"][key], again["model"][key]), key

    # eval_retrieval --checkpoint applies the delta to its base and scores what the trainer scored
    metrics = eval_retrieval.main(
        ["--config", config_path, "--checkpoint", str(straight / "checkpoint_best.pth"), "--output-dir", str(tmp_path)]
    )
    with open(straight / "metrics_test.json") as f:
        expected = json.load(f)
    for key in ("txt_r1", "img_r1", "r_mean", "itc_r_mean"):
        assert metrics[key] == pytest.approx(expected[key]), key

    if method == "adapter":  # a checkpoint written before adapter.gate existed loads with its default (no gate)
        best = torch.load(straight / "checkpoint_best.pth", weights_only=True)
        del best["finetune"]["config"]["adapter"]["gate"]
        torch.save(best, tmp_path / "before_gate.pth")
        old = eval_retrieval.main(
            ["--config", config_path, "--checkpoint", str(tmp_path / "before_gate.pth"), "--output-dir", str(tmp_path)]
        )
        assert old["r_mean"] == pytest.approx(expected["r_mean"])


def test_a_delta_on_the_wrong_base_is_refused(data_root, tmp_path):
    config_path = _config_file(data_root, tmp_path, METHODS["prompt"])
    out = tmp_path / "run"
    train_retrieval.main(["--config", config_path, "--output-dir", str(out), "--options", "max_epoch=1"])
    config = schema.load_config(config_path)
    # Another queue_size (say, eval with the default config) loads: the queues are the one shape that may differ.
    resized = copy.deepcopy(config)
    resized["queue_size"] = 2 * config["queue_size"]
    model, _ = load_model(resized, str(out / "checkpoint_best.pth"))
    saved = torch.load(out / "checkpoint_best.pth", weights_only=True)["model"]
    assert torch.equal(model.text_encoder.prompt.tokens, saved["text_encoder.prompt.tokens"])
    assert model.image_queue.shape[1] == resized["queue_size"]
    other = tmp_path / "other_base.pth"
    torch.manual_seed(5)
    torch.save({"model": build_model(config).state_dict()}, other)
    config["finetune"]["base"] = str(other)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(config, str(out / "checkpoint_best.pth"))
    config["finetune"]["base"] = str(tmp_path / "moved.pth")
    with pytest.raises(CheckpointError, match="finetune.base"):
        load_model(config, str(out / "checkpoint_best.pth"))
    with pytest.raises(UserError, match="trained with finetune.method 'prompt'"):
        train_retrieval.main(
            ["--config", config_path, "--output-dir", str(out), "--resume", "--options", "finetune.method=lora"]
        )


def test_exported_lora_merge_evaluates_like_the_delta(data_root, tmp_path):
    import export_merged

    config_path = _config_file(data_root, tmp_path, METHODS["lora"])
    out = tmp_path / "run"
    train_retrieval.main(["--config", config_path, "--output-dir", str(out), "--options", "max_epoch=1"])
    merged = tmp_path / "merged.pth"
    export_merged.main(
        ["--config", config_path, "--checkpoint", str(out / "checkpoint_best.pth"), "--output", str(merged)]
    )
    state = torch.load(merged, weights_only=True)["model"]
    assert not any("lora" in k for k in state)
    a = eval_retrieval.main(
        ["--config", config_path, "--checkpoint", str(out / "checkpoint_best.pth"), "--output-dir", str(tmp_path / "a")]
    )
    b = eval_retrieval.main(
        [
            "--config",
            config_path,
            "--checkpoint",
            str(merged),
            "--output-dir",
            str(tmp_path / "b"),
            "--options",
            "finetune.method=full",
        ]
    )
    for key in ("txt_r1", "img_r1", "r_mean", "itc_r_mean"):
        assert a[key] == pytest.approx(b[key]), key


# ----------------------------------------------------------------------------------------------------
# IMAGECODE
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagecode_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_imagecode_sample(str(tmp_path_factory.mktemp("imagecode")), num_video_sets=3, num_static_sets=2)


def test_imagecode_sample_follows_the_release_format(imagecode_data):
    with open(imagecode_data["valid_file"]) as f:
        valid = json.load(f)
    with open(imagecode_data["test_file"]) as f:
        test = json.load(f)
    assert len(valid) == 5 and sum(is_static(name) for name in valid) == 2
    for name, entries in valid.items():
        assert all(k.isdigit() and 0 <= int(k) < 10 and isinstance(v, str) for k, v in entries.items())
        files = sorted_set_images(os.path.join(imagecode_data["image_root"], name))
        numbers = [int(os.path.basename(p)[3:-4]) for p in files]
        assert numbers == sorted(numbers) and len(numbers) == 10  # numeric order (img7 before img15)
        assert isinstance(test[name], list)
        if not is_static(name):  # a video frame is described by where its shapes are
            phrases = [p for options in LOCATIONS.values() for p in options]
            assert all(any(p in text for p in phrases) for text in entries.values())


def test_video_set_descriptions_fit_only_their_own_frame():
    """The frames of a generated video set are distinct placements of the same shapes, and no wording a positional
    template gives one frame (30 draws each) is a wording it gives another frame of the set: the description
    singles out its target. A template without positions fails this, so the check can fail."""

    def wordings(template, scene) -> set[str]:
        return {template(scene, _groups(scene), random.Random(k)) for k in range(30)}

    rng = random.Random(0)
    for _ in range(20):
        scenes = sample_set_scenes(rng, video=True)
        assert len({placement(scene) for scene in scenes}) == 10
        assert len({(s.kind, s.colour, s.size) for scene in scenes for s in scene}) <= 2  # the same shapes move
        for template in POSITIONAL_TEMPLATES:
            per_frame = [wordings(template, scene) for scene in scenes]
            assert all(not per_frame[i] & per_frame[j] for i, j in itertools.combinations(range(10), 2))
        unpositioned = [wordings(_t_picture_of, scene) for scene in scenes]
        assert unpositioned[0] & unpositioned[1]


def _cells_in_pixels(path: str) -> set[tuple[str, tuple[int, int]]]:
    """(colour name, cell) of every shape a filled image shows, read from its pixels: a cell is taken when its
    centre differs from the background, and its colour is the nearest named one."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    side = pixels.shape[0]
    is_shape = np.abs(pixels - np.median(pixels.reshape(-1, 3), axis=0)).max(-1) > 45
    found = set()
    for row, col in LOCATIONS:
        window = (slice(int((row + 0.25) * side / 3), int((row + 0.75) * side / 3)),)
        window += (slice(int((col + 0.25) * side / 3), int((col + 0.75) * side / 3)),)
        if is_shape[window].sum() >= 4:
            mean = pixels[window][is_shape[window]].mean(0)
            found.add((min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - mean) ** 2)), (row, col)))
    return found


def _cells_in_words(text: str) -> set[tuple[str, tuple[int, int]]]:
    """(colour, cell) pairs a positional description states: per clause its place, with the clause's colour or,
    for "two red circles, one at the top and one on the left", the last colour named."""
    phrases = sorted(((p, cell) for cell, options in LOCATIONS.items() for p in options), key=lambda x: -len(x[0]))
    stated, colour = set(), None
    for clause in re.split(r", | and ", text):
        colour = next((w for w in clause.split() if w in COLOURS), colour)
        cell = next((cell for phrase, cell in phrases if phrase in clause), None)
        if cell is not None:
            stated.add((colour, cell))
    return stated


def test_generated_video_descriptions_match_their_frame_pixels_and_no_other(tmp_path):
    """Read back from the files: the shapes' colours and cells in each frame's pixels, and the colours and places
    each description states. The labelled frame is the one, and the only one, that shows what its text says."""
    paths = make_imagecode_sample(str(tmp_path), num_video_sets=12, num_static_sets=0, descriptions_per_set=3)
    with open(paths["valid_file"]) as f:
        valid = json.load(f)
    for name, entries in valid.items():
        frames = [_cells_in_pixels(p) for p in sorted_set_images(os.path.join(paths["image_root"], name))]
        for index, text in entries.items():
            assert [i for i, shown in enumerate(frames) if shown == _cells_in_words(text)] == [int(index)], text


def test_imagecode_outline_style_keeps_the_sets_and_redraws_the_images(imagecode_data, tmp_path):
    outline = make_imagecode_sample(str(tmp_path), num_video_sets=3, num_static_sets=2, style="outline")
    for key in ("valid_file", "test_file"):
        with open(imagecode_data[key]) as f, open(outline[key]) as g:
            assert json.load(f) == json.load(g)
    name = sorted(os.listdir(outline["image_root"]))[0]
    first = [
        sorted_set_images(os.path.join(root, name))[0] for root in (imagecode_data["image_root"], outline["image_root"])
    ]
    assert os.path.basename(first[0]) == os.path.basename(first[1])
    assert not np.array_equal(*(np.asarray(Image.open(path)) for path in first))
    with pytest.raises(ValueError, match="style must be one of"):
        make_imagecode_sample(str(tmp_path / "bad"), 1, 1, style="dotted")


def test_imagecode_accuracy_equals_brute_force(imagecode_data, tmp_path):
    config = tiny_config(tmp_path, text_encoder=imagecode_data["vocab_file"], batch_size_test=20, itm_batch_size=16)
    torch.manual_seed(0)
    model = spread_weights(build_model(config)).eval()
    dataset = ImagecodeSet(imagecode_data["valid_file"], imagecode_data["image_root"], 32)
    got = {s: imagecode_scores(model, dataset, config, torch.device("cpu"), s) for s in ("itc", "itm", "both")}
    transform = test_transform(32)
    correct = {s: [] for s in got}
    with torch.no_grad():
        for row, d in enumerate(dataset.descriptions):  # one pair at a time, nothing batched or shared
            files = sorted_set_images(os.path.join(imagecode_data["image_root"], dataset.set_names[d.set_index]))
            ids, atts = model.tokenize([d.text])
            pair = {"itc": [], "itm": []}
            for path in files:
                embeds, image_feat = model.encode_image(transform(load_image(path))[None])
                pair["itc"].append(float(image_feat @ model.encode_text(ids, atts).t()))
                pair["itm"].append(float(model.itm_logits(model.with_enc_token(ids), atts, embeds)[0, 1]))
            pair["both"] = [a + b for a, b in zip(pair["itc"], pair["itm"])]
            for s in got:
                torch.testing.assert_close(got[s][row], torch.tensor(pair[s]), rtol=1e-4, atol=1e-4)
                correct[s].append(max(range(10), key=lambda i: (pair[s][i], -i)) == d.target)
    for s in got:
        result = imagecode_accuracy(got[s], dataset)
        static = [is_static(dataset.set_names[d.set_index]) for d in dataset.descriptions]
        assert result["accuracy"] == pytest.approx(100 * sum(correct[s]) / len(correct[s]))
        video_hits = [c for c, st in zip(correct[s], static) if not st]
        assert result["accuracy_video"] == pytest.approx(100 * sum(video_hits) / len(video_hits))
        assert result["num_video"] + result["num_static"] == result["num_descriptions"] == 10


def test_eval_imagecode_script_writes_metrics_and_leaderboard_predictions(imagecode_data, data_root, tmp_path):
    import eval_imagecode

    root, config = data_root
    config = copy.deepcopy(config)
    config["text_encoder"] = imagecode_data["vocab_file"]
    config["pretrained"] = ""
    path = tmp_path / "config.yaml"
    save_config(config, str(path))
    common = ["--config", str(path), "--image-root", imagecode_data["image_root"], "--scoring", "itm"]
    result = eval_imagecode.main([*common, "--ann-file", imagecode_data["valid_file"], "--output-dir", str(tmp_path)])
    assert set(result) >= {"accuracy", "accuracy_video", "accuracy_static"}
    eval_imagecode.main([*common, "--ann-file", imagecode_data["test_file"], "--output-dir", str(tmp_path / "t")])
    with open(tmp_path / "t" / "imagecode_predictions.json") as f:
        predictions = json.load(f)
    assert all(len(v) == 2 and all(0 <= i < 10 for i in v) for v in predictions.values())


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "expected a non-empty mapping"),
        ({"open-images-1_ab": {"12": "a dog"}}, "expected '0' to '9'"),
        ({"open-images-1_ab": {"3": "  "}}, "empty or non-text description"),
        ({"no-such-set": {"3": "a dog"}}, "image set not found"),
    ],
)
def test_imagecode_bad_annotations_are_clear_errors(imagecode_data, tmp_path, content, message):
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        ImagecodeSet(str(ann), imagecode_data["image_root"], 32)


def test_peft_report_cost_part_runs_on_tiny_towers(tmp_path):
    from studies import peft_report

    threads = torch.get_num_threads()
    try:
        args = ["--part", "cost", "--device", "cpu", "--vit", "tiny", "--text", "tiny", "--image-size", "32"]
        out = peft_report.main(
            [*args, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--out-dir", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    rows = out["cost"]["rows"]
    assert list(rows) == ["full", "lora", "prompt", "prompt (vision)", "adapter", "adapter (no TMIM)"]
    assert rows["full"]["trainable_vs_full"] == 1.0
    smaller = ("lora", "prompt", "prompt (vision)", "adapter (no TMIM)")
    assert all(rows[m]["trainable"] < rows["full"]["trainable"] for m in smaller)
    assert rows["adapter (no TMIM)"]["method"] == rows["adapter (no TMIM)"]["trainable"]
    assert (tmp_path / "peft_report.md").read_text().count("\n| ") == 7  # header + 6 methods


def test_paired_gain_averages_seeds_per_description_then_takes_the_standard_error():
    import statistics

    from studies.peft_adapt import paired_gain

    # description 0: both right; 1: one seed of two lost it; 2: both seeds gained it; 3: all wrong
    result = paired_gain("1100", ["1010", "1110"])
    diffs = [0.0, -0.5, 1.0, 0.0]
    assert result["gain"] == pytest.approx(100 * statistics.mean(diffs))
    assert result["se"] == pytest.approx(100 * statistics.stdev(diffs) / 2)
    assert paired_gain("10", ["10"]) == {"gain": 0.0, "se": 0.0}
    with pytest.raises(ValueError, match="same 4"):
        paired_gain("1100", ["110"])


def test_peft_adapt_bench_runs_every_step_and_tabulates_gains_over_zero_shot(tmp_path):
    """studies.peft_adapt end to end on a few images: the zero-shot run, two methods, their IMAGECODE scores, and a
    table whose gains are the runs' own numbers minus zero-shot; --report-only rebuilds the same summary."""
    from data.synthetic import make_synthetic_dataset
    from models.blip_retrieval import build_model
    from studies import peft_adapt

    vocab = make_synthetic_dataset(str(tmp_path / "vocab_data"), 20, 1, 1)["vocab_file"]
    base = str(tmp_path / "base.pth")
    torch.manual_seed(0)
    torch.save({"model": build_model(schema.load_config(DEMO_CONFIG, [f"text_encoder={vocab}"])).state_dict()}, base)
    out = str(tmp_path / "bench")
    args = ["--out", out, "--base", base, "--base-vocab", vocab, "--methods", "full", "adapter_gate_itc"]
    args += ["--epochs", "1", "--num-train", "8", "--num-eval", "6", "--imagecode-sets", "1"]
    args += ["--options", "batch_size_train=8", "batch_size_test=6", "k_test=3", "queue_size=8"]
    result = peft_adapt.main(args)
    summary, runs = result["summary"], result["runs"]
    assert set(runs) == {"zero_shot", "full_seed0", "adapter_gate_itc_seed0"}
    assert all(run["imagecode"]["num_descriptions"] == 6 for run in runs.values())  # 2 sets x 3 descriptions
    for run in runs.values():  # per description, from the predictions file = the evaluator's accuracy
        correct = run["imagecode"]["correct"]
        assert len(correct) == 6 and 100.0 * correct.count("1") / 6 == pytest.approx(run["imagecode"]["accuracy"])
    for method in ("full", "adapter_gate_itc"):  # one seed: the paired gain is the difference of accuracies
        gain = summary[method]["imagecode_accuracy"] - summary["zero_shot"]["imagecode_accuracy"]
        assert summary[method]["imagecode_paired"]["gain"] == pytest.approx(gain)
    assert len(runs["full_seed0"]["curves"]["val_r_mean"]) == 1
    assert summary["full"]["test_r_mean"] == runs["full_seed0"]["test"]["r_mean"]
    table = (tmp_path / "bench" / "results.md").read_text()
    zero = summary["zero_shot"]["test_r_mean"]
    gain = summary["adapter_gate_itc"]["test_r_mean"] - zero
    assert (
        "| adapter_gate_itc | " in table and f"{summary['adapter_gate_itc']['test_r_mean']:.1f} ({gain:+.1f})" in table
    )
    assert (tmp_path / "bench" / "peft_adapt.png").stat().st_size > 10_000
    again = peft_adapt.main([*args, "--report-only"])
    assert again["summary"] == summary
