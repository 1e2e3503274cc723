"""One filesystem layer for what feeds the lake: local paths and `s3://` URIs through pyarrow's filesystems.

Sources (shards, download metadata) and download outputs are named by a string: a local path or
`s3://bucket/key` (`s3a://` is read as `s3://`). S3 credentials, region and endpoint come from the
standard AWS_* variables, as for the lake (`AWS_ENDPOINT_URL` points at an S3-compatible store).
Reads on S3 are ranged (`open_input`, `read_range`); a file written here is published whole, never
seen half-written under its final name (`output_path`, `open_output`, `write_file`).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import glob
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from recap_tasks.errors import RecapError
from recap_tasks.files import atomic_path

_REMOTE = ("s3://", "s3a://")
_GLOB = "*?["


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """Whether `uri` names an object in S3 (s3://, s3a://) rather than a local file."""
    return isinstance(uri, str) and uri.lower().startswith(_REMOTE)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 client configured from the same AWS_* variables delta-rs reads: one per setting and
    process (a forked child makes its own rather than share the parent's connections)."""
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return _s3_for(os.getpid(), tuple(os.environ.get(n) for n in names))


@functools.lru_cache(maxsize=8)
def _s3_for(pid: int, env: tuple[str | None, ...]) -> pafs.S3FileSystem:
    endpoint = env[0] or env[1]
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    region = env[2] or env[3]
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it (`bucket/key` on S3; local paths resolved)."""
    if is_remote(uri):
        path = uri.split("://", 1)[1].strip("/")
        if not path:
            raise RecapError(f"{uri!r}: name a bucket, e.g. s3://bucket/shards")
        return s3_filesystem(), path
    local = os.fspath(uri)
    return pafs.LocalFileSystem(), str(Path(local.removeprefix("file://")).expanduser().resolve())


def normalize(uri: str | os.PathLike[str]) -> str:
    """The one spelling of a file's name: `s3://bucket/key`, or an absolute local path."""
    fs, path = filesystem(uri)
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base/part/...` for a local folder or an S3 prefix."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base).joinpath(*parts))


def _info(uri: str | os.PathLike[str]) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file (or a folder, an S3 prefix holding objects) is at `uri`."""
    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str | os.PathLike[str]) -> bool:
    """Whether a file (an S3 object) is at `uri`."""
    return _info(uri).type == pafs.FileType.File


def same_file(a: str, b: str) -> bool:
    """Whether `a` and `b` name one file: the same name, or two local paths to one file."""
    if a == b:
        return True
    return not (is_remote(a) or is_remote(b)) and os.path.samefile(a, b)


def stat(uri: str | os.PathLike[str]) -> tuple[int, int]:
    """(size, mtime_ns) of the file at `uri` (on S3 the object's Last-Modified); FileNotFoundError if absent."""
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {uri}")
    return info.size, info.mtime_ns or 0


def open_input(uri: str | os.PathLike[str]) -> pa.NativeFile:
    """The file at `uri` for random access (`read_at`, `seek`): on S3 each read is a ranged GET."""
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def open_sequential(uri: str | os.PathLike[str], *, read_ahead: int = 8 << 20) -> BinaryIO:
    """The file at `uri` for reading mostly front to back (a tar walked member by member): seekable,
    `read_ahead` bytes fetched at a time, so a small read is not one GET each on S3."""
    if not is_remote(uri):
        return open(filesystem(uri)[1], "rb")
    return io.BufferedReader(open_input(uri), read_ahead)


def read_range(uri: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """`size` bytes of the file at `uri` from `offset` (one ranged GET on S3)."""
    with open_input(uri) as f:
        return read_exact(f, size, offset, uri)


# A connection cut mid-response can end an S3 read short without an error from pyarrow's client
# (seen through a proxy that cuts responses: a JSON record read back as b""): every read of a known
# length is checked, and read again.
_SHORT_READ_TRIES = 4


def read_exact(f: pa.NativeFile, size: int, offset: int, what: str | os.PathLike[str]) -> bytes:
    """`size` bytes of the open file `f` from `offset`; a short read is retried, then an OSError."""
    for attempt in range(_SHORT_READ_TRIES):
        data = f.read_at(size, offset)
        if len(data) == size:
            return data
        time.sleep(0.05 * 2**attempt)
    raise OSError(errno.EIO, f"short read: {len(data)} of {size} bytes at offset {offset}, "
                             f"{_SHORT_READ_TRIES} tries (a store or network fault)", str(what))


def read_bytes(uri: str | os.PathLike[str]) -> bytes | None:
    """The whole file at `uri`, or None when there is none (small records: stats, manifests)."""
    try:
        with open_input(uri) as f:
            return read_exact(f, f.size(), 0, uri)
    except FileNotFoundError:
        return None


def remove(uri: str | os.PathLike[str]) -> None:
    """Delete the file at `uri`; absent is fine."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


@contextlib.contextmanager
def output_path(uri: str | os.PathLike[str], *, single_writer: bool = False) -> Iterator[Path]:
    """A local file to write (tarfile, parquet); published at `uri` when the block ends without an error.

    Local: files.atomic_path beside the target (`single_writer`: see there). S3: a temporary local
    file, uploaded once finished (pyarrow completes an S3 upload on close even after an error, so a
    stream onto the final key could publish half a file).
    """
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.create_dir(str(Path(path).parent), recursive=True)
        with atomic_path(path, single_writer=single_writer) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="recap-out-") as tmp:
        local = Path(tmp) / path.rsplit("/", 1)[-1]
        yield local
        write_file(uri, local)


@contextlib.contextmanager
def open_output(uri: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary stream onto `uri`, published whole when the block ends without an error."""
    with output_path(uri) as local, open(local, "wb") as f:
        yield f


def write_file(uri: str | os.PathLike[str], local_path: str | os.PathLike[str]) -> None:
    """Publish the finished local file `local_path` at `uri` (local: copy then rename; S3: one upload)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        with output_path(path) as tmp:
            shutil.copyfile(local_path, tmp)
        return
    # One write call of the whole mapped file: pyarrow sends one PUT, or a multipart upload that
    # S3 shows only once complete. A connection cut mid-upload can leave an object of the wrong size
    # without an error from pyarrow's client (seen: a record read back empty): the size is checked,
    # and the upload repeated.
    size = os.path.getsize(local_path)
    for attempt in range(_SHORT_READ_TRIES):
        with pa.memory_map(os.fspath(local_path)) as src, fs.open_output_stream(path) as out:
            out.write(src.read_buffer())
        stored = fs.get_file_info(path)
        if stored.type == pafs.FileType.File and stored.size == size:
            return
        time.sleep(0.05 * 2**attempt)
    raise OSError(errno.EIO, f"upload of {size} bytes stored {stored.size} bytes, {_SHORT_READ_TRIES} tries "
                             f"(a store or network fault)", str(uri))


def file_sizes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """name -> size of the files directly in `folder` (on S3 one paged listing of the prefix, no object
    read); {} when there is no such folder."""
    fs, path = filesystem(folder)
    try:
        listing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:  # access denied, no such bucket, endpoint unreachable
        raise RecapError(f"cannot list {folder}: {' '.join(str(exc).split())[:300]}") from None
    return {i.base_name: i.size for i in listing if i.type == pafs.FileType.File}


def list_files(source: str, suffixes: tuple[str, ...], *, what: str, plural: str, noun: str) -> list[str]:
    """The files with `suffixes` that a folder (S3: prefix), glob (`**` crosses folders) or file
    `source` names, sorted, as absolute paths or `s3://` URIs; RecapError when it names none
    (`what`: "a .tar or .parquet shard", `plural`: ".tar or .parquet shards", `noun`: "source")."""
    fs, path = filesystem(source)
    try:
        if any(ch in source for ch in _GLOB):
            matches = _glob(source, fs, path)
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                matches = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]
            elif info.type == pafs.FileType.File:
                if not path.endswith(suffixes):
                    raise RecapError(f"{source}: not {what}")
                matches = [path]
            else:
                raise RecapError(f"{noun} not found: {source}")
    except OSError as exc:  # access denied, no such bucket, endpoint unreachable
        raise RecapError(f"{noun} {source}: {' '.join(str(exc).split())[:300]}") from None
    found = sorted({normalize(f"s3://{m}" if is_remote(source) else m) for m in matches if m.endswith(suffixes)})
    if not found:
        raise RecapError(f"no {plural} in {source}")
    return found


def _glob(source: str, fs: pafs.FileSystem, path: str) -> list[str]:
    """Files a glob names: the local filesystem's own glob, or on S3 a listing under the pattern's fixed
    prefix matched segment by segment."""
    if not is_remote(source):
        return [m for m in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(m)]
    path = source.split("://", 1)[1].strip("/")
    fixed = path[:min(path.index(ch) for ch in _GLOB if ch in path)]
    if "/" not in fixed:
        raise RecapError(f"{source}: a bucket name cannot be a pattern")
    prefix = fixed.rsplit("/", 1)[0]
    pattern = path[len(prefix) + 1:].split("/")
    selector = pafs.FileSelector(prefix, recursive=len(pattern) > 1 or "**" in pattern, allow_not_found=True)
    return [i.path for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File and _match(i.path[len(prefix) + 1:].split("/"), pattern)]


def _match(parts: list[str], pattern: list[str]) -> bool:
    """glob.glob's rule on path segments: `*`, `?`, `[...]` within a segment, `**` any number of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])
