"""Caption metrics: pycocoevalcap's BLEU and CIDEr-D against independent re-computations written here from the
metric definitions, the Python tokenizer fallback against Stanford's PTB tokenizer, and the unavailable metrics."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from engine import caption_metrics as cm

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "a man surfing a big wave"],
    2: ["Two dogs play with a red ball on the grass.", "two dogs and a ball in a park", "Dogs playing in the grass."],
    3: ["A plate of food with broccoli and rice.", "rice and broccoli on a white plate", "a dinner plate of food"],
    4: ["A cat sitting on a laptop keyboard.", "the cat is on the computer", "a cat sits on a laptop"],
}
CANDIDATES = {
    1: "a man riding a wave on a surfboard",
    2: "two dogs playing with a ball in the grass",
    3: "a plate of rice and broccoli",
    4: "a dog sitting on a couch",
}


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _bleu(cands: dict, refs: dict, max_n: int = 4) -> list[float]:
    """Corpus BLEU as in the COCO caption code: clipped n-gram precisions summed over the corpus, the brevity
    penalty from the closest reference length, tiny (1e-9 / 1e-15) guards, geometric mean of the first n."""
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for key, cand in cands.items():
        words = cand[0].split()
        ref_words = [r.split() for r in refs[key]]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            best = Counter()
            for r in ref_words:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(words) - n + 1, 0)
    bp = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / cand_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        log_sum += math.log((matches[n] + 1e-15) / (totals[n] + 1e-9))
        scores.append(bp * math.exp(log_sum / (n + 1)))
    return scores


def _cider_d(cands: dict, refs: dict, n_max: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: TF-IDF n-gram vectors (IDF over the split's references), clipped candidate counts, a Gaussian
    length penalty (sigma 6), averaged over references and n = 1..4, times 10."""
    keys = list(cands)
    doc_freq = Counter()
    for key in keys:
        doc_freq.update({g for r in refs[key] for n in range(1, n_max + 1) for g in _ngrams(r.split(), n)})
    log_docs = math.log(float(len(keys)))

    def vec(words: list[str]) -> list[dict]:
        out = []
        for n in range(1, n_max + 1):
            out.append({g: c * (log_docs - math.log(max(1.0, doc_freq[g]))) for g, c in _ngrams(words, n).items()})
        return out

    total = 0.0
    for key in keys:
        cand = cands[key][0].split()
        cv = vec(cand)
        score = [0.0] * n_max
        for ref in refs[key]:
            rw = ref.split()
            rv = vec(rw)
            for n in range(n_max):
                dot = sum(min(v, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, v in cv[n].items())
                norm_c = math.sqrt(sum(v * v for v in cv[n].values()))
                norm_r = math.sqrt(sum(v * v for v in rv[n].values()))
                value = dot / (norm_c * norm_r) if norm_c and norm_r else 0.0
                score[n] += value * math.exp(-((len(cand) - len(rw)) ** 2) / (2 * sigma**2))
        total += sum(s / len(refs[key]) for s in score) / n_max * 10.0
    return total / len(keys)


@pytest.fixture(scope="module")
def tokenized() -> tuple[dict, dict]:
    refs = {k: [cm.simple_ptb_tokenize(r) for r in v] for k, v in REFERENCES.items()}
    cands = {k: [cm.simple_ptb_tokenize(v)] for k, v in CANDIDATES.items()}
    return refs, cands


def test_bleu_and_cider_match_independent_computations(tokenized) -> None:
    refs, cands = tokenized
    metrics, unavailable = cm.score_tokenized(refs, cands, meteor=False)
    for n, expected in enumerate(_bleu(cands, refs), start=1):
        assert metrics[f"bleu_{n}"] == pytest.approx(100 * expected, rel=1e-6)
    assert metrics["cider"] == pytest.approx(100 * _cider_d(cands, refs), rel=1e-6)
    assert 0 < metrics["bleu_4"] < metrics["bleu_1"] < 100 and metrics["cider"] > 10
    assert metrics["spice"] is None and "CoreNLP" in unavailable["spice"]


def test_a_perfect_candidate_scores_bleu_100(tokenized) -> None:
    refs, _ = tokenized
    cands = {k: [v[0]] for k, v in refs.items()}
    metrics, _ = cm.score_tokenized(refs, cands, meteor=False)
    assert metrics["bleu_1"] == pytest.approx(100.0) and metrics["bleu_4"] == pytest.approx(100.0, rel=1e-6)


SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys, and a cat's bowl!",
    "The man doesn't wear a T-shirt (blue).",
    'a picture of 2.5 people; "quoted" words: yes',
    "It's a 'quote' here -- and - there...",
    "Kids play in the U.S. park?",
    "the woman is holding a   hot-dog\nand a soda",
    "I'm sure they've been there & we'd go",
]


@pytest.mark.skipif(not cm.java_available(), reason="the Stanford PTB tokenizer needs java")
def test_python_tokenizer_matches_stanford_ptb() -> None:
    java, name = cm.ptb_tokenize({i: [s] for i, s in enumerate(SENTENCES)})
    assert "Stanford" in name
    for i, sentence in enumerate(SENTENCES):
        assert cm.simple_ptb_tokenize(sentence) == java[i][0], sentence


@pytest.mark.skipif(not cm.java_available(), reason="METEOR needs java")
def test_full_pipeline_with_meteor() -> None:
    metrics = cm.caption_metrics(CANDIDATES, REFERENCES)
    assert 0 < metrics["meteor"] < 100 and "meteor" not in metrics["unavailable"]
    assert metrics["num_images"] == 4 and "Stanford" in metrics["tokenizer"]
    line = cm.format_caption_metrics(metrics)
    assert "B@4" in line and "SPICE n/a" in line


def test_without_java_meteor_is_unavailable_and_tokenizing_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    metrics = cm.caption_metrics(CANDIDATES, REFERENCES)
    assert metrics["meteor"] is None and "java" in metrics["unavailable"]["meteor"]
    assert "Python" in metrics["tokenizer"] and metrics["bleu_4"] > 0


def test_results_and_references_must_cover_the_same_images() -> None:
    with pytest.raises(ValueError, match="no reference captions"):
        cm.caption_metrics({**CANDIDATES, 9: "a dog"}, REFERENCES)
    with pytest.raises(ValueError, match="were not captioned"):
        cm.caption_metrics({1: CANDIDATES[1]}, REFERENCES)
