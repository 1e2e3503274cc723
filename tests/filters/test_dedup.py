"""Duplicates: exact copies and resized copies dropped with the right survivor; boilerplate captions."""

from __future__ import annotations

import random

import pytest

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.filters.chain import decode
from recap_tasks.filters.dedup import hamming, near_pairs, normalise_caption, phash
from tests.filters.util import by_key, make_lake, photo

LOCAL = dict(chain="datacomp", executor="local")


def test_phash_matches_a_resized_copy_and_separates_different_photos():
    big = phash(decode(photo("astronaut"), 640).rgb)
    small = phash(decode(photo("astronaut", (256, 256), quality=70), 640).rgb)
    assert hamming(big, small) <= 2
    others = [phash(decode(photo(n), 640).rgb) for n in ("coffee", "chelsea", "rocket")]
    assert min(hamming(big, o) for o in others) > 16


def test_banding_finds_exactly_the_close_pairs():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) - (1 << 63) for _ in range(300)]
    for i in range(0, 60, 2):  # plant near copies 0..4 bits away
        h = hashes[i]
        for bit in rng.sample(range(64), i % 5):
            h ^= 1 << bit
        hashes[i + 1] = h - (1 << 64) if h >= 1 << 63 else h
    brute = {(i, j) for i in range(300) for j in range(i + 1, 300) if hamming(hashes[i], hashes[j]) <= 4}
    assert set(near_pairs(hashes, 4)) == brute and len(brute) >= 30


def test_duplicates_dropped_with_the_right_survivor(tmp_path):
    original = photo("astronaut")
    lake = make_lake(tmp_path, {"00000.tar": [
        ("000000001", "an astronaut holding her helmet in front of a flag", original),
        ("000000002", "astronaut portrait from the archive, same file", original),  # exact copy
        ("000000003", "small thumbnail of an astronaut portrait", photo("astronaut", (256, 256), quality=70)),
        ("000000004", "a cup of coffee on a saucer on a wooden table", photo("coffee")),
    ]})
    result = run_filter(lake, config=FilterConfig(**LOCAL))
    assert result.dropped == {"duplicate_image": 1, "near_duplicate_image": 1}
    v = by_key(lake, tables.FILTER_RESULTS)
    uid = {k: r["uid"] for k, r in v.items()}
    # Same bytes: the smaller uid survives; the resized copy loses to the larger original.
    survivor, copy = sorted(["000000001", "000000002"], key=lambda k: uid[k])
    assert v[survivor]["kept"] and v["000000004"]["kept"]
    assert (v[copy]["reason"], v[copy]["duplicate_of"], v[copy]["phash_distance"]) == \
        ("duplicate_image", uid[survivor], 0)
    assert v["000000003"]["reason"] == "near_duplicate_image"
    assert v["000000003"]["duplicate_of"] == uid[survivor] and v["000000003"]["phash_distance"] <= 2
    assert all(r["phash"] is not None for r in v.values())


def test_a_copy_arriving_later_loses_to_the_row_kept_before(tmp_path):
    lake = make_lake(tmp_path, {"00000.tar": [("000000001", "a small thumbnail of an astronaut portrait",
                                               photo("astronaut", (300, 300)))]})
    run_filter(lake, config=FilterConfig(**LOCAL))
    later = make_lake(tmp_path, {"00001.tar": [("000010001", "the astronaut portrait at full size",
                                                photo("astronaut"))]})
    assert later.uri == lake.uri
    result = run_filter(lake, config=FilterConfig(**LOCAL))
    assert result.dropped == {"near_duplicate_image": 1}  # larger, but the earlier row was already kept
    v = by_key(lake, tables.FILTER_RESULTS)
    assert v["000000001"]["kept"] and v["000010001"]["duplicate_of"] == v["000000001"]["uid"]


def test_normalised_caption_folds_case_punctuation_numbers_accents():
    assert normalise_caption("Product  Image 12!") == normalise_caption("product image #3") == "product image 0"
    assert normalise_caption("Café au lait") == normalise_caption("cafe AU LAIT")
    assert normalise_caption("a dog on a beach") != normalise_caption("a dog on the beach")


def test_boilerplate_caption_on_many_images_is_dropped(tmp_path):
    names = ["astronaut", "coffee", "chelsea", "rocket", "colorwheel"]
    rows = [(f"00000000{i}", f"Click here to enlarge image {i}!", photo(n)) for i, n in enumerate(names[:4])]
    rows.append(("000000009", "a colour wheel with every hue around the circle", photo("colorwheel")))
    lake = make_lake(tmp_path, {"00000.tar": rows})
    result = run_filter(lake, config=FilterConfig(**LOCAL, max_caption_repeats=3))
    assert result.dropped == {"caption_boilerplate": 4}
    v = by_key(lake, tables.FILTER_RESULTS)
    assert v["000000000"]["caption_repeats"] == 4 and v["000000009"]["caption_repeats"] == 1
    assert v["000000009"]["kept"]


def test_index_finds_near_duplicates_by_band_and_exact_copies_by_sha(tmp_path):
    """History lookups through the dedup index: within d bits (any band) found, beyond d not."""
    import pyarrow as pa

    from recap_tasks.filters import dedup_index
    from recap_tasks.lake import Lake

    lake = Lake(tmp_path / "lake")
    base = 0x0F0F_1234_5678_9ABC
    old = pa.table({"uid": ["old-near", "old-sha"], "sha256": ["a" * 64, "b" * 64],
                    "phash": pa.array([base, 0x7777_0000_0000_0001], pa.int64())})
    dedup_index.add(lake, old, 4)
    def flips(h: int, bits: list[int]) -> int:  # as a signed 64-bit value, the index's phash type
        v = h ^ sum(1 << b for b in bits)
        return v - (1 << 64) if v >= 1 << 63 else v

    new = pa.table({"uid": ["n3", "n6", "copy", "old-near"], "sha256": ["c" * 64, "d" * 64, "b" * 64, "a" * 64],
                    "phash": pa.array([flips(base, [1, 20, 40]), flips(base, [0, 13, 26, 39, 52, 63]), 5, base],
                                      pa.int64())})
    found = dedup_index.history(lake, new.slice(0, 1), 4).to_pylist()
    assert [r["uid"] for r in found] == ["old-near"]  # 3 bits apart, across three bands
    assert dedup_index.history(lake, new.slice(1, 1), 4).num_rows == 0  # 6 bits: beyond d = 4
    found = dedup_index.history(lake, new.slice(2, 1), 4).to_pylist()
    assert found == [{"uid": "old-sha", "sha256": "b" * 64, "phash": 0x7777_0000_0000_0001}]
    assert dedup_index.history(lake, new.slice(3, 1), 4).num_rows == 0  # a row never matches itself


def test_index_band_keys_give_back_the_phash_and_group_each_band_value():
    """A band key is the pHash rotated (band first): invertible, and one band value is one key range."""
    import numpy as np

    from recap_tasks.filters import dedup_index

    rng = np.random.default_rng(7)
    hashes = rng.integers(-2**63, 2**63 - 1, 5000, dtype=np.int64)
    for _, shift, width in dedup_index.band_kinds(4):
        keys = dedup_index.band_key(hashes, shift, width)
        assert np.array_equal(dedup_index.key_phash(keys, shift, width), hashes)
        band = ((hashes.view(np.uint64) >> np.uint64(shift)) & np.uint64((1 << width) - 1)).view(np.int64)
        low, high = dedup_index._band_range(band, width)
        assert np.all((low <= keys) & (keys <= high))  # in its band's range, in signed order
        order = np.argsort(keys)  # sorted by key, each band value is one contiguous run
        runs = band[order]
        assert len(np.unique(runs)) == 1 + np.count_nonzero(runs[1:] != runs[:-1])


def test_index_for_another_radius_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    import pyarrow as pa

    from recap_tasks.errors import RecapError
    from recap_tasks.filters import dedup_index
    from recap_tasks.lake import Lake

    lake = Lake(tmp_path / "lake")
    dedup_index.add(lake, pa.table({"uid": ["a"], "sha256": ["a" * 64], "phash": pa.array([5], pa.int64())}), 4)
    rows = pa.table({"uid": ["b"], "sha256": ["b" * 64], "phash": pa.array([6], pa.int64())})
    with pytest.raises(RecapError, match="max_phash_distance=2.*recap maintain --migrate"):
        dedup_index.history(lake, rows, 2)
    assert dedup_index.history(lake, rows, 4).column("uid").to_pylist() == ["a"]  # 1 bit apart


def test_index_range_hits_are_the_same_for_sorted_and_unsorted_keys():
    import numpy as np

    from recap_tasks.filters import dedup_index

    rng = np.random.default_rng(3)
    keys = np.sort(rng.integers(-2**63, 2**63 - 1, 20000, dtype=np.int64))
    los = np.sort(rng.choice(keys, 50, replace=False))
    his = los + 2**50
    his[:-1] = np.minimum(his[:-1], los[1:] - 1)  # disjoint
    want = np.flatnonzero(np.any((keys[:, None] >= los) & (keys[:, None] <= his), axis=1))
    assert np.array_equal(dedup_index._in_ranges(keys, los, his), want)
    shuffled = rng.permutation(len(keys))
    got = dedup_index._in_ranges(keys[shuffled], los, his)
    assert np.array_equal(np.sort(shuffled[got]), want)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_row_group_search_by_bisection_finds_what_the_full_scan_finds(tmp_path, order):
    """Bisecting a sorted file's row-group statistics finds every group a probe range meets; a file
    whose groups are out of order falls back to the full scan (and finds the same)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recap_tasks.filters import dedup_index

    rng = np.random.default_rng(11)
    keys = np.sort(rng.integers(-2**63, 2**63 - 1, 64 * 400, dtype=np.int64))
    keys[1000:1200] = keys[1000]  # a run of equal keys across row-group boundaries
    if order == "shuffled":
        groups = keys.reshape(400, 64)[rng.permutation(400)]
        keys = groups.ravel()
    path = tmp_path / "index.parquet"
    pq.write_table(pa.table({"key": keys}), path, row_group_size=64)
    meta = pq.ParquetFile(path).metadata
    probes = np.sort(rng.choice(keys, 5, replace=False))
    los, his = probes, probes + 2**40
    los, his = np.append(los, keys[1000]), np.append(his, keys[1000])
    order_ = np.argsort(los)
    los, his = los[order_], his[order_]
    want = dedup_index._scan_groups(meta, 0, los, his)
    got = dedup_index._candidate_groups(meta, 0, los, his)
    assert got == want and len(want) >= 6
    # Every key inside a probe range lies in one of the groups found.
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    inside = np.zeros(len(keys), dtype=bool)
    for lo, hi in zip(los, his):
        inside |= (keys >= lo) & (keys <= hi)
    assert set(owner[inside].tolist()) <= set(got)


def test_run_finds_exactly_the_keys_in_each_range_across_both_fence_levels():
    """A sorted run answers range probes like a scan of its keys: ranges narrow and wide, at the
    edges, below and above every key, and runs of equal keys that cross fence boundaries."""
    import numpy as np
    import pyarrow as pa

    from recap_tasks.filters import dedup_runs

    rng = np.random.default_rng(5)
    n = 3 * dedup_runs.FAN**2 + 1234  # four top-level blocks, the last one partial
    ks = np.sort(rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64))
    second, top = 300 * dedup_runs.FAN, 2 * dedup_runs.FAN**2
    ks[second - 600:second + 100] = ks[second - 600]  # equal keys across second-level fences
    ks[top - 100:top + 100] = ks[top - 100]  # ... and across a top-level fence
    order = rng.permutation(n)  # written in any order: the run sorts
    keys = np.empty_like(ks)
    keys[order] = ks
    uid = [f"u{i}" for i in range(n)]
    run = dedup_runs.Run(pa.BufferReader(dedup_runs.encode(pa.table({"key": keys, "uid": uid}), with_sha=False)))
    los = np.unique(np.concatenate([rng.choice(ks, 300, replace=False),
                                    [ks[0], ks[-1], ks[second - 600], ks[top - 100], -2**63]]))
    his = los + rng.integers(0, 2**52, len(los))
    his[:-1] = np.minimum(his[:-1], los[1:] - 1)
    los, his = np.append(los, ks[-1] + 1), np.append(his, 2**63 - 1)  # above every key
    rows, found = run.find(los, his)
    want = np.flatnonzero(np.any((ks[:, None] >= los) & (ks[:, None] <= his), axis=1))
    assert np.array_equal(rows, want) and np.array_equal(found, ks[want])
    assert len(want) > 900  # the equal-key runs were found whole
    got_uids = run.columns(rows, ["uid"])["uid"].to_pylist()
    assert sorted(got_uids) == sorted(uid[i] for i in order[want])  # input row order[j] has key ks[j]
    assert run.reads < 2 * len(los) + 10  # fences and key slices, not the file
    for at, count in ((second - 600, 700), (top - 100, 200)):  # alone: no other probe's blocks to lean on
        alone, _ = run.find(np.array([ks[at]]), np.array([ks[at]]))
        assert np.array_equal(alone, np.arange(at, at + count))
    wide_rows, _ = run.find(np.array([ks[10]]), np.array([ks[n - 10]]))  # one range over all blocks
    assert np.array_equal(wide_rows, np.arange(10, n - 9))


def test_lookups_through_runs_equal_lookups_through_parquet(tmp_path, monkeypatch):
    """After maintain writes runs, history finds the same rows as the Parquet path without opening a
    Parquet file; a run whose files changed, or that cannot be read, is not used; maintain replaces
    runs whose files left, and files appended since are read as Parquet beside the runs."""
    import numpy as np
    import pyarrow as pa

    from recap_tasks.filters import dedup_index, dedup_runs
    from recap_tasks.lake import Lake
    from recap_tasks.maintenance import maintain

    lake = Lake(tmp_path / "lake")
    rng = np.random.default_rng(9)
    n = 5000
    hashes = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    shas = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(n)]
    for part in range(2):  # two appends: maintain then compacts them into sorted files
        s = slice(part * n // 2, (part + 1) * n // 2)
        dedup_index.add(lake, pa.table({"uid": [f"old{i}" for i in range(n)][s], "sha256": shas[s],
                                        "phash": pa.array(hashes[s])}), 2)
    flips = hashes[:300].view(np.uint64) ^ (np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64))
    probe = pa.table({"uid": [f"new{i}" for i in range(400)],
                      "sha256": shas[4000:4050] + [f"{i:064x}" for i in range(350)],
                      "phash": pa.array(np.concatenate([flips.view(np.int64), rng.integers(-2**63, 2**63 - 1, 100)]))})
    before = dedup_index.history(lake, probe, 2)
    assert not lake.list_dirs(dedup_runs.RUNS)
    report = maintain(lake, tables=["dedup_index"])
    assert report["dedup_index"]["runs_written"] == 4 and report["dedup_index"]["runs_removed"] == 0
    opened = []
    original = dedup_index.pq.ParquetFile
    monkeypatch.setattr(dedup_index.pq, "ParquetFile", lambda *a, **k: opened.append(1) or original(*a, **k))
    via_runs = dedup_index.history(lake, probe, 2)
    assert via_runs.equals(before) and before.num_rows == 350 and not opened  # 300 near + 50 exact

    # A run that cannot be read is not used: its files are read as Parquet.
    runs = [rel for d in lake.list_dirs(dedup_runs.RUNS) for rel in lake.list(d, ".run")]
    lake.write_bytes(runs[0], b"not a run")
    whole = lake.read_bytes(runs[1])
    lake.write_bytes(runs[1], whole[:-8])  # cut short by one fence entry: sections misplaced
    assert dedup_index.history(lake, probe, 2).equals(before)
    lake.write_bytes(runs[1], whole)
    assert dedup_index.history(lake, probe, 2).equals(before) and opened
    maintain(lake, tables=["dedup_index"])  # the unreadable run stays until its files change
    # The index rebuilt from fewer rows (as `maintain --migrate` does): the runs name files no
    # longer in the table, so no lookup uses them (they would find rows the index lost).
    keep = 1000
    dedup_index.add(lake, pa.table({"uid": [f"old{i}" for i in range(keep)], "sha256": shas[:keep],
                                    "phash": pa.array(hashes[:keep])}), 2, replace=True)
    rebuilt = dedup_index.history(lake, probe, 2)
    assert set(rebuilt.column("uid").to_pylist()) == {u for u in before.column("uid").to_pylist()
                                                      if int(u[3:]) < keep}
    report = maintain(lake, tables=["dedup_index"])
    assert report["dedup_index"]["runs_written"] == 4 and report["dedup_index"]["runs_removed"] == 4
    opened.clear()
    assert dedup_index.history(lake, probe, 2).equals(rebuilt) and not opened
    # New files, then lookups: runs for the maintained files, Parquet for the new one.
    late = pa.table({"uid": ["late"], "sha256": [shas[0][:-1] + "x"], "phash": pa.array([int(hashes[1] ^ 1)])})
    dedup_index.add(lake, late, 2)
    found = dedup_index.history(lake, probe.slice(0, 2), 2).column("uid").to_pylist()
    assert found == ["late", "old0", "old1"]  # row 1: pHash near old1 and the late copy of it
    # Maintain: the index re-sorted into new files, the old runs removed, one run per kind again.
    report = maintain(lake, tables=["dedup_index"])
    assert report["dedup_index"]["runs_written"] == 4 and report["dedup_index"]["runs_removed"] == 4
    opened.clear()
    assert dedup_index.history(lake, probe, 2).num_rows == rebuilt.num_rows + 1 and not opened


def test_a_run_is_built_from_files_in_key_order_in_chains_of_disjoint_ranges(tmp_path):
    """Files whose key ranges overlap go to separate runs; each run's keys are sorted; a run's
    payload widths are the widest of its files (a long uid in a later file)."""
    import numpy as np
    import pyarrow as pa

    from recap_tasks.filters import dedup_runs

    assert dedup_runs._chains(["a", "b", "c", "d"], [0, 10, 5, 21], [9, 20, 30, 40]) == [["a", "b", "d"], ["c"]]
    with pytest.raises(ValueError, match="key order"):
        writer = dedup_runs._Writer(tmp_path, with_sha=False)
        writer.add(pa.table({"key": [5, 6], "uid": ["a", "b"]}))
        writer.add(pa.table({"key": [1], "uid": ["c"]}))
    writer = dedup_runs._Writer(tmp_path, with_sha=True)
    writer.add(pa.table({"key": [3, 1], "uid": ["u3", "u1"], "sha256": ["s3", "s1"], "phash": pa.array([None, 11], pa.int64())}))
    writer.add(pa.table({"key": [7], "uid": ["a-much-longer-uid"], "sha256": ["s7"], "phash": pa.array([77], pa.int64())}))
    out = pa.BufferOutputStream()
    writer.finish(out)
    run = dedup_runs.Run(pa.BufferReader(out.getvalue()))
    rows, keys = run.find(np.array([0]), np.array([10]))
    assert keys.tolist() == [1, 3, 7]
    cols = run.columns(rows, ["uid", "sha256", "phash"])
    assert cols["uid"].to_pylist() == ["u1", "u3", "a-much-longer-uid"]
    assert cols["sha256"].to_pylist() == ["s1", "s3", "s7"] and cols["phash"].to_pylist() == [11, None, 77]
