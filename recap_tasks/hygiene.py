"""Caption hygiene: clean model output and flag what the quality gates check.

Pure functions on strings, shared by the caption stage (which stores the flags) and validation
(which recomputes them for rows captioned before the flags existed).
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

# Openings of refusals and non-answers seen from instruction-tuned captioners.
_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i'?m unable|i am unable|i'?m not able|"
    r"as an ai|unfortunately,? i|i do not have|i don'?t have the ability)",
    re.IGNORECASE,
)
# Chat-template debris that a decode with skip_special_tokens can leave behind.
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|<image>|\[/?INST\]")
_ROLE_TURN = re.compile(r"^\s*(?:USER|user|User)\s*:.*?(?:ASSISTANT|assistant|Assistant)\s*:\s*", re.DOTALL)
_ROLE = re.compile(r"^\s*(?:ASSISTANT|assistant|Assistant)\s*:\s*")
_BARE_ROLE = re.compile(r"^\s*(?:assistant|ASSISTANT)\s+")  # "<|im_start|>assistant ..." once tokens are gone


def clean_caption(text: str, prompt: str) -> str:
    """Strip chat-template leftovers and an echoed prompt; normalise white space."""
    had_special = bool(_SPECIAL.search(text))
    text = _ROLE.sub("", _ROLE_TURN.sub("", _SPECIAL.sub(" ", text)))
    if had_special:
        text = _BARE_ROLE.sub("", text)
    stripped = text.strip()
    if prompt and stripped.lower().startswith(prompt.strip().lower()):
        stripped = stripped[len(prompt.strip()):]
    return " ".join(stripped.split())


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text or ""))


def echoes_prompt(text: str, prompt: str) -> bool:
    """The caption repeats (most of) the prompt instead of describing the image."""
    if not text or not prompt:
        return False
    norm = " ".join(prompt.lower().split())
    return norm in " ".join(text.lower().split()) or "detailed caption of this image" in text.lower()


def distinct_ngram_ratio(text: str, n: int = 3) -> float:
    """Distinct n-grams / all n-grams of the words; near 0 for degenerate loops ("a dog a dog a dog")."""
    words = (text or "").lower().split()
    if len(words) < n + 1:
        return 1.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def word_count(text: str | None) -> int:
    """Words as the released table counts them (re_length, org_length): whitespace-separated tokens.

    The one definition of a caption's word count; `word_counts` is the same over many texts.
    """
    return len(text.split()) if text else 0


def word_counts(texts: Iterable[str | None]) -> np.ndarray:
    """`word_count` of each text, as int32 (the filter's caption_words, the tables' lengths)."""
    texts = list(texts)
    return np.fromiter((word_count(t) for t in texts), dtype=np.int32, count=len(texts))
