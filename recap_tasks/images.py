"""Image checks at ingest, and reading images back from their source shards by pointer."""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# We enforce our own pixel limit before decoding; PIL's global guard would only warn below 2x.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def inspect_image(data: bytes | None, *, max_pixels: int) -> ImageInfo:
    """Check that the bytes are a whole, decodable image of sane size; raise ImageRejected if not."""
    if data is None:
        raise ImageRejected("missing_image", "no image in the sample")
    if len(data) == 0:
        raise ImageRejected("empty_image", "image has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            fmt = im.format or "unknown"
            if width <= 0 or height <= 0:
                raise ImageRejected("image_decode_error", f"image reports size {width}x{height}")
            if width * height > max_pixels:
                raise ImageRejected(
                    "image_too_many_pixels",
                    f"{width}x{height} = {width * height} pixels > {max_pixels} (decompression bomb guard)",
                )
            if fmt == "JPEG":
                # Decoding at 1/8 scale still walks the whole entropy-coded stream, so truncation
                # is caught at a fraction of the cost of a full decode.
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            im.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("image_too_many_pixels", str(exc)) from None
    except OSError as exc:
        text = str(exc)
        reason = "image_truncated" if "truncated" in text or "broken data stream" in text else "image_decode_error"
        raise ImageRejected(reason, text[:300]) from None
    except Exception as exc:  # PIL raises a zoo of types on hostile input (SyntaxError, ValueError...)
        raise ImageRejected("image_decode_error", f"{type(exc).__name__}: {exc}"[:300]) from None
    return ImageInfo(width, height, fmt)


def read_images(rows: pa.Table, lake=None) -> list[bytes]:
    """Image bytes for rows of the pairs table, in row order, opening each source shard once.

    With `lake`, images the filter blurred faces in (recap_tasks.blur) come back blurred: rows
    then need `uid` and `shard_id` too.
    """
    out = _read_sources(rows)
    if lake is not None and rows.num_rows:
        from recap_tasks.blur import blurred_images

        shard_ids = rows.column("shard_id").to_pylist()
        by_shard = {s: blurred_images(lake, s) for s in set(shard_ids)}
        for i, (uid, shard_id) in enumerate(zip(rows.column("uid").to_pylist(), shard_ids)):
            blurred = by_shard[shard_id].get(uid)
            if blurred is not None:
                out[i] = blurred
    return out


def _read_sources(rows: pa.Table) -> list[bytes]:
    out: list[bytes | None] = [None] * rows.num_rows
    by_source: dict[tuple[str, str], list[int]] = defaultdict(list)
    uris = rows.column("source_uri").to_pylist()
    fmts = rows.column("source_format").to_pylist()
    for i, (uri, fmt) in enumerate(zip(uris, fmts)):
        by_source[(uri, fmt)].append(i)
    offsets = rows.column("image_offset").to_pylist()
    sizes = rows.column("image_size").to_pylist()
    src_rows = rows.column("source_row").to_pylist()
    img_cols = rows.column("image_column").to_pylist()
    for (uri, fmt), idx in by_source.items():
        if fmt == "wds":
            with open(uri, "rb") as f:
                for i in sorted(idx, key=lambda j: offsets[j]):
                    f.seek(offsets[i])
                    out[i] = f.read(sizes[i])
        elif fmt == "parquet":
            column = pq.read_table(uri, columns=[img_cols[idx[0]]]).column(0)
            taken = column.take(pa.array([src_rows[i] for i in idx])).to_pylist()
            for i, data in zip(idx, taken):
                out[i] = data
        else:
            raise ValueError(f"unknown source format {fmt!r} for {uri}")
    return out  # type: ignore[return-value]


def open_rgb(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    return im.convert("RGB")
