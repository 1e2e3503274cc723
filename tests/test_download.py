"""Download: URL metadata -> img2dataset-layout shards, safely, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.helpers import REPO, jpeg
from tests.http_server import ImageServer

from recap_tasks import lake as tables
from recap_tasks.config import DownloadConfig
from recap_tasks.stages.download import download
from recap_tasks.errors import RecapError
from recap_tasks.fetch import blocked_address, opt_out
from recap_tasks.ids import make_uid
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.status import format_status, lake_status

IMAGES = {f"{i}.jpg": jpeg(320 + 8 * i, 240, (40 * i % 255, 90, 160)) for i in range(12)}
# Loopback is where the test server is: allowed explicitly, as a user on a private network would.
# Deadlines are short (the slow and dripping servers cost a run that long) with room for a loaded
# 2-core machine.
LOCAL = DownloadConfig(allow_private_networks=True, timeout=1.0, deadline=2.5, max_image_bytes=1 << 20, threads=8)


@pytest.fixture
def server():
    with ImageServer(IMAGES) as s:
        yield s


def write_metadata(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def shard_rows(out: Path, name: str = "00000") -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(out / f"{name}.parquet").to_pylist()}


def sha(name: str) -> str:
    return hashlib.sha256(IMAGES[name]).hexdigest()


def test_every_failure_has_its_reason(tmp_path, server):
    cases = [  # (url, expected sha256, reason or None for success)
        (server.url("img/0.jpg"), sha("0.jpg"), None),
        (server.url("redirect/1.jpg"), None, None),
        (server.url("missing"), None, "http_404"),
        (server.url("error"), None, "http_503"),
        (server.url("slow"), None, "timeout"),
        (server.url("loop"), None, "too_many_redirects"),
        (server.url("nolocation"), None, "bad_redirect"),
        (server.url("big"), None, "too_large"),
        (server.url("optout/2.jpg?tag=noai"), None, "opted_out"),
        (server.url("optout/3.jpg?tag=recap:%20noimageai"), None, "opted_out"),
        (server.url("optout/4.jpg?tag=otherbot:%20noai"), None, None),  # another agent's opt-out
        (server.url("img/5.jpg"), sha("0.jpg"), "sha256_mismatch"),
        (server.url("html"), None, "not_an_image"),
        (server.url("short"), None, "incomplete_body"),  # fewer bytes than Content-Length (issue 19, 8)
        (f"http://127.0.0.1:{_closed_port()}/x.jpg", None, "connection_error"),  # refused (issue 19, 8)
        ("ftp://example.com/x.jpg", None, "unsupported_scheme"),
        ("http://[::1", None, "invalid_url"),
        (None, None, "missing_url"),
    ]
    meta = write_metadata(tmp_path / "meta.parquet", {
        "uid": [f"uid{i:02d}" for i in range(len(cases))],
        "url": [c[0] for c in cases], "text": [f"caption number {i}" for i in range(len(cases))],
        "sha256": [c[1] for c in cases], "original_width": list(range(len(cases)))})
    result = download([str(meta)], tmp_path / "out", config=LOCAL)
    out = tmp_path / "out"
    rows = shard_rows(out)
    got = {r["uid"]: r["reason"] for r in rows.values()}
    assert got == {f"uid{i:02d}": reason for i, (_, _, reason) in enumerate(cases)}
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == len(cases) and stats["successes"] == 3
    assert stats["reasons"]["opted_out"] == 2 and result.summary()["failed"] == len(cases) - 3
    # The tar holds the successes in img2dataset's layout, every metadata column kept in the .json.
    with tarfile.open(out / "00000.tar") as tf:
        names = sorted(tf.getnames())
        meta0 = json.loads(tf.extractfile("000000000.json").read())
        assert tf.extractfile("000000000.jpg").read() == IMAGES["0.jpg"]
        assert tf.extractfile("000000000.txt").read() == b"caption number 0"
    # Keys: 5-digit shard, 4-digit index (10,000 per shard), as img2dataset writes them.
    assert names == [f"{k:09d}.{e}" for k in (0, 1, 10) for e in ("jpg", "json", "txt")]
    assert meta0["source_uid"] == "uid00" and meta0["sha256"] == sha("0.jpg") and meta0["original_width"] == 0
    assert meta0["status"] == "success" and meta0["url"] == server.url("img/0.jpg")
    assert server.hits["/loop"] == LOCAL.max_redirects + 1


def test_the_deadline_holds_while_a_body_drips(tmp_path, server):
    """Issue 19, 4: a server that sends Content-Length 40 and then a byte every 0.3 s (12 s in all)
    cannot hold a fetch past its deadline (2.5 s here): the client leaves long before the 40 bytes."""
    meta = write_metadata(tmp_path / "meta.parquet", {"url": [server.url("drip"), server.url("img/0.jpg")],
                                                      "text": ["dripping", "fine"]})
    download([str(meta)], tmp_path / "out", config=LOCAL)
    assert [r["reason"] for r in shard_rows(tmp_path / "out").values()] == ["timeout", None]
    assert 1 <= server.dripped["/drip"] < 25


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_private_addresses_are_refused_by_default(tmp_path, server):
    port = server.port
    urls = [server.url("img/0.jpg"), f"http://localhost:{port}/img/0.jpg", f"http://[::1]:{port}/img/0.jpg",
            f"http://2130706433:{server.port}/img/0.jpg", f"http://127.1:{server.port}/img/0.jpg",
            "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.jpg", "http://[::ffff:192.168.1.1]/x.jpg"]
    meta = write_metadata(tmp_path / "meta.parquet", {"url": urls, "text": ["a caption"] * len(urls)})
    download([str(meta)], tmp_path / "out", config=DownloadConfig(timeout=0.5, deadline=1.0))
    assert {r["reason"] for r in shard_rows(tmp_path / "out").values()} == {"private_address"}
    assert sum(server.hits.values()) == 0  # refused before any request was sent


def test_a_name_that_rebinds_to_a_private_address_is_refused_at_the_peer(tmp_path, server, monkeypatch):
    """DNS rebinding: the name resolves to a public address when checked, but the socket ends up on
    loopback. The check of the connected peer refuses it. (Simulated without leaving the machine: the
    resolver answers a public address, and every connect goes to the test server on 127.0.0.1.)"""
    import socket

    real_getaddrinfo, real_socket, port = socket.getaddrinfo, socket.socket, server.port

    def resolve(host, *args, **kwargs):
        if host == "rebind.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return real_getaddrinfo(host, *args, **kwargs)

    class ToLoopback(real_socket):
        def connect(self, address):
            return super().connect(("127.0.0.1", port))

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "socket", ToLoopback)
    meta = write_metadata(tmp_path / "meta.parquet", {"url": [f"http://rebind.test:{port}/img/0.jpg"],
                                                      "text": ["a caption"]})
    download([str(meta)], tmp_path / "out", config=DownloadConfig(timeout=1.0, deadline=2.5, threads=1))
    rows = list(shard_rows(tmp_path / "out").values())
    assert [r["reason"] for r in rows] == ["private_address"] and "connected to 127.0.0.1" in rows[0]["error_message"]
    assert sum(server.hits.values()) == 0  # refused before the request was sent


def test_a_redirect_from_a_public_host_onto_a_private_address_is_refused(tmp_path, server, monkeypatch):
    """Issue 24: the first hop is a public host (per the patched resolver) that answers 302 to a
    private place: loopback by address, a name resolving to 10.0.0.1, the metadata service, or a name
    that resolves public but connects to loopback (rebinding on the second hop). Each row is
    rejected as `private_address` and the redirect's target is never requested. Nothing leaves
    127.0.0.1: every connect goes to the test server, so a target that were fetched would show in its
    hits. A redirect from the public host to its own /img path is the control: it succeeds."""
    import socket
    from urllib.parse import quote

    real_getaddrinfo, real_socket, port = socket.getaddrinfo, socket.socket, server.port
    names = {"public.test": "93.184.216.34", "internal.test": "10.0.0.1", "rebind.test": "93.184.216.35"}

    def resolve(host, *args, **kwargs):
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return real_getaddrinfo(host, *args, **kwargs)

    class ToTestServer(real_socket):
        """Connects to the test server whatever the address; reports the address asked for as the
        peer (as the network would), except for rebind.test, whose peer shows as loopback."""

        def connect(self, address):
            assert self.family == socket.AF_INET, address  # nothing may leave the machine
            self._asked = address
            return super().connect(("127.0.0.1", port))

        def getpeername(self):
            asked = getattr(self, "_asked", None)
            if asked is None or asked[0] == names["rebind.test"]:
                return super().getpeername()
            return asked

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "socket", ToTestServer)
    public = f"http://public.test:{port}"
    targets = {  # where public.test redirects -> the detail the refusal names
        f"http://127.0.0.1:{port}/img/1.jpg": "resolves to 127.0.0.1",
        f"http://internal.test:{port}/img/2.jpg": "resolves to 10.0.0.1",
        "http://169.254.169.254/img/3.jpg": "resolves to 169.254.169.254",
        f"http://rebind.test:{port}/img/4.jpg": "connected to 127.0.0.1",
    }
    urls = [f"{public}/goto?to={quote(t, safe='')}" for t in targets] + [f"{public}/redirect/0.jpg"]
    meta = write_metadata(tmp_path / "meta.parquet", {"url": urls, "text": ["a caption"] * len(urls)})
    download([str(meta)], tmp_path / "out", config=DownloadConfig(timeout=1.0, deadline=2.5, threads=1))
    rows = list(shard_rows(tmp_path / "out").values())
    assert [r["reason"] for r in rows] == ["private_address"] * len(targets) + [None]
    for row, detail in zip(rows, targets.values()):
        assert detail in row["error_message"], row["error_message"]
    assert server.hits["/goto"] == len(targets)  # the public first hop was requested each time ...
    assert not any(server.hits[f"/img/{i}.jpg"] for i in (1, 2, 3, 4))  # ... its private target never
    assert server.hits["/redirect/0.jpg"] == 1 and server.hits["/img/0.jpg"] == 1  # the control


def test_blocked_addresses_and_opt_out_rules():
    for ip in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "224.0.0.1"):
        assert blocked_address(ip), ip
    for ip in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert not blocked_address(ip), ip
    directives = ("noai", "noimageai", "noindex", "noimageindex")
    assert opt_out(["noai"], directives, "recap") == "noai"
    assert opt_out(["nofollow, NoImageAI"], directives, "recap") == "noimageai"
    assert opt_out(["recap: noindex"], directives, "recap") == "noindex"
    assert opt_out(["googlebot: noai"], directives, "recap") is None
    assert opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], directives, "recap") == "noai"
    assert opt_out(["none"], directives, "recap") == "none"  # none = noindex, nofollow
    assert opt_out(["nofollow"], directives, "recap") is None


def test_ingest_reads_download_failures_and_accounts_every_row(tmp_path, server):
    urls = [server.url("img/0.jpg"), server.url("missing"), server.url("img/1.jpg"), server.url("optout/2.jpg")]
    meta = write_metadata(tmp_path / "meta.parquet", {
        "URL": urls, "TEXT": ["a red square on a plain background"] * 4, "SAMPLE_ID": [11, 12, 13, 14]})
    download([str(meta)], tmp_path / "dl", config=LOCAL)
    lake = Lake(tmp_path / "lake")
    result = ingest([str(tmp_path / "dl")], lake)
    assert result.rows == 2 and result.summary()["download_failed"] == 2
    rejected = {r["key"]: r for r in lake.read(tables.REJECTED).to_pylist()}
    assert {k: (r["stage"], r["reason"]) for k, r in rejected.items()} == {
        "000000001": ("download", "http_404"), "000000003": ("download", "opted_out")}
    assert rejected["000000001"]["uid"] == make_uid("dl/00000.tar", "000000001")
    pairs = {r["key"]: r for r in lake.read(tables.PAIRS).to_pylist()}
    assert pairs["000000000"]["source_uid"] == "11" and pairs["000000002"]["source_uid"] == "13"
    status = lake_status(lake)
    assert status["ingested"] == 4 and status["passed_ingest"] == 2 and status["balanced"]
    assert status["downloaded"] == {"rows": 4, "failed": 2}
    assert status["rejected"]["by_stage"]["download"] == {"http_404": 1, "opted_out": 1}
    text = format_status(status)
    assert "downloaded" in text and "download http_404" in " ".join(text.split())
    again = ingest([str(tmp_path / "dl")], lake)  # unchanged shard: skipped, nothing added
    assert again.shards[0].skipped and lake.read(tables.REJECTED).num_rows == 2


def test_img2dataset_output_failures_are_counted_too(tmp_path):
    """img2dataset's own parquet (status, error_message, no reason column) is read the same way."""
    from tests.helpers import sample, write_tar

    shard = write_tar(tmp_path / "i2d" / "00000.tar", sample("000000000"))
    pq.write_table(pa.table({
        "key": ["000000000", "000000001", "000000002", "000000003"], "url": ["u0", "u1", "u2", "u3"],
        "status": ["success", "failed_to_download", "failed_to_download", "failed_to_resize"],
        "error_message": [None, "HTTP Error 404: Not Found", "<urlopen error timed out>", "cannot identify image"],
        "uid": ["a", "b", "c", "d"]}), shard.with_suffix(".parquet"))
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    reasons = {r["key"]: r["reason"] for r in lake.read(tables.REJECTED).to_pylist() if r["stage"] == "download"}
    assert reasons == {"000000001": "http_404", "000000002": "timeout", "000000003": "image_decode_error"}
    status = lake_status(lake)
    assert status["ingested"] == 4 and status["balanced"]


def test_retry_failed_refetches_transient_failures_only(tmp_path, server):
    urls = [server.url("img/0.jpg"), server.url("flaky/1.jpg"), server.url("missing"), server.url("flaky/2.jpg")]
    meta = write_metadata(tmp_path / "meta.parquet", {"url": urls, "text": ["a red square on a plain background"] * 4})
    out, lake = tmp_path / "dl", Lake(tmp_path / "lake")
    download([str(meta)], out, config=LOCAL)
    assert [r["reason"] for r in shard_rows(out).values()] == [None, "http_503", "http_404", "http_503"]
    ingest([str(out)], lake)
    assert lake_status(lake)["rejected"]["by_stage"]["download"] == {"http_404": 1, "http_503": 2}
    skipped = download([str(meta)], out, config=LOCAL)  # without --retry-failed: a finished shard is kept
    assert skipped.skipped == 1 and server.hits["/flaky/1.jpg"] == 1
    retried = download([str(meta)], out, config=LOCAL, retry_failed=True)
    assert retried.summary()["successes"] == 3
    assert server.hits["/img/0.jpg"] == 1 and server.hits["/missing"] == 1  # neither fetched again
    with tarfile.open(out / "00000.tar") as tf:
        assert sorted(n for n in tf.getnames() if n.endswith(".jpg")) == ["000000000.jpg", "000000001.jpg",
                                                                          "000000003.jpg"]
    ingest([str(out)], lake)  # the rewritten shard is read again: retried samples become pairs
    status = lake_status(lake)
    assert status["passed_ingest"] == 3 and status["rejected"]["by_stage"]["download"] == {"http_404": 1}
    assert status["ingested"] == 4 and status["balanced"]


def test_a_resume_lists_the_folder_and_reads_no_finished_shards_stats(tmp_path, server, monkeypatch):
    """130k finished shards on S3 must not cost 130k GETs: the finished ones are found by one listing."""
    from recap_tasks import storage

    meta = write_metadata(tmp_path / "meta.parquet", {"url": [server.url(f"img/{i}.jpg") for i in range(6)],
                                                      "text": ["a red square on a plain background"] * 6})
    out, config = tmp_path / "dl", DownloadConfig(allow_private_networks=True, samples_per_shard=2, timeout=5)
    download([str(meta)], out, config=config)
    (out / "00001_stats.json").unlink()  # as if killed before shard 1 was finished
    reads, read_bytes = [], storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(os.path.basename(uri)) or read_bytes(uri))
    again = download([str(meta)], out, config=config).summary()
    assert (again["shards"], again["shards_skipped"], again["count"]) == (3, 2, 2)
    assert sum(server.hits.values()) == 8  # 6, then shard 1's 2 rows again
    assert [r for r in reads if r.endswith("_stats.json")] == ["00001_stats.json"]  # the redone shard's own check
    reads.clear()
    assert download([str(meta)], out, config=config).summary()["shards_skipped"] == 3
    assert not [r for r in reads if r.endswith("_stats.json")]


def test_shards_resume_after_kill_9(tmp_path, server):
    """A killed download redoes only the unfinished shard; finished shards are never fetched again."""
    urls = [server.url(f"img/{i}.jpg") for i in range(6)] + [server.url("hold/6.jpg")] + \
        [server.url(f"img/{i}.jpg") for i in range(7, 9)]
    meta = write_metadata(tmp_path / "meta.parquet", {"url": urls, "text": ["a red square on a plain background"] * 9})
    config = tmp_path / "dl.yaml"
    config.write_text("download:\n  timeout: 30\n  deadline: 60\n  threads: 2\n")
    out = tmp_path / "dl"
    cmd = [sys.executable, "-m", "recap_tasks", "download", str(meta), "--out", str(out), "--config", str(config),
           "--samples-per-shard", "3", "--allow-private-networks"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "RECAP_QUIET": "1"})
    try:
        assert server.holding.wait(60), "the download never reached the held URL"
        assert (out / "00001_stats.json").exists() and not (out / "00002_stats.json").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "00002.tar.part").exists() and not (out / "00002.tar").exists()
    server.release()
    result = download([str(meta)], out, config=DownloadConfig(allow_private_networks=True, samples_per_shard=3,
                                                              processes=2, timeout=5))
    assert result.skipped == 2 and result.summary()["shards"] == 3
    assert result.summary()["successes"] == 3  # the rows of the shard downloaded now
    assert all(server.hits[f"/img/{i}.jpg"] == 1 for i in range(6))  # finished shards: not fetched again
    assert server.hits["/hold/6.jpg"] == 2 and not list(out.glob("*.part"))
    assert [p.name for p in sorted(out.glob("*.tar"))] == ["00000.tar", "00001.tar", "00002.tar"]
    lake = Lake(tmp_path / "lake")
    assert ingest([str(out)], lake).rows == 9 and lake_status(lake)["balanced"]


def test_cli_csv_columns_and_a_folder_of_other_metadata_is_refused(tmp_path, server):
    from recap_tasks.cli import main

    csv = tmp_path / "meta.csv"
    csv.write_text("link,alt,id\n" + "".join(f"{server.url(f'img/{i}.jpg')},photo number {i},{100 + i}\n"
                                             for i in range(3)))
    out = tmp_path / "dl"
    args = ["download", str(csv), "--out", str(out), "--url-column", "link", "--caption-column", "alt",
            "--uid-column", "id", "--allow-private-networks", "--samples-per-shard", "1", "--processes", "2"]
    assert main(args) == 0  # three shards over two worker processes
    rows = [r for name in ("00000", "00001", "00002") for r in shard_rows(out, name).values()]
    assert [r["source_uid"] for r in rows] == ["100", "101", "102"]
    assert [r["key"] for r in rows] == ["000000", "000010", "000020"]
    assert all(r["status"] == "success" for r in rows)
    other = write_metadata(tmp_path / "other.parquet", {"url": [server.url("img/0.jpg")], "text": ["x y z"]})
    with pytest.raises(RecapError, match="holds a download of other metadata"):
        download([str(other)], out, config=LOCAL)
    assert main(["download", str(tmp_path / "nope.parquet"), "--out", str(out)]) == 2


def test_metadata_without_a_url_column_is_a_clear_error(tmp_path):
    meta = write_metadata(tmp_path / "meta.parquet", {"link": ["http://x/y.jpg"], "text": ["a b c"]})
    with pytest.raises(RecapError, match="cannot tell which column holds the url"):
        download([str(meta)], tmp_path / "out", config=LOCAL)


def _old_schema_tables(lake: Lake) -> None:
    """`pairs` and `recap` as a lake made before `source_uid` existed holds them."""
    from deltalake import DeltaTable

    from recap_tasks import schemas

    for schema in (schemas.PAIRS, schemas.RECAP):
        old = pa.schema([f for f in schema.arrow if f.name != "source_uid"])
        DeltaTable.create(lake.path(schema.name), old, partition_by=list(schema.partition_by))


def test_datacomp_and_laion_metadata_flow_to_published_rows(tmp_path, server, tiny_model):
    """download -> ingest -> filter -> caption -> validate -> publish: the source uid and sha256 reach
    the published row, in DataComp's and in LAION's column names, into a lake whose tables predate them."""
    from deltalake import DeltaTable

    from recap_tasks.pipeline import run_pipeline

    captions = ["a red square on a plain background", "two dogs playing in the snow",
                "a bowl of fruit on a wooden table"]
    datacomp = write_metadata(tmp_path / "datacomp" / "0000.parquet", {
        "uid": ["9f0e", "77aa", "31bc", "c0de"],
        "url": [server.url("img/0.jpg"), server.url("img/1.jpg"), server.url("missing"), server.url("img/2.jpg")],
        "text": captions[:2] + ["gone", captions[2]],
        "original_width": [320, 328, 0, 336], "original_height": [240] * 4,
        "sha256": [sha("0.jpg"), sha("1.jpg"), None, sha("2.jpg")]})
    laion = write_metadata(tmp_path / "laion" / "part-0.parquet", {
        "SAMPLE_ID": [1001, 1002, 1003], "URL": [server.url("img/3.jpg"), server.url("optout/4.jpg"),
                                                  server.url("img/5.jpg")],
        "TEXT": captions, "WIDTH": [344, 352, 360], "HEIGHT": [240] * 3, "similarity": [0.31, 0.33, 0.29]})
    download([str(datacomp)], tmp_path / "dl" / "datacomp", config=LOCAL)
    download([str(laion)], tmp_path / "dl" / "laion", config=LOCAL)
    lake = Lake(tmp_path / "lake")
    _old_schema_tables(lake)
    summary = run_pipeline([str(tmp_path / "dl" / "datacomp"), str(tmp_path / "dl" / "laion")], lake,
                           model=str(tiny_model), run_id="dl1")
    assert summary["publish"]["inserted"] == 5, summary
    published = DeltaTable(lake.path(tables.RECAP)).to_pandas().set_index("source_uid")
    assert sorted(published.index) == ["1001", "1003", "77aa", "9f0e", "c0de"]
    assert published.loc["9f0e", "sha256"] == sha("0.jpg") and published.loc["1003", "sha256"] == sha("5.jpg")
    assert published.loc["77aa", "org_caption"] == captions[1] and published.loc["1001", "key"] == "000000000"
    status = summary["status"]
    assert status["balanced"] and status["ingested"] == 7 and status["published"] == 5
    assert status["rejected"]["by_stage"]["download"] == {"http_404": 1, "opted_out": 1}


def test_a_downloaded_row_that_ingest_rejects_is_counted_once(tmp_path, server):
    """Issue 19, 1: one good URL, the same URL with a null caption (ingest rejects it), one 404: three
    metadata rows, three input rows in status, matching what the tables hold."""
    meta = write_metadata(tmp_path / "meta.parquet", {
        "url": [server.url("img/0.jpg"), server.url("img/0.jpg"), server.url("missing")],
        "text": pa.array(["a red square on a plain background", None, "gone"], pa.string())})
    download([str(meta)], tmp_path / "dl", config=LOCAL)
    lake = Lake(tmp_path / "lake")
    ingest([str(tmp_path / "dl")], lake)
    pairs, rejected = lake.read(tables.PAIRS), lake.read(tables.REJECTED)
    assert pairs.num_rows == 1 and sorted(rejected.column("stage").to_pylist()) == ["download", "ingest"]
    status = lake_status(lake)
    assert status["ingested"] == 3 == pairs.num_rows + rejected.num_rows
    assert status["rejected"]["total"] == 2 and status["downloaded"] == {"rows": 3, "failed": 1}
    assert set(status["rejected"]["by_stage"]["download"]) == {"http_404"} and status["balanced"]
    # --verify checks the counts the summary sums: a record that over-counts is caught.
    from recap_tasks.status import verify

    assert verify(lake, ["dl/00000.tar"])["ok"]
    from recap_tasks import progress

    rec = progress.latest(lake, stages=("download",)).to_pylist()[0]
    lake.append("progress", pa.Table.from_pylist([{**rec, "rejected": 2, "reasons": '{"http_404": 2}',
                                                   "recorded_at": rec["recorded_at"].replace(year=2100)}]))
    problems = verify(lake, ["dl/00000.tar"])["problems"]
    assert [(p["table"], p["kind"]) for p in problems] == [("rejected", "lost")]
