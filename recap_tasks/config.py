"""Stage settings: frozen dataclasses with defaults, loadable from one YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from recap_tasks.errors import RecapError

# The Recap-DataComp-1B prompt (Li et al., 2024), used with greedy decoding.
PAPER_PROMPT = (
    "Please generate a detailed caption of this image. Please be as descriptive as possible."
)


@dataclass(frozen=True)
class IngestConfig:
    # Parquet sources: which columns hold the image bytes, the caption, the key and the url.
    # None means "detect": the first present of the candidates in readers.parquet.
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    url_column: str | None = None
    # Alt text longer than this is page junk (scraped paragraphs, base64), not a caption.
    max_caption_bytes: int = 16_384
    # Decompression-bomb guard: images with more pixels are rejected before decoding.
    max_image_pixels: int = 64_000_000
    # Images larger than this on disk are rejected without being read into memory.
    max_image_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _positive(self, "max_caption_bytes", "max_image_pixels", "max_image_bytes")


@dataclass(frozen=True)
class FilterConfig:
    # DataComp's basic filter: captions of more than 2 words and more than 5 characters,
    # images whose shorter side is at least 200 px and whose aspect ratio is at most 3.
    min_caption_words: int = 3
    min_caption_chars: int = 6
    min_image_side: int = 200
    max_aspect_ratio: float = 3.0

    def __post_init__(self) -> None:
        _positive(self, "min_image_side", "max_aspect_ratio")
        if self.max_aspect_ratio < 1:
            raise RecapError("filter.max_aspect_ratio must be >= 1 (it is long side / short side)")


@dataclass(frozen=True)
class CaptionConfig:
    prompt: str = PAPER_PROMPT
    # Short name recorded with each caption so prompt changes are traceable in the table.
    prompt_id: str = "recap-datacomp-v1"
    max_new_tokens: int = 128
    # None leaves the model's generation_config alone (the tiny test model sets its own).
    min_new_tokens: int | None = None
    batch_size: int = 8
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size")
        if not self.prompt.strip():
            raise RecapError("caption.prompt must not be empty")


@dataclass(frozen=True)
class ValidateConfig:
    # Recaption length bounds in words; the paper's recaptions average ~49 words.
    min_caption_words: int = 1
    max_caption_words: int = 400

    def __post_init__(self) -> None:
        if self.min_caption_words > self.max_caption_words:
            raise RecapError("validate.min_caption_words must not exceed max_caption_words")


@dataclass(frozen=True)
class RecapConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: dict[str, Any]) -> "RecapConfig":
        """Defaults, then the YAML file's sections, then per-section overrides (e.g. from the CLI)."""
        raw: dict[str, Any] = {}
        if path is not None:
            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except FileNotFoundError:
                raise RecapError(f"config file not found: {path}") from None
            except yaml.YAMLError as exc:
                raise RecapError(f"config file {path} is not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise RecapError(f"config file {path} must hold a mapping of sections")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise RecapError(f"unknown config sections {sorted(unknown)}; known: {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            values = dict(raw.get(f.name) or {})
            values.update({k: v for k, v in (overrides.get(f.name) or {}).items() if v is not None})
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise RecapError(f"unknown keys {sorted(bad)} in config section {f.name!r}; known: {sorted(known)}")
            try:
                built[f.name] = section_cls(**values)
            except TypeError as exc:
                raise RecapError(f"config section {f.name!r}: {exc}") from None
        return cls(**built)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise RecapError(f"{type(obj).__name__}.{name} must be positive, got {value!r}")
