"""Sources and downloads on object storage: the same shards and metadata in a bucket (moto's server
on 127.0.0.1) as in a local folder give the same listing, ids, uids and captions."""

from __future__ import annotations

import hashlib
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import jpeg
from tests.http_server import ImageServer
from tests.s3 import s3_env, s3_server  # noqa: F401  (fixtures: the S3 emulator)

from recap_tasks import lake as tables
from recap_tasks import storage
from recap_tasks.cli import main
from recap_tasks.config import IngestConfig
from recap_tasks.errors import RecapError
from recap_tasks.ids import shard_id_for
from recap_tasks.images import _ranges, read_images
from recap_tasks.lake import Lake
from recap_tasks.readers import expand_sources
from recap_tasks.shards import shards_to_ingest
from recap_tasks.stages.ingest import ingest

# A tree of files, written both into a local folder and under a bucket prefix.
TREE = {"shards/a/00000.tar": b"t" * 1500, "shards/a/00000.parquet": b"p", "shards/a/00001.tar": b"u" * 700,
        "shards/a/notes.txt": b"n", "shards/b/c/00002.tar": b"v", "shards/b/00003.parquet": b"q"}


def put_tree(s3, bucket: str, root: Path | None = None) -> None:
    for key, data in TREE.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        if root is not None:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)


def upload(s3, bucket: str, folder: Path, prefix: str) -> str:
    for f in sorted(folder.iterdir()):
        s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize("pattern", ["shards/a", "shards/a/", "shards/**/*.tar", "shards/*/0000[01].*",
                                     "shards/**", "shards/a/00001.tar", "shards/b/*.parquet"])
def test_a_bucket_lists_as_a_local_folder_does(s3_env, tmp_path, pattern):
    s3, bucket = s3_env
    put_tree(s3, bucket, tmp_path)
    kw = dict(what="a .tar or .parquet shard", plural=".tar or .parquet shards", noun="source")
    remote = storage.list_files(f"s3://{bucket}/{pattern}", (".tar", ".parquet"), **kw)
    local = storage.list_files(str(tmp_path / pattern), (".tar", ".parquet"), **kw)
    assert remote and all(r.startswith(f"s3://{bucket}/shards/") for r in remote)
    assert [r.removeprefix(f"s3://{bucket}/") for r in remote] == [str(Path(p).relative_to(tmp_path)) for p in local]


def test_img2dataset_parquet_beside_a_tar_is_not_a_source_in_a_bucket(s3_env, monkeypatch):
    s3, bucket = s3_env
    put_tree(s3, bucket)
    base = f"s3://{bucket}/shards"
    # Listings only: a request per parquet (a HEAD for its tar) would be 130,000 at the mission's size.
    monkeypatch.setattr(storage, "exists", lambda uri: pytest.fail(f"a request per file: {uri}"))
    monkeypatch.setattr(storage, "is_file", lambda uri: pytest.fail(f"a request per file: {uri}"))
    assert expand_sources([f"{base}/a/*.parquet"]) == []  # a glob that leaves the tar out
    assert expand_sources([f"{base}/a"]) == [f"{base}/a/00000.tar", f"{base}/a/00001.tar"]
    # Named on its own, the metadata parquet is what the user asked for.
    assert expand_sources([f"{base}/a/00000.parquet"]) == [f"{base}/a/00000.parquet"]
    assert expand_sources([f"{base}/b/*.parquet"]) == [f"{base}/b/00003.parquet"]  # no tar beside it


def test_missing_bucket_prefix_or_object_is_one_line_naming_it(s3_env, capsys, tmp_path):
    s3, bucket = s3_env
    put_tree(s3, bucket)
    for uri in (f"s3://no-such-bucket-{bucket}/shards", f"s3://{bucket}/nothing/here", f"s3://{bucket}/shards/a/9.tar"):
        with pytest.raises(RecapError, match=f"^source not found: {uri}$"):
            expand_sources([uri])
        assert main(["ingest", uri, "--lake", str(tmp_path / "lake")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"recap ingest: error: source not found: {uri}"
    with pytest.raises(RecapError, match=f"no .tar or .parquet shards in s3://{bucket}/shards/\\*\\*/\\*.zip"):
        expand_sources([f"s3://{bucket}/shards/**/*.zip"])
    with pytest.raises(RecapError, match="no .tar or .parquet shards in"):  # a pattern names files, not folders
        expand_sources([f"s3://{bucket}/shards/*/c"])
    with pytest.raises(RecapError, match="not a .tar or .parquet shard"):
        expand_sources([f"s3://{bucket}/shards/a/notes.txt"])
    assert main(["download", f"s3://{bucket}/meta/missing.parquet", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"recap download: error: metadata not found: s3://{bucket}/meta/missing.parquet"
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.jpg"], "text": ["a caption"]}), meta)
    assert main(["download", str(meta), "--out", f"s3://no-such-bucket-{bucket}/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recap download: error: cannot write s3://no-such-bucket-{bucket}/out/_download.json: ")
    assert "\n" not in err
    for out in (str(meta), f"s3://{bucket}/shards/a/00000.tar"):  # a file, not a folder or prefix
        assert main(["download", str(meta), "--out", out]) == 2
        assert capsys.readouterr().err.startswith(f"recap download: error: --out {out} is a file")


def test_stat_and_ranged_reads(s3_env):
    s3, bucket = s3_env
    put_tree(s3, bucket)
    uri = f"s3://{bucket}/shards/a/00000.tar"
    size, mtime_ns = storage.stat(uri)
    assert size == 1500 and mtime_ns > 0
    assert storage.read_range(uri, 1000, 10) == b"t" * 10
    with storage.open_input(uri) as f:
        assert f.size() == 1500 and f.read_at(4, 1496) == b"tttt"
    assert storage.exists(uri) and storage.is_file(uri) and not storage.is_file(f"s3://{bucket}/shards/a")
    with pytest.raises(FileNotFoundError):
        storage.stat(f"s3://{bucket}/shards/a/nope.tar")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_output_is_published_whole_or_not_at_all(s3_env, tmp_path, where):
    s3, bucket = s3_env
    uri = f"s3://{bucket}/out/x.bin" if where == "s3" else str(tmp_path / "out" / "x.bin")
    with pytest.raises(RuntimeError):
        with storage.open_output(uri) as f:
            f.write(b"half of it")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)
    with storage.open_output(uri) as f:
        f.write(b"all of it")
    assert storage.read_bytes(uri) == b"all of it"
    local = tmp_path / "finished.bin"
    local.write_bytes(b"x" * 100_000)
    storage.write_file(uri, local)
    assert storage.read_bytes(uri) == local.read_bytes()


def test_ingest_from_a_bucket_gives_the_uids_of_a_local_copy(s3_env, sample_shards, tmp_path):
    s3, bucket = s3_env
    source = upload(s3, bucket, sample_shards, f"copy/{sample_shards.name}")
    local_lake, s3_lake = Lake(tmp_path / "local"), Lake(f"s3://{bucket}/lake")
    local, remote = ingest([str(sample_shards)], local_lake), ingest([source], s3_lake)
    assert [s.shard_id for s in remote.shards] == [s.shard_id for s in local.shards] == \
        [shard_id_for(p) for p in sorted(sample_shards.glob("*.tar"))]
    assert (remote.rows, remote.rejected) == (local.rows, local.rejected) == (21, 1)
    cols = ["uid", "key", "shard_id", "sha256", "org_caption"]
    assert _rows(s3_lake, tables.PAIRS, cols) == _rows(local_lake, tables.PAIRS, cols)
    assert _rows(s3_lake, tables.REJECTED, ["uid", "reason"]) == _rows(local_lake, tables.REJECTED, ["uid", "reason"])
    uris = set(s3_lake.read(tables.PAIRS, ["source_uri"]).column(0).to_pylist())
    assert uris == {f"{source}/00000.tar", f"{source}/00001.tar"}
    # Read back by pointer (ranged reads): the ingested bytes.
    pairs = s3_lake.read(tables.PAIRS).sort_by("uid")
    images = read_images(pairs)
    assert [hashlib.sha256(b).hexdigest() for b in images] == pairs.column("sha256").to_pylist()
    # The ingest record holds the object's size and Last-Modified: a rerun skips, the planner has nothing.
    again = ingest([source], s3_lake)
    assert all(s.skipped for s in again.shards) and again.rows == 0
    assert shards_to_ingest(s3_lake, source) == []
    time.sleep(1.1)  # Last-Modified has whole seconds
    s3.upload_file(str(sample_shards / "00001.tar"), bucket, f"copy/{sample_shards.name}/00001.tar")  # same size
    assert shards_to_ingest(s3_lake, source) == [f"{source}/00001.tar"]


def test_a_parquet_source_in_a_bucket_reads_back_by_row_group(s3_env, tmp_path):
    s3, bucket = s3_env
    images = [jpeg(200 + 4 * i, 200, (i * 20 % 255, 80, 40)) for i in range(12)]
    path = tmp_path / "pq" / "web-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"key": [f"k{i:02d}" for i in range(12)], "jpg": images,
                             "caption": [f"a test picture number {i}" for i in range(12)]}), path, row_group_size=3)
    source = upload(s3, bucket, path.parent, "pq")
    lake = Lake(tmp_path / "lake")
    assert ingest([source], lake, config=IngestConfig()).rows == 12
    pairs = lake.read(tables.PAIRS).sort_by("key")
    some = pairs.take(pa.array([10, 1, 7]))
    assert read_images(some) == [images[10], images[1], images[7]]
    assert shard_id_for(f"{source}/web-00000.parquet") == shard_id_for(path) == "pq/web-00000.parquet"


class _Recording:
    """A pyarrow file that counts its ranged reads."""

    def __init__(self, data: bytes):
        self.file, self.reads = pa.BufferReader(data), []

    def read_at(self, nbytes: int, offset: int) -> bytes:
        self.reads.append((offset, nbytes))
        return self.file.read_at(nbytes, offset)


def test_pointer_reads_merge_neighbours_and_skip_far_gaps():
    from recap_tasks import images

    data = bytes(range(256)) * ((3 * images._GAP) // 256 + 1)
    f = _Recording(data)
    wanted = [(0, 100, 10), (1, 5000, 20), (2, 130, 5), (3, 100 + 2 * images._GAP, 7)]
    got = dict(_ranges(f, wanted))
    assert got == {i: data[o:o + n] for i, o, n in wanted}
    # Neighbours (gap < _GAP) in one read, a far one in another: never the bytes between.
    assert f.reads == [(100, 4920), (100 + 2 * images._GAP, 7)]


def test_download_to_a_bucket_then_run_on_it_matches_the_local_run(s3_env, sample_shards, tiny_model, tmp_path,
                                                                   capsys):
    """Done-when: metadata in a bucket -> `recap download --out s3://` -> `recap run s3:// --lake s3://`
    publishes the same uids and captions as the same commands on local paths, every row accounted for."""
    s3, bucket = s3_env
    photos = _sample_photos(sample_shards)
    with ImageServer({f"{k}.jpg": img for k, (img, _) in photos.items()}) as server:
        urls = [server.url(f"img/{k}.jpg") for k in photos] + [server.url("missing")]
        meta = tmp_path / "meta" / "photos.parquet"
        meta.parent.mkdir()
        pq.write_table(pa.table({"uid": [f"u{i:03d}" for i in range(len(urls))], "url": urls,
                                 "text": [c for _, c in photos.values()] + ["a photo that is gone"]}), meta)
        upload(s3, bucket, meta.parent, "meta")
        runs = {"local": (str(meta), str(tmp_path / "dl" / "shards"), str(tmp_path / "lake")),
                "s3": (f"s3://{bucket}/meta/", f"s3://{bucket}/dl/shards", f"s3://{bucket}/lake")}
        for name, (metadata, out, lake) in runs.items():
            download = ["download", metadata, "--out", out, "--allow-private-networks", "--samples-per-shard", "8"]
            assert main(download) == 0, capsys.readouterr().err
            assert main(["run", out, "--lake", lake, "--model", str(tiny_model), "--run-id", f"dl-{name}"]) == 0, \
                capsys.readouterr().err
            assert main(["status", "--verify", "--lake", lake]) == 0, capsys.readouterr().out
            capsys.readouterr()
        # Resume reads the finished shards' stats back from the bucket.
        assert main(download) == 0 and '"shards_skipped": 3' in capsys.readouterr().out
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dl/")["Contents"]}
    assert {"dl/shards/00000.tar", "dl/shards/00000.parquet", "dl/shards/00000_stats.json",
            "dl/shards/_download.json"} <= keys and not any(k.endswith((".part", ".tmp")) for k in keys)
    local, remote = Lake(runs["local"][2]), Lake(runs["s3"][2])
    published = _rows(remote, tables.RECAP, ["uid", "shard_id", "re_caption", "org_caption", "source_uid"])
    assert published == _rows(local, tables.RECAP, ["uid", "shard_id", "re_caption", "org_caption", "source_uid"])
    assert len(published) >= 10 and all(r["re_caption"] for r in published)
    rejected = _rows(remote, tables.REJECTED, ["uid", "stage", "reason"])
    assert rejected == _rows(local, tables.REJECTED, ["uid", "stage", "reason"])
    assert {"stage": "download", "reason": "http_404"} in [{k: r[k] for k in ("stage", "reason")} for r in rejected]
    assert len(published) + len(rejected) == len(urls)  # every metadata row is in one place


def _rows(lake: Lake, table: str, columns: list[str]) -> list[dict]:
    return sorted(lake.read(table, columns).to_pylist(), key=lambda r: r["uid"])


def _sample_photos(shards: Path) -> dict[str, tuple[bytes, str]]:
    """key -> (jpeg, caption) of the sample shards' samples (the truncated JPEG among them)."""
    photos: dict[str, dict] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                photos.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return {k: (p["jpg"], p["txt"].decode()) for k, p in photos.items() if "jpg" in p and "txt" in p}


@pytest.mark.shared_data
def test_object_store_ingest_benchmark_smoke(shared_data):
    """benchmarks/ingest.py --object-store: coco-mini-wds from local disk and from moto's server."""
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run([sys.executable, "benchmarks/ingest.py", "--repeats", "1", "--object-store"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local, remote = (line.split() for line in proc.stdout.splitlines()[-2:])
    assert local[:2] == ["local", "disk"] and remote[:2] == ["S3", "(moto,"]
    assert all(r[-3] == "239" and float(r[-1]) > 0 for r in (local, remote))
