"""Caption normalisation shared by the retrieval datasets."""

from __future__ import annotations

import re

# The characters BLIP's pre_caption blanks out. Commas, apostrophes, hyphens, slashes and
# question marks are deliberately absent: the released checkpoints were fine-tuned on text
# that still contains them, so removing them would shift the input distribution.
_BLANKED_CHARS = re.compile(r'[.!"()*#:;~]')
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Normalise a caption the way BLIP does and keep at most ``max_words`` words.

    Steps: lower-case; replace each of ``. ! " ( ) * # : ; ~`` with a space; collapse runs of two
    or more whitespace characters into one space; strip trailing newlines, then leading and
    trailing spaces; keep the first ``max_words`` space-separated words.
    """
    text = _BLANKED_CHARS.sub(" ", caption.lower())
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    # Splitting on a single space (not str.split()) matches the reference: after the collapse
    # above, a lone tab or newline inside the text stays part of a word.
    words = text.split(" ")
    return " ".join(words[:max_words])


# ALBEF's rule (dataset/utils.py of salesforce/ALBEF), which ContextBLIP's zero-shot IMAGECODE script applies
# (its utils.pre_caption, ALBEF's without the '<person>' -> 'person' replacement, which it does not have): these
# characters are deleted, not blanked, and hyphens and slashes become spaces.
_ALBEF_DELETED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption_albef(caption: str, max_words: int = 30) -> str:
    """Normalise a caption as ContextBLIP's zero-shot IMAGECODE script does and keep at most ``max_words`` words.

    Steps: lower-case; delete each of ``, . ' ! ? " ( ) * # : ; ~``; replace ``-`` and ``/`` with a space;
    collapse whitespace runs, strip and truncate as ``pre_caption`` does.
    """
    text = _ALBEF_DELETED_CHARS.sub("", caption.lower()).replace("-", " ").replace("/", " ")
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


TEXT_CLEANINGS = {"blip": pre_caption, "albef": pre_caption_albef}  # config key imagecode_text_cleaning
