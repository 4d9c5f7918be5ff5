"""The caption model: generation parity with transformers' BlipForConditionalGeneration, the K/V cache, the LM loss,
checkpoint loading (HF directory, official .pth, pre-trained keys, wrong checkpoints) and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.generation import GenerationSettings, generate
from models.blip_retrieval import build_model
from models.caption_checkpoint import export_hf_caption_directory, load_caption_model
from models.checkpoint import CheckpointError
from models.hf_keys import hf_to_official_state_dict
from tests.helpers import TINY_WORDS, tiny_config, write_vocab

transformers = pytest.importorskip("transformers")

EOS = 3  # [SEP] in the tiny vocab


def _hf_caption_config(vocab_size: int, dec_id: int):
    return transformers.BlipConfig(
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "bos_token_id": dec_id,
            "sep_token_id": EOS,
            "eos_token_id": EOS,
            "pad_token_id": 0,
        },
    )


def _random_hf(vocab_size: int, dec_id: int, eos_bias: float, seed: int = 0):
    """A random BlipForConditionalGeneration whose captions depend on the image; `eos_bias` makes [SEP] likelier,
    so that beams end at different steps."""
    torch.manual_seed(seed)
    hf = transformers.BlipForConditionalGeneration(_hf_caption_config(vocab_size, dec_id)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
        hf.text_decoder.cls.predictions.bias.normal_(0.0, 0.1)
        hf.text_decoder.cls.predictions.bias[EOS] += eos_bias
    return hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("caption")
    vocab = write_vocab(root / "vocab.txt", TINY_WORDS + ["picture", "[DEC]", "[ENC]"])
    tokenizer = transformers.BertTokenizerFast(vocab)
    dirs = {}
    for eos_bias in (0.0, 3.0):
        hf = _random_hf(len(tokenizer), len(tokenizer) - 2, eos_bias)
        path = str(root / f"blip-caption-{eos_bias}")
        hf.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[eos_bias] = (path, hf)
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32) * 3
    prompt_ids = tokenizer(["a picture of "] * 4, return_tensors="pt").input_ids  # [CLS] ... [SEP], as HF expects
    return {"root": root, "vocab": vocab, "dirs": dirs, "images": images, "prompt_ids": prompt_ids}


def _trim(row: torch.Tensor, prompt_len: int = 4) -> list[int]:
    """Ids up to and including the first [SEP] after the prompt (what follows is padding, differently filled)."""
    out = row.tolist()[:prompt_len]
    for token in row.tolist()[prompt_len:]:
        out.append(token)
        if token == EOS:
            break
    return out


def _hf_generate(hf, setup: dict, s: GenerationSettings) -> list[list[int]]:
    kwargs = {"num_beams": s.num_beams, "max_length": s.max_length, "min_length": s.min_length}
    kwargs.update(repetition_penalty=s.repetition_penalty, do_sample=s.sample)
    if s.sample:
        kwargs.update(top_p=s.top_p, top_k=s.top_k)
    with torch.no_grad():
        out = hf.generate(pixel_values=setup["images"], input_ids=setup["prompt_ids"].clone(), **kwargs)
    return [_trim(r) for r in out]


def _ours(model, setup: dict, s: GenerationSettings, use_cache: bool = True) -> list[list[int]]:
    return [_trim(r) for r in generate(model.eval(), setup["images"], s, use_cache=use_cache)]


CASES = [
    GenerationSettings(num_beams=3, max_length=20, min_length=5),  # the official defaults
    GenerationSettings(num_beams=1, max_length=20, min_length=5),  # greedy
    GenerationSettings(num_beams=5, max_length=14, min_length=8, repetition_penalty=1.3),
    GenerationSettings(num_beams=1, max_length=16, min_length=5, repetition_penalty=1.5),
]


@pytest.mark.parametrize("eos_bias", [0.0, 3.0])
@pytest.mark.parametrize("settings", CASES, ids=["beam3", "greedy", "beam5_rep", "greedy_rep"])
def test_generation_matches_transformers(setup: dict, tmp_path, eos_bias: float, settings) -> None:
    path, hf = setup["dirs"][eos_bias]
    model, report = load_caption_model(tiny_config(tmp_path), path)
    assert report.clean, report.summary()
    ours, ref = _ours(model, setup, settings), _hf_generate(hf, setup, settings)
    assert ours == ref
    # ... and the cached decoding equals re-running the decoder over the whole sequence at every step.
    assert _ours(model, setup, settings, use_cache=False) == ours


def test_generation_lengths_vary(setup: dict, tmp_path) -> None:
    """The parity cases above are not degenerate: with the [SEP] bias, beams end at different steps."""
    path, _ = setup["dirs"][3.0]
    model, _ = load_caption_model(tiny_config(tmp_path), path)
    lengths = {len(r) for r in _ours(model, setup, CASES[0])}
    assert len(lengths) > 1 and min(lengths) >= 5


@pytest.mark.parametrize("eos_bias", [0.0, 3.0])
def test_sampling_matches_transformers_with_a_seed(setup: dict, tmp_path, eos_bias: float) -> None:
    path, hf = setup["dirs"][eos_bias]
    model, _ = load_caption_model(tiny_config(tmp_path), path)
    settings = GenerationSettings(num_beams=1, max_length=20, min_length=5, repetition_penalty=1.1, sample=True)
    torch.manual_seed(123)
    ref = _hf_generate(hf, setup, settings)
    torch.manual_seed(123)
    ours = _ours(model, setup, settings)
    assert ours == ref
    torch.manual_seed(124)
    assert _ours(model, setup, settings) != ours  # the seed matters: the draws are real


def test_official_pth_and_export_round_trip(setup: dict, tmp_path) -> None:
    path, hf = setup["dirs"][3.0]
    pth = str(tmp_path / "model_caption.pth")
    torch.save({"model": hf_to_official_state_dict(hf.state_dict())}, pth)
    config = tiny_config(tmp_path, text_encoder=setup["vocab"])
    model, report = load_caption_model(config, pth)
    assert report.clean, report.summary()
    settings = CASES[0]
    assert _ours(model, setup, settings) == _hf_generate(hf, setup, settings)
    out = export_hf_caption_directory(model, str(tmp_path / "export"))
    back, info = transformers.BlipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert _hf_generate(back.eval(), setup, settings) == _ours(model, setup, settings)


def test_lm_loss_skips_prompt_and_smooths_labels(setup: dict, tmp_path) -> None:
    path, _ = setup["dirs"][0.0]
    model, _ = load_caption_model(tiny_config(tmp_path), path)
    model.eval()
    captions = ["a picture of a red dog on the grass", "a picture of two cats"]
    images = setup["images"][:2]
    loss = model(images, captions)
    # Independent computation: full-sequence logits, then the smoothed cross-entropy of every caption token
    # after the prompt, written out by hand.
    ids = model.tokenizer(captions, padding="longest", return_tensors="pt").input_ids
    ids[:, 0] = model.bos_token_id
    mask = (ids != 0).long()
    logits, _ = model.text_decoder(ids, mask, model.encode_image(images))
    log_probs = F.log_softmax(logits.float(), dim=-1)
    prompt_len = len(model.tokenizer("a picture of ").input_ids) - 1
    assert prompt_len == 4  # [DEC] a picture of
    terms = []
    for b in range(ids.shape[0]):
        for t in range(prompt_len, int(mask[b].sum())):  # targets: caption words and the final [SEP]
            lp = log_probs[b, t - 1]
            terms.append(0.9 * -lp[ids[b, t]] - 0.1 * lp.mean())
    expected = torch.stack(terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Without smoothing and with the prompt counted, the loss is a different number: both choices are exercised.
    unsmoothed = model.text_decoder(ids, mask, model.encode_image(images), ids.masked_fill(mask == 0, -100))[1]
    assert abs(unsmoothed.item() - loss.item()) > 1e-3


def test_pretrained_checkpoint_keys_are_expected(setup: dict, tmp_path) -> None:
    """model_base.pth style: retrieval parts + text_decoder. The retrieval parts are reported as expected."""
    path, hf = setup["dirs"][0.0]
    config = tiny_config(tmp_path, text_encoder=setup["vocab"])
    state = build_model(config).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    state.update(hf_to_official_state_dict(hf.state_dict()))
    pth = str(tmp_path / "model_base_like.pth")
    torch.save({"model": state}, pth)
    model, report = load_caption_model(config, pth)
    assert report.clean, report.summary()
    assert "text_encoder.embeddings.word_embeddings.weight" in report.expected_unexpected
    assert "itm_head.weight" in report.expected_unexpected and "image_queue" in report.expected_unexpected


def test_retrieval_checkpoint_is_refused_with_a_hint(setup: dict, tmp_path) -> None:
    config = tiny_config(tmp_path, text_encoder=setup["vocab"])
    pth = str(tmp_path / "retrieval.pth")
    torch.save({"model": build_model(config).state_dict()}, pth)
    with pytest.raises(CheckpointError, match="retrieval .*cannot caption"):
        load_caption_model(config, pth)


def test_wrong_width_is_an_error_naming_the_shapes(setup: dict, tmp_path) -> None:
    path, _ = setup["dirs"][0.0]
    config = tiny_config(tmp_path, text_encoder=setup["vocab"], vit={"width": 64, "depth": 2, "heads": 2})
    pth = str(tmp_path / "c.pth")
    torch.save({"model": hf_to_official_state_dict(setup["dirs"][0.0][1].state_dict())}, pth)
    with pytest.raises(CheckpointError, match="different shape.*48 wide"):
        load_caption_model(config, pth)


def test_max_length_shorter_than_prompt(setup: dict, tmp_path) -> None:
    path, _ = setup["dirs"][0.0]
    model, _ = load_caption_model(tiny_config(tmp_path), path)
    with pytest.raises(ValueError, match="no room after the prompt"):
        generate(model, setup["images"], GenerationSettings(max_length=4, min_length=0))
