"""The transformers captioner: AutoProcessor + AutoModelForImageTextToText, batched greedy decoding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from recap_tasks.captioning import Captioner
from recap_tasks.config import CaptionConfig, model_generation_config
from recap_tasks.errors import RecapError

log = logging.getLogger(__name__)


class TransformersCaptioner(Captioner):
    """Any LLaVA-style image-text-to-text model by hub id or local path; the same path for 8B and tiny."""

    def __init__(self, model: str, config: CaptionConfig, *, loaded: tuple | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_id = model
        self.config = config
        self.device = _pick_device(config.device)
        dtype = _pick_dtype(config.dtype, self.device)
        if loaded is not None:  # a model built in memory (benchmarks): same code path from here on
            self.model, self.processor = loaded
        else:
            try:
                self.processor = AutoProcessor.from_pretrained(model)
                self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype,
                                                                         attn_implementation="sdpa")
            except Exception as exc:  # corrupt weights raise safetensors, torch or json errors: all "cannot load"
                hint = "" if Path(model).exists() else " (not a local folder; model hubs may be unreachable offline)"
                raise RecapError(f"cannot load captioning model {model!r}{hint}: {exc}") from exc
        self.model.to(self.device).eval()
        if config.chat_template:
            self.processor.chat_template = config.chat_template
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only generation needs prompts flush right
        self._torch = torch
        self.prompt_text = self._build_prompt(config.prompt)
        self.revision = getattr(self.model.config, "_commit_hash", None)
        # The one decoding the vLLM backend runs too (CaptionConfig.decoding), passed explicitly.
        generation = getattr(self.model, "generation_config", None)
        self.decoding = config.decoding(model_generation_config(generation) if generation is not None else {})
        log.info("captioner %s on %s (%s), %.1fM parameters", model, self.device, dtype,
                 sum(p.numel() for p in self.model.parameters()) / 1e6)

    def _build_prompt(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        raise RecapError(f"model {self.model_id!r} has no chat template; set one on its processor")

    def generation_kwargs(self) -> dict:
        """generate()'s settings: all of CaptionConfig.decoding, so nothing is left to the model's defaults."""
        return dict(self.decoding)

    def prepare(self, images: list[Image.Image]):
        inputs = self.processor(images=images, text=[self.prompt_text] * len(images), return_tensors="pt",
                                padding=True)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self.device.startswith("cuda"):  # pinned host memory makes the copy asynchronous
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return dict(inputs)

    def generate(self, prepared) -> list[str]:
        torch = self._torch
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in prepared.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generation_kwargs())
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def free_memory(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def provenance(self) -> dict:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "prompt": self.config.prompt,
            "prompt_id": self.config.prompt_id,
            "generation": json.dumps({**self.generation_kwargs(), "prompt_id": self.config.prompt_id,
                                      "dtype": str(self.model.dtype).removeprefix("torch."),
                                      "revision": self.revision, "backend": "transformers"}, sort_keys=True),
        }


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecapError(f"caption.device={device!r} but no CUDA GPU is available")
    return device


def _pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
