"""Sorted runs beside the dedup index: lookups whose cost per probe does not grow with the index.

A Parquet file is read through its footer, and the footer holds the statistics of every row group:
with probes spread over the key space, a lookup parsed the footer of every index file, a cost linear
in the index (~9 us per 2,048 entries; BENCHMARKS.md, dedup index). A run holds the entries of one
kind laid out for point lookups, as an LSM tree's sorted string table is (LevelDB, RocksDB): the keys
sorted in one flat int64 array, two levels of fence keys over them (every 256th key, and every
65,536th), and the payload columns (uid; sha256 and phash for sha entries) as fixed-width arrays in
the same order. A lookup reads the top fence once (8 bytes per 65,536 entries), then per probe a
2 KiB slice of the second fence and a 2 KiB slice of keys, and the payload of only the keys its
caller keeps (for band probes: those within the Hamming radius).

Runs are derived data; the Delta table stays the truth. `recap maintain` re-sorts the index, then
`build` streams each kind's files, in key order, into one run (files whose key ranges overlap go
to a second run), with a manifest naming the data files it covers and their row counts. A lookup
uses a run only when every file it covers is still in the table with that row count, and reads
the files no usable run covers as Parquet (files appended since the last maintain).

`_dedup_runs/<kind>/<id>.run` (and `<id>.json`, the manifest), little-endian:
  header   64 bytes: magic, version, rows n, uid width, sha256 width (0: no sha256 and phash)
  keys     n int64, sorted
  uid      n x uid width bytes (UTF-8, NUL-padded)
  sha256   n x sha256 width bytes (sha entries only)
  phash    n int64, then n validity bytes (sha entries only)
  fence2   ceil(n / 256) int64: keys[::256]
  fence1   ceil(n / 65536) int64: keys[::65536]
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recap_tasks.lake import DEDUP_INDEX, Lake

log = logging.getLogger(__name__)

RUNS = "_dedup_runs"
FAN = 256  # keys per fence entry, at both levels
MAGIC = b"RECAPRUN"
VERSION = 2
_HEADER = struct.Struct("<8sIQII36x")
_GAP_BYTES = 4096  # rows this close together are read in one call
_COPY = 64 << 20  # bytes per copy when a run is assembled


@dataclass(frozen=True)
class _Layout:
    rows: int
    uid_width: int
    sha_width: int  # 0: a band run, without sha256 and phash

    @property
    def keys(self) -> int:
        return _HEADER.size

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

    @property
    def fence2(self) -> int:
        return self.phash_valid + self.rows if self.sha_width else self.sha256

    @property
    def fence2_len(self) -> int:
        return -(-self.rows // FAN)

    @property
    def fence1(self) -> int:
        return self.fence2 + 8 * self.fence2_len

    @property
    def fence1_len(self) -> int:
        return -(-self.rows // FAN**2)


class _Writer:
    """Assembles a run from chunks of entries given in key order, a section per local temp file, so
    memory holds one chunk whatever the run's size."""

    def __init__(self, tmp: Path, with_sha: bool):
        self.tmp, self.with_sha = tmp, with_sha
        self.names = ["keys", "uid", "sha256", "phash", "valid"] if with_sha else ["keys", "uid"]
        self.files = {name: open(tmp / name, "wb") for name in self.names}
        self.chunks: list[tuple[int, int, int]] = []  # rows, uid width, sha256 width of each chunk
        self.fence2: list[np.ndarray] = []
        self.fence1: list[np.ndarray] = []
        self.rows = 0
        self.last_key: int | None = None

    def add(self, entries: pa.Table) -> None:
        entries = entries.sort_by("key")
        keys = entries.column("key").to_numpy().astype("<i8")
        if not len(keys):
            return
        if self.last_key is not None and keys[0] < self.last_key:
            raise ValueError("chunks of a run must come in key order")
        self.last_key = int(keys[-1])
        self.fence2.append(keys[(-self.rows) % FAN::FAN])
        self.fence1.append(keys[(-self.rows) % FAN**2::FAN**2])
        uid = _fixed_width(entries.column("uid"))
        self.files["keys"].write(keys.tobytes())
        self.files["uid"].write(uid.tobytes())
        sha_width = 0
        if self.with_sha:
            sha = _fixed_width(entries.column("sha256"))
            sha_width = sha.shape[1]
            phash = entries.column("phash")
            self.files["sha256"].write(sha.tobytes())
            self.files["phash"].write(phash.fill_null(0).to_numpy().astype("<i8").tobytes())
            self.files["valid"].write(np.asarray(phash.is_valid().to_numpy(zero_copy_only=False), np.uint8).tobytes())
        self.chunks.append((len(keys), uid.shape[1], sha_width))
        self.rows += len(keys)

    def finish(self, out) -> None:
        """Write the run to the binary stream `out`."""
        for f in self.files.values():
            f.close()
        uid_width = max((c[1] for c in self.chunks), default=1)
        sha_width = max((c[2] for c in self.chunks), default=1) if self.with_sha else 0
        out.write(_HEADER.pack(MAGIC, VERSION, self.rows, uid_width, sha_width))
        for name in self.names:
            width = {"uid": uid_width, "sha256": sha_width}.get(name)
            with open(self.tmp / name, "rb") as f:
                if width is None:  # fixed widths already: copy
                    shutil.copyfileobj(f, out, _COPY)
                    continue
                for rows, *widths in self.chunks:  # pad each chunk to the run's width
                    have = widths[0] if name == "uid" else widths[1]
                    raw = np.frombuffer(f.read(rows * have), np.uint8).reshape(rows, have)
                    padded = np.zeros((rows, width), np.uint8)
                    padded[:, :have] = raw
                    out.write(padded.tobytes())
        for fence in (self.fence2, self.fence1):
            out.write(np.concatenate(fence or [np.zeros(0, "<i8")]).astype("<i8").tobytes())


def encode(entries: pa.Table, *, with_sha: bool) -> bytes:
    """A run of index entries (key, uid[, sha256, phash]) given in any order, in memory."""
    with tempfile.TemporaryDirectory(prefix="recap-run-") as tmp:
        writer = _Writer(Path(tmp), with_sha)
        writer.add(entries)
        out = pa.BufferOutputStream()
        writer.finish(out)
        return out.getvalue().to_pybytes()


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
        size, want = f.size(), self.layout.fence1 + 8 * self.layout.fence1_len
        if size != want:  # cut short (or grown): its sections are not where the header says
            raise ValueError(f"a run of {rows} rows is {want} bytes, this file is {size}")
        self.reads = 0

    def _gather(self, base: int, width: int, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (sorted, unique) of a fixed-width section as an (len(idx), width) uint8 array;
        rows close together are read in one call."""
        if len(idx) == 0:
            return np.zeros((0, width), dtype=np.uint8)
        cuts = np.flatnonzero(np.diff(idx) > max(1, _GAP_BYTES // width)) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [len(idx)])).tolist()
        out = []
        for a, b in zip(starts, ends):
            first, last = int(idx[a]), int(idx[b - 1])
            raw = self.f.read_at((last - first + 1) * width, base + first * width)
            self.reads += 1
            out.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)[idx[a:b] - first])
        return out[0] if len(out) == 1 else np.concatenate(out)

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


def usable(lake: Lake, kind: str, files: dict[str, int]) -> list[tuple[str, set[str]]]:
    """The runs of `kind` a lookup may use, each with the data files it covers. `files`: the kind's
    data files in the table now, path -> row count. A run is usable when every file its manifest
    names is among them with that row count (else it may miss or hold rows the table lost)."""
    out = []
    for rel in lake.list(f"{RUNS}/{kind}", ".json"):
        try:
            manifest = lake.read_json(rel) or {}
        except ValueError:
            continue
        names = manifest.get("files") or {}
        if manifest.get("version") == VERSION and names and all(files.get(p) == n for p, n in names.items()):
            out.append((rel.removesuffix(".json") + ".run", set(names)))
    return out


def lookup(lake: Lake, rel: str, los: np.ndarray, his: np.ndarray, columns: list[str],
           keep: Callable[[np.ndarray], np.ndarray] | None) -> pa.Table | None:
    """Entries of the run `rel` whose key lies in one of the sorted, disjoint ranges [los, his] (and
    `keep` accepts); None when the run cannot be read (the caller reads its files as Parquet)."""
    try:
        with lake.open_input(rel) as f:
            run = Run(f)
            rows, keys = run.find(los, his)
            if keep is not None and len(rows):
                mask = keep(keys)
                rows, keys = rows[mask], keys[mask]
            return pa.table({"key": pa.array(keys, pa.int64()), **run.columns(rows, columns)})
    except (FileNotFoundError, ValueError, IndexError, struct.error, OSError) as err:
        log.warning("ignoring unreadable dedup run %s: %s", rel, err)
        return None


def _chains(paths: list[str], lows: list[int], highs: list[int]) -> list[list[str]]:
    """The files in key order, split into chains whose key ranges do not overlap (one chain after
    `recap maintain` sorts the index; files appended since then start chains of their own)."""
    chains: list[list[str]] = []
    ends: list[int] = []
    for lo, hi, path in sorted(zip(lows, highs, paths)):
        for i, end in enumerate(ends):
            if lo > end:
                chains[i].append(path)
                ends[i] = hi
                break
        else:
            chains.append([path])
            ends.append(hi)
    return chains


def build(lake: Lake, sha_kind: str) -> dict:
    """One run per chain of each kind's files (see `_chains`), written when missing; runs whose files
    changed are deleted. `sha_kind`: the kind whose entries carry sha256 and phash. Returns how many
    runs were written and removed."""
    out = {"runs_written": 0, "runs_removed": 0}
    if not lake.exists(DEDUP_INDEX):
        return out
    actions = pa.table(lake.delta(DEDUP_INDEX).get_add_actions(flatten=True))
    want: dict[str, tuple[str, list[str]]] = {}
    for kind in sorted(set(actions.column("partition.kind").to_pylist())):
        mine = actions.filter(pa.compute.equal(actions.column("partition.kind"), kind))
        rows = dict(zip(mine.column("path").to_pylist(), mine.column("num_records").to_pylist()))
        for chain in _chains(mine.column("path").to_pylist(), mine.column("min.key").to_pylist(),
                             mine.column("max.key").to_pylist()):
            manifest = {"version": VERSION, "kind": kind, "files": {p: rows[p] for p in chain}}
            digest = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
            want[f"{RUNS}/{kind}/{digest}"] = (kind, chain, manifest)
    have = set()
    for rel in (rel for folder in lake.list_dirs(RUNS) for rel in lake.list(folder)):
        if rel.endswith((".run", ".json")):
            have.add(rel.rsplit(".", 1)[0])
        else:
            lake.remove(rel)  # left by a build that was killed
    for stem in sorted(have - set(want)):
        lake.remove(f"{stem}.json")  # the manifest first: a lookup never meets a run without its file
        lake.remove(f"{stem}.run")
        out["runs_removed"] += 1
    for stem in sorted(set(want) - {s for s in have if lake.read_json(f"{s}.json") is not None}):
        kind, chain, manifest = want[stem]
        with_sha = kind == sha_kind
        columns = ["key", "uid", "sha256", "phash"] if with_sha else ["key", "uid"]
        with tempfile.TemporaryDirectory(prefix="recap-run-") as tmp:
            writer = _Writer(Path(tmp), with_sha)
            for path in chain:
                with lake.open_table_file(DEDUP_INDEX, path) as f:
                    writer.add(pq.read_table(f, columns=columns))
            with lake.writer(f"{stem}.run") as f:
                writer.finish(f)
        lake.write_json(f"{stem}.json", manifest)  # written last: it is what makes the run usable
        out["runs_written"] += 1
    return out
