"""BLIP-2 first stage (models/blip2.py) in the retrieval evaluator, against transformers' Blip2ForImageTextRetrieval on
tiny random weights: the ITC similarity matrix, the ITM scores and the re-ranked score matrices; LAVIS-layout
checkpoints; the eval and compare scripts; two-process evaluation."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers

import compare_retrieval
import eval_retrieval
from configs.schema import DEFAULT_CONFIG, save_config, validate_config
from data import create_dataset
from data.synthetic import config_keys, make_synthetic_dataset
from engine.evaluation import evaluate
from models.blip2 import Blip2Retrieval, load_blip2_state, query_max_similarity
from models.checkpoint import CheckpointError
from models.loading import load_model
from tests.dist_helpers import run_distributed
from tests.helpers import tiny_config
from utils import ConfigError

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "Blip2ForImageTextRetrieval"),
    reason="this transformers has no Blip2ForImageTextRetrieval (model: blip2 refuses it with a ConfigError)",
)

# Vision width 48 differs from the Q-Former's 32 and the ITC dim 16, so a confusion of the three fails loudly.
TINY_BLIP2 = {
    "vision_config": {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
    "qformer_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "encoder_hidden_size": 48,
        "max_position_embeddings": 64,
        "cross_attention_frequency": 2,
    },
    "num_query_tokens": 32,
    "image_text_hidden_size": 16,
}


def _spread(net: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Redraw weight matrices and embeddings with a large std: HF's init (0.02) makes every cosine in a row agree to
    ~1e-3, and the top-k sets would hinge on rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2 or name.endswith(("class_embedding", "position_embedding", "query_tokens")):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generated data (8 val and 8 test images of 64 px, 2 captions each) and a tiny HF BLIP-2 retrieval directory
    (random weights, the data's vocabulary)."""
    root = tmp_path_factory.mktemp("blip2")
    paths = make_synthetic_dataset(
        str(root / "data"), num_train_images=8, num_val_images=8, num_test_images=8, captions_per_image=2, seed=0
    )
    vocab = open(paths["vocab_file"]).read().split()
    spec = copy.deepcopy(TINY_BLIP2)
    spec["qformer_config"]["vocab_size"] = len(vocab) + 2  # + [DEC] (LAVIS's bos) + [ENC] (init_tokenizer adds it)
    spec["qformer_config"]["use_qformer_text_input"] = True
    torch.manual_seed(0)
    net = transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(**spec))
    _spread(net)
    hf_dir = str(root / "hf_blip2")
    net.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    spec_file = str(root / "tiny_blip2.json")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    return {"paths": paths, "hf_dir": hf_dir, "spec_file": spec_file, "root": str(root)}


def _config(files: dict, **overrides) -> dict:
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(config_keys(files["paths"]))
    config.update(model="blip2", image_size=32, device="cpu", num_workers=0, batch_size_test=4, k_test=3, max_words=50)
    config.update(overrides)
    return validate_config(config, "test_blip2")


def _hf(files: dict):
    net = transformers.Blip2ForImageTextRetrieval.from_pretrained(files["hf_dir"]).eval()
    net.config.image_token_index = None
    return net


def _inputs(model: Blip2Retrieval, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ids, atts = model.tokenize(dataset.text)  # max_length padding, as LAVIS and HF's processor
    return images, ids, atts


@torch.no_grad()
def _hf_itc(net, images, ids, atts) -> torch.Tensor:
    return net(pixel_values=images, input_ids=ids, attention_mask=atts).logits_per_image


@torch.no_grad()
def _hf_itm_match(net, images, ids, atts) -> torch.Tensor:
    """Every (image, text) pair's ITM match logit, through HF's forward one image at a time: (N_img, N_txt)."""
    rows = []
    for image in images:
        pixels = image[None].expand(len(ids), -1, -1, -1)
        logits = net(pixel_values=pixels, input_ids=ids, attention_mask=atts, use_image_text_matching_head=True)
        rows.append(logits.logits_per_image[:, 1])
    return torch.stack(rows)


def _reference_scores(sims: torch.Tensor, match: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-ranked matrices computed plainly (LAVIS's compute_sim_matrix): per query, its top k by ITC get the ITM
    match logit + the ITC similarity; every other pair gets the similarity - 100 (LAVIS: a flat -100; ours keeps the
    ITC order below the top k, the same R@K for K <= k)."""
    i2t, t2i = sims - 100, sims.t() - 100
    for i in range(sims.shape[0]):
        top = sims[i].topk(k).indices
        i2t[i, top] = match[i, top] + sims[i, top]
    for t in range(sims.shape[1]):
        top = sims[:, t].topk(k).indices
        t2i[t, top] = match[top, t] + sims[top, t]
    return i2t, t2i


def test_itc_and_itm_match_transformers(files):
    """Our ITC similarity (max over the queries) and ITM logits (mean over the query positions) equal HF's
    Blip2ForImageTextRetrieval forward with use_image_text_matching_head False / True, within 1e-4."""
    config = _config(files)
    model, report = load_model(config, files["hf_dir"])
    assert isinstance(model, Blip2Retrieval) and report.clean, report.summary()
    model.eval()
    dataset = create_dataset(config, "test")
    images, ids, atts = _inputs(model, dataset)
    net = _hf(files)
    with torch.no_grad():
        image_embeds, query_feat = model.encode_image(images)
        ours_itc = query_max_similarity(query_feat, model.encode_text(ids, atts))
        pair_img = torch.arange(len(images)).repeat_interleave(len(ids))
        pair_txt = torch.arange(len(ids)).repeat(len(images))
        ours_match = model.itm_logits(ids[pair_txt], atts[pair_txt], image_embeds[pair_img])[:, 1]
    hf_itc = _hf_itc(net, images, ids, atts)
    assert ours_itc.shape == (8, 16) and hf_itc.std() > 0.05  # spread weights: well separated similarities
    torch.testing.assert_close(ours_itc, hf_itc, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_match.view(8, 16), _hf_itm_match(net, images, ids, atts), atol=1e-4, rtol=0)


@pytest.mark.parametrize("eval_mode", ["fast", "official"])
def test_reranked_scores_match_a_plain_computation_on_transformers(files, eval_mode):
    """The evaluator's i2t and t2i matrices (ITC top k re-ranked by ITM) equal the plain computation on HF's outputs."""
    config = _config(files, eval_mode=eval_mode, itm_batch_size=5)  # small batches: several ITM forwards per image
    model, _ = load_model(config, files["hf_dir"])
    dataset = create_dataset(config, "test")
    result = evaluate(model, dataset, config, torch.device("cpu"), desc="test")
    images, ids, atts = _inputs(model, dataset)
    net = _hf(files)
    sims = _hf_itc(net, images, ids, atts)
    ref_i2t, ref_t2i = _reference_scores(sims, _hf_itm_match(net, images, ids, atts), config["k_test"])
    np.testing.assert_allclose(result.scores_i2t, ref_i2t.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.scores_t2i, ref_t2i.numpy(), atol=1e-4, rtol=0)
    itc_only = _reference_scores(sims, torch.zeros_like(sims), 1)[0]  # ranking by ITC alone
    hits = [itc_only[i].argmax().item() in dataset.img2txt[i] for i in range(len(images))]
    assert result.metrics["itc_txt_r1"] == pytest.approx(100 * np.mean(hits))
    for key in ("txt_r1", "img_r10", "r_mean", "txt_medr", "img_meanr", "txt_rprec", "itc_r_mean", "k_test"):
        assert key in result.metrics


def _to_lavis(hf_state: dict) -> dict:
    """An HF Blip2ForImageTextRetrieval state dict in LAVIS Blip2Qformer key names (the EVA ViT keeps separate q and
    v biases; the Q-Former is a BertModel under Qformer.bert with its LM head under Qformer.cls)."""
    lavis = {}
    for key, value in hf_state.items():
        new = key
        if key.startswith("vision_model.encoder.layers."):
            rest = key[len("vision_model.encoder.layers.") :]
            index, sub = rest.split(".", 1)
            if sub == "self_attn.qkv.bias":
                q, _, v = value.chunk(3)
                lavis[f"visual_encoder.blocks.{index}.attn.q_bias"] = q
                lavis[f"visual_encoder.blocks.{index}.attn.v_bias"] = v
                continue
            for old, lav in (
                ("layer_norm1.", "norm1."),
                ("layer_norm2.", "norm2."),
                ("self_attn.qkv.", "attn.qkv."),
                ("self_attn.projection.", "attn.proj."),
            ):
                if sub.startswith(old):
                    sub = lav + sub[len(old) :]
                    break
            new = f"visual_encoder.blocks.{index}.{sub}"
        else:
            for old, lav in (
                ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
                ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
                ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
                ("vision_model.post_layernorm.", "ln_vision."),
                ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
                ("embeddings.", "Qformer.bert.embeddings."),
                ("qformer.encoder.", "Qformer.bert.encoder."),
                ("vision_projection.", "vision_proj."),
                ("text_projection.", "text_proj."),
            ):
                if key.startswith(old):
                    new = lav + key[len(old) :]
                    break
            new = new.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self."
            )
        lavis[new] = value
    lavis["temp"] = torch.tensor(0.05)
    lavis["Qformer.cls.predictions.bias"] = torch.zeros(5)  # the pre-training LM head: ignored, with a reason
    return lavis


def test_lavis_layout_loads_clean_and_gives_the_same_model(files, tmp_path):
    """A LAVIS-layout checkpoint converted from the HF tiny model loads with a clean report (only the LM head
    ignored), keeps its temperature, and scores exactly as the HF-loaded model; the wrong checkpoints are refused."""
    hf_model, _ = load_model(_config(files), files["hf_dir"])
    lavis = _to_lavis(transformers.Blip2ForImageTextRetrieval.from_pretrained(files["hf_dir"]).state_dict())
    path = str(tmp_path / "blip2_tiny_lavis.pth")
    torch.save({"model": lavis}, path)
    config = _config(files, blip2_config=files["spec_file"], text_encoder=os.path.join(files["hf_dir"], "vocab.txt"))
    model, report = load_model(config, path)
    assert report.clean, report.summary()
    assert list(report.expected_unexpected) == ["Qformer.cls.predictions.bias"]
    assert model.temp.item() == pytest.approx(0.05)
    assert len(report.loaded) == len(model.state_dict())
    for key, value in hf_model.state_dict().items():
        if key != "temp":
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # a 24 px checkpoint (3x3 patch grid) into the 32 px model (4x4): the position embedding is resized, loudly
    small = dict(lavis, **{"visual_encoder.pos_embed": lavis["visual_encoder.pos_embed"][:, :10]})
    report = load_blip2_state(model, small, "small.pth")
    assert report.clean and report.interpolated and "3x3 -> 4x4" in report.interpolated[0]
    # the wrong checkpoints
    with pytest.raises(CheckpointError, match="different shape"):
        wide = dict(lavis, **{"text_proj.weight": torch.zeros(8, 32)})
        load_blip2_state(model, wide, "wide.pth")
    blip_state = load_model(tiny_config(tmp_path))[0].state_dict()
    with pytest.raises(CheckpointError, match=r"only 1% of the BLIP-2 model's parameters.*visual_encoder"):
        load_blip2_state(model, blip_state, "blip.pth")
    clip_l = {"visual_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3), **lavis}
    with pytest.raises(CheckpointError, match="clip_L"):
        load_blip2_state(model, clip_l, "vitL.pth")


def test_freeze_vit_option(files):
    """blip2_freeze_vit: the ViT gets no gradients and stays in eval mode (BLIP-2 pre-training); false trains it."""
    frozen, _ = load_model(_config(files), files["hf_dir"])
    frozen.train()
    assert not any(p.requires_grad for p in frozen.net.vision_model.parameters())
    assert not frozen.net.vision_model.training and frozen.net.qformer.training
    assert all(p.requires_grad for p in frozen.net.qformer.parameters())
    trained, _ = load_model(_config(files, blip2_freeze_vit=False), files["hf_dir"])
    trained.train()
    assert all(p.requires_grad for p in trained.net.vision_model.parameters()) and trained.net.vision_model.training


def test_bad_blip2_configs_are_clear(files):
    with pytest.raises(ConfigError, match="not divisible by the BLIP-2 ViT patch size 8"):
        load_model(_config(files, blip2_config=files["spec_file"], image_size=36))
    with pytest.raises(ConfigError, match="blip2_config"):
        load_model(_config(files, blip2_config="no/such/config.json"))
    with pytest.raises(ConfigError, match="finetune.method"):
        _config(files, finetune={"method": "lora"})


def test_eval_script_writes_every_metric_and_compares_with_blip(files, tmp_path):
    """eval_retrieval.py with model: blip2 writes the metrics BLIP's evaluation writes, and compare_retrieval.py puts
    the BLIP-2 run beside a BLIP run."""
    config_path = str(tmp_path / "blip2.yaml")
    save_config(_config(files), config_path)
    blip2_dir, blip_dir = str(tmp_path / "blip2_run"), str(tmp_path / "blip_run")
    metrics = eval_retrieval.main(
        ["--config", config_path, "--checkpoint", files["hf_dir"], "--output-dir", blip2_dir, "--save-scores"]
    )
    blip_config = str(tmp_path / "blip.yaml")
    save_config(tiny_config(tmp_path, **config_keys(files["paths"]), k_test=3), blip_config)
    blip_metrics = eval_retrieval.main(["--config", blip_config, "--output-dir", blip_dir, "--save-scores"])
    assert set(blip_metrics) == set(metrics)
    saved = json.load(open(os.path.join(blip2_dir, "metrics_test.json")))
    assert saved["model_info"]["model"] == "blip2" and saved["model_info"]["image_size"] == 32
    files_out = compare_retrieval.main([blip_dir, blip2_dir, "--output-dir", str(tmp_path / "cmp")])
    table = open(files_out["table"]).read()
    assert "BLIP-2 hf_blip2" in table and table.count("ITC + ITM top 3") == 2


def _dist_eval_body(rank: int, world_size: int, config: dict, source: str) -> tuple:
    model, _ = load_model(config, source)
    dataset = create_dataset(config, "test")
    result = evaluate(model, dataset, config, torch.device("cpu"))
    return result.scores_i2t, result.scores_t2i, {k: v for k, v in result.metrics.items() if not k.startswith("time_")}


def test_distributed_blip2_evaluation_matches_one_process(files):
    """Texts and images sharded over 2 processes, ITM pairs scored by the rank holding their image: the same scores
    and metrics on every rank as in one process."""
    config = _config(files, itm_batch_size=7)
    single = _dist_eval_body(0, 1, config, files["hf_dir"])
    for i2t, t2i, metrics in run_distributed(_dist_eval_body, 2, config, files["hf_dir"], timeout_s=180):
        np.testing.assert_allclose(i2t, single[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(t2i, single[1], atol=1e-5, rtol=0)
        assert metrics == single[2]
