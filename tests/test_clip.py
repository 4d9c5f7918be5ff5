"""CLIP beside BLIP (models/clip.py): parity with transformers' CLIPModel and with open_clip on the same weights and
images, the activation check (QuickGELU), evaluation through eval_retrieval.py, ITC-only fine-tuning through
train_retrieval.py, and the clear errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import eval_retrieval
import train_retrieval
from configs.schema import save_config
from data import create_dataset
from data.synthetic import config_keys, make_synthetic_dataset
from engine.evaluation import evaluate
from engine.metrics import compute_metrics
from models.checkpoint import apply_config_updates
from models.clip import (
    MAX_LOGIT_SCALE,
    ClipCheckpointError,
    ClipRetrieval,
    check_activation,
    clip_contrastive_loss,
    dataset_transform,
    expected_quick_gelu,
    load_clip_model,
)
from models.loading import load_model
from tests.clip_helpers import clip_config, save_open_clip_checkpoint, write_hf_clip_dir, write_open_clip_config
from tests.dist_helpers import run_distributed
from utils import ConfigError


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generated data (24 train images x 2 captions, 8 val, 8 test, 64 px), a tiny HF CLIP directory and tiny
    open_clip configs (GELU and QuickGELU) with a QuickGELU checkpoint file."""
    root = tmp_path_factory.mktemp("clip")
    paths = make_synthetic_dataset(
        str(root / "data"), num_train_images=24, num_val_images=8, num_test_images=8, captions_per_image=2, seed=0
    )
    quick = write_open_clip_config(str(root / "oc"), "tiny-clip-qg", quick_gelu=True)
    gelu = write_open_clip_config(str(root / "oc"), "tiny-clip-gelu", quick_gelu=False)
    return {
        "root": str(root),
        "paths": paths,
        "hf_dir": write_hf_clip_dir(str(root / "hf")),
        "oc_quick": quick,
        "oc_gelu": gelu,
        "oc_ckpt": save_open_clip_checkpoint(quick, str(root / "oc" / "tiny_openai.pt")),
    }


def _data_keys(files: dict) -> dict:
    keys = config_keys(files["paths"])
    keys.pop("text_encoder")  # BLIP's tokenizer; CLIP brings its own
    return keys


def _hf_config(files: dict, **overrides) -> dict:
    return clip_config(pretrained=files["hf_dir"], **_data_keys(files), **overrides)


def _oc_config(files: dict, **overrides) -> dict:
    keys = dict(clip_model=files["oc_quick"], pretrained=files["oc_ckpt"], clip_pretrained_tag="openai")
    return clip_config(**{**keys, **_data_keys(files), **overrides})


def _test_images(files: dict) -> tuple[list[Image.Image], list[str]]:
    with open(files["paths"]["test_file"]) as f:
        records = json.load(f)
    images = [Image.open(os.path.join(files["paths"]["image_root"], r["image"])).convert("RGB") for r in records]
    return images, [caption for r in records for caption in r["caption"]]


# ----------------------------------------------------------------------------------------------------
# Parity: the evaluator's cosines equal the libraries' own pipelines (their preprocessing, tokenizer, model)
# ----------------------------------------------------------------------------------------------------


def test_hf_similarities_equal_transformers_clipmodel(files):
    """Our pipeline (dataset transform, tokenizer, features, evaluator) vs CLIPProcessor + CLIPModel.forward."""
    from transformers import CLIPModel, CLIPProcessor

    config = _hf_config(files)
    model = load_clip_model(config)
    result = evaluate(
        model, create_dataset(config, "test", dataset_transform(model, False)), config, torch.device("cpu")
    )
    images, captions = _test_images(files)
    reference = CLIPModel.from_pretrained(files["hf_dir"]).eval()
    processor = CLIPProcessor.from_pretrained(files["hf_dir"])
    inputs = processor(text=captions, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = reference(**inputs)
        expected = (out.logits_per_image / reference.logit_scale.exp()).numpy()
    assert np.abs(expected).max() > 0.05  # spread weights: the cosines are not all ~0
    np.testing.assert_allclose(result.scores_i2t, expected, atol=1e-4)
    np.testing.assert_allclose(result.scores_t2i, expected.T, atol=1e-4)


def test_open_clip_similarities_equal_open_clip(files):
    """Our pipeline vs open_clip's create_model_and_transforms (its preprocess) + get_tokenizer + encode_*."""
    import open_clip

    config = _oc_config(files)
    model = load_clip_model(config)
    result = evaluate(
        model, create_dataset(config, "test", dataset_transform(model, False)), config, torch.device("cpu")
    )
    reference, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-qg", pretrained=files["oc_ckpt"])
    reference.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip-qg")
    images, captions = _test_images(files)
    with torch.no_grad():
        image_feat = reference.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        text_feat = reference.encode_text(tokenizer(captions), normalize=True)
    expected = (image_feat @ text_feat.t()).numpy()
    assert np.abs(expected).max() > 0.05
    np.testing.assert_allclose(result.scores_i2t, expected, atol=1e-4)


def test_hf_and_open_clip_tokenizers_agree_and_truncate_to_77(files):
    hf = load_clip_model(_hf_config(files))
    oc = load_clip_model(_oc_config(files))
    captions = ["a red circle to the left of two blue squares", " ".join(["word"] * 200)]
    hf_ids, _ = hf.tokenize(captions)
    oc_ids, oc_mask = oc.tokenize(captions)
    assert hf_ids.shape[1] == oc_ids.shape[1] == 77  # the long caption fills the context
    torch.testing.assert_close(hf_ids[0, : int(oc_mask[0].sum())], oc_ids[0, : int(oc_mask[0].sum())])
    assert int(oc_ids[1, -1]) == int(hf_ids[1, -1]) == 49407  # truncated, the end token kept


def test_each_model_keeps_its_own_preprocessing(files):
    """The transform comes from the model: 32 px here (not BLIP's 384), resize + centre crop, the model's mean/std;
    the laion2b ViT-L-14 tag normalises with 0.5 (open_clip's published preprocessing)."""
    hf = load_clip_model(_hf_config(files))
    assert hf.identity["image_size"] == 32
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    assert hf.image_transform(False)(image).shape == (3, 32, 32)
    config = clip_config(clip_model="ViT-L-14")
    model, report = load_model(config)
    assert model.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert report.config_updates == {"image_size": 224} and config["image_size"] != 224  # loaders leave it alone
    assert apply_config_updates(config, report)["image_size"] == 224  # the saved config describes the model
    laion = load_clip_model(clip_config(clip_model="ViT-L-14", clip_pretrained_tag="laion2b_s32b_b82k"))
    assert laion.preprocess.mean == (0.5, 0.5, 0.5) and laion.preprocess.std == (0.5, 0.5, 0.5)


# Non-square sizes (width, height): at 32 px, 500x334 and 203x150 resize to a long side 11 or 15 px over the crop,
# where a rounded centre-crop offset is one pixel off transformers' floored one; at 224 px, so are the Flickr-sized
# 500x334 and 64x97. The others have even or harmless odd differences.
NON_SQUARE_SIZES = [(500, 334), (333, 500), (301, 207), (64, 97), (97, 64), (50, 35), (203, 150), (150, 203)]


def _noise_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """RGB noise images: any one-pixel shift of the crop changes the pixels."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _rounded_crop_transform(preprocess) -> transforms.Compose:
    """The previous HF eval transform: torchvision resize + centre crop, whose offset is rounded, not floored."""
    return transforms.Compose(
        [
            transforms.Resize(preprocess.size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(preprocess.size),
            transforms.ToTensor(),
            transforms.Normalize(preprocess.mean, preprocess.std),
        ]
    )


@pytest.mark.parametrize("image_size", [32, 224])
def test_hf_preprocessing_is_clip_image_processor_on_non_square_images(image_size, tmp_path):
    """An HF directory's eval transform gives CLIPImageProcessor's pixels (floored crop offset, its resample, the
    directory's mean/std) on non-square images, where a rounded offset would move the crop by one pixel."""
    from transformers import CLIPImageProcessor

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not OpenAI's: the directory's own statistics must be used
    directory = write_hf_clip_dir(str(tmp_path / "hf"), image_size=image_size, image_mean=mean, image_std=std)
    model = load_clip_model(clip_config(pretrained=directory))
    assert model.preprocess.mean == pytest.approx(mean) and model.preprocess.std == pytest.approx(std)
    processor = CLIPImageProcessor.from_pretrained(directory)
    transform = dataset_transform(model, train=False)
    images = _noise_images(NON_SQUARE_SIZES)
    rounded_offsets_differ = 0
    for image in images:
        ours = transform(image)
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == expected.shape == (3, image_size, image_size)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
        rounded_offsets_differ += not torch.allclose(_rounded_crop_transform(model.preprocess)(image), expected)
    assert rounded_offsets_differ >= 2  # the sizes include cases the previous transform got wrong


def test_hf_cosines_on_non_square_images_equal_transformers(files):
    """Cosines of non-square images through our transform and encoders equal CLIPProcessor + CLIPModel.forward."""
    from transformers import CLIPModel, CLIPProcessor

    model = load_clip_model(_hf_config(files)).eval()
    images = _noise_images(NON_SQUARE_SIZES, seed=1)
    captions = ["a red circle", "two blue squares to the left of a green triangle", "noise"]
    with torch.no_grad():
        ours = model.similarity(torch.stack([model.image_transform(False)(im) for im in images]), captions)
        reference = CLIPModel.from_pretrained(files["hf_dir"]).eval()
        inputs = CLIPProcessor.from_pretrained(files["hf_dir"])(
            text=captions, images=images, return_tensors="pt", padding=True
        )
        out = reference(**inputs)
        expected = out.logits_per_image / reference.logit_scale.exp()
    assert expected.abs().max() > 0.05
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_hf_processor_with_a_larger_resize_than_crop_and_bad_processors(files, tmp_path):
    """Resize 40 then crop 32 (as OpenAI's 256 -> 224 style configs do) is the processor's; a processor that does
    not crop to a square is refused with the file named."""
    from transformers import CLIPImageProcessor

    directory = write_hf_clip_dir(str(tmp_path / "hf"), size={"shortest_edge": 40})
    model = load_clip_model(clip_config(pretrained=directory))
    processor = CLIPImageProcessor.from_pretrained(directory)
    for image in _noise_images([(500, 334), (64, 97)]):
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(model.image_transform(False)(image), expected, atol=1e-6, rtol=0)
    assert model.image_transform(True)(_noise_images([(500, 334)])[0]).shape == (3, 32, 32)
    no_crop = write_hf_clip_dir(str(tmp_path / "no_crop"), do_center_crop=False)
    with pytest.raises(ConfigError, match=r"no_crop/preprocessor_config.json: the image processor must centre crop"):
        load_clip_model(clip_config(pretrained=no_crop))


def test_open_clip_keeps_open_clips_transform_on_non_square_images(files):
    """open_clip models are preprocessed as open_clip does (its preprocess from create_model_and_transforms)."""
    import open_clip

    model = load_clip_model(_oc_config(files))
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-qg", pretrained=files["oc_ckpt"])
    transform = dataset_transform(model, train=False)
    for image in _noise_images(NON_SQUARE_SIZES):
        torch.testing.assert_close(transform(image), preprocess(image), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# The activation is part of the model's identity
# ----------------------------------------------------------------------------------------------------


def test_openai_weights_in_a_gelu_model_are_refused(files):
    config = _oc_config(files, clip_model=files["oc_gelu"])
    with pytest.raises(ConfigError, match=r"tiny-clip-gelu uses GELU, but weights tagged 'openai'.*QuickGELU"):
        load_clip_model(config)


def test_the_mismatch_would_be_silent_and_wrong(files):
    """Why the check exists: the same file loads into the GELU model without any error, and its similarities
    differ from the QuickGELU model's."""
    right = load_clip_model(_oc_config(files))
    wrong = load_clip_model(_oc_config(files, clip_model=files["oc_gelu"], clip_pretrained_tag="custom"))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "two blue squares", "a green triangle below a circle", "three shapes"]
    with torch.no_grad():
        gap = (right.similarity(images, captions) - wrong.similarity(images, captions)).abs().max()
    # Two tiny layers keep the gap small (GELU and QuickGELU differ by at most ~0.02 per unit); it is still 50x the
    # parity tolerance, and it compounds through the 12-24 layers of a real CLIP.
    assert gap > 5e-3


def test_published_tags_fix_the_activation():
    assert expected_quick_gelu("ViT-B-16", "openai") is True
    assert expected_quick_gelu("ViT-L-14-quickgelu", "openai") is True
    assert expected_quick_gelu("ViT-L-14", "laion2b_s32b_b82k") is False
    assert expected_quick_gelu("ViT-L-14", "custom") is None
    check_activation("ViT-B-16-quickgelu", True, "openai")
    with pytest.raises(ConfigError, match="set clip_model: ViT-B-16-quickgelu"):
        check_activation("ViT-B-16", False, "openai")
    with pytest.raises(ConfigError, match="set clip_model: ViT-L-14 "):
        check_activation("ViT-L-14-quickgelu", True, "laion2b_s32b_b82k")
    with pytest.raises(ConfigError, match="not a published tag of ViT-L-14.*laion2b_s32b_b82k"):
        check_activation("ViT-L-14", False, "laion5b_typo")


def test_an_open_clip_file_without_a_tag_is_refused(files):
    with pytest.raises(ConfigError, match="clip_pretrained_tag' is empty.*QuickGELU"):
        load_clip_model(_oc_config(files, clip_pretrained_tag=""))


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------


def test_bad_sources_give_clear_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="model: clip needs `pretrained`"):
        load_clip_model(clip_config())
    with pytest.raises(ConfigError, match="needs config key 'clip_model'"):
        load_clip_model(clip_config(pretrained=files["oc_ckpt"]))
    with pytest.raises(ConfigError, match="'ViT-B-61' is not an open_clip model; did you mean"):
        load_clip_model(clip_config(clip_model="ViT-B-61"))
    with pytest.raises(ConfigError, match="model-config file not found"):
        load_clip_model(clip_config(clip_model=str(tmp_path / "nope.json")))
    not_clip = tmp_path / "bert"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ClipCheckpointError, match="not a Hugging Face CLIPModel directory"):
        load_clip_model(clip_config(pretrained=str(not_clip)))
    other = write_open_clip_config(str(tmp_path), "tiny-clip-wide", quick_gelu=True)
    cfg = json.loads(open(other).read())
    cfg["vision_cfg"]["width"] = 48
    json.dump(cfg, open(other, "w"))
    with pytest.raises(ClipCheckpointError, match="does not fit open_clip model tiny-clip-wide"):
        load_clip_model(_oc_config(files, clip_model=other))
    with pytest.raises(ConfigError, match="expected one of blip, clip"):
        clip_config(model="siglip")


# ----------------------------------------------------------------------------------------------------
# eval_retrieval.py with a CLIP model
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_eval_cli_with_clip(files, backend, tmp_path, capsys):
    config = _hf_config(files) if backend == "hf" else _oc_config(files)
    path = str(tmp_path / "clip.yaml")
    save_config(config, path)
    out = str(tmp_path / "out")
    metrics = eval_retrieval.main(["--config", path, "--output-dir", out, "--save-scores"])
    printed = capsys.readouterr().out
    assert "ITM re-ranked" not in printed and "ITC only" not in printed  # one ranking, one column
    assert "R-Precision" in printed
    with open(os.path.join(out, "metrics_test.json")) as f:
        written = json.load(f)
    assert written["k_test"] == 0 and written["eval_mode"] == "itc" and written["time_rerank"] == 0
    assert written["model_info"]["model"] == "clip" and written["model_info"]["image_size"] == 32
    assert written["model_info"]["activation"] == "quick_gelu"
    for key in ("txt_r1", "img_r5", "r_mean", "txt_rprec", "img_rprec", "txt_medr"):
        assert written[key] == written[f"itc_{key}"] == metrics[key]  # ITC-only metrics under the usual keys
    scores = np.load(os.path.join(out, "scores_test.npz"))
    model = load_clip_model(config)
    images, captions = _test_images(files)
    pixels = torch.stack([model.image_transform(False)(im) for im in images])
    with torch.no_grad():
        brute = model.similarity(pixels, captions).numpy()
    np.testing.assert_allclose(scores["i2t"], brute, atol=1e-5)
    txt2img = {t: t // 2 for t in range(16)}
    img2txt = {i: [2 * i, 2 * i + 1] for i in range(8)}
    expected = compute_metrics(brute, np.ascontiguousarray(brute.T), txt2img, img2txt)
    for key, value in expected.items():
        assert written[key] == pytest.approx(value), key
    with open(os.path.join(out, "config.yaml")) as f:
        assert "image_size: 32" in f.read()
    index = json.load(open(os.path.join(out, "index_test.json")))
    assert len(index["images"]) == 8 and len(index["texts"]) == 16 and os.path.isfile(index["images"][0])


def test_load_model_dispatches_on_the_model_key(files):
    model, report = load_model(_hf_config(files))
    assert isinstance(model, ClipRetrieval) and not model.has_itm
    assert report.config_updates == {"image_size": 32} and report.num_model_tensors == 0  # no key report for CLIP


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: ITC only, symmetric InfoNCE, learnable temperature
# ----------------------------------------------------------------------------------------------------


def test_contrastive_loss_is_symmetric_infonce(files):
    model = load_clip_model(_oc_config(files))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle", "two blue squares", "a green triangle", "three shapes"]
    out = model(images, captions)
    with torch.no_grad():
        logits = model.logit_scale.exp() * model.similarity(images, captions)
    labels = torch.arange(4)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    assert out["loss_ita"].item() == pytest.approx(float(expected), rel=1e-5)
    assert float(out["loss_itm"]) == 0 and math.isnan(float(out["itm_acc_pos"]))


def test_logit_scale_is_learnable_and_clamped_at_ln_100(files):
    model = load_clip_model(_oc_config(files))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle", "two blue squares", "a green triangle", "three shapes"]
    model(images, captions)["loss_ita"].backward()
    assert model.logit_scale.grad is not None and float(model.logit_scale.grad.abs()) > 0
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    out = model(images, captions)
    assert float(out["logit_scale"]) == pytest.approx(MAX_LOGIT_SCALE)
    groups = model.optimizer_groups(0.1)
    assert any(p is model.logit_scale for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.0


def test_a_few_steps_reduce_the_loss(files):
    """Eight AdamW steps on one batch of generated images: the InfoNCE loss falls and the temperature moves."""
    torch.manual_seed(0)
    config = _oc_config(files)
    model = load_clip_model(config)
    train_set = create_dataset(config, "train", dataset_transform(model, True))
    images, captions, _ = zip(*[train_set[i] for i in range(0, 32, 2)])
    images = torch.stack(images)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)
    start_scale = model.logit_scale.item()
    losses = []
    for _ in range(8):
        loss = model(images, list(captions))["loss_ita"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.logit_scale.item() != pytest.approx(start_scale, abs=1e-4)


def test_train_cli_fine_tunes_clip_and_eval_reloads_it(files, tmp_path):
    """train_retrieval.py with model: clip (two epochs), then eval_retrieval.py --checkpoint checkpoint_best.pth gives
    the test metrics the trainer wrote; the temperature in the checkpoint moved from its initial value."""
    config = _oc_config(files, batch_size_train=8, max_epoch=2, init_lr=5e-4, log_every=1, weight_decay=0.1)
    path = str(tmp_path / "clip.yaml")
    save_config(config, path)
    out = str(tmp_path / "train")
    result = train_retrieval.main(["--config", path, "--output-dir", out])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps = [r for r in log if "loss_ita" in r and "step" in r and "epoch" in r and "train_time_s" not in r]
    assert steps[-1]["loss_ita"] < steps[0]["loss_ita"]
    assert all(r["loss_itm"] == 0 for r in steps)
    ckpt = torch.load(os.path.join(out, "checkpoint_best.pth"), weights_only=True)
    initial = torch.load(files["oc_ckpt"], weights_only=True)["logit_scale"]
    assert float(ckpt["model"]["net.logit_scale"]) != pytest.approx(float(initial), abs=1e-5)
    eval_out = str(tmp_path / "eval")
    ckpt_path = os.path.join(out, "checkpoint_best.pth")
    metrics = eval_retrieval.main(["--config", path, "--checkpoint", ckpt_path, "--output-dir", eval_out])
    for key in ("txt_r1", "img_r1", "r_mean", "txt_rprec"):
        assert metrics[key] == pytest.approx(result["best_test"][key]), key


def test_a_blip_checkpoint_given_to_clip_is_refused(files, tmp_path):
    path = str(tmp_path / "blip_ckpt.pth")
    torch.save({"model": {}, "config": {"model": "blip"}}, path)
    with pytest.raises(ClipCheckpointError, match="checkpoint of model 'blip', not clip"):
        load_clip_model(_hf_config(files), path)


def _dist_loss_body(rank: int, world_size: int, image: torch.Tensor, text: torch.Tensor) -> dict:
    rows = len(image) // world_size
    local_image = image[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
    local_text = text[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = clip_contrastive_loss(local_image, local_text, scale)
    loss.backward()
    return {
        "loss": loss.detach(),
        "image_grad": local_image.grad,
        "text_grad": local_text.grad,
        "scale_grad": scale.grad,
    }


def test_contrastive_loss_over_two_processes_equals_one_process_on_the_global_batch():
    """Each rank scores its own rows against the gathered global batch; after DDP's gradient averaging this is the
    single-process loss on the whole batch: same loss (mean over ranks) and same gradients."""
    gen = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    results = run_distributed(_dist_loss_body, 2, image, text, timeout_s=120)
    single = _dist_loss_body(0, 1, image, text)
    assert float(sum(r["loss"] for r in results) / 2) == pytest.approx(float(single["loss"]), rel=1e-6)
    # DDP averages parameter gradients over the 2 ranks; the features' gradients flow into the parameters.
    torch.testing.assert_close(torch.cat([r["image_grad"] for r in results]) / 2, single["image_grad"])
    torch.testing.assert_close(torch.cat([r["text_grad"] for r in results]) / 2, single["text_grad"])
    torch.testing.assert_close(sum(r["scale_grad"] for r in results) / 2, single["scale_grad"])


def _dist_eval_body(rank: int, world_size: int, config: dict) -> tuple:
    model = load_clip_model(config)
    dataset = create_dataset(config, "test", dataset_transform(model, False))
    result = evaluate(model, dataset, config, torch.device("cpu"))
    return result.scores_i2t, {k: v for k, v in result.metrics.items() if not k.startswith("time_")}


def test_distributed_clip_evaluation_matches_one_process(files):
    """Texts and images sharded over 2 processes, features gathered: the same scores and metrics on every rank."""
    config = _oc_config(files)
    single_scores, single_metrics = _dist_eval_body(0, 1, config)
    for scores, metrics in run_distributed(_dist_eval_body, 2, config, timeout_s=180):
        np.testing.assert_allclose(scores, single_scores, atol=1e-5, rtol=0)
        assert metrics == single_metrics


def test_clip_training_resumes_exactly(files, tmp_path):
    """One epoch + --resume for a second equals two epochs straight (weights loaded strictly from
    checkpoint_last.pth, optimizer and RNG restored; fp32 on CPU, no workers)."""
    config = _oc_config(files, batch_size_train=8, max_epoch=2, init_lr=5e-4, log_every=1, eval_every=1)
    path = str(tmp_path / "clip.yaml")
    save_config(config, path)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_retrieval.main(["--config", path, "--output-dir", straight])
    train_retrieval.main(["--config", path, "--output-dir", resumed, "--options", "max_epoch=1"])
    train_retrieval.main(["--config", path, "--output-dir", resumed, "--resume"])
    log = [json.loads(line) for line in open(os.path.join(resumed, "log.jsonl"))]
    assert any(r.get("event") == "resume" and r["start_epoch"] == 1 for r in log)
    a = torch.load(os.path.join(straight, "checkpoint_last.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "checkpoint_last.pth"), weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
