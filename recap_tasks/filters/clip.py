"""CLIP score of (image, original caption): cosine similarity of the two embeddings.

Any transformers `CLIPModel` id or local path (DataComp used ViT-L/14 and kept its top 30%;
LAION kept ViT-B/32 scores above 0.28). Tests use `make_test_clip_model`, a tiny random CLIP
built from the same classes and loaded through the same code path.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from recap_tasks.config import FilterConfig
from recap_tasks.filters import FilterDecision, ModelLoadError, PairFilter, PairImage


class ClipScoreFilter(PairFilter):
    """Drops pairs whose CLIP score is below `min_clip_score`; keeps the score of every pair."""

    name = "clip_score"
    needs_image = True

    def __init__(self, config: FilterConfig, *, threads: int = 1):
        self.model_id = config.clip_model
        self.min_score = config.min_clip_score
        self.device = config.clip_device
        self.threads = threads
        self._scorer = None

    def check(self) -> None:
        if self.model_id is None:
            raise ModelLoadError(self.name, "<none>", "filter.clip_model is not set")
        looks_local = self.model_id.startswith((".", "/", "~")) or Path(self.model_id).exists()
        if looks_local and not Path(self.model_id).expanduser().exists():
            raise ModelLoadError(self.name, self.model_id, "no such file or directory")

    def load(self) -> None:
        if self._scorer is not None:
            return
        self.check()
        try:
            import torch

            from recap_tasks.captioning.clip_scorer import ClipScorer

            if self.device == "cpu":
                torch.set_num_threads(self.threads)
            self._scorer = ClipScorer(self.model_id, device=self.device)
        except Exception as exc:
            raise ModelLoadError(self.name, self.model_id, f"{type(exc).__name__}: {exc}") from exc

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        self.load()
        captions = [c or "" for c in batch.column("org_caption").to_pylist()]
        (score,) = self._scorer.score([im.rgb for im in images], captions)
        return [FilterDecision(score >= self.min_score, "low_clip_score", {"clip_score": score})]


def make_test_clip_model(out_dir: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random CLIPModel + processor (word-level tokenizer) loadable by `ClipScoreFilter`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPVisionConfig, PreTrainedTokenizerFast)

    from recap_tasks.captioning.tiny_model import _WORDS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="removed")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                   pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                                   eos_token_id=vocab["</s>"]),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(out)
    return out
