"""CLIP scores of (image, original caption) and (image, recaption) in one forward pass.

The released Recap-DataComp-1B table carries both scores. CLIP's text encoder reads a fixed number
of tokens (77 for OpenAI CLIP): a longer recaption is cut, and the row records that it was. A
long-context CLIP (a model id whose text encoder has more positions) reads more of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from recap_tasks.errors import RecapError

log = logging.getLogger(__name__)


class ClipScorer:
    """Any transformers `CLIPModel` id or local path; cosine similarities in [-1, 1]."""

    def __init__(self, model_id: str, *, device: str = "auto"):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.model_id = model_id
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        try:
            self.model = CLIPModel.from_pretrained(model_id).to(self.device).eval()
            self.processor = AutoProcessor.from_pretrained(model_id)
        except Exception as exc:  # corrupt weights raise safetensors, torch or json errors: all "cannot load"
            hint = "" if Path(model_id).exists() else " (not a local folder; model hubs may be unreachable offline)"
            raise RecapError(f"cannot load CLIP model {model_id!r}{hint}: {exc}") from exc
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self._torch = torch

    def token_counts(self, texts: list[str]) -> np.ndarray:
        ids = self.processor.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return np.array([len(i) for i in ids])

    def score(self, images: list[Image.Image], *captions: list[str]) -> list[np.ndarray]:
        """Cosine similarity of each image with its caption, for each aligned list of captions.

        One forward pass: the images are embedded once, all captions together.
        """
        torch = self._torch
        n = len(images)
        texts = [t or "" for caps in captions for t in caps]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_tokens)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return [(img * txt[k * n:(k + 1) * n]).sum(-1).cpu().numpy().astype(np.float32)
                for k in range(len(captions))]

    def score_pairs(self, images: list[Image.Image], org: list[str], re_: list[str]):
        """(re scores, org scores, re truncated) for aligned lists of images and captions."""
        org_scores, re_scores = self.score(images, org, re_)
        truncated = self.token_counts([t or "" for t in re_]) > self.max_tokens
        return re_scores, org_scores, truncated
