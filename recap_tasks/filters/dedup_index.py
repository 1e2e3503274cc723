"""The corpus-dedup index: look new images up against every image kept before, reading only the
index entries their keys fall on.

Each kept image has one entry of kind `sha` (key: the first 64 bits of its sha256) and, when its
pHash is known, one entry per pHash band (kind `b<bands>-<i>`, key: band i). Two hashes at most d
bits apart agree exactly on at least one of d+1 bands (pigeonhole), so near-duplicate candidates
are the entries sharing a band value with a new image; their full pHash is in the entry, and the
Hamming distance decides.

The Delta table is partitioned by kind; each file is sorted by key with small row groups. A lookup
prunes files by the key range in the Delta log, then row groups by their min/max statistics, and
reads only row groups that can hold one of its keys. `recap maintain` re-sorts the index (z-order
on key) so files and row groups cover narrow, disjoint key ranges.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recap_tasks import schemas
from recap_tasks.lake import DEDUP_INDEX, Lake

log = logging.getLogger(__name__)

SHA = "sha"
ROW_GROUP = 2048  # entries per row group: what one probe costs at most, per file
_BITS = 64
_MASK = (1 << 64) - 1


EMPTY_HISTORY = pa.table({"uid": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                          "phash": pa.array([], pa.int64())})


def band_kinds(max_distance: int) -> list[tuple[str, int, int]]:
    """(kind, shift, mask) of each pHash band for a Hamming radius of `max_distance` bits."""
    bands = max_distance + 1
    width = -(-_BITS // bands)
    return [(f"b{bands}-{b}", b * width, (1 << min(width, _BITS - b * width)) - 1) for b in range(bands)]


def sha_key(sha256: list[str | None]) -> np.ndarray:
    """First 64 bits of each hex sha256, as int64 (two's complement)."""
    return np.array([int(s[:16], 16) for s in sha256], dtype=np.uint64).view(np.int64)


def _band(phash: np.ndarray, shift: int, mask: int) -> np.ndarray:
    return ((phash.view(np.uint64) >> np.uint64(shift)) & np.uint64(mask)).view(np.int64)


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
        for kind, shift, mask in band_kinds(max_distance):
            parts.append(pa.table({"kind": pa.array([kind] * with_ph.num_rows, pa.string()),
                                   "key": pa.array(_band(hashes, shift, mask)),
                                   "phash": pa.array(hashes), "sha256": pa.nulls(with_ph.num_rows, pa.string()),
                                   "uid": with_ph.column("uid")}))
    if not parts:
        return schemas.DEDUP_INDEX.empty_table()
    return pa.concat_tables(parts).sort_by([("kind", "ascending"), ("key", "ascending")])


def add(lake: Lake, rows: pa.Table, max_distance: int) -> int:
    """Append the entries of newly kept rows (uid, sha256, phash); duplicates of entries are harmless."""
    from deltalake import WriterProperties

    table = entries(rows, max_distance)
    lake.append(DEDUP_INDEX, table, writer_properties=WriterProperties(max_row_group_size=ROW_GROUP))
    return table.num_rows


def add_kept(lake: Lake, verdicts: pa.Table, sha256_of: dict[str, str | None], max_distance: int) -> int:
    """Index the rows `verdicts` (uid, kept[, phash]) kept; `sha256_of` maps uid -> image sha256."""
    kept = verdicts.filter(pc.fill_null(verdicts.column("kept"), False))
    uids = kept.column("uid").to_pylist()
    phash = kept.column("phash") if "phash" in kept.column_names else pa.nulls(kept.num_rows, pa.int64())
    return add(lake, pa.table({"uid": pa.array(uids, pa.string()),
                               "sha256": pa.array([sha256_of.get(u) for u in uids], pa.string()),
                               "phash": phash.cast(pa.int64())}), max_distance)


def lookup(lake: Lake, kind: str, keys: np.ndarray, columns: list[str], *,
           keep=None) -> pa.Table:
    """Index entries of `kind` whose key is one of `keys`, reading only row groups that can hold them.

    Two passes: the key column (and `phash` for bands) of the row groups whose key range holds a
    probe, then `columns` only of the row groups with an entry `keep` accepts (an exact key match,
    or for bands a pHash within reach): most probes miss, so most bytes read are 8-byte keys.
    `keep(key, phash) -> bool mask` narrows the matches (default: all).
    """
    empty = schemas.DEDUP_INDEX.empty_table().select(["key", *columns])
    if len(keys) == 0 or not lake.exists(DEDUP_INDEX):
        return empty
    probes = np.unique(keys.astype(np.int64))
    dt = lake.delta(DEDUP_INDEX)
    lake.check_layout(DEDUP_INDEX, dt)
    actions = pa.table(dt.get_add_actions(flatten=True))
    actions = actions.filter(pc.equal(actions.column("partition.kind"), kind))
    if actions.num_rows == 0:
        return empty
    lows = actions.column("min.key").to_numpy(zero_copy_only=False)
    highs = actions.column("max.key").to_numpy(zero_copy_only=False)
    hits = np.searchsorted(probes, highs, "right") > np.searchsorted(probes, lows, "left")
    value_set = pa.array(probes)
    first = ["key", "phash"] if kind != SHA else ["key"]
    out = []
    for path in actions.column("path").filter(pa.array(hits)).to_pylist():
        with lake.fs.open_input_file(f"{lake._fs_root}/{DEDUP_INDEX}/{path}") as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            idx = meta.schema.to_arrow_schema().get_field_index("key")
            groups = _candidate_groups(meta, idx, probes)
            if not groups:
                continue
            # Pass 1: keys (and pHashes) of every candidate row group, in one read.
            part = pf.read_row_groups(groups, columns=first, use_threads=False)
            hit_rows = np.flatnonzero(pc.is_in(part.column("key"), value_set=value_set).to_numpy(zero_copy_only=False))
            if keep is not None and len(hit_rows):
                keys = part.column("key").to_numpy()[hit_rows]
                hashes = part.column("phash").to_numpy(zero_copy_only=False)[hit_rows]
                hit_rows = hit_rows[keep(keys, hashes)]
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
    return pa.concat_tables(out) if out else empty


def _candidate_groups(meta: pq.FileMetaData, column: int, probes: np.ndarray) -> list[int]:
    """Row groups whose [min, max] of the key column holds one of the sorted `probes`."""
    n = meta.num_row_groups
    lows = np.empty(n, dtype=np.int64)
    highs = np.empty(n, dtype=np.int64)
    unknown = np.zeros(n, dtype=bool)
    for g in range(n):
        stats = meta.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            unknown[g] = True
        else:
            lows[g], highs[g] = stats.min, stats.max
    hit = np.searchsorted(probes, highs, "right") > np.searchsorted(probes, lows, "left")
    return np.flatnonzero(hit | unknown).tolist()


def history(lake: Lake, rows: pa.Table, max_distance: int) -> pa.Table:
    """Earlier kept images that `rows` (uid, sha256, phash) may duplicate: same sha256, or a pHash
    within `max_distance` bits. Returns uid, sha256, phash, sorted by uid; never one of `rows`."""
    found = []
    shas = [s for s in rows.column("sha256").to_pylist() if s is not None]
    if shas:
        hit = lookup(lake, SHA, sha_key(shas), ["uid", "sha256", "phash"])
        # 64 bits of sha256 match: confirm on the whole digest.
        hit = hit.filter(pc.is_in(hit.column("sha256"), value_set=pa.array(shas, pa.string())))
        found.append(hit.select(["uid", "sha256", "phash"]))
    ph = rows.column("phash")
    hashes = ph.filter(pc.is_valid(ph)).to_numpy().astype(np.int64) if ph.null_count < len(ph) else np.zeros(0, np.int64)
    if len(hashes):
        for kind, shift, mask in band_kinds(max_distance):
            bands = _band(hashes, shift, mask)

            def close(keys, phashes, bands=bands):
                return _within(keys, phashes.astype(np.int64), bands, hashes, max_distance)

            cand = lookup(lake, kind, bands, ["uid", "phash"], keep=close)
            if cand.num_rows == 0:
                continue
            found.append(pa.table({"uid": cand.column("uid"), "sha256": pa.nulls(cand.num_rows, pa.string()),
                                   "phash": cand.column("phash")}))
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
