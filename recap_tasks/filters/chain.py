"""The filter chain: which filters, in which order, from a YAML profile; and running it on rows."""

from __future__ import annotations

import dataclasses
import io
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from recap_tasks.config import FilterConfig
from recap_tasks.errors import RecapError
from recap_tasks.filters import CorpusFilter, FilterDecision, PairFilter, PairImage

log = logging.getLogger(__name__)

PROFILES = Path(__file__).resolve().parents[1] / "configs"


def _registry() -> dict[str, Callable[..., PairFilter]]:
    from recap_tasks.filters.basic import CaptionLengthFilter, ImageSizeFilter
    from recap_tasks.filters.clip import ClipScoreFilter
    from recap_tasks.filters.dedup import CaptionBoilerplateFilter, ImageDedupFilter
    from recap_tasks.filters.faces import FaceFilter
    from recap_tasks.filters.language import LanguageFilter
    from recap_tasks.filters.nsfw import NsfwFilter

    return {
        "caption_length": lambda c, t: CaptionLengthFilter(c),
        "image_size": lambda c, t: ImageSizeFilter(c),
        "language": lambda c, t: LanguageFilter(c),
        "nsfw": lambda c, t: NsfwFilter(c, threads=t),
        "faces": lambda c, t: FaceFilter(c, threads=t),
        "image_dedup": lambda c, t: ImageDedupFilter(c),
        "caption_boilerplate": lambda c, t: CaptionBoilerplateFilter(c),
        "clip_score": lambda c, t: ClipScoreFilter(c, threads=t),
    }


def load_profile(chain: str) -> list[tuple[str, dict]]:
    """[(filter name, filter.* overrides)] from a profile name in recap_tasks/configs or a YAML path."""
    path = Path(chain).expanduser()
    if not path.suffix:
        path = PROFILES / f"{chain}.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise RecapError(f"filter chain {chain!r} not found (profiles: {known}, or a path to a YAML file)") from None
    except yaml.YAMLError as exc:
        raise RecapError(f"filter chain {path} is not valid YAML: {exc}") from None
    entries = raw.get("filters") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise RecapError(f"filter chain {path}: needs a non-empty list under 'filters'")
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            name, params = next(iter(entry.items()))
            out.append((name, dict(params or {})))
        else:
            raise RecapError(f"filter chain {path}: bad entry {entry!r} (a name or {{name: {{field: value}}}})")
    return out


def build_chain(config: FilterConfig, *, threads: int = 1) -> list[PairFilter]:
    """The configured filters, in order; unknown names and fields are errors."""
    registry = _registry()
    fields = {f.name for f in dataclasses.fields(FilterConfig)}
    chain: list[PairFilter] = []
    for name, params in load_profile(config.chain):
        if name not in registry:
            raise RecapError(f"unknown filter {name!r} in chain {config.chain!r}; known: {sorted(registry)}")
        when = params.pop("when", None)
        bad = set(params) - fields
        if bad or (when is not None and when not in fields):
            raise RecapError(f"filter {name!r} in chain {config.chain!r}: unknown filter fields "
                             f"{sorted(bad | ({when} - fields if when else set()))}")
        if when is not None and getattr(config, when) is None:
            log.info("filter chain: %s skipped (filter.%s is not set)", name, when)
            continue
        own = dataclasses.replace(config, **params) if params else config
        chain.append(registry[name](own, threads))
    return chain


def decode(data: bytes, max_side: int) -> PairImage:
    """Decode once for every image filter; JPEGs decode straight at reduced scale (DCT draft)."""
    from recap_tasks.images import orientation, upright

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if im.format == "JPEG":
        ratio = max(w, h) / max_side
        if ratio >= 2:
            im.draft("RGB", (int(w / ratio), int(h / ratio)))
    size = (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)  # upright, full resolution
    rgb = upright(im).convert("RGB")
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return PairImage(rgb=rgb, data=data, scale=rgb.size[0] / size[0], size=size)


@dataclass
class RowVerdicts:
    """What the row filters said about a batch: survivors, reasons, scores, blurred images."""

    alive: np.ndarray
    reason: list[str | None]
    scores: dict[str, list]
    images: dict[int, bytes]
    errors: list[tuple[int, str, str]]  # (row, filter, error) for filter_error:<name> rows
    seconds: dict[str, float]  # time per filter (and "decode"), for the benchmark


def run_rows(batch: pa.Table, chain: list[PairFilter], *, max_side: int,
             read_images: Callable[[pa.Table], list[bytes | None]]) -> RowVerdicts:
    """Run the row part of every filter on `batch`, each on the survivors of those before it.

    A filter that raises is retried row by row; rows that still raise are dropped with reason
    `filter_error:<filter>`, the others go on. Images are read and decoded once, when the first
    filter that needs them is reached, and only for rows still alive then.
    """
    import time

    n = batch.num_rows
    v = RowVerdicts(np.ones(n, dtype=bool), [None] * n, {}, {}, [], {})
    images: dict[int, PairImage] = {}
    for flt in chain:
        idx = np.flatnonzero(v.alive)
        if idx.size == 0:
            break
        if flt.needs_image and not images:
            t0 = time.perf_counter()
            images = _load_images(batch, idx, v, max_side, read_images)
            v.seconds["decode"] = v.seconds.get("decode", 0.0) + time.perf_counter() - t0
            idx = np.flatnonzero(v.alive)
            if idx.size == 0:
                break
        t0 = time.perf_counter()
        sub = batch.take(pa.array(idx))
        ims = [images[i] for i in idx] if flt.needs_image else None
        decisions, failed = _decide_isolated(flt, sub, ims)
        v.seconds[flt.name] = v.seconds.get(flt.name, 0.0) + time.perf_counter() - t0
        for j, err in failed.items():
            i = int(idx[j])
            v.alive[i] = False
            v.reason[i] = f"filter_error:{flt.name}"
            v.errors.append((i, flt.name, err))
        for decision in decisions:
            _record(v, idx, decision)
    return v


def _record(v: RowVerdicts, idx: np.ndarray, decision: FilterDecision) -> None:
    n = len(v.alive)
    for name, values in decision.scores.items():
        column = v.scores.setdefault(name, [None] * n)
        for j, i in enumerate(idx):
            value = values[j]
            column[i] = value.item() if isinstance(value, np.generic) else value
    for j, data in decision.images.items():
        v.images[int(idx[j])] = data
    for j, i in enumerate(idx):
        if v.alive[i] and not decision.keep[j]:
            v.alive[i] = False
            v.reason[i] = decision.reason


def _load_images(batch, idx, v: RowVerdicts, max_side, read_images) -> dict[int, PairImage]:
    problems: dict[int, tuple[str, str]] = {}
    blobs = read_images(batch.take(pa.array(idx)), problems=problems)
    images = {}
    for j, (i, data) in enumerate(zip(idx, blobs)):
        try:
            if j in problems:
                raise _ImageProblem(*problems[j])
            if data is None:
                raise OSError("image bytes could not be read back from the source shard")
            images[int(i)] = decode(data, max_side)
        except Exception as exc:  # ingest checked it; a shard rewritten since can hold anything
            v.alive[i] = False
            v.reason[i] = exc.reason if isinstance(exc, _ImageProblem) else "image_unreadable"
            v.errors.append((int(i), "decode", f"{type(exc).__name__}: {exc}"[:500]))
    return images


class _ImageProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _decide_isolated(flt: PairFilter, sub: pa.Table, ims) -> tuple[list[FilterDecision], dict[int, str]]:
    """The filter's decisions on the batch; if it raises, per row, with failing rows set aside."""
    try:
        return flt.decide(sub, ims), {}
    except Exception:
        log.warning("filter %s raised on a batch of %d rows; retrying row by row", flt.name, sub.num_rows,
                    exc_info=True)
    failed: dict[int, str] = {}
    per_row: list[list[FilterDecision] | None] = []
    for j in range(sub.num_rows):
        try:
            per_row.append(flt.decide(sub.slice(j, 1), ims[j:j + 1] if ims is not None else None))
        except Exception as exc:
            uid = sub.column("uid")[j].as_py()
            log.error("filter %s failed on row %s: %s", flt.name, uid, exc, exc_info=True)
            failed[j] = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3)}"[:1000]
            per_row.append(None)
    template = next((d for d in per_row if d is not None), None)
    if template is None:
        return [], failed
    merged = []
    for k, rule in enumerate(template):
        keep = np.ones(sub.num_rows, dtype=bool)
        scores: dict[str, list] = {name: [None] * sub.num_rows for name in rule.scores}
        images: dict[int, bytes] = {}
        for j, ds in enumerate(per_row):
            if ds is None:
                continue
            keep[j] = bool(ds[k].keep[0])
            for name in scores:
                scores[name][j] = ds[k].scores[name][0]
            if 0 in ds[k].images:
                images[j] = ds[k].images[0]
        merged.append(FilterDecision(keep, rule.reason, scores, images))
    return merged, failed


def run_corpus(rows: pa.Table, chain: list[PairFilter], history: pa.Table) -> tuple[np.ndarray, list[str | None], dict[str, list]]:
    """Corpus filters in order over `rows` (survivors of the row filters, with their scores)."""
    n = rows.num_rows
    alive = np.ones(n, dtype=bool)
    reason: list[str | None] = [None] * n
    scores: dict[str, list] = {}
    for flt in chain:
        if not isinstance(flt, CorpusFilter):
            continue
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        v = RowVerdicts(alive, reason, scores, {}, [], {})
        for decision in flt.decide_corpus(rows.take(pa.array(idx)), history):
            _record(v, idx, decision)
    return alive, reason, scores
