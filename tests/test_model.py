"""Model building blocks: attention against a written-out reference, cached cross-attention K/V, activation
checkpointing, the captioning decoder, and the errors a user can hit when building a model."""

from __future__ import annotations

import math

import pytest
import torch

from models.blip_retrieval import build_model, init_tokenizer
from models.med import BertLMHeadModel, BertModel, MedConfig
from models.vit import create_vit, vit_spec
from tests.helpers import TINY_MED, tiny_config, tiny_model

SMALL = MedConfig(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    encoder_width=48,
)


def _reference_bert(model: BertModel, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None):
    """The BERT-with-cross-attention forward written out with explicit softmax(QK^T/sqrt(d) + bias) V."""
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def attend(att, x, kv_states, bias):
        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, dim).transpose(1, 2)

        q, k, v = split(att.self.query(x)), split(att.self.key(kv_states)), split(att.self.value(kv_states))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
        if bias is not None:
            scores = scores + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return att.output.LayerNorm(att.output.dense(context) + x)

    emb = model.embeddings
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(ids.shape[1])[None]))
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for layer in model.encoder.layer:
        x = attend(layer.attention, x, x, bias)
        if image is not None:
            x = attend(layer.crossattention, x, image, None)
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
    return x


@pytest.mark.parametrize("mode", ["text", "multimodal"])
def test_bert_matches_written_out_attention(mode):
    torch.manual_seed(0)
    model = BertModel(SMALL).eval()
    ids = torch.randint(5, 40, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padding must not change the unpadded tokens' outputs
    image = torch.randn(3, 5, 48)
    ours = model(ids, mask, encoder_hidden_states=image if mode == "multimodal" else None, mode=mode)
    ref = _reference_bert(model, ids, mask, image if mode == "multimodal" else None)
    assert torch.allclose(ours, ref, atol=1e-5)
    # Padding invariance: the padded row equals the same text run alone at its true length.
    alone = model(
        ids[1:2, :4], mask[1:2, :4], encoder_hidden_states=image[1:2] if mode == "multimodal" else None, mode=mode
    )
    assert torch.allclose(ours[1:2, :4], alone, atol=1e-5)


def test_cached_kv_grouped_texts_match_per_pair_forward():
    """G images x m texts each through shared K/V == every pair with its own image tokens."""
    torch.manual_seed(0)
    model = BertModel(SMALL).eval()
    groups, per_group = 3, 4
    images = torch.randn(groups, 6, 48)
    ids = torch.randint(5, 40, (groups * per_group, 9))
    mask = torch.ones_like(ids)
    per_pair = model(ids, mask, encoder_hidden_states=images.repeat_interleave(per_group, 0))
    shared = model(ids, mask, encoder_kv=model.cross_attention_kv(images))
    assert torch.allclose(per_pair, shared, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        model(ids[:5], mask[:5], encoder_kv=model.cross_attention_kv(images))


def test_cls_only_equals_position_zero_of_the_full_forward():
    """cls_only skips the last layer's work for positions 1.. ; position 0 must not change (both modes, padding,
    shared K/V), and gradients through it must match too."""
    torch.manual_seed(0)
    model = BertModel(SMALL).eval()
    ids = torch.randint(5, 40, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    images = torch.randn(4, 6, 48)
    for kwargs in (
        {"mode": "text"},
        {"encoder_hidden_states": images},
        {"encoder_kv": model.cross_attention_kv(images[:2])},
    ):
        full = model(ids, mask, **kwargs)
        first = model(ids, mask, cls_only=True, **kwargs)
        assert first.shape == (4, 1, SMALL.hidden_size)
        assert torch.allclose(first[:, 0], full[:, 0], atol=1e-6)
    image = images.clone().requires_grad_(True)
    model(ids, mask, encoder_hidden_states=image)[:, 0].sum().backward()
    grad_full = image.grad.clone()
    image.grad = None
    model(ids, mask, encoder_hidden_states=image, cls_only=True)[:, 0].sum().backward()
    assert torch.allclose(image.grad, grad_full, atol=1e-6)
    with pytest.raises(ValueError, match="decoder"):
        model(ids, mask, mode="text", is_decoder=True, cls_only=True)


def test_mode_errors():
    model = BertModel(SMALL)
    ids = torch.randint(5, 40, (2, 4))
    with pytest.raises(ValueError, match="mode must be"):
        model(ids, mode="fusion")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(ids, mode="multimodal")


def test_decoder_is_causal_and_loads_official_key_names():
    torch.manual_seed(0)
    decoder = BertLMHeadModel(SMALL).eval()
    keys = set(decoder.state_dict())
    assert {
        "cls.predictions.bias",
        "cls.predictions.decoder.weight",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.LayerNorm.weight",
        "bert.encoder.layer.0.crossattention.self.key.weight",
    } <= keys
    ids = torch.randint(5, 40, (2, 6))
    image = torch.randn(2, 5, 48)
    logits, loss = decoder(ids, torch.ones_like(ids), image, labels=ids)
    assert logits.shape == (2, 6, 40) and torch.isfinite(loss)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 40  # the last token must not influence earlier positions
    later, _ = decoder(changed, torch.ones_like(ids), image)
    assert torch.allclose(logits[:, :-1], later[:, :-1], atol=1e-5)


def test_vit_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain, _ = create_vit({"width": 48, "depth": 4, "heads": 2, "patch_size": 16}, 32)
    ckpt, _ = create_vit({"width": 48, "depth": 4, "heads": 2, "patch_size": 16}, 32, grad_ckpt=True, ckpt_layer=2)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    out_plain, out_ckpt = plain(images), ckpt(images)
    assert out_plain.shape == (2, 5, 48) and torch.allclose(out_plain, out_ckpt)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_vit_sizes_and_errors():
    assert vit_spec("base")["width"] == 768 and vit_spec("large")["drop_path_rate"] == 0.1
    with pytest.raises(ValueError, match="'base', 'large'"):
        vit_spec("huge")
    with pytest.raises(ValueError, match="missing"):
        vit_spec({"width": 32})
    with pytest.raises(ValueError, match="multiple of the ViT patch size"):
        create_vit({"width": 48, "depth": 1, "heads": 2, "patch_size": 16}, 40)


def test_model_shapes_and_enc_token(tmp_path):
    model = tiny_model(tmp_path).eval()
    images = torch.randn(2, 3, 32, 32)
    image_embeds, image_feat = model.encode_image(images)
    assert image_embeds.shape == (2, 5, 48) and image_feat.shape == (2, 16)
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(2))
    ids, mask = model.tokenize(["a dog runs", "a red ball on the grass"])
    assert ids.shape == (2, 35) and ids[0, 0] == model.tokenizer.cls_token_id
    enc = model.with_enc_token(ids)
    assert (enc[:, 0] == model.tokenizer.convert_tokens_to_ids("[ENC]")).all() and (enc[:, 1:] == ids[:, 1:]).all()
    assert model.itm_logits(enc, mask, image_embeds).shape == (2, 2)


def test_tokenizer_ids_follow_the_official_order(tmp_path):
    """[DEC] then [ENC] are appended after the vocabulary (30522, 30523 for bert-base-uncased)."""
    tokenizer = init_tokenizer(tiny_config(tmp_path)["text_encoder"])
    vocab_size = len(tokenizer) - 2
    assert tokenizer.convert_tokens_to_ids("[DEC]") == vocab_size and tokenizer.bos_token == "[DEC]"
    assert tokenizer.enc_token_id == vocab_size + 1


def test_missing_tokenizer_says_how_to_work_offline(monkeypatch, tmp_path):
    from transformers import BertTokenizerFast

    with pytest.raises(OSError, match="does not exist") as err:
        init_tokenizer(str(tmp_path / "no_such_dir"))
    assert "text_encoder" in str(err.value) and "local directory" in str(err.value)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(BertTokenizerFast, "from_pretrained", offline)
    with pytest.raises(OSError, match="bert-base-uncased.*text_encoder") as err:
        init_tokenizer("bert-base-uncased")
    assert "local directory" in str(err.value)


def test_tokenizer_without_vocabulary_is_an_error(tmp_path):
    specials_only = tmp_path / "vocab.txt"
    specials_only.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(OSError, match="no vocabulary"):
        init_tokenizer(str(specials_only))


def test_vocab_size_smaller_than_tokenizer_is_an_error(tmp_path):
    config = tiny_config(tmp_path, med_config={**TINY_MED, "vocab_size": 10})
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(config)


def test_unknown_med_config_field_is_an_error(tmp_path):
    config = tiny_config(tmp_path, med_config={**TINY_MED, "hiden_size": 10})
    with pytest.raises(ValueError, match="hiden_size"):
        build_model(config)
