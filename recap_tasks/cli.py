"""The `recap` command line: one thin verb per Python function (what pods and Airflow run)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recap_tasks import faults
from recap_tasks.config import RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.runs import check_name, configure_logging
from recap_tasks.stages import BY_NAME, STAGES

log = logging.getLogger("recap")


def _config(args: argparse.Namespace) -> RecapConfig:
    """The config file (or RECAP_CONFIG), then the flags of OPTIONS that were given."""
    overrides: dict[str, dict[str, Any]] = {}
    for option in _OPTION_LIST:
        section, name = option.key.split(".")
        value = getattr(args, option.name, None)
        # None: not given, the file's value stands (a switch left off is False, and means the same)
        overrides.setdefault(section, {})[name] = None if value is False else value
    return RecapConfig.load(args.config, **overrides)


def _lake(args: argparse.Namespace, *, must_exist: bool = False) -> Lake:
    if "://" not in args.lake and Path(args.lake).expanduser().exists() and not Path(args.lake).expanduser().is_dir():
        raise RecapError(f"--lake {args.lake} is a file: name a folder (created if missing) or an s3:// URI")
    lake = Lake(args.lake)
    if must_exist and not lake.exists():
        raise RecapError(f"no lake at {lake.uri}: run `recap ingest SOURCE --lake {args.lake}` first")
    return lake


def _print(payload: dict) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_download(args):
    from recap_tasks import storage
    from recap_tasks.stages.download import download

    if storage.is_file(args.out):
        raise RecapError(f"--out {args.out} is a file: name a folder (created if missing) or an s3:// prefix")
    _print(download(args.metadata, args.out, config=_config(args).download, retry_failed=args.retry_failed).summary())


def cmd_ingest(args):
    from recap_tasks.stages.ingest import ingest

    _print(ingest(args.sources, _lake(args), config=_config(args).ingest, run_id=args.run_id,
                  force=args.force).summary())


def cmd_filter(args):
    from recap_tasks.stages.filter import run_filter

    _print(run_filter(_lake(args, must_exist=True), config=_config(args).filter, run_id=args.run_id,
                      shard_ids=args.shard or None).summary())


def cmd_caption(args):
    from recap_tasks.stages.caption import run_caption

    _print(run_caption(_lake(args, must_exist=True), model=args.model, config=_config(args).caption,
                       run_id=args.run_id, shard_ids=args.shard or None).summary())


def cmd_validate(args):
    from recap_tasks.stages.validate import run_validate

    result = run_validate(_lake(args, must_exist=True), config=_config(args).validate, run_id=args.run_id,
                          shard_ids=args.shard or None)
    if result.batch is None:  # nothing pending: one line, no batch, exit 0
        print(result.note)
        return
    _print(result.summary())


def cmd_publish(args):
    from recap_tasks.stages.publish import run_publish

    _print(run_publish(_lake(args, must_exist=True), batch_id=args.batch, run_id=args.run_id).summary())


def cmd_run(args):
    from recap_tasks.pipeline import run_pipeline

    summary = run_pipeline(args.sources, _lake(args), model=args.model, config=_config(args), run_id=args.run_id)
    _print({k: summary[k] for k in ("run_id", "ingest", "filter", "caption", "validate", "publish", "report")})
    print(f"published table: {summary['published_table']}", file=sys.stderr)
    print(f"quality report : {summary['report'] or 'none: ' + summary['validate']['note']}", file=sys.stderr)


def cmd_demo(args):
    from recap_tasks.pipeline import run_demo
    from recap_tasks.status import format_status

    summary = run_demo(args.workdir)
    print(format_status(summary["status"]))
    print()
    print(f"published table  : {summary['published_table']}")
    print(f"quality report   : {summary['report'] or 'none: ' + summary['validate']['note']}")
    print(f"GX Data Docs     : {summary['data_docs'] or 'none'}")
    print(f"run summary      : {summary['lake']}/_runs/{summary['run_id']}/summary.json")
    print(f"read it back     : python -c \"from deltalake import DeltaTable; "
          f"print(DeltaTable('{summary['published_table']}').to_pandas().head())\"")


def cmd_status(args):
    from recap_tasks.status import format_status, format_verified, lake_status, verify

    lake = _lake(args, must_exist=True)
    status = lake_status(lake)
    verified = None
    if args.verify or args.shard:
        from recap_tasks.progress import latest, require_known

        if args.shard:
            require_known(lake, args.shard)
        shards = args.shard or sorted(set(latest(lake).column("shard_id").to_pylist()))
        verified = verify(lake, shards)
        status["verified"] = verified
        status["balanced"] = status["balanced"] and verified["ok"]
    if args.json:
        _print(status)
    else:
        print(format_status(status))
        if verified is not None:
            print(format_verified(verified))
    if verified is not None and not verified["ok"]:
        return 1  # a scheduled check alerts on the exit status
    return 0


def cmd_report(args):
    from recap_tasks.stages.report import build_report

    print(build_report(_lake(args, must_exist=True), run_id=args.run_id))


def cmd_maintain(args):
    from recap_tasks.maintenance import maintain, migrate

    if args.migrate:
        _print(migrate(_lake(args, must_exist=True)))
        return
    _print(maintain(_lake(args, must_exist=True), tables=args.table or None, retention_hours=args.retention_hours,
                    dry_run=args.dry_run, allow_short_retention=args.allow_short_retention,
                    take_over=args.take_over))


def _out_file(path: str, lake: Lake | None = None) -> str:
    """An output path for a command that is not a stage: its folder must exist, and it must not lie
    inside the lake (links resolved), where it would write into the lake's tables."""
    target = Path(path).expanduser().resolve()
    folder = target.parent
    if not folder.is_dir():
        raise RecapError(f"--out {path}: folder {folder} does not exist; create it first")
    if lake is not None and lake.is_local and (target == lake.root or lake.root in target.parents):
        raise RecapError(f"--out {path} is inside the lake {lake.uri}: write exports and snapshots outside it")
    return path


def cmd_history(args):
    from recap_tasks.maintenance import history

    _print({"table": args.table, "versions": history(_lake(args, must_exist=True), args.table, args.limit)})


def cmd_snapshot(args):
    import pyarrow.parquet as pq

    from recap_tasks.maintenance import snapshot

    if args.version is None and args.as_of is None:
        raise RecapError("name a --version or an --as-of timestamp")
    lake = _lake(args, must_exist=True)
    out = _out_file(args.out, lake)
    data = snapshot(lake, args.table, version=args.version, as_of=args.as_of)
    pq.write_table(data, out)
    _print({"table": args.table, "version": args.version, "as_of": args.as_of, "rows": data.num_rows,
            "out": args.out})


def cmd_export(args):
    from recap_tasks.export import export_webdataset

    lake = _lake(args, must_exist=True)
    _print(export_webdataset(lake, _out_file(args.out.rstrip("/"), lake), shard_size=args.shard_size,
                             version=args.version, p_original=args.p_original))


def cmd_evaluate_clip(args):
    from recap_tasks.evaluate import evaluate_clip

    result = evaluate_clip(_lake(args, must_exist=True), config=_config(args).evaluate, run_id=args.run_id)
    _print(result)
    print(f"evaluation: {result['lake']}/{result['path']}", file=sys.stderr)


def cmd_make_test_model(args):
    from recap_tasks.captioning.tiny_model import make_test_model
    from recap_tasks.filters.clip import make_test_clip_model

    captioner = make_test_model(args.dir, seed=args.seed)
    clip = make_test_clip_model(Path(args.dir) / "clip", seed=args.seed)
    print(captioner)
    print(f"tiny CLIP scorer: {clip}  (use as caption.clip_model / filter.clip_model)", file=sys.stderr)


def cmd_make_sample_data(args):
    from recap_tasks.sample_data import make_sample_data

    print(make_sample_data(args.dir, shards=args.shards))


def _run_id(value: str) -> str:
    try:
        return check_name(value, "--run-id")
    except RecapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _table(value: str) -> str:
    from recap_tasks.schemas import TABLES

    if value not in TABLES:
        raise argparse.ArgumentTypeError(f"unknown table {value!r}; known: {', '.join(sorted(TABLES))}")
    return value


def _count(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {n}")
    return n


@dataclass(frozen=True)
class Option:
    """A flag that sets one config key. Its help's {key}, {default} and {choices} are read from the config
    dataclass, so the help cannot drift from it; a bool key is a switch, a Literal key has its choices."""

    flag: str
    key: str  # section.field of RecapConfig
    help: str
    dest: str | None = None  # default: the flag's name; unique across OPTIONS, since _config reads them all
    type: Callable[[str], Any] | None = None
    nargs: str | None = None
    metavar: str | None = None

    @property
    def name(self) -> str:
        return self.dest or self.flag.removeprefix("--").replace("-", "_")


# Every flag that sets a config key, grouped as verbs take them: the one place a flag meets its key.
# The parser's options and _config's overrides are both made from this table.
OPTIONS: dict[str, tuple[Option, ...]] = {
    "source": (
        Option("--image-column", "ingest.image_column", "parquet column with the image bytes (default: detected)"),
        Option("--caption-column", "ingest.caption_column", "parquet column with the caption (default: detected)"),
        Option("--key-column", "ingest.key_column",
               "parquet column with the sample key (default: key/id or row number)"),
        Option("--url-column", "ingest.url_column", "parquet column with the image url (default: detected)"),
        Option("--dataset", "ingest.dataset", "name prefixed to the shard ids of these sources ({key}): "
                                              "needed when another dataset's shards share their folder/file names"),
    ),
    "download": (
        Option("--url-column", "download.url_column", "column with the image URL (default: url/URL)",
               dest="dl_url_column"),
        Option("--caption-column", "download.caption_column", "column with the caption (default: text/TEXT)",
               dest="dl_caption_column"),
        Option("--uid-column", "download.uid_column",
               "column with the source dataset's id (default: uid/SAMPLE_ID if present)"),
        Option("--sha256-column", "download.sha256_column",
               "column with the expected sha256 of the image (default: sha256 if present)"),
        Option("--samples-per-shard", "download.samples_per_shard", "rows per shard (default {default})", type=_count),
        Option("--processes", "download.processes", "worker processes (default {default})", type=_count),
        Option("--threads", "download.threads", "concurrent fetches per process (default {default})", type=_count),
    ),
    # Apart from "download" only so that download's help keeps --retry-failed before it.
    "private-networks": (
        Option("--allow-private-networks", "download.allow_private_networks",
               "allow URLs on loopback/private/link-local addresses (refused by default: SSRF)"),
    ),
    "caption": (
        Option("--batch-size", "caption.batch_size", "images per generate() call (default {default})", type=int),
        Option("--max-new-tokens", "caption.max_new_tokens", "decoding limit (default {default}, as in the paper)",
               type=int),
        Option("--device", "caption.device", "auto, cpu, cuda, cuda:1 ... (default {default})"),
        Option("--backend", "caption.backend",
               "{key}: {choices} (default {default}; vllm needs ./dev setup-vllm or RECAP_VLLM_PYTHON)"),
    ),
    "evaluate": (
        Option("--p", "evaluate.p_values", "mix ratios to compare ({key}; default {default}; the paper: 0.8)",
               type=float, nargs="+", metavar="P"),
        Option("--steps", "evaluate.steps", "training steps per p ({key}, default {default})", dest="eval_steps",
               type=_count),
        Option("--device", "evaluate.device", "auto, cpu, cuda, cuda:1 ... ({key}, default {default})",
               dest="eval_device"),
        Option("--seed", "evaluate.seed", "initial weights and batch order ({key}, default {default})",
               dest="eval_seed", type=int),
    ),
}
_OPTION_LIST = tuple(option for group in OPTIONS.values() for option in group)


def _config_field(key: str) -> tuple[Any, Any]:
    """The default and the type of a config key such as caption.batch_size, from its dataclass."""
    section, name = key.split(".")
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(RecapConfig)}[section]
    field = {f.name: f for f in dataclasses.fields(section_cls)}[name]
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return default, typing.get_type_hints(section_cls)[name]


def _add_options(parser: argparse.ArgumentParser, group: str) -> None:
    for option in OPTIONS[group]:
        default, hint = _config_field(option.key)
        choices = list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help = option.help.format(key=option.key, default=shown, choices=" or ".join(choices or ()))
        if hint is bool:
            parser.add_argument(option.flag, dest=option.name, action="store_true", help=help)
        else:
            parser.add_argument(option.flag, dest=option.name, type=option.type, nargs=option.nargs,
                                metavar=option.metavar, choices=choices, help=help)


def _verb(sub, name: str, func, help: str | None = None, *, lake: bool = True) -> argparse.ArgumentParser:
    """A verb's parser; a stage's help is its line in recap_tasks.stages."""
    help = help or BY_NAME[name].help
    p = sub.add_parser(name, help=help, description=help)
    if lake:
        p.add_argument("--lake", required=True, help="lake root folder (Delta tables live under it)")
        p.add_argument("--config", help="YAML file with ingest/filter/caption/validate sections")
        p.add_argument("--run-id", type=_run_id, help="id recorded with every row this run writes (default: generated)")
    p.set_defaults(func=func)
    return p


def _shard_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", action="append", help="only this shard id (repeatable); default: all pending")


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folder or glob (local or s3://) of webdataset .tar shards, or .parquet files")
    _add_options(p, "source")


def _caption_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model id or local path (AutoModelForImageTextToText)")
    _add_options(p, "caption")


def _download_verb(sub) -> None:
    p = _verb(sub, "download", cmd_download, lake=False)
    p.add_argument("metadata", nargs="+", metavar="METADATA",
                   help="parquet/CSV/TSV files, folders or globs (local or s3://)")
    p.add_argument("--out", required=True,
                   help="folder or s3:// prefix for the shards (00000.tar, .parquet, _stats.json)")
    p.add_argument("--config", help="YAML file with a download section")
    _add_options(p, "download")
    p.add_argument("--retry-failed", action="store_true",
                   help="fetch finished shards' transient failures (timeouts, connection errors, 429/5xx) again")
    _add_options(p, "private-networks")


def _ingest_verb(sub) -> None:
    p = _verb(sub, "ingest", cmd_ingest)
    _source_options(p)
    p.add_argument("--force", action="store_true", help="re-read shards already ingested (adds only new rows)")


def _filter_verb(sub) -> None:
    _shard_option(_verb(sub, "filter", cmd_filter))


def _caption_verb(sub) -> None:
    p = _verb(sub, "caption", cmd_caption)
    _caption_options(p)
    _shard_option(p)


def _validate_verb(sub) -> None:
    _shard_option(_verb(sub, "validate", cmd_validate))


def _publish_verb(sub) -> None:
    p = _verb(sub, "publish", cmd_publish)
    p.add_argument("--batch", type=_run_id, help="batch id to publish (default: the latest validated)")


def _report_verb(sub) -> None:
    _verb(sub, "report", cmd_report)


# The verb of each stage; build_parser adds them in recap_tasks.stages.STAGES order.
_STAGE_VERBS = {"download": _download_verb, "ingest": _ingest_verb, "filter": _filter_verb,
                "caption": _caption_verb, "validate": _validate_verb, "publish": _publish_verb,
                "report": _report_verb}


def _run_verb(sub) -> None:
    p = _verb(sub, "run", cmd_run, "all stages in order, locally")
    _source_options(p)
    _caption_options(p)


def _status_verb(sub) -> None:
    p = _verb(sub, "status", cmd_status, "counts for the lake: ingested, rejected by stage and reason, published")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true",
                   help="also check uid by uid that every row is in one place (reads every shard: slow on a big lake)")
    p.add_argument("--shard", action="append", help="verify only this shard id (repeatable)")


def _maintain_verb(sub) -> None:
    p = _verb(sub, "maintain", cmd_maintain,
              "compact small files, checkpoint and vacuum old files of the lake's tables")
    p.add_argument("--table", action="append", type=_table, help="only this table (repeatable); default: all")
    p.add_argument("--retention-hours", type=int, default=168, help="vacuum files unreferenced for longer (>=168)")
    p.add_argument("--dry-run", action="store_true", help="list what vacuum would delete; change nothing")
    p.add_argument("--allow-short-retention", action="store_true",
                   help="permit retention below 168 h (breaks readers on older versions)")
    p.add_argument("--take-over", action="store_true",
                   help="take over tables held by a maintain that died (two live maintains would duplicate rows)")
    p.add_argument("--migrate", action="store_true",
                   help="rewrite a lake made by an older Recap into shard partitions + progress records (once)")


def _history_verb(sub) -> None:
    p = _verb(sub, "history", cmd_history, "versions of a table: operation, time, rows, batch id")
    p.add_argument("--table", default="recap", type=_table)
    p.add_argument("--limit", type=_count, default=20)


def _snapshot_verb(sub) -> None:
    p = _verb(sub, "snapshot", cmd_snapshot, "time travel: write a table as of a version or timestamp to parquet")
    p.add_argument("--table", default="recap", type=_table)
    p.add_argument("--version", type=int)
    p.add_argument("--as-of", help="ISO 8601 timestamp, e.g. 2026-11-27T03:00:00Z")
    p.add_argument("--out", required=True, help="parquet file to write")


def _export_verb(sub) -> None:
    p = _verb(sub, "export", cmd_export,
              "write published rows as webdataset shards (image + both captions) for training")
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--shard-size", type=_count, default=1000)
    p.add_argument("--version", type=int, help="export the table as of this version (default: latest)")
    p.add_argument("--p-original", type=float, default=0.8,
                   help="recorded in the manifest: probability a loader picks the original caption")


def _evaluate_verb(sub) -> None:
    help = "train small models on the published rows and measure them"
    which = sub.add_parser("evaluate", help=help, description=help).add_subparsers(
        dest="evaluation", required=True, metavar="WHAT")
    _add_options(_verb(which, "clip", cmd_evaluate_clip,
                       "train a small CLIP once per caption mix p (chance of the original caption) "
                       "and report held-out zero-shot retrieval Recall@1/5/10"), "evaluate")


def _make_test_model_verb(sub) -> None:
    p = _verb(sub, "make-test-model", cmd_make_test_model,
              "write a tiny random LLaVA captioner (DIR) and CLIP scorer (DIR/clip) for tests and demos", lake=False)
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)


def _make_sample_data_verb(sub) -> None:
    p = _verb(sub, "make-sample-data", cmd_make_sample_data, "write the built-in sample webdataset shards",
              lake=False)
    p.add_argument("dir")
    p.add_argument("--shards", type=int, default=2)


def _demo_verb(sub) -> None:
    p = _verb(sub, "demo", cmd_demo, "sample data + tiny offline model through every stage", lake=False)
    p.add_argument("--workdir", default=".recap-demo", help="where sample data, model and lake go")


# The verbs that are not stages, in the order `recap --help` lists them after the stages.
_OTHER_VERBS = (_run_verb, _status_verb, _maintain_verb, _history_verb, _snapshot_verb, _export_verb,
                _evaluate_verb, _make_test_model_verb, _make_sample_data_verb, _demo_verb)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        _STAGE_VERBS[stage.name](sub)
    for add_verb in _OTHER_VERBS:
        add_verb(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    faults.arm(args.command)  # RECAP_FAULT: crash tests only (recap_tasks/faults.py)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print(f"recap {args.command}: interrupted; finished shards are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        message = expected_error(exc)
        if message is None:
            raise  # a bug: the traceback is the report
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug or isinstance(exc, RecapError) else " (--debug shows the traceback)"
        message = " ".join(message.split())  # one line, whatever the cause's text held
        print(f"recap {args.command}: error: {message[:1500]}{hint}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) else 0


# Transport failures of an object store as delta-rs (object_store) and pyarrow (AWS SDK) word them.
_STORE_ERRORS = ("Generic S3 error", "HTTP error", "error sending request", "error reading a body",
                 "AWS Error NETWORK_CONNECTION", "AWS Error SLOW_DOWN", "AWS Error INTERNAL_FAILURE",
                 "AWS Error SERVICE_UNAVAILABLE", "Connection reset", "connection closed")


def expected_error(exc: BaseException) -> str | None:
    """One line for a failure the user can act on (config, I/O, storage, corrupt table, model);
    None for anything else, which is a bug and keeps its traceback."""
    import errno

    from deltalake.exceptions import DeltaError

    if isinstance(exc, RecapError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {exc.filename or 'the lake'}: free space or point --lake elsewhere"
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {exc.filename or 'the lake'}: {exc.strerror} (check permissions or mount)"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = " ".join(str(exc).split())[:400]
    if any(marker in text for marker in _STORE_ERRORS):
        return f"object store request failed ({text}): a store or network fault that outlasted the client's " \
               f"retries; every commit is all or nothing, so rerun to resume"
    if isinstance(exc, DeltaError) or type(exc).__module__.startswith("deltalake"):
        if "No space left" in text:
            return f"disk full writing the lake: free space or point --lake elsewhere ({text})"
        if "Read-only file system" in text or "Permission denied" in text:
            return f"cannot write the lake: {text}"
        return f"Delta table error: {text}. A corrupt or missing log entry or data file: restore it, " \
               f"or time-travel to an earlier version (`recap history`, `recap snapshot`)"
    import pyarrow as pa

    if isinstance(exc, (pa.ArrowInvalid, pa.ArrowIOError)):
        return f"unreadable data file: {text}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {text}"
    return None


if __name__ == "__main__":
    sys.exit(main())
