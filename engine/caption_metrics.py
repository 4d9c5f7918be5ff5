"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (SPICE is reported as unavailable).

The scorers are pycocoevalcap's, the package the official BLIP evaluation (and every COCO caption paper) uses, so
the numbers are the reference ones by construction; tests/test_caption_metrics.py checks them against independent
re-computations. The pipeline is COCOEvalCap's: PTB-tokenise references and candidates (Stanford PTBTokenizer,
lower-cased, punctuation dropped), then score the whole split in one call (CIDEr-D's IDF comes from the split's
references).

Java: the PTB tokenizer and METEOR run `java` (any version from 8 on). Without `java` on the PATH, the tokenizer
falls back to `simple_ptb_tokenize` (a Python approximation, identical on ordinary captions) and METEOR is reported
as unavailable with the reason. SPICE needs Stanford CoreNLP models downloaded on first use and Java 8, so it is
always reported as unavailable; run pycocoevalcap's Spice yourself where both are at hand.

Values are percentages (the paper's BLEU-4 39.7 is 0.397 in pycocoevalcap's output).
"""

from __future__ import annotations

import re
import shutil

METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")
SPICE_REASON = (
    "SPICE needs Stanford CoreNLP models downloaded on first use and Java 8; not run (pycocoevalcap's Spice computes "
    "it where both are available)"
)
# What pycocoevalcap's PTBTokenizer drops after tokenising.
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def java_available() -> bool:
    """Whether a `java` executable is on the PATH (PTB tokenizer, METEOR)."""
    return shutil.which("java") is not None


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_LEADING = "\"'`([{"
_TRAILING = "\"'`)]}.,!?;:"
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _split_chunk(chunk: str) -> list[str]:
    """One whitespace-separated chunk -> PTB tokens (before the punctuation filter)."""
    leading, trailing = [], []
    while chunk and chunk[0] in _LEADING:
        leading.append(chunk[0])
        chunk = chunk[1:]
    while chunk:
        if chunk.endswith("..."):
            trailing.insert(0, "...")
            chunk = chunk[:-3]
        elif chunk[-1] in _TRAILING and not (chunk[-1] == "." and "." in chunk[:-1]):  # keep "u.s." whole
            trailing.insert(0, chunk[-1])
            chunk = chunk[:-1]
        else:
            break
    core = []
    if chunk:
        match = _CLITIC.match(chunk)
        core = [match.group(1), match.group(2)] if match else [chunk]
    return [_BRACKETS.get(t, t) for t in leading + core + trailing]


def simple_ptb_tokenize(text: str) -> str:
    """A Python approximation of `PTBTokenizer -lowerCase` followed by pycocoevalcap's punctuation filter.

    Splits off leading and trailing punctuation (not the period of "u.s."), the clitics n't 's 're 've 'll 'd 'm,
    maps brackets to -lrb- -rrb- ... (which pycocoevalcap's filter, written for upper case, keeps) and drops the
    punctuation tokens pycocoevalcap drops. Used only when Java is missing; tests compare it with the Java tokenizer.
    """
    tokens = []
    for chunk in text.lower().replace('"', ' " ').split():
        tokens += _split_chunk(chunk)
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION and t != '"')


def ptb_tokenize(captions: dict) -> tuple[dict, str]:
    """{key: [caption, ...]} -> ({key: [tokenised caption, ...]}, which tokenizer ran)."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        wrapped = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(wrapped), "Stanford PTBTokenizer (pycocoevalcap)"
    return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}, "Python PTB approximation (no java)"


def score_tokenized(
    references: dict, candidates: dict, meteor: bool = True
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Scores of tokenised candidates {key: [one caption]} against tokenised references {key: [captions]}.

    Returns (metrics in percent, None where not computed; {metric: reason it was not computed}).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    metrics: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    unavailable = {"spice": SPICE_REASON}
    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    for n, value in enumerate(bleu, start=1):
        metrics[f"bleu_{n}"] = 100.0 * float(value)  # plain floats: checkpoints are read with weights_only
    metrics["rouge_l"] = 100.0 * float(Rouge().compute_score(references, candidates)[0])
    metrics["cider"] = 100.0 * float(Cider().compute_score(references, candidates)[0])
    if not meteor:
        unavailable["meteor"] = "not requested"
    elif not java_available():
        unavailable["meteor"] = "METEOR runs meteor-1.5.jar and needs `java` on the PATH (apt install default-jre)"
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            metrics["meteor"] = 100.0 * float(scorer.compute_score(references, candidates)[0])
        finally:
            del scorer  # its __del__ stops the java process
    return metrics, unavailable


def caption_metrics(results: dict, references: dict, meteor: bool = True) -> dict:
    """COCO caption metrics of `results` {image key: caption} against `references` {image key: [captions]}.

    Every result key must have references (and the other way round): the official evaluation scores exactly the
    images that were captioned. Returns {metric: percent or None, 'unavailable': {metric: reason},
    'tokenizer': ..., 'num_images': N}.
    """
    missing = [k for k in results if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no reference captions (e.g. {missing[:3]})")
    extra = [k for k in references if k not in results]
    if extra:
        raise ValueError(f"{len(extra)} reference images were not captioned (e.g. {extra[:3]})")
    if not results:
        raise ValueError("no captions to score")
    refs, tokenizer = ptb_tokenize({k: list(references[k]) for k in results})
    cands, _ = ptb_tokenize({k: [results[k]] for k in results})
    metrics, unavailable = score_tokenized(refs, cands, meteor)
    return {**metrics, "unavailable": unavailable, "tokenizer": tokenizer, "num_images": len(results)}


def format_caption_metrics(metrics: dict) -> str:
    """One line: B@1..4, METEOR, ROUGE-L, CIDEr, SPICE (n/a where not computed)."""
    names = {"bleu_1": "B@1", "bleu_2": "B@2", "bleu_3": "B@3", "bleu_4": "B@4", "meteor": "METEOR"}
    names.update(rouge_l="ROUGE-L", cider="CIDEr", spice="SPICE")
    parts = [
        f"{label} {metrics[k]:.2f}" if metrics.get(k) is not None else f"{label} n/a" for k, label in names.items()
    ]
    return "  ".join(parts)
