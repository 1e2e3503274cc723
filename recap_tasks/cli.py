"""The `recap` command line: one thin verb per Python function (what pods and Airflow run)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from recap_tasks import faults
from recap_tasks.config import RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.runs import check_name, configure_logging

log = logging.getLogger("recap")


def _config(args: argparse.Namespace) -> RecapConfig:
    overrides = {
        "ingest": {"image_column": getattr(args, "image_column", None),
                   "caption_column": getattr(args, "caption_column", None),
                   "key_column": getattr(args, "key_column", None),
                   "url_column": getattr(args, "url_column", None),
                   "dataset": getattr(args, "dataset", None)},
        "download": {"url_column": getattr(args, "dl_url_column", None),
                     "caption_column": getattr(args, "dl_caption_column", None),
                     "uid_column": getattr(args, "uid_column", None),
                     "sha256_column": getattr(args, "sha256_column", None),
                     "samples_per_shard": getattr(args, "samples_per_shard", None),
                     "processes": getattr(args, "processes", None),
                     "threads": getattr(args, "threads", None),
                     "allow_private_networks": getattr(args, "allow_private_networks", None) or None},
        "caption": {"batch_size": getattr(args, "batch_size", None),
                    "max_new_tokens": getattr(args, "max_new_tokens", None),
                    "device": getattr(args, "device", None),
                    "backend": getattr(args, "backend", None)},
        "evaluate": {"p_values": getattr(args, "p", None),
                     "steps": getattr(args, "eval_steps", None),
                     "device": getattr(args, "eval_device", None),
                     "seed": getattr(args, "eval_seed", None)},
    }
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
    from recap_tasks.download import download

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise RecapError(f"--out {args.out} is a file: name a folder (created if missing)")
    _print(download(args.metadata, out, config=_config(args).download, retry_failed=args.retry_failed).summary())


def cmd_ingest(args):
    from recap_tasks.ingest import ingest

    _print(ingest(args.sources, _lake(args), config=_config(args).ingest, run_id=args.run_id,
                  force=args.force).summary())


def cmd_filter(args):
    from recap_tasks.filtering import run_filter

    _print(run_filter(_lake(args, must_exist=True), config=_config(args).filter, run_id=args.run_id,
                      shard_ids=args.shard or None).summary())


def cmd_caption(args):
    from recap_tasks.caption import run_caption

    _print(run_caption(_lake(args, must_exist=True), model=args.model, config=_config(args).caption,
                       run_id=args.run_id, shard_ids=args.shard or None).summary())


def cmd_validate(args):
    from recap_tasks.validate import run_validate

    result = run_validate(_lake(args, must_exist=True), config=_config(args).validate, run_id=args.run_id,
                          shard_ids=args.shard or None)
    if result.batch is None:  # nothing pending: one line, no batch, exit 0
        print(result.note)
        return
    _print(result.summary())


def cmd_publish(args):
    from recap_tasks.publish import run_publish

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
    from recap_tasks.report import build_report

    print(build_report(_lake(args, must_exist=True), run_id=args.run_id))


def cmd_maintain(args):
    from recap_tasks.maintenance import maintain, migrate

    if args.migrate:
        _print(migrate(_lake(args, must_exist=True)))
        return
    _print(maintain(_lake(args, must_exist=True), tables=args.table or None, retention_hours=args.retention_hours,
                    dry_run=args.dry_run, allow_short_retention=args.allow_short_retention))


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
    from recap_tasks.captioning.test_model import make_test_model
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, func, help: str, *, lake: bool = True, parent=None) -> argparse.ArgumentParser:
        p = (parent or sub).add_parser(name, help=help, description=help)
        if lake:
            p.add_argument("--lake", required=True, help="lake root folder (Delta tables live under it)")
            p.add_argument("--config", help="YAML file with ingest/filter/caption/validate sections")
            p.add_argument("--run-id", type=_run_id,
                           help="id recorded with every row this run writes (default: generated)")
        p.set_defaults(func=func)
        return p

    def source_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="folder or glob of webdataset .tar shards, or .parquet files")
        p.add_argument("--image-column", help="parquet column with the image bytes (default: detected)")
        p.add_argument("--caption-column", help="parquet column with the caption (default: detected)")
        p.add_argument("--key-column", help="parquet column with the sample key (default: key/id or row number)")
        p.add_argument("--url-column", help="parquet column with the image url (default: detected)")
        p.add_argument("--dataset", help="name prefixed to the shard ids of these sources (ingest.dataset): "
                                         "needed when another dataset's shards share their folder/file names")

    def caption_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model id or local path (AutoModelForImageTextToText)")
        p.add_argument("--batch-size", type=int, help="images per generate() call")
        p.add_argument("--max-new-tokens", type=int, help="decoding limit (default 128, as in the paper)")
        p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
        p.add_argument("--backend", choices=["transformers", "vllm"],
                       help="caption.backend: transformers (default) or vllm (needs ./dev setup-vllm or RECAP_VLLM_PYTHON)")

    p = stage("download", cmd_download, "download the images of URL metadata (DataComp, LAION parquet or CSV) "
                                        "into webdataset shards that ingest reads", lake=False)
    p.add_argument("metadata", nargs="+", metavar="METADATA", help="parquet/CSV/TSV files, folders or globs")
    p.add_argument("--out", required=True, help="folder for the shards (00000.tar, .parquet, _stats.json)")
    p.add_argument("--config", help="YAML file with a download section")
    p.add_argument("--url-column", dest="dl_url_column", help="column with the image URL (default: url/URL)")
    p.add_argument("--caption-column", dest="dl_caption_column", help="column with the caption (default: text/TEXT)")
    p.add_argument("--uid-column", help="column with the source dataset's id (default: uid/SAMPLE_ID if present)")
    p.add_argument("--sha256-column", help="column with the expected sha256 of the image (default: sha256 if present)")
    p.add_argument("--samples-per-shard", type=_count, help="rows per shard (default 10000)")
    p.add_argument("--processes", type=_count, help="worker processes (default 1)")
    p.add_argument("--threads", type=_count, help="concurrent fetches per process (default 32)")
    p.add_argument("--retry-failed", action="store_true",
                   help="fetch finished shards' transient failures (timeouts, connection errors, 429/5xx) again")
    p.add_argument("--allow-private-networks", action="store_true",
                   help="allow URLs on loopback/private/link-local addresses (refused by default: SSRF)")
    p = stage("ingest", cmd_ingest, "read source shards into the pairs table; bad samples go to rejected")
    source_options(p)
    p.add_argument("--force", action="store_true", help="re-read shards already ingested (adds only new rows)")
    p = stage("filter", cmd_filter, "apply the filter chain to pairs not yet filtered")
    p.add_argument("--shard", action="append", help="only this shard id (repeatable); default: all pending")
    p = stage("caption", cmd_caption, "caption kept pairs that have no caption yet")
    caption_options(p)
    p.add_argument("--shard", action="append", help="only this shard id (repeatable); default: all pending")
    p = stage("validate", cmd_validate, "run the data-quality suite over captioned, unpublished rows")
    p.add_argument("--shard", action="append", help="only this shard id (repeatable); default: all pending")
    p = stage("publish", cmd_publish, "publish the latest validated batch into LAKE/recap (by uid, exactly once)")
    p.add_argument("--batch", type=_run_id, help="batch id to publish (default: the latest validated)")
    p = stage("run", cmd_run, "all stages in order, locally")
    source_options(p)
    caption_options(p)
    p = stage("status", cmd_status, "counts for the lake: ingested, rejected by stage and reason, published")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true",
                   help="also check uid by uid that every row is in one place (reads every shard: slow on a big lake)")
    p.add_argument("--shard", action="append", help="verify only this shard id (repeatable)")
    stage("report", cmd_report, "write the HTML quality report of --run-id (default: the latest validated) and the index")
    p = stage("maintain", cmd_maintain, "compact small files, checkpoint and vacuum old files of the lake's tables")
    p.add_argument("--table", action="append", type=_table, help="only this table (repeatable); default: all")
    p.add_argument("--retention-hours", type=int, default=168, help="vacuum files unreferenced for longer (>=168)")
    p.add_argument("--dry-run", action="store_true", help="list what vacuum would delete; change nothing")
    p.add_argument("--allow-short-retention", action="store_true",
                   help="permit retention below 168 h (breaks readers on older versions)")
    p.add_argument("--migrate", action="store_true",
                   help="rewrite a lake made by an older Recap into shard partitions + progress records (once)")
    p = stage("history", cmd_history, "versions of a table: operation, time, rows, batch id")
    p.add_argument("--table", default="recap", type=_table)
    p.add_argument("--limit", type=_count, default=20)
    p = stage("snapshot", cmd_snapshot, "time travel: write a table as of a version or timestamp to parquet")
    p.add_argument("--table", default="recap", type=_table)
    p.add_argument("--version", type=int)
    p.add_argument("--as-of", help="ISO 8601 timestamp, e.g. 2026-11-27T03:00:00Z")
    p.add_argument("--out", required=True, help="parquet file to write")
    p = stage("export", cmd_export, "write published rows as webdataset shards (image + both captions) for training")
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--shard-size", type=_count, default=1000)
    p.add_argument("--version", type=int, help="export the table as of this version (default: latest)")
    p.add_argument("--p-original", type=float, default=0.8,
                   help="recorded in the manifest: probability a loader picks the original caption")
    p = sub.add_parser("evaluate", help="train small models on the published rows and measure them",
                       description="train small models on the published rows and measure them")
    which = p.add_subparsers(dest="evaluation", required=True, metavar="WHAT")
    p = stage("clip", cmd_evaluate_clip, "train a small CLIP once per caption mix p (chance of the original "
              "caption) and report held-out zero-shot retrieval Recall@1/5/10", parent=which)
    p.add_argument("--p", nargs="+", type=float, metavar="P",
                   help="mix ratios to compare (evaluate.p_values; default 0 0.5 0.8 1.0; the paper: 0.8)")
    p.add_argument("--steps", dest="eval_steps", type=_count, help="training steps per p (evaluate.steps)")
    p.add_argument("--device", dest="eval_device", help="auto, cpu, cuda, cuda:1 ... (evaluate.device)")
    p.add_argument("--seed", dest="eval_seed", type=int, help="initial weights and batch order (evaluate.seed)")
    p = stage("make-test-model", cmd_make_test_model,
              "write a tiny random LLaVA captioner (DIR) and CLIP scorer (DIR/clip) for tests and demos",
              lake=False)
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p = stage("make-sample-data", cmd_make_sample_data, "write the built-in sample webdataset shards", lake=False)
    p.add_argument("dir")
    p.add_argument("--shards", type=int, default=2)
    p = stage("demo", cmd_demo, "sample data + tiny offline model through every stage", lake=False)
    p.add_argument("--workdir", default=".recap-demo", help="where sample data, model and lake go")
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
