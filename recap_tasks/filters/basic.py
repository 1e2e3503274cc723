"""DataComp's basic rules: caption length and image size/shape."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recap_tasks.config import FilterConfig
from recap_tasks.filters import FilterDecision, PairFilter, PairImage
from recap_tasks.hygiene import word_counts


class CaptionLengthFilter(PairFilter):
    """Drops captions of at most 2 words or at most 5 characters (DataComp basic filter)."""

    name = "caption_length"

    def __init__(self, config: FilterConfig):
        self.min_words = config.min_caption_words
        self.min_chars = config.min_caption_chars

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        captions = batch.column("org_caption").to_pylist()
        words = word_counts(captions)
        chars = np.fromiter((len(c.strip()) if c else 0 for c in captions), dtype=np.int32, count=len(captions))
        scores = {"caption_words": words, "caption_chars": chars}
        return [
            FilterDecision(words >= self.min_words, "caption_too_few_words", scores),
            FilterDecision(chars >= self.min_chars, "caption_too_short", scores),
        ]


class ImageSizeFilter(PairFilter):
    """Drops images whose shorter side is too small or whose aspect ratio is too extreme."""

    name = "image_size"

    def __init__(self, config: FilterConfig):
        self.min_side = config.min_image_side
        self.max_aspect = config.max_aspect_ratio

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        w = batch.column("width").to_numpy(zero_copy_only=False).astype(np.int32)
        h = batch.column("height").to_numpy(zero_copy_only=False).astype(np.int32)
        short = np.minimum(w, h)
        aspect = (np.maximum(w, h) / np.maximum(short, 1)).astype(np.float32)
        scores = {"min_side": short, "aspect_ratio": aspect}
        return [
            FilterDecision(short >= self.min_side, "image_too_small", scores),
            FilterDecision(aspect <= self.max_aspect, "aspect_ratio_too_extreme", scores),
        ]
