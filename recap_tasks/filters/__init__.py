"""Filters decide keep/drop per pair with a snake_case reason and keep their scores.

Two kinds: a `PairFilter` judges each row on its own (it runs on the Dask workers, a batch of one
shard at a time); a `CorpusFilter` judges rows against each other (duplicates, boilerplate) and
runs in the driver over the survivors of the whole run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from recap_tasks.errors import RecapError


@dataclass
class FilterDecision:
    """Per-row verdicts for one batch: keep mask, reason for each dropped row, named scores."""

    keep: np.ndarray  # bool, one per row
    reason: str  # the reason recorded for every dropped row of this filter
    scores: dict[str, Any]  # name -> numpy array or list (one value per row; None = no score)
    # Side output: row index -> new image bytes (the face-blurred image captioning should read).
    images: dict[int, bytes] = field(default_factory=dict)


@dataclass
class PairImage:
    """One decoded image: `rgb` at working size (<= the chain's max side), `data` as stored."""

    rgb: Image.Image
    data: bytes
    scale: float  # rgb size / original size (<= 1)
    size: tuple[int, int]  # (width, height) of the original, upright: what face boxes are relative to


class ModelLoadError(RecapError):
    """A filter's model file is missing or unreadable: the run stops before any shard is judged."""

    def __init__(self, filter_name: str, path: str, cause: object):
        super().__init__(f"filter {filter_name!r}: cannot load model {path}: {cause}")
        self.filter_name = filter_name
        self.model_path = path
        self._cause = str(cause)

    def __reduce__(self):  # raised on a Dask worker, re-raised in the driver
        return (type(self), (self.filter_name, self.model_path, self._cause))


class PairFilter(ABC):
    """One job: score a batch of pairs and say which to keep.

    Subclasses fill `decide`; models are loaded in `load` (once per worker process, never per
    task); `check` is a cheap preflight in the driver (model paths exist) so a bad path fails
    before the cluster starts.
    """

    name: str
    needs_image: bool = False

    def check(self) -> None:
        """Fail fast (ModelLoadError) when a configured model file is not there."""

    def load(self) -> None:
        """Load models; raise ModelLoadError naming the filter and the path on failure."""

    @abstractmethod
    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        """Verdicts for `batch`; several decisions may be returned (one per rule, first wins)."""


class CorpusFilter(PairFilter):
    """Judges rows against each other and against rows kept by earlier runs.

    `decide` (on the workers) may compute per-row scores that `decide_corpus` needs (a perceptual
    hash); it drops nothing. `decide_corpus` runs in the driver on all survivors of the run.
    """

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        return []

    @abstractmethod
    def decide_corpus(self, rows: pa.Table, history: pa.Table) -> list[FilterDecision]:
        """Verdicts for `rows` (survivors of this run, with scores); `history`: rows kept before."""


def check_model_file(filter_name: str, path: str | None) -> None:
    from pathlib import Path

    if path is not None and "://" not in path and not Path(path).exists():
        raise ModelLoadError(filter_name, path, "no such file or directory")
