"""Parquet sources: one row per sample, with an image-bytes column and a caption column."""

from __future__ import annotations

import bisect
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from recap_tasks import storage
from recap_tasks.errors import RecapError
from recap_tasks.readers import RawSample, ShardReport

IMAGE_CANDIDATES = ("image_bytes", "jpg", "image", "img", "bytes")
CAPTION_CANDIDATES = ("caption", "alt_text", "txt", "text", "TEXT")
KEY_CANDIDATES = ("key", "id", "uid")
URL_CANDIDATES = ("url", "URL", "image_url")


def pick_column(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str,
                required: bool, *, section: str = "ingest") -> str | None:
    """The column holding `what`: `wanted` when set (must exist), else the first of `candidates`
    present; RecapError naming the `section.<what>_column` setting when a required one is missing."""
    if wanted is not None:
        if wanted not in names:
            raise RecapError(f"{path}: no column {wanted!r} for the {what} (columns: {names})")
        return wanted
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise RecapError(
            f"{path}: cannot tell which column holds the {what} (tried {list(candidates)}; columns: {names}); "
            f"set {section}.{what}_column in the config or pass --{what}-column"
        )
    return found


def metadata_columns(schema: pa.Schema, image_column: str) -> list[str]:
    """A sample's metadata in a parquet source: every column but the image bytes (and other binary
    columns), as img2dataset's save_additional_columns copies them into a tar sample's .json."""
    return [f.name for f in schema if f.name != image_column and not (
        pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_binary_view(f.type))]


class ParquetReader:
    """Reads samples from one parquet file, a record batch at a time."""

    def __init__(self, *, image_column: str | None, caption_column: str | None, key_column: str | None,
                 url_column: str | None, max_image_bytes: int, batch_size: int = 256):
        self.columns = (image_column, caption_column, key_column, url_column)
        self.max_image_bytes = max_image_bytes
        self.batch_size = batch_size
        self.report = ShardReport()
        self.image_column: str | None = None

    def read(self, path: str) -> Iterator[RawSample]:
        """The samples of the parquet file at `path` (a local path or s3:// URI: ranged reads per row group)."""
        self.report = ShardReport()
        pf = pq.ParquetFile(storage.open_input(path))  # the file closes with `pf`
        names = pf.schema_arrow.names
        image_col = pick_column(names, self.columns[0], IMAGE_CANDIDATES, "image", path, True)
        caption_col = pick_column(names, self.columns[1], CAPTION_CANDIDATES, "caption", path, True)
        key_col = pick_column(names, self.columns[2], KEY_CANDIDATES, "key", path, False)
        url_col = pick_column(names, self.columns[3], URL_CANDIDATES, "url", path, False)
        if not (pa.types.is_binary(pf.schema_arrow.field(image_col).type)
                or pa.types.is_large_binary(pf.schema_arrow.field(image_col).type)):
            raise RecapError(f"{path}: column {image_col!r} is {pf.schema_arrow.field(image_col).type}, not image bytes")
        self.image_column = image_col
        meta_cols = metadata_columns(pf.schema_arrow, image_col)
        wanted = list(dict.fromkeys([c for c in (image_col, caption_col, key_col, url_col) if c] + meta_cols))
        row = 0
        seen: dict[str, int] = {}
        for batch in pf.iter_batches(batch_size=self.batch_size, columns=wanted):
            cols = {name: batch.column(name).to_pylist() for name in wanted}
            for i in range(batch.num_rows):
                key = cols[key_col][i] if key_col else None
                image = cols[image_col][i]
                caption = cols[caption_col][i]
                url = cols[url_col][i] if url_col else None
                sample = RawSample(
                    key=str(key) if key is not None else f"{row:09d}",
                    image=image if image is None or len(image) <= self.max_image_bytes else None,
                    image_ext="bytes",
                    image_size=len(image) if image is not None else None,
                    source_row=row,
                    caption=caption,
                    url=url if isinstance(url, str) else None,
                    meta={name: cols[name][i] for name in meta_cols},
                )
                if isinstance(caption, bytes):  # a binary caption column: decoded (strictly) by ingest
                    sample.caption = caption
                elif caption is not None and not isinstance(caption, str):  # int, list...: not alt text
                    sample.caption = None
                    sample.error, sample.detail = "caption_not_text", \
                        f"column {caption_col!r} holds {type(caption).__name__}, not text"
                sample.occurrence = seen.get(sample.key, 0)
                seen[sample.key] = sample.occurrence + 1
                if sample.occurrence and not sample.error:
                    sample.error, sample.detail = "duplicate_key", \
                        f"key {sample.key!r} appears {sample.occurrence + 1} times in the file"
                yield sample
                row += 1


def take_rows(pf: pq.ParquetFile, rows: Sequence[int], columns: list[str] | None = None) -> pa.Table:
    """Rows `rows` of a parquet file (row numbers in the file, in that order), read from only the row
    groups that hold them: a few rows of a remote file cost their row groups, not the whole file."""
    starts = [0]
    for i in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
    if any(not 0 <= r < starts[-1] for r in rows):
        raise IndexError(f"rows {sorted(r for r in rows if not 0 <= r < starts[-1])[:3]} are not in a file of "
                         f"{starts[-1]} rows")
    group_of = [bisect.bisect_right(starts, r) - 1 for r in rows]
    first, n = {}, 0  # each group's first row in the table read
    for g in sorted(set(group_of)):
        first[g], n = n, n + starts[g + 1] - starts[g]
    table = pf.read_row_groups(sorted(first), columns=columns)
    return table.take(pa.array([first[g] + r - starts[g] for r, g in zip(rows, group_of)], pa.int64()))
