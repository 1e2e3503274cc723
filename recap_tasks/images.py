"""Image checks at ingest, and reading images back from their source shards by pointer."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from recap_tasks import storage
from recap_tasks.readers.parquet import take_rows

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


def read_images(rows: pa.Table, lake=None, *, problems: dict[int, tuple[str, str]] | None = None) -> list[bytes | None]:
    """Image bytes for rows of the pairs table, in row order, opening each source shard once.

    Bytes read from a source are checked against the row's ingested `sha256` (when the rows carry
    it): a source rewritten since ingest gives None for that row, and `problems[i] =
    ("image_changed", detail)`. With `lake`, images the filter blurred faces in (recap_tasks.blur)
    come back blurred: rows then need `uid` and `shard_id` too.
    """
    out = _read_sources(rows)
    if "sha256" in rows.column_names:
        for i, (data, want) in enumerate(zip(out, rows.column("sha256").to_pylist())):
            if data is not None and want is not None and hashlib.sha256(data).hexdigest() != want:
                out[i] = None
                if problems is not None:
                    problems[i] = ("image_changed", f"source bytes hash to {hashlib.sha256(data).hexdigest()[:16]}..., "
                                                    f"ingested as {want[:16]}...: the shard changed since ingest")
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
    """Each row's image bytes from its source (local or s3://), each source file opened once: tar
    members by ranged reads, parquet images from the row groups holding the rows."""
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
        if fmt not in ("wds", "parquet"):
            raise ValueError(f"unknown source format {fmt!r} for {uri}")
        with storage.open_input(uri) as f:
            if fmt == "wds":
                for i, data in _ranges(f, [(i, offsets[i], sizes[i]) for i in idx]):
                    out[i] = data
            else:
                taken = take_rows(pq.ParquetFile(f), [src_rows[i] for i in idx], [img_cols[idx[0]]])
                for i, data in zip(idx, taken.column(0).to_pylist()):
                    out[i] = data
    return out  # type: ignore[return-value]


# Ranged reads of one file are merged across gaps of up to _GAP bytes, up to _SPAN bytes per read:
# on S3 one GET then serves a run of neighbouring images (a request costs ~10-50 ms; 1 MiB is that
# much transfer), and no read holds more than a bounded part of a shard.
_GAP = 1 << 20
_SPAN = 32 << 20


def _ranges(f, wanted: list[tuple[int, int, int]]) -> Iterator[tuple[int, bytes]]:
    """(row, bytes) for each (row, offset, size) of `wanted`, reading `f` in merged ranges."""
    run: list[tuple[int, int, int]] = []
    end = 0
    for item in sorted(wanted, key=lambda w: w[1]):
        _, offset, size = item
        if run and (offset - end > _GAP or offset + size - run[0][1] > _SPAN):
            yield from _read_run(f, run, end)
            run = []
        end = max(end, offset + size) if run else offset + size
        run.append(item)
    if run:
        yield from _read_run(f, run, end)


def _read_run(f, run: list[tuple[int, int, int]], end: int) -> Iterator[tuple[int, bytes]]:
    start = run[0][1]
    block = storage.read_exact(f, end - start, start, "an image's source shard")
    return ((i, block[offset - start:offset - start + size]) for i, offset, size in run)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, 5-8 = rotated by 90 degrees)."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not worth rejecting an image for
        return 1


def upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (camera photos store it)."""
    if orientation(im) == 1:
        return im
    return ImageOps.exif_transpose(im)


def open_rgb(data: bytes) -> Image.Image:
    """Decode to upright RGB; animated formats (GIF, WebP) give their first frame."""
    return upright(Image.open(io.BytesIO(data))).convert("RGB")


EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def upright_bytes(data: bytes) -> tuple[bytes, str]:
    """(bytes, file extension) as shipped to a training loader: re-encoded upright only when the
    EXIF orientation says the pixels are stored rotated, otherwise unchanged."""
    im = Image.open(io.BytesIO(data))
    fmt = im.format or "JPEG"
    if orientation(im) == 1:
        return data, EXTENSIONS.get(fmt, fmt.lower())
    out = io.BytesIO()
    fmt = fmt if fmt in ("JPEG", "PNG", "WEBP") else "PNG"
    rgb = upright(im).convert("RGB") if fmt == "JPEG" else upright(im)
    rgb.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue(), EXTENSIONS[fmt]
