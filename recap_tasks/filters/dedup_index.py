"""The corpus-dedup index: look new images up against every image kept before, reading only the
index entries their keys fall on.

Each kept image has one entry of kind `sha` (key: the first 64 bits of its sha256) and, when its
pHash is known, one entry per pHash band (kind `p<bands>-<i>`). Two hashes at most d bits apart
agree exactly on at least one of d+1 bands (pigeonhole), so near-duplicate candidates are the
entries sharing a band value with a new image. A band entry's key is the whole pHash rotated so
that its band comes first: sorted by key, the entries of one band value are one contiguous key
range, and the key alone gives back the pHash for the Hamming check (one 8-byte column to read).

The Delta table is partitioned by kind and is the truth. `recap maintain` re-sorts it (z-order on
key) and streams each kind's files into a sorted run beside it (dedup_runs): the keys, two levels of
fence keys and fixed-width payload, read by byte ranges, so a probe costs a few small reads whatever
the index holds. Files without a run (appended since the last maintain) are read as Parquet: files pruned by
the key range in the Delta log, row groups by their min/max statistics (bisected in a sorted file),
and only row groups that can hold a probe's key are read; that path parses each touched file's
footer, a cost linear in those files' row groups.

With the default radius (2: three bands of 21-22 bits) a probe's band range holds ~N/2M entries:
about one 2 KiB key slice read per probe and band up to ~4B images (BENCHMARKS.md, dedup index).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recap_tasks import schemas
from recap_tasks.errors import RecapError
from recap_tasks.filters import dedup_runs
from recap_tasks.filters.dedup_runs import in_ranges as _in_ranges
from recap_tasks.lake import DEDUP_INDEX, Lake

log = logging.getLogger(__name__)

SHA = "sha"
ROW_GROUP = 2048  # entries per row group: what one probe reads at most (16 KiB of keys), per file
_BITS = 64
_U64 = np.uint64


EMPTY_HISTORY = pa.table({"uid": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                          "phash": pa.array([], pa.int64())})


def band_kinds(max_distance: int) -> list[tuple[str, int, int]]:
    """(kind, shift, width) of each pHash band for a Hamming radius of `max_distance` bits."""
    bands = max_distance + 1
    width = -(-_BITS // bands)
    return [(f"p{bands}-{b}", b * width, min(width, _BITS - b * width)) for b in range(bands)]


def sha_key(sha256: list[str | None]) -> np.ndarray:
    """First 64 bits of each hex sha256, as int64 (two's complement)."""
    return np.array([int(s[:16], 16) for s in sha256], dtype=np.uint64).view(np.int64)


def _rotr(x: np.ndarray, k: int) -> np.ndarray:
    k %= _BITS
    u = x.view(_U64)
    return u.copy().view(np.int64) if k == 0 else ((u >> _U64(k)) | (u << _U64(_BITS - k))).view(np.int64)


def band_key(phash: np.ndarray, shift: int, width: int) -> np.ndarray:
    """The pHash rotated so that bits [shift, shift + width) become its top bits (the sort key)."""
    return _rotr(phash, shift + width)


def key_phash(key: np.ndarray, shift: int, width: int) -> np.ndarray:
    """The pHash a band key was made from."""
    return _rotr(key, _BITS - (shift + width) % _BITS)


def _band_value(key: np.ndarray, width: int) -> np.ndarray:
    return (key.view(_U64) >> _U64(_BITS - width)).view(np.int64)


def _band_range(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The [low, high] key range (int64) of each band value: one contiguous range in signed order,
    since every key of a range has the same top bit."""
    low = values.view(_U64) << _U64(_BITS - width)
    high = low | _U64((1 << (_BITS - width)) - 1)
    return low.view(np.int64), high.view(np.int64)


def entries(rows: pa.Table, max_distance: int) -> pa.Table:
    """Index entries of `rows` (uid, sha256, phash), sorted by kind and key."""
    parts = []
    sha, ph = rows.column("sha256"), rows.column("phash")
    with_sha = rows.filter(pc.is_valid(sha))
    if with_sha.num_rows:
        parts.append(pa.table({"kind": pa.array([SHA] * with_sha.num_rows, pa.string()),
                               "key": pa.array(sha_key(with_sha.column("sha256").to_pylist())),
                               "phash": with_sha.column("phash").cast(pa.int64()),
                               "sha256": with_sha.column("sha256"), "uid": with_sha.column("uid")}))
    with_ph = rows.filter(pc.is_valid(ph))
    if with_ph.num_rows:
        hashes = with_ph.column("phash").to_numpy().astype(np.int64)
        n = with_ph.num_rows
        for kind, shift, width in band_kinds(max_distance):
            parts.append(pa.table({"kind": pa.array([kind] * n, pa.string()),
                                   "key": pa.array(band_key(hashes, shift, width)),
                                   "phash": pa.nulls(n, pa.int64()), "sha256": pa.nulls(n, pa.string()),
                                   "uid": with_ph.column("uid")}))
    if not parts:
        return schemas.DEDUP_INDEX.empty_table()
    return pa.concat_tables(parts).sort_by([("kind", "ascending"), ("key", "ascending")])


def add(lake: Lake, rows: pa.Table, max_distance: int, *, replace: bool = False) -> int:
    """Append the entries of newly kept rows (uid, sha256, phash); duplicates of entries are harmless.

    `replace`: write a new index with these entries instead (a rebuild)."""
    from deltalake import WriterProperties

    table = entries(rows, max_distance)
    props = WriterProperties(max_row_group_size=ROW_GROUP)
    if replace:
        lake.write_delta(DEDUP_INDEX, table, mode="overwrite", schema_mode="overwrite",
                         partition_by=list(schemas.DEDUP_INDEX.partition_by), writer_properties=props)
    else:
        lake.append(DEDUP_INDEX, table, writer_properties=props)
    return table.num_rows


def add_kept(lake: Lake, verdicts: pa.Table, sha256_of: dict[str, str | None], max_distance: int, *,
             replace: bool = False) -> int:
    """Index the rows `verdicts` (uid, kept[, phash]) kept; `sha256_of` maps uid -> image sha256."""
    kept = verdicts.filter(pc.fill_null(verdicts.column("kept"), False))
    uids = kept.column("uid").to_pylist()
    phash = kept.column("phash") if "phash" in kept.column_names else pa.nulls(kept.num_rows, pa.int64())
    return add(lake, pa.table({"uid": pa.array(uids, pa.string()),
                               "sha256": pa.array([sha256_of.get(u) for u in uids], pa.string()),
                               "phash": phash.cast(pa.int64())}), max_distance, replace=replace)


def kinds(lake: Lake) -> set[str]:
    """The entry kinds the index holds (its partitions)."""
    if not lake.exists(DEDUP_INDEX):
        return set()
    actions = pa.table(lake.delta(DEDUP_INDEX).get_add_actions(flatten=True))
    return set(pc.unique(actions.column("partition.kind")).to_pylist()) if actions.num_rows else set()


def check_kinds(lake: Lake, max_distance: int) -> None:
    """Refuse an index written for another pHash radius or by an older Recap (lookups would miss)."""
    have = kinds(lake) - {SHA}
    want = {kind for kind, _, _ in band_kinds(max_distance)}
    if have and have != want:
        raise RecapError(f"the dedup index {lake.path(DEDUP_INDEX)} holds pHash bands {sorted(have)}, but "
                         f"filter.max_phash_distance={max_distance} needs {sorted(want)}: rebuild it with "
                         f"`recap maintain --migrate --lake {lake.uri}` (or set max_phash_distance back)")


def lookup(lake: Lake, kind: str, lows: np.ndarray, highs: np.ndarray, columns: list[str], *,
           keep=None) -> pa.Table:
    """Index entries of `kind` whose key lies in one of the ranges [lows[i], highs[i]], through the
    kind's sorted runs (dedup_runs) and, for files no run covers, reading only the Parquet row
    groups that can hold them.

    Parquet in two passes: the key column of the row groups whose key range meets a probe's, then `columns`
    only of the row groups with an entry `keep(keys) -> bool mask` accepts (default: every key in
    a range): most probes miss, so most bytes read are 8-byte keys. Ranges are equal or disjoint.
    """
    empty = schemas.DEDUP_INDEX.empty_table().select(["key", *columns])
    if len(lows) == 0 or not lake.exists(DEDUP_INDEX):
        return empty
    ranges = np.unique(np.stack([lows.astype(np.int64), highs.astype(np.int64)], axis=1), axis=0)
    los, his = ranges[:, 0], ranges[:, 1]
    dt = lake.delta(DEDUP_INDEX)
    lake.check_layout(DEDUP_INDEX, dt)
    actions = pa.table(dt.get_add_actions(flatten=True))
    actions = actions.filter(pc.equal(actions.column("partition.kind"), kind))
    if actions.num_rows == 0:
        return empty
    # The kind's sorted runs first (a few small reads per probe); Parquet only for the files no
    # usable run covers (appended since the last maintain).
    out = []
    covered: set[str] = set()
    files = dict(zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist()))
    for rel, paths in dedup_runs.usable(lake, kind, files):
        found = dedup_runs.lookup(lake, rel, los, his, columns, keep)
        if found is not None:
            covered |= paths
            if found.num_rows:
                out.append(found.select(["key", *columns]))
    if covered:
        actions = actions.filter(pc.invert(pc.is_in(actions.column("path"), value_set=pa.array(sorted(covered)))))
    file_lo = actions.column("min.key").to_numpy(zero_copy_only=False)
    file_hi = actions.column("max.key").to_numpy(zero_copy_only=False)
    hits = _meets(los, his, file_lo, file_hi)
    for path, lo, hi in zip(actions.column("path").filter(pa.array(hits)).to_pylist(), file_lo[hits], file_hi[hits]):
        # Only the probes this file's key range can hold (sorted files split the key space between them).
        mine = (his >= lo) & (los <= hi)
        f_los, f_his = los[mine], his[mine]
        with lake.open_table_file(DEDUP_INDEX, path) as f:
            # pre_buffer off: it coalesces reads into large ranges, 4x slower for scattered small row groups.
            pf = pq.ParquetFile(f, pre_buffer=False)
            meta = pf.metadata
            groups = _candidate_groups(meta, meta.schema.to_arrow_schema().get_field_index("key"), f_los, f_his)
            if not groups:
                continue
            # Pass 1: the keys of every candidate row group, in one read.
            keys = pf.read_row_groups(groups, columns=["key"], use_threads=False).column("key").to_numpy()
            hit_rows = _in_ranges(keys, f_los, f_his)
            if keep is not None and len(hit_rows):
                hit_rows = hit_rows[keep(keys[hit_rows])]
            if len(hit_rows) == 0:
                continue
            # Pass 2: the other columns, only of the row groups holding a match.
            sizes = np.array([meta.row_group(g).num_rows for g in groups])
            owner = np.searchsorted(np.cumsum(sizes), hit_rows, "right")
            matched = sorted(set(owner.tolist()))
            full = pf.read_row_groups([groups[i] for i in matched], columns=["key", *columns], use_threads=False)
            starts = np.concatenate(([0], np.cumsum(sizes)))
            local = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in matched])
            out.append(full.filter(pa.array(np.isin(local, hit_rows))))
    return pa.concat_tables([t.cast(empty.schema) for t in out]) if out else empty


def build_runs(lake: Lake) -> dict:
    """Sorted runs for the index files that have none (`recap maintain`; see dedup_runs)."""
    return dedup_runs.build(lake, SHA)


def _meets(los: np.ndarray, his: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """Which [lows[j], highs[j]] intervals meet one of the sorted, disjoint ranges [los, his]."""
    at = np.searchsorted(los, highs, "right") - 1  # the last range starting at or before the high end
    return (at >= 0) & (his[np.maximum(at, 0)] >= lows)


def _candidate_groups(meta: pq.FileMetaData, column: int, los: np.ndarray, his: np.ndarray) -> list[int]:
    """Row groups whose [min, max] of the key column meets one of the probe ranges.

    Index files are sorted by key (written sorted, re-sorted by `recap maintain`), so each probe's
    groups are found by bisecting the row groups' statistics: O(probes x log(row groups)) statistics
    read instead of all of them (a file's footer holds ~N / 2,048 row groups). A file whose
    statistics turn out not to be in order, or a probe set large enough that reading every
    group's statistics is cheaper, takes the scan over all of them.
    """
    n = meta.num_row_groups
    if n == 0:
        return []
    if len(los) * 2 * n.bit_length() >= n:
        return _scan_groups(meta, column, los, his)
    cache: dict[int, tuple[int, int] | None] = {}

    def stats(g: int):
        if g not in cache:
            cache[g] = _group_range(meta, column, g)
        return cache[g]

    out: list[int] = []
    for lo, hi in zip(los.tolist(), his.tolist()):
        a, b = 0, n
        while a < b:  # the first group whose max reaches lo
            m = (a + b) // 2
            st = stats(m)
            if st is None:
                return _scan_groups(meta, column, los, his)
            a, b = (m + 1, b) if st[1] < lo else (a, m)
        g = a
        while g < n:
            st = stats(g)
            if st is None:
                return _scan_groups(meta, column, los, his)
            if st[0] > hi:
                break
            out.append(g)
            g += 1
    seen = sorted(cache.items())
    if any(p[1] is None or q[1] is None or p[1][1] > q[1][0] for p, q in zip(seen, seen[1:])):
        return _scan_groups(meta, column, los, his)  # not sorted: bisecting could miss groups
    return sorted(set(out))


def _scan_groups(meta: pq.FileMetaData, column: int, los: np.ndarray, his: np.ndarray) -> list[int]:
    """`_candidate_groups` by reading every row group's statistics."""
    n = meta.num_row_groups
    lows = np.empty(n, dtype=np.int64)
    highs = np.empty(n, dtype=np.int64)
    unknown = np.zeros(n, dtype=bool)
    for g in range(n):
        found = _group_range(meta, column, g)
        if found is None:
            unknown[g] = True
        else:
            lows[g], highs[g] = found
    return np.flatnonzero(_meets(los, his, lows, highs) | unknown).tolist()


def _group_range(meta: pq.FileMetaData, column: int, g: int) -> tuple[int, int] | None:
    """Row group `g`'s [min, max] of the key column, or None without statistics."""
    stats = meta.row_group(g).column(column).statistics
    return (stats.min, stats.max) if stats is not None and stats.has_min_max else None


def history(lake: Lake, rows: pa.Table, max_distance: int) -> pa.Table:
    """Earlier kept images that `rows` (uid, sha256, phash) may duplicate: same sha256, or a pHash
    within `max_distance` bits. Returns uid, sha256, phash, sorted by uid; never one of `rows`."""
    found = []
    shas = [s for s in rows.column("sha256").to_pylist() if s is not None]
    if shas:
        keys = sha_key(shas)
        hit = lookup(lake, SHA, keys, keys, ["uid", "sha256", "phash"])
        # 64 bits of sha256 match: confirm on the whole digest.
        hit = hit.filter(pc.is_in(hit.column("sha256"), value_set=pa.array(shas, pa.string())))
        found.append(hit.select(["uid", "sha256", "phash"]))
    ph = rows.column("phash")
    hashes = ph.filter(pc.is_valid(ph)).to_numpy().astype(np.int64) if ph.null_count < len(ph) else np.zeros(0, np.int64)
    if len(hashes):
        check_kinds(lake, max_distance)
        for kind, shift, width in band_kinds(max_distance):
            probe_bands = _band_value(band_key(hashes, shift, width), width)
            lows, highs = _band_range(probe_bands, width)

            def close(keys, shift=shift, width=width, probe_bands=probe_bands):
                return _within(_band_value(keys, width), key_phash(keys, shift, width), probe_bands, hashes,
                               max_distance)

            cand = lookup(lake, kind, lows, highs, ["uid"], keep=close)
            if cand.num_rows == 0:
                continue
            phashes = key_phash(cand.column("key").to_numpy(), shift, width)
            found.append(pa.table({"uid": cand.column("uid"), "sha256": pa.nulls(cand.num_rows, pa.string()),
                                   "phash": pa.array(phashes)}))
    if not found:
        return EMPTY_HISTORY
    table = pa.concat_tables([t.cast(EMPTY_HISTORY.schema) for t in found])
    table = table.filter(pc.invert(pc.is_in(table.column("uid"), value_set=rows.column("uid").combine_chunks())))
    # One row per uid, keeping the sha256 where a sha entry found it.
    table = table.sort_by([("uid", "ascending"), ("sha256", "ascending")])
    uids = table.column("uid").to_numpy(zero_copy_only=False)
    first = np.ones(len(uids), dtype=bool)
    first[1:] = uids[1:] != uids[:-1]
    return table.filter(pa.array(first))


def _within(cand_keys: np.ndarray, cand_hashes: np.ndarray, probe_keys: np.ndarray, probe_hashes: np.ndarray,
            max_distance: int) -> np.ndarray:
    """For each candidate: is its pHash within `max_distance` bits of a probe sharing its band value?"""
    order = np.argsort(probe_keys, kind="stable")
    keys, hashes = probe_keys[order], probe_hashes[order]
    lo = np.searchsorted(keys, cand_keys, "left")
    hi = np.searchsorted(keys, cand_keys, "right")
    counts = hi - lo
    owner = np.repeat(np.arange(len(cand_keys)), counts)
    # Index of each (candidate, probe) pair's probe: lo of its candidate plus its rank in the run.
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    probe = starts + np.arange(counts.sum())
    dist = np.bitwise_count((cand_hashes[owner] ^ hashes[probe]).view(np.uint64))
    close = np.zeros(len(cand_keys), dtype=bool)
    np.logical_or.at(close, owner[dist <= max_distance], True)
    return close
