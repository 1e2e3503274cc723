"""Captioners: image -> detailed caption, behind one small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from PIL import Image


class Captioner(ABC):
    """Loads a model once, then captions batches of RGB images.

    `prepare` (CPU: resize, normalise, tokenise) is split from `generate` (the accelerator) so a
    loader can prepare the next batch while the current one generates.
    """

    # Images per generate() call this backend wants; None: caption.batch_size.
    batch_size: int | None = None

    @abstractmethod
    def prepare(self, images: list[Image.Image]) -> Any:
        """Model inputs for a batch of images."""

    @abstractmethod
    def generate(self, prepared: Any) -> list[str]:
        """Raw decoded output, one string per image, in order."""

    def caption(self, images: list[Image.Image]) -> list[str]:
        return self.generate(self.prepare(images))

    def free_memory(self) -> None:
        """Release cached accelerator memory (after an out-of-memory error)."""

    @abstractmethod
    def provenance(self) -> dict:
        """What produced the captions: model id/path, revision, prompt, decoding settings."""

    def close(self) -> None:
        """Release the model (and any engine process)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_captioner(model: str, config) -> Captioner:
    """The captioner of `config.backend` ("transformers" or "vllm") for a model id or local path."""
    if config.backend == "vllm":
        from recap_tasks.captioning.vllm_backend import VllmCaptioner

        return VllmCaptioner(model, config)
    from recap_tasks.captioning.transformers_backend import TransformersCaptioner

    return TransformersCaptioner(model, config)
