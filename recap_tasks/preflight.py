"""Checks before a run writes anything: the source holds shards, the model can load, the lake is writable.

A user error found here costs one failed task in seconds, not a run that ingests and filters
for minutes and then fails (and retries) at the caption stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.shards import list_shards

# A folder a transformers processor can load from holds one of these beside config.json.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def check_model(model: str) -> None:
    """A local model folder needs config.json and a processor; a hub id needs a reachable hub."""
    if not model or not model.strip():
        raise RecapError("no captioning model: set the form's model field or RECAP_MODEL")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecapError(f"model {model}: a model is a folder (config.json, weights, processor), not a file")
        if not (path / "config.json").is_file():
            raise RecapError(f"model {model}: no config.json in the folder; is it a transformers model?")
        if not any((path / f).is_file() for f in _PROCESSOR_FILES):
            raise RecapError(f"model {model}: no processor or tokenizer files (one of {', '.join(_PROCESSOR_FILES)})")
        return
    if model.startswith(("/", "./", "../", "~")) or model.count("/") != 1:
        raise RecapError(f"model {model!r}: no such folder, and not a hub id of the form ORG/NAME")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        raise RecapError(f"model {model!r} is a hub id but model hubs are offline here (HF_HUB_OFFLINE=1): "
                         f"download it and give its local folder")


def check_lake(lake: Lake) -> None:
    """The lake root can be created and written (local lakes; object stores fail on first write)."""
    if not lake.is_local:
        return
    root = lake.root
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RecapError(f"lake {root}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecapError(f"lake {root}: {probe} is not writable by this user")


def check_run(*, source: str | list[str], lake: str, model: str | None) -> int:
    """All checks; returns the number of shards found."""
    names = [source] if isinstance(source, str) else list(source)
    if not any(name and name.strip() for name in names):
        raise RecapError("no source given: name a folder, glob or file of shards (the Source field of the "
                         "trigger form, `source` in the run's conf)")
    shards = list_shards(source)
    if model is not None:
        check_model(model)
    check_lake(Lake(lake))
    return len(shards)
