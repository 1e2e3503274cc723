"""Atomic writes of local files: a reader sees the old file or the new one, never half of one.

The one way Recap publishes a local file (download's shards, stats and manifest). `Lake.writer`
does the same for a local lake through pyarrow's filesystem (tmp file beside, then a move) and
could call `atomic_path` for that case.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, single_writer: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; moved onto `path` when the block ends without an error.

    The temporary file is removed on an error. By default its name holds this process's id, so
    concurrent writers of one path never share it. With `single_writer` (one writer per path, as
    a download shard) it is `path` + ".part": a writer that was killed leaves a file the next
    writer overwrites rather than one more stray file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.part" if single_writer else f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
