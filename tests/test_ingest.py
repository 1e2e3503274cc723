"""Ingest: good samples land in pairs, every bad one in rejected with a reason, reruns add nothing."""

from __future__ import annotations

import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import jpeg, sample, write_tar
from deltalake import DeltaTable

from recap_tasks import lake as tables
from recap_tasks.errors import RecapError
from recap_tasks.ids import make_uid
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.status import lake_status


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10 gigapixels over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def rejected_reasons(lake: Lake) -> dict[str, str]:
    rows = lake.read(tables.REJECTED).to_pylist()
    return {r["key"]: r["reason"] for r in rows}


def test_good_shard_rows_and_pointers(tmp_path):
    shard = write_tar(tmp_path / "src" / "00000.tar", sample("000000000", url="https://example.com/a.jpg")
                      + sample("000000001", "two dogs playing in the snow", jpeg(400, 300)))
    lake = Lake(tmp_path / "lake")
    result = ingest([str(shard.parent)], lake, run_id="r1")
    assert result.rows == 2 and result.rejected == 0
    rows = {r["key"]: r for r in lake.read(tables.PAIRS).to_pylist()}
    a = rows["000000000"]
    assert a["url"] == "https://example.com/a.jpg"
    assert a["org_caption"] == "a red square on a plain background"
    assert (a["width"], a["height"], a["image_format"]) == (320, 240, "JPEG")
    assert a["shard_id"] == "src/00000.tar" and a["run_id"] == "r1"
    assert a["uid"] == make_uid("src/00000.tar", "000000000")
    # The pointer reads back exactly the bytes that were hashed.
    import hashlib

    with open(a["source_uri"], "rb") as f:
        f.seek(a["image_offset"])
        assert hashlib.sha256(f.read(a["image_size"])).hexdigest() == a["sha256"]


BAD_CASES = {
    "corrupt_jpeg": (sample("000000010", image=b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10), "image_decode_error"),
    "truncated_jpeg": (sample("000000011", image=jpeg(640, 480)[:2500]), "image_truncated"),
    "empty_image": (sample("000000012", image=b""), "empty_image"),
    "missing_caption": ([("000000013.jpg", jpeg())], "missing_caption"),
    "non_utf8_caption": (sample("000000014", caption=b"caf\xe9 au lait \xff\xfe"), "caption_not_utf8"),
    "escaping_member": ([("../../x.jpg", jpeg()), ("../../x.txt", b"escape attempt caption")], "unsafe_member_name"),
    "bomb_png": (sample("000000016", image=bomb_png(), ext="png"), "image_too_many_pixels"),
    "megabyte_caption": (sample("000000017", caption="word " * 210_000), "caption_too_long"),
    "missing_image": ([("000000018.txt", b"a caption without any image"), ("000000018.json", b"{}")],
                      "missing_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_is_rejected_with_reason_and_nothing_lost(tmp_path, monkeypatch, case):
    members, reason = BAD_CASES[case]
    monkeypatch.chdir(tmp_path)
    shard = write_tar(tmp_path / "src" / "00000.tar", sample("000000001") + members + sample("000000099"))
    lake = Lake(tmp_path / "lake")
    result = ingest([str(shard)], lake, run_id="r1")
    assert result.rows == 2  # the good neighbours survive
    reasons = list(rejected_reasons(lake).values())
    assert reasons == [reason]  # one sample, one row (issue 19, 2)
    status = lake_status(lake)
    assert status["ingested"] == status["passed_ingest"] + sum(status["rejected"]["by_stage"]["ingest"].values())
    # Nothing was extracted anywhere: the escaping member never became a file.
    assert not list(tmp_path.rglob("x.jpg")) and not (tmp_path.parent / "x.jpg").exists()


def test_every_sample_is_one_row_whatever_its_members(tmp_path):
    """Issue 19, 2: a sample whose image is a symlink, and one whose members climb out of the shard,
    are each one rejected row (its key, its first reason); a 33-sample tar counts 33."""
    import io
    import tarfile

    shard = tmp_path / "src" / "00000.tar"
    shard.parent.mkdir()
    good = [m for i in range(30) for m in sample(f"{i:09d}")]
    with tarfile.open(shard, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for name, data in good[:30]:
            add(name, data)
        link = tarfile.TarInfo("x.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        add("x.txt", b"a caption for a linked image")
        add("../evil.jpg", jpeg())
        add("../evil.txt", b"a caption that climbs out")
        add("000000099.txt", b"a caption without an image")
        for name, data in good[30:]:
            add(name, data)
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    rejected = {r["key"]: r["reason"] for r in lake.read(tables.REJECTED).to_pylist()}
    assert rejected == {"x": "unsafe_member_type", "../evil": "unsafe_member_name", "000000099": "missing_image"}
    assert lake.read(tables.PAIRS).num_rows == 30
    status = lake_status(lake)
    assert status["ingested"] == 33 and status["balanced"]


def test_duplicate_key_in_shard(tmp_path):
    shard = write_tar(tmp_path / "src" / "00000.tar",
                      sample("000000001") + sample("000000001", "a different caption for a copy"))
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    assert lake.read(tables.PAIRS).num_rows == 1
    rejected = lake.read(tables.REJECTED).to_pylist()
    assert [r["reason"] for r in rejected] == ["duplicate_key"]
    assert rejected[0]["uid"] == make_uid("src/00000.tar", "000000001", 1)


def test_tar_cut_mid_member_keeps_earlier_samples_and_records_cut(tmp_path):
    full = write_tar(tmp_path / "full" / "00000.tar",
                     sample("000000001") + sample("000000002", image=jpeg(800, 600)) + sample("000000003"))
    data = full.read_bytes()
    cut = tmp_path / "src" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: int(len(data) * 0.5)])  # inside sample 2's image
    lake = Lake(tmp_path / "lake")
    result = ingest([str(cut)], lake)
    assert [r["key"] for r in lake.read(tables.PAIRS).to_pylist()] == ["000000001"]
    assert result.shards[0].truncated and "cut" in result.shards[0].detail
    assert "shard_truncated" in rejected_reasons(lake).values()
    assert lake_status(lake)["shards"]["truncated"] == ["src/00000.tar"]


def test_tar_cut_at_member_boundary_is_recorded(tmp_path):
    import tarfile

    full = write_tar(tmp_path / "full" / "00000.tar", sample("000000001") + sample("000000002"))
    with tarfile.open(full) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # after the last member, before the end marker
    cut = tmp_path / "src" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(full.read_bytes()[:end])
    result = ingest([str(cut)], Lake(tmp_path / "lake"))
    assert result.rows == 2  # every member is whole...
    assert result.shards[0].truncated and "end-of-archive" in result.shards[0].detail  # ...but the cut is recorded


def test_not_a_tar_is_one_recorded_rejection(tmp_path):
    bad = tmp_path / "src" / "00000.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a tar archive" * 100)
    lake = Lake(tmp_path / "lake")
    result = ingest([str(bad)], lake)
    assert result.rows == 0
    assert [r["reason"] for r in lake.read(tables.REJECTED).to_pylist()] == ["shard_unreadable"]


def test_rerun_adds_nothing(tmp_path):
    shard = write_tar(tmp_path / "src" / "00000.tar", sample("000000001") + sample("000000002", image=b""))
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    versions = (lake.version(tables.PAIRS), lake.version(tables.REJECTED))
    again = ingest([str(shard)], lake)
    assert again.shards[0].skipped
    forced = ingest([str(shard)], lake, force=True)  # re-reads the shard; MERGE inserts nothing
    assert forced.rows == 0 and forced.rejected == 0
    assert (lake.version(tables.PAIRS), lake.version(tables.REJECTED)) == versions
    assert lake.read(tables.PAIRS).num_rows == 1 and lake.read(tables.REJECTED).num_rows == 1


def test_uids_are_stable_across_lakes(tmp_path):
    shard = write_tar(tmp_path / "src" / "00000.tar", sample("000000001") + sample("000000002"))
    a, b = Lake(tmp_path / "a"), Lake(tmp_path / "b")
    ingest([str(shard)], a)
    ingest([str(shard)], b)
    assert sorted(a.uids(tables.PAIRS).to_pylist()) == sorted(b.uids(tables.PAIRS).to_pylist())


def test_parquet_source_with_configured_columns(tmp_path):
    from recap_tasks.config import IngestConfig

    path = tmp_path / "src" / "web.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({
        "pic": [jpeg(), b"garbage", jpeg(300, 300)],
        "alt": ["a photo of a red thing", "broken image here", None],
        "page": ["https://example.com/1", "https://example.com/2", "https://example.com/3"],
    }), path)
    lake = Lake(tmp_path / "lake")
    with pytest.raises(RecapError, match="cannot tell which column holds the image"):
        ingest([str(path)], lake)
    result = ingest([str(path)], lake, config=IngestConfig(image_column="pic", caption_column="alt",
                                                           url_column="page"))
    assert result.rows == 1 and result.rejected == 2
    row = lake.read(tables.PAIRS).to_pylist()[0]
    assert row["source_format"] == "parquet" and row["source_row"] == 0 and row["url"] == "https://example.com/1"
    assert sorted(rejected_reasons(lake).values()) == ["image_decode_error", "missing_caption"]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(RecapError, match="source not found"):
        ingest([str(tmp_path / "nope")], Lake(tmp_path / "lake"))


@pytest.mark.shared_data
def test_real_shards_add_up(shared_data, tmp_path):
    lake = Lake(tmp_path / "lake")
    result = ingest([str(shared_data / "coco-mini-wds"), str(shared_data / "cc-web-758.parquet")], lake)
    assert result.rows + result.rejected == 239 + 758
    assert DeltaTable(lake.path(tables.PAIRS)).to_pandas()["uid"].is_unique


def test_an_image_over_max_image_bytes_is_rejected_as_too_large(tmp_path):
    """`ingest.max_image_bytes` (README's table of reasons: image_too_large)."""
    from recap_tasks.config import IngestConfig

    big = jpeg(640, 480)
    shard = write_tar(tmp_path / "src" / "00000.tar", sample("000000001") + sample("000000002", image=big))
    lake = Lake(tmp_path / "lake")
    result = ingest([str(shard)], lake, config=IngestConfig(max_image_bytes=len(big) - 1))
    assert result.rows == 1 and list(rejected_reasons(lake).values()) == ["image_too_large"]
