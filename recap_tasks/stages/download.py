"""Download: image-URL metadata (DataComp, LAION parquet or CSV) -> webdataset shards that ingest reads.

The output is img2dataset's layout, so `recap ingest OUT` reads it as it reads img2dataset's:

- `00000.tar`: `{key}.jpg|png|webp|gif|...` (the bytes as served), `{key}.txt` (caption),
  `{key}.json` (every metadata column, plus key, url, caption, status, sha256, source_uid);
- `00000.parquet`: one row per metadata row, failures included (status, reason, error_message);
- `00000_stats.json`: counts (success, failures by reason), written last: the shard's completion
  marker. A rerun skips shards that have one (found by one listing of the folder, not a read per
  shard) and redoes the unfinished shard from the start.

Keys are img2dataset's: the shard number (5 digits) then the row's index in the shard, so the same
metadata always gives the same keys (and, through ingest, the same uids). `_download.json` records
the inputs: a rerun on other metadata into the same folder is refused. Fetching is in
recap_tasks.fetch (SSRF refusal, bounded redirects, time and bytes, X-Robots-Tag opt-outs).

The metadata and the output folder may be local or `s3://` (recap_tasks.storage): each shard is
written in a local temporary folder and published whole, so a half-written shard is never seen
under its final name, and the stats files that mark shards finished are listed from the output.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recap_tasks import storage
from recap_tasks.config import DownloadConfig, RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.fetch import Fetcher, FetchFailed, FetchPolicy
from recap_tasks.readers.parquet import pick_column, take_rows
from recap_tasks.runs import progress_bar, utcnow

log = logging.getLogger(__name__)

METADATA_SUFFIXES = (".parquet", ".csv", ".tsv")
# First present wins: DataComp (uid, url, text, sha256), LAION (URL, TEXT, SAMPLE_ID), others.
URL_CANDIDATES = ("url", "URL", "image_url", "img_url")
CAPTION_CANDIDATES = ("text", "TEXT", "caption", "alt_text", "alt", "title")
UID_CANDIDATES = ("uid", "SAMPLE_ID", "sample_id", "id", "image_id")
SHA256_CANDIDATES = ("sha256", "SHA256")
# Failures worth another try with --retry-failed; the others are verdicts (404, opted out, private
# address, wrong sha256, too large, not an image) and stay as they are.
TRANSIENT = {"timeout", "connection_error", "dns_error", "tls_error", "incomplete_body", "download_error",
             "http_408", "http_425", "http_429", "http_500", "http_502", "http_503", "http_504"}
# Columns this stage writes; a metadata column of the same name is replaced in the outputs.
OWN_COLUMNS = ("key", "url", "caption", "status", "reason", "error_message", "sha256", "source_uid")
MANIFEST = "_download.json"
STATS = "_stats.json"  # `{shard}_stats.json`, the completion marker


@dataclass(frozen=True)
class Columns:
    url: str
    caption: str | None
    uid: str | None
    sha256: str | None


@dataclass(frozen=True)
class ShardJob:
    """Rows [start, stop) of one metadata file make shard `number` of the output folder."""

    number: int
    path: str
    start: int
    stop: int
    key_digits: tuple[int, int]  # (shard digits, index digits)
    out: str
    columns: Columns

    @property
    def name(self) -> str:
        return f"{self.number:0{self.key_digits[0]}d}"

    def key(self, index: int) -> str:
        return f"{self.name}{index:0{self.key_digits[1]}d}"


@dataclass
class DownloadResult:
    """What one call downloaded into `out`: the stats of the shards it fetched, and how many shards it
    skipped as finished before (counted from the folder's listing: their stats are not read)."""

    out: str
    shards: list[dict] = field(default_factory=list)  # stats of the shards downloaded now
    skipped: int = 0

    def summary(self) -> dict:
        """`shards`: those given (downloaded now + skipped); rows, successes and reasons: of those downloaded now."""
        reasons: dict[str, int] = {}
        for s in self.shards:
            for reason, n in s["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        count = sum(s["count"] for s in self.shards)
        ok = sum(s["successes"] for s in self.shards)
        return {"out": self.out, "shards": len(self.shards) + self.skipped, "shards_skipped": self.skipped,
                "count": count, "successes": ok, "failed": count - ok, "reasons": dict(sorted(reasons.items()))}


def list_metadata(sources: list[str]) -> list[str]:
    """Metadata files (.parquet, .csv, .tsv) under folders, globs and file names (local or s3://),
    sorted, unique, as absolute paths or s3:// URIs."""
    found: dict[str, None] = {}
    for source in sources:
        found.update(dict.fromkeys(storage.list_files(
            source, METADATA_SUFFIXES, what="a metadata file (.parquet, .csv or .tsv)",
            plural=".parquet, .csv or .tsv metadata", noun="metadata")))
    return list(found)


def download(sources: list[str], out: str | os.PathLike[str], *, config: DownloadConfig | None = None,
             retry_failed: bool = False) -> DownloadResult:
    """Download every row of the metadata `sources` into shards under `out`; finished shards are kept
    (`retry_failed`: see run_jobs)."""
    config = config or RecapConfig.load().download
    out_dir = storage.normalize(out)
    result = run_jobs(out_dir, plan(list_metadata(sources), out_dir, config), config, retry_failed=retry_failed)
    log.info("download %s: %s", out_dir, result.summary())
    return result


def run_jobs(out: str, jobs: list[ShardJob], config: DownloadConfig, *, retry_failed: bool = False) -> DownloadResult:
    """Download the shards of `jobs` (all under `out`) that are not finished; `config.processes` at a time.

    With `retry_failed`, finished shards' transient failures (timeouts, connection errors, 429/5xx)
    are fetched again and the shard rewritten (its successes copied, never fetched twice).
    """
    todo = pending(out, jobs, retry_failed=retry_failed)
    result = DownloadResult(out, skipped=len(jobs) - len(todo))
    log.info("download into %s: %d shards, %d done before, %d to do", out, len(jobs), result.skipped, len(todo))
    if config.processes == 1 or len(todo) <= 1:
        result.shards = [download_shard(job, config) for job in progress_bar(todo, desc="download", unit="shard")]
        return result
    with ProcessPoolExecutor(max_workers=min(config.processes, len(todo)), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(download_shard, job, config) for job in todo]
        done = [f.result() for f in progress_bar(as_completed(futures), desc="download", unit="shard", total=len(futures))]
    by_name = {stats["shard"]: stats for stats in done}
    result.shards = [by_name[job.name] for job in todo]
    return result


def pending(out: str, jobs: list[ShardJob], *, retry_failed: bool = False) -> list[ShardJob]:
    """The jobs (all under `out`) whose shard is not finished, from one listing of `out`; with
    `retry_failed` also the finished ones with transient failures (only their stats are read)."""
    done = finished_names(out)
    return [job for job in jobs if job.name not in done or retry_failed and _worth_retrying(job)]


def _worth_retrying(job: ShardJob) -> bool:
    stats = finished(job)
    return stats is None or any(r in TRANSIENT for r in stats["reasons"])


def plan(files: list[str | os.PathLike[str]], out: str | os.PathLike[str], config: DownloadConfig) -> list[ShardJob]:
    """Split every metadata file into shards of `samples_per_shard` rows, numbered across files.

    Files and `out` are local paths or s3:// URIs. Records the inputs in `out/_download.json`;
    refuses an `out` that holds another download.
    """
    n = config.samples_per_shard
    out = storage.normalize(out)
    inputs, layout = [], []
    for path in map(storage.normalize, files):
        schema, rows = _schema_and_rows(path)
        layout.append((path, _columns(path, schema, config), rows))
        size, mtime_ns = storage.stat(path)
        inputs.append({"path": path, "size": size, "mtime_ns": mtime_ns, "rows": rows})
    manifest = {"inputs": inputs, "samples_per_shard": n}
    previous = _read_json(storage.join(out, MANIFEST))
    if previous is not None and {k: previous.get(k) for k in manifest} != manifest:
        raise RecapError(f"{out} holds a download of other metadata ({MANIFEST}: "
                         f"{[i['path'] for i in previous.get('inputs', [])]}, {previous.get('samples_per_shard')} "
                         f"per shard): download into another folder, or remove it to start over")
    if previous is None:
        _write_json(storage.join(out, MANIFEST), manifest)
    shards = sum(math.ceil(rows / n) for _, _, rows in layout)
    digits = (max(5, len(str(max(shards - 1, 0)))), max(1, math.ceil(math.log10(n))))
    jobs, number = [], 0
    for path, columns, rows in layout:
        for start in range(0, rows, n):
            jobs.append(ShardJob(number, path, start, min(start + n, rows), digits, out, columns))
            number += 1
    return jobs


def _schema_and_rows(path: str) -> tuple[pa.Schema, int]:
    try:
        if path.endswith(".parquet"):
            meta = pq.ParquetFile(storage.open_input(path)).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
        table = _read_csv(path)
        return table.schema, table.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise RecapError(f"metadata {path} cannot be read: {exc}") from None


def _columns(path: str, schema: pa.Schema, config: DownloadConfig) -> Columns:
    names = schema.names

    def pick(wanted: str | None, candidates: tuple[str, ...], what: str, required: bool) -> str | None:
        return pick_column(names, wanted, candidates, what, path, required, section="download")

    return Columns(url=pick(config.url_column, URL_CANDIDATES, "url", True),
                   caption=pick(config.caption_column, CAPTION_CANDIDATES, "caption", True),
                   uid=pick(config.uid_column, UID_CANDIDATES, "uid", False),
                   sha256=pick(config.sha256_column, SHA256_CANDIDATES, "sha256", False))


def _read_csv(path: str) -> pa.Table:
    delimiter = "\t" if path.endswith(".tsv") else ","
    with storage.open_input(path) as f:
        return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))


def _read_rows(job: ShardJob) -> pa.Table:
    """Only the row groups of the metadata file that hold the job's rows."""
    if not job.path.endswith(".parquet"):
        return _read_csv(job.path).slice(job.start, job.stop - job.start)
    with storage.open_input(job.path) as f:
        return take_rows(pq.ParquetFile(f), range(job.start, job.stop))


# One shard ---------------------------------------------------------------------------------------

_FETCHERS: dict[FetchPolicy, Fetcher] = {}


def _fetcher(config: DownloadConfig) -> Fetcher:
    policy = FetchPolicy(timeout=config.timeout, deadline=config.deadline, max_redirects=config.max_redirects,
                         max_bytes=config.max_image_bytes, per_host_connections=config.per_host_connections,
                         allow_private_networks=config.allow_private_networks,
                         respect_opt_out=config.respect_opt_out, opt_out_directives=config.opt_out_directives,
                         user_agent_token=config.user_agent_token)
    if policy not in _FETCHERS:  # one pool of connections per process
        _FETCHERS[policy] = Fetcher(policy)
    return _FETCHERS[policy]


@dataclass
class _Outcome:
    index: int
    image: bytes | None = None
    ext: str | None = None
    sha256: str | None = None
    reason: str | None = None  # None: success
    detail: str | None = None


def download_shard(job: ShardJob, config: DownloadConfig) -> dict:
    """Fetch one shard's rows and write its tar, parquet and (last) stats; returns the stats.

    A shard with stats already is being retried: its successes and final failures are carried over
    from its own files, only transient failures are fetched again.
    """
    out = job.out
    started = time.time()
    table = _read_rows(job)
    rows = table.to_pylist()
    previous = _previous_outcomes(out, job) if _read_stats(out, job.name) is not None else {}
    # Written locally (beside the target, or in a temporary folder for S3), published when whole.
    with storage.output_path(storage.join(out, f"{job.name}.tar"), single_writer=True) as tar_part, \
            storage.output_path(storage.join(out, f"{job.name}.parquet"), single_writer=True) as parquet_part:
        outcomes = _fetch_into(tar_part, job, rows, previous, config)
        _write_parquet(parquet_part, table, job, rows, outcomes)
        # Stats go last: a shard without them is unfinished and is redone whole by the next run.
        storage.remove(storage.join(out, f"{job.name}{STATS}"))
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o is not None and o.reason is not None:
            reasons[o.reason] = reasons.get(o.reason, 0) + 1
    successes = sum(1 for o in outcomes if o is not None and o.reason is None)
    ended = time.time()
    stats = {"shard": job.name, "count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
             "failed_to_resize": 0, "status_dict": {"success": successes, **dict(sorted(reasons.items()))},
             "reasons": dict(sorted(reasons.items())), "retried": bool(previous),
             "source": {"path": job.path, "start": job.start, "stop": job.stop},
             "start_time": started, "end_time": ended, "duration": round(ended - started, 3),
             "finished_at": utcnow().isoformat()}
    _write_json(storage.join(out, f"{job.name}{STATS}"), stats)
    return stats


def _fetch_into(tar_path: Path, job: ShardJob, rows: list[dict], previous: dict[str, _Outcome],
                config: DownloadConfig) -> list[_Outcome | None]:
    """Write the shard's tar at `tar_path`: successes carried over from `previous`, the rest fetched."""
    outcomes: list[_Outcome | None] = [None] * len(rows)
    fetcher = _fetcher(config)
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        if previous:
            _copy_successes(storage.join(job.out, f"{job.name}.tar"), tar, previous)
        todo = []
        for i in range(len(rows)):
            old = previous.get(job.key(i))
            if old is not None and (old.reason is None or old.reason not in TRANSIENT):
                outcomes[i] = old
            else:
                todo.append(i)
        with ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix=f"dl-{job.name}") as pool:
            queue = iter(todo)
            running = set()

            def submit() -> None:
                i = next(queue, None)
                if i is not None:
                    running.add(pool.submit(_fetch_row, fetcher, i, rows[i], job.columns))

            for _ in range(2 * config.threads):
                submit()
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    outcome = future.result()
                    outcomes[outcome.index] = outcome
                    if outcome.reason is None:
                        _add_sample(tar, job, rows[outcome.index], outcome)
                        outcome.image = None  # written: do not hold the shard's images in memory
                    submit()
    return outcomes


def _fetch_row(fetcher: Fetcher, index: int, row: dict, columns: Columns) -> _Outcome:
    try:
        data = fetcher.fetch(row.get(columns.url))
    except FetchFailed as exc:
        return _Outcome(index, reason=exc.reason, detail=exc.detail[:500])
    digest = hashlib.sha256(data).hexdigest()
    expected = row.get(columns.sha256) if columns.sha256 else None
    if isinstance(expected, str) and len(expected) == 64 and expected.lower() != digest:
        return _Outcome(index, reason="sha256_mismatch", detail=f"got {digest}, metadata says {expected.lower()}")
    ext = image_extension(data)
    if ext is None:
        return _Outcome(index, reason="not_an_image", detail=f"{len(data)} bytes starting {data[:16]!r}")
    return _Outcome(index, image=data, ext=ext, sha256=digest)


def image_extension(data: bytes) -> str | None:
    """The file extension of an image by its magic bytes (what ingest's reader looks for)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return None


def _sample_json(job: ShardJob, row: dict, outcome: _Outcome) -> dict:
    meta = {k: _plain(v) for k, v in row.items() if k not in OWN_COLUMNS}
    c = job.columns
    meta.update({"key": job.key(outcome.index), "url": row.get(c.url),
                 "caption": row.get(c.caption) if c.caption else None, "status": "success", "error_message": None, "sha256": outcome.sha256,
                 "source_uid": _uid(row, c)})
    return meta


def _add_sample(tar: tarfile.TarFile, job: ShardJob, row: dict, outcome: _Outcome) -> None:
    key = job.key(outcome.index)
    caption = row.get(job.columns.caption) if job.columns.caption else None
    members = [(f"{key}.{outcome.ext}", outcome.image)]
    if isinstance(caption, str):
        members.append((f"{key}.txt", caption.encode("utf-8", "surrogatepass")))
    members.append((f"{key}.json", json.dumps(_sample_json(job, row, outcome), default=str).encode()))
    now = int(time.time())
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), now, 0o644
        tar.addfile(info, io.BytesIO(data))


def _write_parquet(path: Path, table: pa.Table, job: ShardJob, rows: list[dict],
                   outcomes: list[_Outcome | None]) -> None:
    c = job.columns
    ours = {
        "key": [job.key(i) for i in range(len(rows))],
        "url": [_text(r.get(c.url)) for r in rows],
        "caption": [_text(r.get(c.caption)) if c.caption else None for r in rows],
        "status": ["success" if o.reason is None else "failed_to_download" for o in outcomes],
        "reason": [o.reason for o in outcomes],
        "error_message": [None if o.reason is None else f"{o.reason}: {o.detail}" if o.detail else o.reason
                          for o in outcomes],
        # The sha256 of what was downloaded; for a failure, what the metadata expected.
        "sha256": [o.sha256 if o.reason is None else _text(r.get(c.sha256)) if c.sha256 else None
                   for o, r in zip(outcomes, rows)],
        "source_uid": [_uid(r, c) for r in rows],
    }
    meta = table.drop_columns([n for n in table.column_names if n in OWN_COLUMNS])
    for name, values in ours.items():
        meta = meta.append_column(name, pa.array(values, pa.string()))
    pq.write_table(meta, path)


def _previous_outcomes(out: str, job: ShardJob) -> dict[str, _Outcome]:
    """key -> outcome, from a finished shard's parquet (to retry its transient failures)."""
    with storage.open_input(storage.join(out, f"{job.name}.parquet")) as f:
        table = pq.read_table(f, columns=["key", "reason", "error_message", "sha256"])
    previous = {}
    for i, r in enumerate(table.to_pylist()):
        detail = r["error_message"] or ""
        previous[r["key"]] = _Outcome(i, sha256=r["sha256"] if r["reason"] is None else None, reason=r["reason"],
                                      detail=detail.split(": ", 1)[1] if ": " in detail else None)
    return previous


def _copy_successes(old: str, tar: tarfile.TarFile, previous: dict[str, _Outcome]) -> None:
    """Members of the successful samples of the shard's current tar, copied into the new one."""
    with storage.open_sequential(old) as f, tarfile.open(fileobj=f, mode="r:") as src:
        for member in src:
            key = member.name.split(".", 1)[0]
            if member.isfile() and previous.get(key) is not None and previous[key].reason is None:
                tar.addfile(member, src.extractfile(member))


def _uid(row: dict, columns: Columns) -> str | None:
    value = row.get(columns.uid) if columns.uid else None
    return None if value is None else str(value)


def _text(value: object) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def _plain(value: object) -> object:
    """A metadata value as JSON can hold it (NaN -> null, bytes -> hex)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def finished_names(out: str | os.PathLike[str]) -> set[str]:
    """The names of the finished shards under `out`, from one listing of the folder (no file read): the
    test of a finished shard for `download()` and the DAGs' planner and mapped download instances.

    A shard is finished when its `_stats.json` is there: written last and published whole (an empty
    one, torn by an older tool, is not). Its content is read only where it is needed (`finished`)."""
    return {name.removesuffix(STATS) for name, size in storage.file_sizes(out).items()
            if name.endswith(STATS) and size}


def finished(job: ShardJob) -> dict | None:
    """A finished shard's stats (one read), else None: no stats file, or one that does not parse."""
    return _read_stats(job.out, job.name)


def _read_stats(out: str | os.PathLike[str], name: str) -> dict | None:
    return _read_json(storage.join(out, f"{name}{STATS}"))


def _read_json(uri: str) -> dict | None:
    raw = storage.read_bytes(uri)
    try:
        return None if raw is None else json.loads(raw)
    except ValueError:
        return None  # a torn write of an older tool: treated as unfinished


def _write_json(uri: str, payload: dict) -> None:
    try:
        with storage.open_output(uri) as f:
            f.write(json.dumps(payload, indent=2).encode())
    except OSError as exc:  # no such bucket, no permission, a read-only folder
        raise RecapError(f"cannot write {uri}: {' '.join(str(exc).split())[:300]}") from None
