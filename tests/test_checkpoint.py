"""Checkpoint loading: parity with transformers' BLIP, pos_embed resizing, key reports, bad inputs, URLs."""

from __future__ import annotations

import argparse
import functools
import http.server
import math
import os
import threading
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import yaml

from models import checkpoint as checkpoint_module
from models.blip_retrieval import build_model
from models.checkpoint import (
    CheckpointError,
    apply_config_updates,
    load_checkpoint,
    load_state_dict_checked,
    sha256_of_file,
)
from models.hf_blip import export_hf_directory, is_hf_directory
from models.hf_keys import hf_to_official_state_dict, official_to_hf_state_dict
from models.loading import load_model
from models.peft_methods import apply_finetune, model_payload
from tests.helpers import TINY_WORDS, tiny_config, tiny_model, write_vocab

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32, eval mode; measured differences are ~1e-7


# ----------------------------------------------------------------------------------------------------
# A tiny random transformers BlipForImageTextRetrieval saved as a directory
# ----------------------------------------------------------------------------------------------------


def _hf_config(vocab_size: int, dec_id: int, vision_eps: float = 1e-5):
    return transformers.BlipConfig(
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
            "layer_norm_eps": vision_eps,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "bos_token_id": dec_id,
            "sep_token_id": 3,
        },
        image_text_hidden_size=16,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    # [DEC] and [ENC] are in the vocab file itself, so the ids are fixed and identical on both sides.
    vocab = write_vocab(root / "vocab.txt", TINY_WORDS + ["[DEC]", "[ENC]"])
    tokenizer = transformers.BertTokenizerFast(vocab)
    torch.manual_seed(0)
    hf = transformers.BlipForImageTextRetrieval(_hf_config(len(tokenizer), len(tokenizer) - 2)).eval()
    with torch.no_grad():  # HF initialises LayerNorms to 1/0 and tiny biases: randomise so every tensor matters
        for _, p in hf.named_parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5)
    path = str(root / "blip-itm-tiny")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)

    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(5, len(tokenizer) - 2, (3, 9))
    mask = torch.ones_like(ids)
    ids[:, 0] = tokenizer.cls_token_id
    mask[1, 6:] = 0  # one padded caption
    ids[1, 6:] = tokenizer.pad_token_id
    ids[0, -1] = ids[1, 5] = ids[2, -1] = tokenizer.sep_token_id
    enc_ids = ids.clone()
    enc_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")  # HF does not swap [ENC] in; both get the same ids
    return {
        "path": path,
        "vocab": vocab,
        "hf": hf,
        "images": images,
        "ids": ids,
        "enc_ids": enc_ids,
        "mask": mask,
        "enc_id": tokenizer.convert_tokens_to_ids("[ENC]"),
    }


@torch.no_grad()
def _hf_outputs(hf, d: dict) -> dict[str, torch.Tensor]:
    vision = hf.vision_model(pixel_values=d["images"]).last_hidden_state
    text = hf.text_encoder(input_ids=d["ids"], attention_mask=d["mask"]).last_hidden_state
    return {
        "image_feat": F.normalize(hf.vision_proj(vision[:, 0]), dim=-1),
        "text_feat": F.normalize(hf.text_proj(text[:, 0]), dim=-1),
        "itc": hf(input_ids=d["ids"], pixel_values=d["images"], attention_mask=d["mask"], use_itm_head=False).itm_score,
        "itm": hf(
            input_ids=d["enc_ids"], pixel_values=d["images"], attention_mask=d["mask"], use_itm_head=True
        ).itm_score,
    }


@torch.no_grad()
def _our_outputs(model, d: dict) -> dict[str, torch.Tensor]:
    model.eval()
    image_embeds, image_feat = model.encode_image(d["images"])
    text_feat = model.encode_text(d["ids"], d["mask"])
    assert torch.equal(model.with_enc_token(d["ids"]), d["enc_ids"])  # our ITM id is the HF vocab's [ENC]
    return {
        "image_feat": image_feat,
        "text_feat": text_feat,
        "itc": image_feat @ text_feat.t(),
        "itm": model.itm_logits(d["enc_ids"], d["mask"], image_embeds),
    }


def _assert_parity(ours: dict, ref: dict) -> dict[str, float]:
    diffs = {k: (ours[k] - ref[k]).abs().max().item() for k in ref}
    assert all(v < TOL for v in diffs.values()), diffs
    return diffs


def _official_pth(hf_dir: dict, tmp_path) -> str:
    path = str(tmp_path / "converted.pth")
    torch.save({"model": hf_to_official_state_dict(hf_dir["hf"].state_dict())}, path)
    return path


def _hf_reference_with_eps(hf_dir: dict, eps: float):
    """The same HF weights with another vision LayerNorm eps (the official ViT uses 1e-6, HF's default 1e-5)."""
    ref = transformers.BlipForImageTextRetrieval(
        _hf_config(hf_dir["hf"].config.text_config.vocab_size, hf_dir["hf"].config.text_config.bos_token_id, eps)
    )
    ref.load_state_dict(hf_dir["hf"].state_dict())
    return ref.eval()


# ----------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------


def test_hf_directory_parity(hf_dir: dict, tmp_path) -> None:
    assert is_hf_directory(hf_dir["path"])
    config = tiny_config(tmp_path, queue_size=8)
    model, report = load_model(config, hf_dir["path"])
    assert model.visual_encoder.norm.eps == pytest.approx(1e-5)  # taken from config.json, not our 1e-6 default
    assert model.enc_token_id == hf_dir["enc_id"] and model.queue_size == 8  # non-architecture key honoured
    _assert_parity(_our_outputs(model, hf_dir), _hf_outputs(hf_dir["hf"], hf_dir))
    assert report.clean, report.summary()
    assert "temp" in report.expected_missing and model.temp.item() == pytest.approx(0.07)
    assert "visual_encoder_m.pos_embed" in report.expected_missing
    assert report.config_updates["vit"] == {"width": 48, "depth": 2, "heads": 2, "patch_size": 16}
    assert report.config_updates["image_size"] == 32 and report.config_updates["embed_dim"] == 16
    for main, momentum in model.model_pairs:  # HF has no momentum encoders: they start as copies
        for p, p_m in zip(main.parameters(), momentum.parameters()):
            assert torch.equal(p, p_m)
    # The loader leaves the config alone; with its updates applied, the config describes the loaded model (as the
    # saved config.yaml must), including the official text dropout where HF configs store 0.
    assert config == tiny_config(tmp_path, queue_size=8)
    rebuilt = build_model(apply_config_updates(config, report))
    assert rebuilt.med_config == model.med_config and model.med_config.hidden_dropout_prob == 0.1
    assert rebuilt.visual_encoder.norm.eps == model.visual_encoder.norm.eps
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_official_pth_parity(hf_dir: dict, tmp_path) -> None:
    config = tiny_config(tmp_path, text_encoder=hf_dir["vocab"])
    model, report = load_model(config, _official_pth(hf_dir, tmp_path))
    ref = _hf_reference_with_eps(hf_dir, model.visual_encoder.norm.eps)
    _assert_parity(_our_outputs(model, hf_dir), _hf_outputs(ref, hf_dir))
    assert report.clean and any("copy_params" in n for n in report.notes)


def test_export_to_transformers_parity(hf_dir: dict, tmp_path) -> None:
    config = tiny_config(tmp_path, text_encoder=hf_dir["vocab"])
    model, _ = load_model(config, _official_pth(hf_dir, tmp_path))
    with torch.no_grad():
        model.temp.fill_(0.05)
    out = export_hf_directory(model, str(tmp_path / "export"))
    hf, info = transformers.BlipForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.vision_config.layer_norm_eps == pytest.approx(1e-6)  # our eps survives the export
    _assert_parity(_our_outputs(model, hf_dir), _hf_outputs(hf.eval(), hf_dir))
    # ... and the exported directory loads back into our model with the same outputs.
    back, report = load_model(config, out)
    _assert_parity(_our_outputs(back, hf_dir), _our_outputs(model, hf_dir))
    assert back.enc_token_id == model.enc_token_id and report.clean


def test_hf_directory_with_pytorch_model_bin(hf_dir: dict, tmp_path) -> None:
    path = tmp_path / "bin_dir"
    path.mkdir()
    for name in os.listdir(hf_dir["path"]):
        if name != "model.safetensors":
            (path / name).write_bytes(open(os.path.join(hf_dir["path"], name), "rb").read())
    torch.save(hf_dir["hf"].state_dict(), path / "pytorch_model.bin")
    model, report = load_model(tiny_config(tmp_path), str(path))
    _assert_parity(_our_outputs(model, hf_dir), _hf_outputs(hf_dir["hf"], hf_dir))
    assert report.clean


def test_key_mapping_round_trip(tmp_path) -> None:
    state = tiny_model(tmp_path).state_dict()
    hf_state = official_to_hf_state_dict(state)
    assert not any(k.startswith(("visual_encoder", "text_encoder_m", "vision_proj_m")) for k in hf_state)
    assert "vision_model.encoder.layers.1.self_attn.projection.weight" in hf_state
    assert "vision_model.embeddings.class_embedding" in hf_state
    back = hf_to_official_state_dict(hf_state)
    main = {
        k
        for k in state
        if not k.startswith(("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"))
        and "queue" not in k
        and k not in ("temp", "text_encoder.embeddings.position_ids")
    }
    assert set(back) == main
    assert all(back[k] is state[k] for k in main)


# ----------------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ----------------------------------------------------------------------------------------------------


def _official_pos_embed_resize(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The official loader's computation, written out: CLS row kept, the patch rows resized as a square image
    with bicubic interpolation, align_corners False, no antialiasing."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side, width = math.isqrt(patches.shape[1]), pos_embed.shape[-1]
    patches = patches.reshape(1, side, side, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, width)], dim=1)


@pytest.mark.parametrize(
    ("src_size", "dst_size", "grids"), [(32, 48, "2x2 -> 3x3"), (48, 32, "3x3 -> 2x2"), (224, 384, "14x14 -> 24x24")]
)
def test_load_checkpoint_into_other_image_size(tmp_path, src_size: int, dst_size: int, grids: str) -> None:
    src = tiny_model(tmp_path, image_size=src_size)
    with torch.no_grad():  # a smooth embedding would hide a wrong resampling: make every row differ
        src.visual_encoder.pos_embed.normal_()
    path = str(tmp_path / "src.pth")
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = tiny_model(tmp_path, image_size=dst_size)
    report = load_checkpoint(dst, path)
    assert len(report.interpolated) == 2 and grids in report.interpolated[0] and grids in report.summary()
    grid = dst_size // 16
    expected = _official_pos_embed_resize(src.visual_encoder.pos_embed.detach(), grid)
    assert torch.equal(dst.visual_encoder.pos_embed.detach(), expected)
    assert torch.equal(dst.visual_encoder.pos_embed[:, :1], src.visual_encoder.pos_embed[:, :1])
    assert dst.visual_encoder_m.pos_embed.shape == (1, 1 + grid * grid, 48)
    assert report.clean and torch.equal(dst.itm_head.weight, src.itm_head.weight)


def test_pos_embed_that_is_not_a_square_grid(tmp_path) -> None:
    state = tiny_model(tmp_path).state_dict()
    state["visual_encoder.pos_embed"] = torch.zeros(1, 1 + 6, 48)
    with pytest.raises(CheckpointError, match=r"cannot resize visual_encoder.pos_embed .*not a square patch grid"):
        load_state_dict_checked(tiny_model(tmp_path), state, "odd-grid.pth")


# ----------------------------------------------------------------------------------------------------
# Key report
# ----------------------------------------------------------------------------------------------------


def test_pretrain_style_keys_are_expected(tmp_path) -> None:
    source = tiny_model(tmp_path)
    state = source.state_dict()
    state["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(31, 32)
    state["queue_ptr"] = torch.tensor([5])
    del state["idx_queue"], state["ptr_queue"]
    model = tiny_model(tmp_path)
    with torch.no_grad():
        model.ptr_queue.fill_(0)
    report = load_state_dict_checked(model, state, "pretrain-like")
    assert report.clean, report.summary()
    assert set(report.expected_unexpected) == {"text_decoder.bert.embeddings.word_embeddings.weight", "queue_ptr"}
    assert {"idx_queue", "ptr_queue"} <= set(report.expected_missing)
    assert int(model.ptr_queue) == 0 and bool((model.idx_queue == -100).all())  # official: queue_ptr ignored
    assert torch.equal(model.image_queue, source.image_queue)  # the queue features themselves do load
    assert "text_decoder" in report.summary() and "queue_ptr" in report.summary()


def test_missing_momentum_copies_main_weights(tmp_path) -> None:
    source = tiny_model(tmp_path)
    state = {
        k: v
        for k, v in source.state_dict().items()
        if not k.startswith(("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m."))
    }
    model = tiny_model(tmp_path)
    report = load_state_dict_checked(model, state, "lavis-like")
    assert report.clean and any("copy_params" in n for n in report.notes)
    for main, momentum in model.model_pairs:
        for p, p_m in zip(main.parameters(), momentum.parameters()):
            assert torch.equal(p, p_m) and not p_m.requires_grad
    assert torch.equal(
        model.text_encoder_m.encoder.layer[0].attention.self.query.weight,
        source.text_encoder.encoder.layer[0].attention.self.query.weight,
    )


def test_queue_size_difference_keeps_fresh_queues(tmp_path) -> None:
    source = tiny_model(tmp_path, queue_size=32)
    with torch.no_grad():
        source.ptr_queue.fill_(24)
    model = tiny_model(tmp_path)  # queue_size 16
    fresh = model.image_queue.clone()
    report = load_state_dict_checked(model, source.state_dict(), "other-queue")
    assert report.clean and set(report.expected_mismatched) == {"image_queue", "text_queue", "idx_queue", "ptr_queue"}
    assert torch.equal(model.image_queue, fresh) and int(model.ptr_queue) == 0


def test_unexplained_missing_and_unexpected_are_reported(tmp_path) -> None:
    state = tiny_model(tmp_path).state_dict()
    del state["itm_head.weight"]
    state["something.else"] = torch.zeros(2)
    report = load_state_dict_checked(tiny_model(tmp_path), state, "odd")
    assert report.missing == ["itm_head.weight"] and report.unexpected == ["something.else"]
    assert not report.clean and "MISSING" in report.summary() and "UNEXPECTED" in report.summary()


def test_depth_difference_is_reported(tmp_path) -> None:
    deeper = tiny_model(tmp_path, vit={"width": 48, "depth": 3, "heads": 2}).state_dict()
    report = load_state_dict_checked(tiny_model(tmp_path), deeper, "deeper.pth")
    assert any(k.startswith("visual_encoder.blocks.2.") for k in report.unexpected)
    assert any("3 ViT blocks, the model 2" in n for n in report.notes)


# ----------------------------------------------------------------------------------------------------
# Bad checkpoints and sources
# ----------------------------------------------------------------------------------------------------


def test_wider_vit_is_an_error_with_shapes(tmp_path) -> None:
    path = str(tmp_path / "wide.pth")
    torch.save({"model": tiny_model(tmp_path, vit={"width": 64, "depth": 2, "heads": 2}).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_config(tmp_path), path)
    msg = str(err.value)
    assert "wide.pth" in msg and "visual_encoder.cls_token" in msg
    assert "(1, 1, 64)" in msg and "(1, 1, 48)" in msg and "64 wide" in msg


def test_vit_large_checkpoint_hint(tmp_path) -> None:
    state = {
        "visual_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16),
        "visual_encoder.cls_token": torch.zeros(1, 1, 1024),
    }
    state.update({f"visual_encoder.blocks.{i}.norm1.weight": torch.zeros(1024) for i in range(24)})
    with pytest.raises(CheckpointError, match="looks like ViT-L .1024 wide, 24 blocks.; set vit: large"):
        load_state_dict_checked(tiny_model(tmp_path), state, "large.pth")


def test_mostly_missing_is_an_error(tmp_path) -> None:
    model = tiny_model(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("itm_head", "text_proj"))}
    with pytest.raises(CheckpointError, match="only .*% of the model's parameters"):
        load_state_dict_checked(tiny_model(tmp_path), state, "partial.pth")


def test_random_bytes_file(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="garbage.pth is not a readable PyTorch checkpoint"):
        load_model(tiny_config(tmp_path), str(path))


def test_dict_that_is_not_a_checkpoint(tmp_path) -> None:
    path = str(tmp_path / "other.pth")
    torch.save({"weights": [1, 2], "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="not a BLIP checkpoint.*'weights'"):
        load_checkpoint(tiny_model(tmp_path), path)


def test_nonexistent_path(tmp_path) -> None:
    missing = str(tmp_path / "nope" / "model.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found.*nope/model.pth"):
        load_model(tiny_config(tmp_path), missing)
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        load_model(tiny_config(tmp_path), "Salesforce/blip-itm-base-coco")


def test_empty_source_builds_fresh_model(tmp_path) -> None:
    model, report = load_model(tiny_config(tmp_path), "")
    assert report is None and model.visual_encoder.pos_embed.shape == (1, 5, 48)


def test_incomplete_hf_directory(tmp_path, hf_dir: dict) -> None:
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(open(os.path.join(hf_dir["path"], "model.safetensors"), "rb").read())
    assert not is_hf_directory(str(no_config))
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(tiny_config(tmp_path), str(no_config))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing model.safetensors or pytorch_model.bin"):
        load_model(tiny_config(tmp_path), str(no_weights))


def test_official_format_checkpoint_loads_with_the_safe_reader(tmp_path, monkeypatch) -> None:
    # What the official training scripts save (BLIP train_retrieval.py / pretrain.py): the state dict, the optimizer
    # state, the YAML config as a plain dict, the epoch. All of it is weights_only material: no full unpickling.
    model = tiny_model(tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # so the optimizer state holds exp_avg / exp_avg_sq tensors and a step count
    config = yaml.load("image_size: 384\nqueue_size: 57600\ninit_lr: 1.0e-5\nvit: base\n", yaml.Loader)
    path = str(tmp_path / "model_base_retrieval_coco.pth")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config, "epoch": 5}, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    loaded, report = load_model(tiny_config(tmp_path), path)
    assert report.clean and loads == [True]
    assert torch.equal(loaded.itm_head.weight, model.itm_head.weight)


class _RunsCode:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_checkpoint(tmp_path, name: str = "evil.pth") -> tuple[str, str]:
    """A checkpoint with a valid tiny state dict whose 'config' runs code when unpickled; returns (path, marker)."""
    marker = str(tmp_path / f"{name}.ran")
    path = str(tmp_path / name)
    torch.save({"model": tiny_model(tmp_path).state_dict(), "config": _RunsCode(marker)}, path)
    return path, marker


def test_a_checkpoint_that_runs_code_is_refused(tmp_path) -> None:
    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=f"{path}: refused to unpickle .*open.*--unsafe-trust-checkpoint") as err:
        load_model(tiny_config(tmp_path), path)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(tiny_model(tmp_path), path)
    assert not os.path.exists(marker)


def test_unsafe_trust_opt_in_loads_it(tmp_path, capsys) -> None:
    path, marker = _malicious_checkpoint(tmp_path)
    model, report = load_model(tiny_config(tmp_path), path, allow_unsafe=True)
    assert report.clean and os.path.exists(marker)  # the user asked for it: full unpickling ran the pickled call
    assert "unpickling fully because of --unsafe-trust-checkpoint" in capsys.readouterr().out


def test_a_class_in_the_config_is_refused_by_name(tmp_path) -> None:
    # A pickled class instance (here argparse.Namespace) is not in the safe set: refused, naming the class.
    path = str(tmp_path / "namespace.pth")
    torch.save({"model": tiny_model(tmp_path).state_dict(), "config": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle 'argparse.Namespace'"):
        load_model(tiny_config(tmp_path), path)
    assert load_model(tiny_config(tmp_path), path, allow_unsafe=True)[1].clean


def test_delta_checkpoint_base_is_always_read_safely(tmp_path) -> None:
    base, marker = _malicious_checkpoint(tmp_path, "base.pth")
    config = tiny_config(tmp_path)
    config["finetune"] = {**config["finetune"], "method": "prompt", "prompt": {"text_tokens": 2, "vision_tokens": 0}}
    model = tiny_model(tmp_path)
    apply_finetune(model, config, base)
    delta = str(tmp_path / "delta.pth")
    torch.save({**model_payload(model), "config": config}, delta)
    with pytest.raises(CheckpointError, match=f"{base}: refused to unpickle"):
        load_model(tiny_config(tmp_path), delta, allow_unsafe=True)  # the opt-in does not reach the recorded base
    assert not os.path.exists(marker)


def test_hf_directory_pytorch_model_bin_is_read_safely(tmp_path, hf_dir: dict) -> None:
    directory = tmp_path / "hf_bin"
    directory.mkdir()
    for name in os.listdir(hf_dir["path"]):
        if name != "model.safetensors":
            (directory / name).write_bytes(open(os.path.join(hf_dir["path"], name), "rb").read())
    marker = str(tmp_path / "bin.ran")
    weights = {"vision_model.post_layernorm.weight": torch.ones(48), "x": _RunsCode(marker)}
    torch.save(weights, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused to unpickle"):
        load_model(tiny_config(tmp_path), str(directory), allow_unsafe=True)
    assert not os.path.exists(marker)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch) -> Iterator[tuple[str, str, http.server.ThreadingHTTPServer]]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a CI proxy must not intercept the local server
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield str(served), f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()


def test_url_download_is_cached(tmp_path, http_root) -> None:
    served, prefix, server = http_root
    source = tiny_model(tmp_path)
    torch.save({"model": source.state_dict()}, os.path.join(served, "ckpt.pth"))
    cache = str(tmp_path / "cache")
    config = tiny_config(tmp_path)
    model, report = load_model(config, prefix + "ckpt.pth", cache_dir=cache)
    assert report.clean and torch.equal(model.itm_head.weight, source.itm_head.weight)
    cached = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files]
    assert len(cached) == 1 and cached[0].endswith("ckpt.pth")  # no leftover .part file
    server.shutdown()  # the second load must not need the network
    server.server_close()
    model, report = load_model(config, prefix + "ckpt.pth", cache_dir=cache)
    assert torch.equal(model.itm_head.weight, source.itm_head.weight)


def test_url_404_names_the_url(tmp_path, http_root) -> None:
    _, prefix, _ = http_root
    url = prefix + "missing/model_base.pth"
    with pytest.raises(CheckpointError, match=f"could not download {url}.*404.*by hand"):
        load_model(tiny_config(tmp_path), url, cache_dir=str(tmp_path / "cache"))
    assert not any(files for _, _, files in os.walk(tmp_path / "cache"))


def test_url_with_pickled_objects_is_refused(tmp_path, http_root) -> None:
    served, prefix, _ = http_root
    _, marker = _malicious_checkpoint(tmp_path)
    os.replace(str(tmp_path / "evil.pth"), os.path.join(served, "evil.pth"))
    with pytest.raises(CheckpointError, match=f"{prefix}evil.pth: refused to unpickle"):
        load_model(tiny_config(tmp_path), prefix + "evil.pth", cache_dir=str(tmp_path / "cache"))
    assert not os.path.exists(marker)


def test_download_with_a_known_digest_is_verified(tmp_path, http_root, monkeypatch) -> None:
    served, prefix, _ = http_root
    good = os.path.join(served, "model_base.pth")
    torch.save({"model": tiny_model(tmp_path).state_dict()}, good)
    monkeypatch.setitem(checkpoint_module.KNOWN_SHA256, prefix + "model_base.pth", sha256_of_file(good))
    cache = str(tmp_path / "cache")
    assert load_model(tiny_config(tmp_path), prefix + "model_base.pth", cache_dir=cache)[1].clean
    # Another file served under a registered URL: refused with both digests, and not left in the cache.
    torch.save({"model": tiny_model(tmp_path).state_dict(), "epoch": 1}, os.path.join(served, "replaced.pth"))
    expected = "0" * 64
    monkeypatch.setitem(checkpoint_module.KNOWN_SHA256, prefix + "replaced.pth", expected)
    actual = sha256_of_file(os.path.join(served, "replaced.pth"))
    message = f"{prefix}replaced.pth: .*SHA-256 {actual}, expected {expected}; deleted"
    with pytest.raises(CheckpointError, match=message):
        load_model(tiny_config(tmp_path), prefix + "replaced.pth", cache_dir=cache)
    cached = [f for _, _, files in os.walk(cache) for f in files]
    assert cached == ["model_base.pth"]
