"""Sorted runs beside the dedup index: lookups whose cost per probe does not grow with the index.

A Parquet file is read through its footer, and the footer holds the statistics of every row group:
with probes spread over the key space, a lookup parsed the footer of every index file, a cost linear
in the index (~9 us per 2,048 entries; BENCHMARKS.md, dedup index). A run is a copy of one index
data file laid out for point lookups, as an LSM tree's sorted string table is (LevelDB, RocksDB):
the keys sorted in one flat int64 array, two levels of fence keys above them (every 256th key, and
every 65,536th), and the payload columns (uid; sha256 and phash for sha entries) as fixed-width
arrays in the same order. A probe reads the top fence (8 bytes per 65,536 entries, once per file and
lookup), a 2 KiB slice of the second fence, a 2 KiB slice of keys, and the payload of only the keys
its caller keeps (for band probes: those within the Hamming radius).

Runs are derived data; the Delta table stays the truth. `recap maintain` writes a run for each index
file that has none (after it re-sorts the index) and deletes the runs of files that left the table.
A lookup uses a file's run when the run holds as many rows as the Delta log says the file does, and
reads the Parquet file otherwise (files appended since the last maintain).

`_dedup_runs/<kind>/<data file name>.run`, little-endian:
  header   64 bytes: magic, version, rows n, uid width, sha256 width (0: no sha256 and phash)
  fence1   ceil(n / 65536) int64: keys[::65536]
  fence2   ceil(n / 256) int64: keys[::256]
  keys     n int64, sorted
  uid      n x uid width bytes (UTF-8, NUL-padded)
  sha256   n x sha256 width bytes (sha entries only)
  phash    n int64, then n validity bytes (sha entries only)
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recap_tasks.lake import DEDUP_INDEX, Lake

log = logging.getLogger(__name__)

RUNS = "_dedup_runs"
FAN = 256  # keys per fence entry, at both levels
MAGIC = b"RECAPRUN"
VERSION = 1
_HEADER = struct.Struct("<8sIQII36x")
_GAP_BYTES = 4096  # rows this close together are read in one call


def run_path(kind: str, data_path: str) -> str:
    """Where the run of the index data file `data_path` (as its add action names it) lives."""
    return f"{RUNS}/{kind}/{data_path.rsplit('/', 1)[-1]}.run"


@dataclass(frozen=True)
class _Layout:
    rows: int
    uid_width: int
    sha_width: int  # 0: a band run, without sha256 and phash

    @property
    def fence1_len(self) -> int:
        return -(-self.rows // FAN**2)

    @property
    def fence2_len(self) -> int:
        return -(-self.rows // FAN)

    @property
    def fence1(self) -> int:
        return _HEADER.size

    @property
    def fence2(self) -> int:
        return self.fence1 + 8 * self.fence1_len

    @property
    def keys(self) -> int:
        return self.fence2 + 8 * self.fence2_len

    @property
    def uid(self) -> int:
        return self.keys + 8 * self.rows

    @property
    def sha256(self) -> int:
        return self.uid + self.uid_width * self.rows

    @property
    def phash(self) -> int:
        return self.sha256 + self.sha_width * self.rows

    @property
    def phash_valid(self) -> int:
        return self.phash + 8 * self.rows


def encode(entries: pa.Table, *, with_sha: bool) -> bytes:
    """A run of index entries (key, uid[, sha256, phash]), in any order."""
    entries = entries.sort_by("key")
    keys = entries.column("key").to_numpy().astype("<i8")
    uid = _fixed_width(entries.column("uid"))
    parts = [keys[::FAN**2], keys[::FAN], keys, uid]
    sha_width = 0
    if with_sha:
        sha = _fixed_width(entries.column("sha256"))
        phash = entries.column("phash")
        sha_width = sha.shape[1]
        parts += [sha, phash.fill_null(0).to_numpy().astype("<i8"),
                  np.asarray(phash.is_valid().to_numpy(zero_copy_only=False), dtype=np.uint8)]
    head = _HEADER.pack(MAGIC, VERSION, len(keys), uid.shape[1], sha_width)
    return head + b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


def _fixed_width(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Strings as an (n, width) uint8 array, NUL-padded to the longest; nulls are refused."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError("a run cannot hold null strings")
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if n and offsets[-1] > offsets[0] else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max()) if n else 0, 1)
    out = np.zeros((n, width), dtype=np.uint8)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = data[offsets[0]:offsets[-1]]
    return out


def in_ranges(keys: np.ndarray, los: np.ndarray, his: np.ndarray) -> np.ndarray:
    """Positions of the `keys` that lie in one of the sorted, disjoint ranges [los, his]."""
    if len(keys) > 1 and np.all(keys[1:] >= keys[:-1]):  # a sorted file (as written and maintained)
        starts, ends = np.searchsorted(keys, los, "left"), np.searchsorted(keys, his, "right")
        hit = ends > starts
        if not hit.any():
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b) for a, b in zip(starts[hit], ends[hit])])
    at = np.searchsorted(los, keys, "right") - 1
    return np.flatnonzero((at >= 0) & (keys <= his[np.maximum(at, 0)]))


def _strings(raw: np.ndarray) -> list[str]:
    return [bytes(r).rstrip(b"\0").decode("utf-8", "surrogateescape") for r in raw]


class Run:
    """One run, read by ranges of rows (`read_at`): nothing is read that a lookup does not need."""

    def __init__(self, f: pa.NativeFile):
        magic, version, rows, uid_width, sha_width = _HEADER.unpack(f.read_at(_HEADER.size, 0))
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a dedup run of version {VERSION}")
        self.f = f
        self.layout = _Layout(rows, uid_width, sha_width)
        self.reads = 0

    def _gather(self, base: int, width: int, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (sorted, unique) of a fixed-width section as an (len(idx), width) uint8 array;
        rows close together are read in one call."""
        if len(idx) == 0:
            return np.zeros((0, width), dtype=np.uint8)
        cuts = np.flatnonzero(np.diff(idx) > max(1, _GAP_BYTES // width)) + 1
        out = []
        for part in np.split(idx, cuts):
            first, last = int(part[0]), int(part[-1])
            raw = self.f.read_at((last - first + 1) * width, base + first * width)
            self.reads += 1
            out.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)[part - first])
        return np.concatenate(out)

    def _ints(self, base: int, idx: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._gather(base, 8, idx)).view("<i8").ravel()

    def find(self, los: np.ndarray, his: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, keys) of the entries whose key lies in one of the sorted, disjoint ranges [los, his]."""
        lay = self.layout
        none = np.zeros(0, dtype=np.int64)
        if lay.rows == 0 or len(los) == 0:
            return none, none
        fence1 = self._ints(lay.fence1, np.arange(lay.fence1_len))
        # Each range's top-level blocks: from the last one starting below its low end (keys equal to
        # the low end may begin in it) to the last one starting at or below its high end.
        first = np.maximum(np.searchsorted(fence1, los, "left") - 1, 0)
        last = np.searchsorted(fence1, his, "right") - 1
        live = last >= 0  # a range below the first key holds nothing
        los, his, first, last = los[live], his[live], first[live], last[live]
        if len(los) == 0:
            return none, none
        blocks = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))
        f2_idx = (blocks[:, None] * FAN + np.arange(FAN)).ravel()
        f2_idx = f2_idx[f2_idx < lay.fence2_len]
        fence2 = self._ints(lay.fence2, f2_idx)
        # The same at the second level, within the blocks read (they hold each range's neighbours).
        # (No fence below a low end only happens in the first block: start at its first row.)
        sub_first = f2_idx[np.maximum(np.searchsorted(fence2, los, "left") - 1, 0)]
        sub_last = f2_idx[np.searchsorted(fence2, his, "right") - 1]
        subs = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(sub_first, sub_last)]))
        rows = (subs[:, None] * FAN + np.arange(FAN)).ravel()
        rows = rows[rows < lay.rows]
        keys = self._ints(lay.keys, rows)
        hit = in_ranges(keys, los, his)
        return rows[hit], keys[hit]

    def columns(self, rows: np.ndarray, names: list[str]) -> dict[str, pa.Array]:
        """The payload columns `names` (uid, sha256, phash) of `rows` (sorted, unique)."""
        lay = self.layout
        out = {}
        for name in names:
            if name == "uid":
                out[name] = pa.array(_strings(self._gather(lay.uid, lay.uid_width, rows)), pa.string())
            elif name == "sha256" and lay.sha_width:
                out[name] = pa.array(_strings(self._gather(lay.sha256, lay.sha_width, rows)), pa.string())
            elif name == "phash" and lay.sha_width:
                valid = self._gather(lay.phash_valid, 1, rows).ravel().astype(bool)
                out[name] = pa.array(self._ints(lay.phash, rows), pa.int64(), mask=~valid)
            elif name in ("sha256", "phash"):
                out[name] = pa.nulls(len(rows), pa.string() if name == "sha256" else pa.int64())
            else:
                raise ValueError(f"a run has no column {name!r}")
        return out


def lookup(lake: Lake, kind: str, data_path: str, rows_in_file: int, los: np.ndarray, his: np.ndarray,
           columns: list[str], keep: Callable[[np.ndarray], np.ndarray] | None, *, with_sha: bool) -> pa.Table | None:
    """Entries of one index file whose key lies in [los, his] (and `keep` accepts), read through the
    file's run; None when it has no usable run (the caller reads the Parquet file instead)."""
    try:
        f = lake.open_input(run_path(kind, data_path))
    except FileNotFoundError:
        return None
    with f:
        try:
            run = Run(f)
        except (ValueError, struct.error):
            log.warning("ignoring unreadable dedup run %s", run_path(kind, data_path))
            return None
        if run.layout.rows != rows_in_file or with_sha != bool(run.layout.sha_width):
            return None  # not this file's run (the log is the truth)
        rows, keys = run.find(los, his)
        if keep is not None and len(rows):
            mask = keep(keys)
            rows, keys = rows[mask], keys[mask]
        return pa.table({"key": pa.array(keys, pa.int64()), **run.columns(rows, columns)})


def build(lake: Lake, sha_kind: str) -> dict:
    """Write a run for every index file that has none; delete the runs of files no longer in the
    index (`sha_kind`: the kind whose entries carry sha256 and phash). Returns how many runs were
    written and removed."""
    out = {"runs_written": 0, "runs_removed": 0}
    if not lake.exists(DEDUP_INDEX):
        return out
    actions = pa.table(lake.delta(DEDUP_INDEX).get_add_actions(flatten=True))
    want = {run_path(kind, path): (kind, path) for kind, path in
            zip(actions.column("partition.kind").to_pylist(), actions.column("path").to_pylist())}
    have = {rel for folder in lake.list_dirs(RUNS) for rel in lake.list(folder, ".run")}
    for rel in sorted(have - set(want)):
        lake.remove(rel)
        out["runs_removed"] += 1
    for rel in sorted(set(want) - have):
        kind, path = want[rel]
        with_sha = kind == sha_kind
        with lake.open_table_file(DEDUP_INDEX, path) as f:
            entries = pq.read_table(f, columns=["key", "uid", "sha256", "phash"] if with_sha else ["key", "uid"])
        lake.write_bytes(rel, encode(entries, with_sha=with_sha))
        out["runs_written"] += 1
    return out
