"""Captioners: image -> detailed caption, behind one small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

from PIL import Image


class Captioner(ABC):
    """Loads a model once, then captions batches of RGB images."""

    @abstractmethod
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order."""

    @abstractmethod
    def provenance(self) -> dict:
        """What produced the captions: model id/path, revision, prompt, decoding settings."""
