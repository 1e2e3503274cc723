"""Filters decide keep/drop per pair with a snake_case reason and keep their scores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class FilterDecision:
    """Per-row verdicts for one batch: keep mask, reason for each dropped row, named scores."""

    keep: np.ndarray  # bool, one per row
    reason: str  # the reason recorded for every dropped row of this filter
    scores: dict[str, np.ndarray]


class PairFilter(ABC):
    """One job: score a batch of pairs and say which to keep.

    Subclasses fill `decide`; the chain runs filters in order on the survivors of earlier ones,
    writes scores and verdicts, and records each drop in `rejected` with the filter's reason.
    """

    name: str
    needs_image: bool = False

    @abstractmethod
    def decide(self, batch: pa.Table) -> list[FilterDecision]:
        """Verdicts for `batch`; several decisions may be returned (one per rule, first wins)."""
