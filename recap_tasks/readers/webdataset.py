"""Webdataset tar shards in img2dataset's layout: {key}.jpg|png|webp|gif|..., {key}.txt, {key}.json."""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from typing import BinaryIO, Iterator

from recap_tasks import storage
from recap_tasks.readers import RawSample, ShardReport

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_BLOCK = tarfile.BLOCKSIZE
_UNSAFE = "\0unsafe"  # a group's mark: one of the sample's members is unsafe (never a file extension)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def _unsafe(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith("/") or name.startswith("\\") or ":" in name.split("/")[0]:
        return "unsafe_member_name"
    if ".." in name.replace("\\", "/").split("/"):
        return "unsafe_member_name"
    if not member.isfile():
        return "unsafe_member_type"
    return None


class WebDatasetReader:
    """Reads samples from one tar shard without extracting anything to disk."""

    def __init__(self, *, max_image_bytes: int, max_caption_bytes: int):
        self.max_image_bytes = max_image_bytes
        self.max_caption_bytes = max_caption_bytes
        self.report = ShardReport()

    def read(self, path: str) -> Iterator[RawSample]:
        """The samples of the tar at `path` (a local path or s3:// URI), read front to back."""
        with storage.open_sequential(path) as f:
            yield from self._read(f)

    def _read(self, f: BinaryIO) -> Iterator[RawSample]:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        self.report = ShardReport()
        # Mode "r:" (random access, uncompressed) gives each member's data offset: the pointer
        # the caption stage seeks to. tarfile.ReadError on open means no member is readable.
        with tarfile.open(fileobj=f, mode="r:") as tf:
            seen: dict[str, int] = {}
            group: dict[str, tarfile.TarInfo | bytes] = {}
            group_key: str | None = None
            end = 0
            members = iter(tf)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except (tarfile.TarError, EOFError, OSError) as exc:
                    self.report = ShardReport(True, f"unreadable header after offset {end}: {exc}")
                    break
                end = member.offset_data + ((member.size + _BLOCK - 1) // _BLOCK) * _BLOCK
                key, ext = _split_name(member.name)
                problem = _unsafe(member)
                if problem:
                    # A row is a sample (a key): an unsafe member rejects its whole sample, once,
                    # with the first member's reason; the sample's other members go with it.
                    if group_key is not None and key != group_key:
                        yield self._sample(group_key, group, seen, tf)
                        group = {}
                    group_key = key
                    group.setdefault(_UNSAFE, (problem, f"member {member.name!r} ({member.type!r})"))
                    continue
                if member.offset_data + member.size > size:
                    # The shard was cut off inside this member: keep what came before, record the cut.
                    self.report = ShardReport(True, f"cut inside member {member.name!r} at byte {size}")
                    if group_key is not None and group_key != key:
                        yield self._sample(group_key, group, seen, tf)
                        group, group_key = {}, None
                    yield RawSample(key=key, error="shard_truncated", detail=self.report.detail,
                                    occurrence=self._count(seen, key))
                    group, group_key = {}, None
                    break
                if group_key is not None and (key != group_key or ext in group):
                    yield self._sample(group_key, group, seen, tf)
                    group = {}
                group_key = key
                group[ext] = member
            if group_key is not None:
                yield self._sample(group_key, group, seen, tf)
        if not self.report.truncated and not _has_end_marker(f, end, size):
            self.report = ShardReport(True, f"no end-of-archive marker after byte {end} (shard cut off?)")

    @staticmethod
    def _count(seen: dict[str, int], key: str) -> int:
        n = seen.get(key, 0)
        seen[key] = n + 1
        return n

    def _sample(self, key: str, group: dict, seen: dict[str, int], tf: tarfile.TarFile) -> RawSample:
        occurrence = self._count(seen, key)
        sample = RawSample(key=key, occurrence=occurrence)
        if _UNSAFE in group:
            sample.error, sample.detail = group[_UNSAFE]
            return sample
        if occurrence:
            sample.error, sample.detail = "duplicate_key", f"key {key!r} appears {occurrence + 1} times in the shard"
            return sample
        try:
            image_ext = next((e for e in IMAGE_EXTS if e in group), None)
            if image_ext is not None:
                m = group[image_ext]
                sample.image_ext, sample.image_offset, sample.image_size = image_ext, m.offset_data, m.size
                if m.size <= self.max_image_bytes:
                    sample.image = _read(tf, m, m.size)
            if "txt" in group:
                sample.caption = _read(tf, group["txt"], self.max_caption_bytes + 1)
            if "json" in group:
                raw = _read(tf, group["json"], 1 << 20)
                try:
                    meta = json.loads(raw)
                    sample.meta = meta if isinstance(meta, dict) else {}
                except ValueError:
                    sample.meta = {}
                url = sample.meta.get("url")
                sample.url = url if isinstance(url, str) else None
                if sample.caption is None and isinstance(sample.meta.get("caption"), str):
                    sample.caption = sample.meta["caption"]
        except (tarfile.TarError, EOFError, OSError) as exc:
            sample.error, sample.detail = "shard_truncated", f"reading {key!r}: {exc}"
            self.report = ShardReport(True, sample.detail)
        return sample


def _read(tf: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    f = tf.extractfile(member)
    assert f is not None  # regular files only reach here
    data = f.read(min(limit, member.size))
    if len(data) != min(limit, member.size):
        raise EOFError(f"unexpected end of data in {member.name!r}")
    return data


def _has_end_marker(f: BinaryIO, end: int, size: int) -> bool:
    """A complete tar ends with two zero blocks after its last member."""
    if size - end < 2 * _BLOCK:
        return False
    f.seek(end)
    return f.read(2 * _BLOCK) == b"\0" * (2 * _BLOCK)
