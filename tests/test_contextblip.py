"""ContextBLIP's released recipe as options (issue 25): ITM negatives from the frozen pre-adapter cosines, TMIM's
trainable text side, the released TMIM width, IMAGECODE scored by softmax P(match) with ALBEF-style text cleaning,
and configs/imagecode_contextblip.yaml."""

from __future__ import annotations

import json
import os

import pytest
import torch

import eval_imagecode
import models.blip_retrieval as blip_retrieval
from configs.schema import CONFIG_CHOICES, load_config, save_config
from data.imagecode import ImagecodeSet, make_imagecode_sample, sorted_set_images
from data.retrieval import load_image
from data.transforms import test_transform
from data.utils import TEXT_CLEANINGS, pre_caption, pre_caption_albef
from engine.imagecode import imagecode_accuracy, imagecode_scores
from models.blip_retrieval import build_model, sample_hard_negatives
from models.peft_methods import apply_finetune, delta_state_dict, trainable_names
from tests.helpers import spread_weights, tiny_config
from utils import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ADAPTER = {"layers": [1, 2], "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
CAPTIONS = ["a red ball", "a dog on grass", "two cats", "a man in the street"]


def _adapter_model(tmp_path, **adapter):
    config = tiny_config(tmp_path, finetune={"method": "adapter", "adapter": {**TINY_ADAPTER, **adapter}})
    torch.manual_seed(0)
    model = spread_weights(build_model(config))
    apply_finetune(model, config, "")
    return model, config


# ----------------------------------------------------------------------------------------------------
# ITM negatives
# ----------------------------------------------------------------------------------------------------


def _sampler_inputs(model, monkeypatch, images, idx) -> list[tuple]:
    """The (sim, positive, floor) that BlipRetrieval.forward hands to sample_hard_negatives (t2i, then i2t)."""
    seen = []

    def spy(sim, positive, hard_fraction=1.0, floor=0.0):
        seen.append((sim.clone(), positive.clone(), floor))
        return sample_hard_negatives(sim, positive, hard_fraction, floor)

    monkeypatch.setattr(blip_retrieval, "sample_hard_negatives", spy)
    model.eval()  # no dropout, so that the features can be recomputed outside the training step
    model(images, CAPTIONS, 0.4, idx)
    return seen


@pytest.mark.parametrize("mode, all_rank", [("blip", False), ("contextblip", False), ("contextblip", True)])
def test_itm_negatives_come_from_the_features_the_option_names(tmp_path, monkeypatch, mode, all_rank):
    model, _ = _adapter_model(tmp_path, itm_negatives=mode)
    model.negative_all_rank = all_rank  # one process: the gathered batch is this batch
    images = torch.randn(4, 3, 32, 32)
    idx = torch.tensor([0, 0, 1, 2])  # captions 0 and 1 share an image id
    (t2i_sim, t2i_positive, floor), (i2t_sim, _, _) = _sampler_inputs(model, monkeypatch, images, idx)
    with torch.no_grad():  # computed independently: the features with and without the adapter
        text_feat = model.encode_text(*model.tokenize(CAPTIONS))
        adapted_feat = model.encode_image(images)[1]
        adapter, model.visual_encoder.adapter = model.visual_encoder.adapter, None
        base_feat = model.encode_image(images)[1]
        model.visual_encoder.adapter = adapter
    assert not torch.allclose(adapted_feat, base_feat, atol=1e-3)  # the adapter does change the features
    if mode == "contextblip":  # released: frozen pre-adapter cosines, no temperature, + 1e-4, diagonal only
        expected_sim, expected_positive, expected_floor = (
            text_feat @ base_feat.t(),
            torch.eye(4, dtype=torch.bool),
            1e-4,
        )
    else:  # BLIP: adapted features / temp, every caption of the same image masked
        expected_sim = text_feat @ adapted_feat.t() / model.temp.detach()
        expected_positive, expected_floor = idx[:, None] == idx[None, :], 0.0
    torch.testing.assert_close(t2i_sim, expected_sim, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(i2t_sim, expected_sim.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(t2i_positive, expected_positive) and floor == expected_floor


def test_the_floor_keeps_every_candidate_drawable():
    # ContextBLIP's + 1e-4: a candidate whose softmax weight underflows can still be drawn, and no row falls back.
    sim = torch.tensor([[0.0, -1e4, -1e4]])
    positive = torch.tensor([[True, False, False]])
    _, fallback = sample_hard_negatives(sim, positive)
    assert int(fallback) == 1
    torch.manual_seed(0)
    drawn = torch.stack([sample_hard_negatives(sim, positive, floor=1e-4)[0] for _ in range(200)])
    assert set(drawn.flatten().tolist()) == {1, 2}
    assert int(sample_hard_negatives(sim, positive, floor=1e-4)[1]) == 0


# ----------------------------------------------------------------------------------------------------
# TMIM's text side
# ----------------------------------------------------------------------------------------------------


def _tmim_grad_into_image_embeds(model) -> torch.Tensor | None:
    """The gradient of TMIM's loss with respect to the adapted image tokens it is given (the ITM pass's input)."""
    model.train()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        embeds = model.visual_encoder(images)
    embeds.requires_grad_(True)
    ids, atts = model.tokenize(CAPTIONS)
    loss = model.tmim(model, images, embeds, model.with_enc_token(ids), atts)
    loss.backward()
    return embeds.grad


def test_detached_tmim_text_sends_no_gradient_through_the_itm_pass(tmp_path):
    model, _ = _adapter_model(tmp_path)  # default: tmim_text detached
    assert model.tmim.text_adapter is None
    assert _tmim_grad_into_image_embeds(model) is None


def test_contextblip_tmim_text_trains_a_text_adapter_and_reaches_the_vision_adapter_through_itm(tmp_path):
    model, _ = _adapter_model(tmp_path, tmim_text="contextblip")
    grad = _tmim_grad_into_image_embeds(model)
    assert grad is not None and grad.abs().sum() > 0
    assert model.tmim.text_adapter.down.weight.grad.abs().sum() > 0
    assert model.tmim.text_adapter.down.weight.shape == (32 // 4, 32)  # text width / 4, as the released Adapter
    assert {"tmim.text_adapter.down.weight", "tmim.text_adapter.up.weight"} <= set(trainable_names(model))
    assert "tmim.text_adapter.up.weight" in delta_state_dict(model)
    # Through the whole training step the frozen base stays without gradient.
    model.zero_grad()
    out = model(torch.randn(4, 3, 32, 32), CAPTIONS, 0.4, torch.arange(4))
    out["loss"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "tmim.text_adapter.up.weight" in grads
    assert all(n.startswith(("visual_encoder.adapter.", "tmim.")) for n in grads)


def test_contextblip_tmim_text_gradient_reaches_the_adapter_only_through_the_text_states(tmp_path):
    """The vision adapter's TMIM gradient differs between the two text sides (the extra path through ITM)."""
    grads = {}
    for side in ("detached", "contextblip"):
        model, _ = _adapter_model(tmp_path, tmim_text=side)
        if side == "contextblip":  # zero text adapter: the same text states as detached, only the gradient differs
            torch.nn.init.zeros_(model.tmim.text_adapter.up.weight)
        model.train()
        torch.manual_seed(1)
        images = torch.randn(4, 3, 32, 32)
        embeds = model.visual_encoder(images)
        ids, atts = model.tokenize(CAPTIONS)
        loss = model.tmim(model, images, embeds, model.with_enc_token(ids), atts)
        (grads[side],) = torch.autograd.grad(loss, [model.visual_encoder.adapter.up.weight])
        grads[f"{side}_loss"] = loss.detach()
    torch.testing.assert_close(grads["detached_loss"], grads["contextblip_loss"])
    assert not torch.allclose(grads["detached"], grads["contextblip"])


@pytest.mark.parametrize(
    "adapter, message",
    [
        ({"itm_negatives": "hard"}, "'finetune.adapter.itm_negatives'.*expected one of blip, contextblip"),
        ({"tmim_text": "frozen"}, "'finetune.adapter.tmim_text'.*expected one of detached, contextblip"),
    ],
)
def test_adapter_option_errors_name_the_key(tmp_path, adapter, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, finetune={"method": "adapter", "adapter": adapter})


# ----------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------


def test_contextblip_config_holds_the_released_recipe():
    config = load_config(os.path.join(REPO, "configs", "imagecode_contextblip.yaml"))
    assert config["pretrained"].endswith("/model_base_14M.pth") and config["vit"] == "base"
    assert (config["image_size"], config["max_length"], config["max_words"]) == (224, 30, 30)
    assert (config["init_lr"], config["min_lr"], config["max_epoch"]) == (3e-4, 1e-6, 20)
    assert (config["lr_schedule"], config["warmup_steps"], config["lr_decay_rate"]) == ("step_decay", 3000, 0.9)
    adapter = config["finetune"]["adapter"]
    assert config["finetune"]["method"] == "adapter" and adapter["decoder_width"] == 768
    assert (adapter["itm_negatives"], adapter["tmim_text"], adapter["itc_weight"]) == ("contextblip", "contextblip", 0)
    assert (config["imagecode_scoring"], config["imagecode_text_cleaning"]) == ("itm_prob", "albef")
    assert config["queue_size"] % (4 * config["batch_size_train"]) == 0  # 4 GPUs, as its header says


def test_lr_schedule_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="'lr_schedule'.*cosine_epoch, cosine_step, step_decay"):
        tiny_config(tmp_path, lr_schedule="linear")
    with pytest.raises(ConfigError, match="'optimizer_betas'.*two numbers in \\[0, 1\\)"):
        tiny_config(tmp_path, optimizer_betas=[0.9, 1.5])
    assert tiny_config(tmp_path, optimizer_betas=[0.9, 0.98])["optimizer_betas"] == [0.9, 0.98]


# ----------------------------------------------------------------------------------------------------
# IMAGECODE: P(match) scoring and ALBEF-style cleaning
# ----------------------------------------------------------------------------------------------------


def test_albef_cleaning_deletes_punctuation_and_splits_hyphens_and_slashes():
    text = "The man's hat, red/blue - on the LEFT?! (again)"
    assert pre_caption(text) == "the man's hat, red/blue - on the left? again"
    assert pre_caption_albef(text) == "the mans hat red blue on the left again"
    assert pre_caption_albef("one two three four", max_words=2) == "one two"
    assert set(TEXT_CLEANINGS) == set(CONFIG_CHOICES["imagecode_text_cleaning"])


@pytest.fixture(scope="module")
def imagecode_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_imagecode_sample(str(tmp_path_factory.mktemp("imagecode")), num_video_sets=2, num_static_sets=1)


def _reversing_itm_model(tmp_path, vocab: str):
    """A model whose no-match logit is twice its match logit: match - no-match = -match, so P(match) ranks the
    images in the reverse order of the match logit (different no-match logits separate the two scorings)."""
    config = tiny_config(tmp_path, text_encoder=vocab, batch_size_test=20, itm_batch_size=16)
    torch.manual_seed(0)
    model = spread_weights(build_model(config)).eval()
    with torch.no_grad():
        model.itm_head.weight[0] = 2 * model.itm_head.weight[1]
        model.itm_head.bias[0] = 2 * model.itm_head.bias[1]
    return model, config


def test_itm_prob_is_the_softmax_match_probability_and_orders_differently_from_the_logit(imagecode_data, tmp_path):
    model, config = _reversing_itm_model(tmp_path, imagecode_data["vocab_file"])
    dataset = ImagecodeSet(imagecode_data["valid_file"], imagecode_data["image_root"], 32)
    logit = imagecode_scores(model, dataset, config, torch.device("cpu"), "itm")
    prob = imagecode_scores(model, dataset, config, torch.device("cpu"), "itm_prob")
    transform = test_transform(32)
    with torch.no_grad():  # one pair at a time: softmax over the two ITM logits, index 1
        for row, d in enumerate(dataset.descriptions):
            files = sorted_set_images(os.path.join(imagecode_data["image_root"], dataset.set_names[d.set_index]))
            ids, atts = model.tokenize([d.text])
            expected = []
            for path in files:
                embeds, _ = model.encode_image(transform(load_image(path))[None])
                expected.append(float(model.itm_logits(model.with_enc_token(ids), atts, embeds).softmax(1)[0, 1]))
            torch.testing.assert_close(prob[row], torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert (prob.argmax(1) != logit.argmax(1)).all()  # every pick differs on this fixture
    assert torch.equal(prob.argmax(1), logit.argmin(1))
    assert imagecode_accuracy(prob, dataset)["num_descriptions"] == len(dataset.descriptions)


def test_imagecode_set_applies_the_chosen_cleaning(imagecode_data, tmp_path):
    ann = tmp_path / "valid.json"
    name = sorted(os.listdir(imagecode_data["image_root"]))[0]
    ann.write_text(json.dumps({name: {"3": "A red-ish square, left/top!"}}))
    blip = ImagecodeSet(str(ann), imagecode_data["image_root"], 32)
    albef = ImagecodeSet(str(ann), imagecode_data["image_root"], 32, cleaning="albef")
    assert blip.descriptions[0].text == "a red-ish square, left/top"
    assert albef.descriptions[0].text == "a red ish square left top"


def test_eval_imagecode_takes_scoring_and_cleaning_from_the_config_or_the_flags(imagecode_data, tmp_path):
    model, config = _reversing_itm_model(tmp_path, imagecode_data["vocab_file"])
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    config.update(imagecode_scoring="itm_prob", imagecode_text_cleaning="albef")
    path = tmp_path / "config.yaml"
    save_config(config, str(path))
    common = ["--config", str(path), "--checkpoint", str(checkpoint), "--image-root", imagecode_data["image_root"]]
    common += ["--ann-file", imagecode_data["valid_file"]]
    from_config = eval_imagecode.main([*common, "--output-dir", str(tmp_path / "a")])
    assert (from_config["scoring"], from_config["text_cleaning"]) == ("itm_prob", "albef")
    written = load_config(str(tmp_path / "a" / "config.yaml"))
    assert (written["imagecode_scoring"], written["imagecode_text_cleaning"]) == ("itm_prob", "albef")
    by_logit = eval_imagecode.main(
        [*common, "--scoring", "itm", "--text-cleaning", "blip", "--output-dir", str(tmp_path)]
    )
    assert (by_logit["scoring"], by_logit["text_cleaning"]) == ("itm", "blip")
    with open(tmp_path / "a" / "imagecode_predictions.json") as f, open(tmp_path / "imagecode_predictions.json") as g:
        assert json.load(f) != json.load(g)  # the reversed fixture: P(match) and the logit pick other images
