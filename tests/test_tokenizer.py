"""Our BertTokenizerFast (models.blip_retrieval.init_tokenizer) gives the same ids as the official slow BertTokenizer.

The official code tokenizes with the pure-Python `BertTokenizer` and adds [DEC] (bos) and [ENC]; we use the Rust
`BertTokenizerFast`. Both are built here from one generated WordPiece vocab, so no download is needed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from data.utils import pre_caption
from models.blip_retrieval import init_tokenizer
from tests.helpers import tiny_model, write_vocab

# Whole words, WordPiece continuations (so that "dogs", "1990s", "skateboarders", "playing" split), the plain
# forms that BERT uncased reduces accented words to (café -> cafe), digits, punctuation and one CJK character.
# Words left out on purpose ("zebra", "xylophone", ";") must become [UNK].
VOCAB_WORDS = [
    "a",
    "the",
    "dog",
    "cat",
    "man",
    "woman",
    "red",
    "ball",
    "on",
    "in",
    "and",
    "grass",
    "street",
    "road",
    "near",
    "cafe",
    "naive",
    "resume",
    "said",
    "idea",
    "well",
    "known",
    "two",
    "it",
    "s",
    "word",
    "quoted",
    "photo",
    "of",
    "view",
    "eye",
    "apart",
    "play",
    "skate",
    "meter",
    "2",
    "3",
    "5",
    "1990",
    "犬",
    "##s",
    "##ing",
    "##board",
    "##er",
    ",",
    ".",
    "'",
    "-",
    "/",
    "?",
    "!",
    '"',
]

CAPTIONS = [
    "A dog runs on the grass.",
    "Two dogs, a cat and the man's red ball.",
    "A well-known street/road near the café?",
    'The woman said "naïve" résumé ideas.',
    "It's a 'quoted' word!",
    "2 dogs in the 1990s, 3.5 meters apart",
    "A zebra plays xylophone; skateboarders playing",
    "CAFÉ  NAÏVE\tRÉSUMÉ\n",
    "cafe\u0301 nai\u0308ve",  # decomposed accents (combining marks)
    "a 犬 dog-eye view/photo?!",
    "",
    "a" * 120,  # longer than WordPiece's 100-character word limit
    " ".join(["dog"] * 33),  # 33 words + [CLS] + [SEP]: exactly max_length, nothing cut
    " ".join(["dog"] * 34),  # one word too many: cut before [SEP]
    "Two red dogs, a cat and a woman play on the well-known street near the café; the man's ball is red, "
    "the grass is green and it's 3.5 meters apart from the road in the 1990s photo of two skateboarders",
]
MAX_LENGTH = 35  # BlipRetrieval.tokenize's max_length (config max_length)
Pair = tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]  # (official slow, our fast)


def _slow_bert_tokenizer_class() -> type:
    """The pure-Python BERT tokenizer the official code uses, under either major version of transformers."""
    try:  # transformers 5: `BertTokenizer` is the Rust-backed one; the Python one was renamed
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        return BertTokenizerLegacy
    except ImportError:  # transformers 4: `BertTokenizer` is the Python one
        from transformers import BertTokenizer

        return BertTokenizer


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_vocab(tmp_path_factory.mktemp("tok") / "vocab.txt", VOCAB_WORDS)


@pytest.fixture(scope="module")
def tokenizers(vocab_file: str) -> Pair:
    fast = init_tokenizer(vocab_file)
    # The official init_tokenizer's steps, on the slow class.
    slow = _slow_bert_tokenizer_class()(vocab_file, do_lower_case=True)
    slow.add_special_tokens({"bos_token": "[DEC]"})
    slow.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert not slow.is_fast and fast.is_fast
    return slow, fast


def test_vocab_exercises_wordpiece_accents_and_unknowns(tokenizers: Pair) -> None:
    """The caption set really covers the cases this file is about (so a vocab change cannot hollow it out)."""
    slow, _ = tokenizers
    tokens = [t for c in CAPTIONS for t in slow.tokenize(c)]
    assert {"##s", "##ing", "##board", "cafe", "naive", "resume", "1990", "'", "-", "/", "?", '"'} <= set(tokens)
    assert "[UNK]" in tokens
    assert len(slow.tokenize(CAPTIONS[-1])) > MAX_LENGTH


def test_special_token_ids_match(tokenizers: Pair, vocab_file: str) -> None:
    slow, fast = tokenizers
    n_vocab = len(open(vocab_file, encoding="utf-8").read().split())
    assert len(slow) == len(fast) == n_vocab + 2
    for token in ("[DEC]", "[ENC]", "[CLS]", "[SEP]", "[PAD]", "[UNK]"):
        assert slow.convert_tokens_to_ids(token) == fast.convert_tokens_to_ids(token), token
    assert slow.bos_token_id == fast.bos_token_id == fast.convert_tokens_to_ids("[DEC]") == n_vocab
    # [ENC] is the last id, as with bert-base-uncased ([DEC] 30522, [ENC] 30523).
    assert fast.convert_tokens_to_ids("[ENC]") == fast.enc_token_id == len(fast) - 1 == n_vocab + 1


@pytest.mark.parametrize("prepare", ["raw", "pre_caption"])
def test_fast_and_slow_give_identical_ids(tokenizers: Pair, prepare: str) -> None:
    """Same input_ids and attention_mask, with the arguments BlipRetrieval.tokenize passes, for raw captions and
    for captions as the datasets hand them over (after pre_caption)."""
    slow, fast = tokenizers
    captions = CAPTIONS if prepare == "raw" else [pre_caption(c, 30) for c in CAPTIONS]
    for padding in ("max_length", "longest"):  # training pads to the longest caption, evaluation to max_length
        kwargs = dict(padding=padding, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        expected, got = slow(captions, **kwargs), fast(captions, **kwargs)
        assert torch.equal(got["input_ids"], expected["input_ids"]), padding
        assert torch.equal(got["attention_mask"], expected["attention_mask"]), padding
    ids = expected["input_ids"]
    assert ids.shape[1] == MAX_LENGTH
    if prepare == "raw":  # the long captions are cut at 35 tokens, with [SEP] kept last
        assert (ids[-3:, -1] == slow.sep_token_id).all() and expected["attention_mask"][-3:].all()


def test_model_tokenize_matches_slow_tokenizer(tmp_path, tokenizers: Pair, vocab_file: str) -> None:
    """The model's own tokenize path (its tokenizer and arguments) gives the slow tokenizer's ids."""
    slow, _ = tokenizers
    model = tiny_model(tmp_path, text_encoder=vocab_file)
    assert model.max_length == MAX_LENGTH
    ids, mask = model.tokenize(CAPTIONS)
    expected = slow(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert model.enc_token_id == slow.convert_tokens_to_ids("[ENC]")
