"""`recap report`: one self-contained HTML quality report per run, and an index with trends.

Written at stable paths under the lake: `_reports/runs/<run id>/report.html` (one per validated
batch) and `_reports/index.html` (every run, trends across runs, link to each report). Plots are
PNGs embedded as data URIs, so a report is a single file that opens anywhere (a browser, the
Airflow UI plugin, an object-store console).
"""

from __future__ import annotations

import base64
import html
from urllib.parse import quote
import io
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks import quality
from recap_tasks.batches import Batch, all_batches, read_uids
from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.status import lake_status

log = logging.getLogger(__name__)

# Words that say nothing about an image; left out of the top-words chart.
_STOP = set("""a an the of in on with and at to is are it its this that there be as by for from or
near next while which who has have into onto over under up down out his her their he she they""".split())

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1f2933;padding:0 1rem} h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #d9e2ec;padding-bottom:.3rem} .muted{color:#627d98} .grid{display:grid;
grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:.8rem} .card{background:#f0f4f8;border-radius:8px;
padding:.8rem} .card b{display:block;font-size:1.5rem} table{border-collapse:collapse;width:100%;font-size:.9rem}
td,th{border-bottom:1px solid #e4e7eb;padding:.35rem .5rem;text-align:left;vertical-align:top}
.ok{color:#2f8132;font-weight:600} .bad{color:#c62828;font-weight:600} img{max-width:100%}
.thumb{width:160px;min-width:160px;max-width:160px;max-height:160px;object-fit:contain;border-radius:4px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1rem}
.warn{background:#fff3c4;border-left:4px solid #f0b429;padding:.6rem .8rem}
"""


def _config_section(lake: Lake, batch: Batch) -> str:
    """The configuration the run ran with (saved by `recap run` and the Airflow planner)."""
    raw = lake.read_bytes(f"_runs/{batch.batch_id}/config.yaml")
    if raw is None:
        return ""
    return f"<h2>Configuration</h2><pre>{html.escape(raw.decode('utf-8', 'replace'))}</pre>"


def _docs_link(page: str | None) -> str:
    """A link to the batch's Data Docs page, relative to the run report (works in the lake's
    folder, in the Airflow UI's /recap/lake/ view and on an object store alike)."""
    if not page or "/_reports/data_docs/" not in page.replace("\\", "/"):
        return html.escape(page or "-")
    rel = "../../data_docs/" + page.replace("\\", "/").split("/_reports/data_docs/", 1)[1]
    return f"<a href='{html.escape(quote(rel, safe='/'))}'>{html.escape(rel.rsplit('/', 1)[-1])}</a>"


def build_report(lake: Lake, *, run_id: str | None = None) -> str:
    """Write the report of `run_id` (default: the latest validated batch) and the index; return its path."""
    batches = all_batches(lake)
    if not batches:
        raise RecapError(f"nothing validated in {lake.uri} yet: run `recap validate` first")
    batch = batches[-1] if run_id is None else Batch.load(lake, run_id)
    if batch is None:
        raise RecapError(f"no validated batch {run_id!r} in {lake.uri}; known: {[b.batch_id for b in batches][-5:]}")
    page = _run_page(lake, batch)
    rel = f"_reports/runs/{batch.batch_id}/report.html"
    lake.write_bytes(rel, page.encode())
    lake.write_bytes("_reports/index.html", _index_page(lake, batches).encode())
    log.info("report for %s written to %s/%s", batch.batch_id, lake.uri, rel)
    return f"{lake.uri}/{rel}"


_POINTERS = ["uid", "shard_id", "sha256", "source_uri", "source_format", "image_offset", "image_size",
             "source_row", "image_column"]
_SAMPLES, _WORST = 8, 5


def _run_rows(lake: Lake, batch: Batch):
    """The run's rows (published, or those checked for a refused batch) with their caption flags,
    references and image pointers; where they came from; and the shards' pairs (pointers, original
    captions, references), read once for the whole page."""
    published = lake.read(tables.RECAP, ["uid", "re_caption", "org_caption", "re_length", "org_length",
                                        "re_clip_score", "org_clip_score", "model", "url"], shards=batch.shards)
    uids = read_uids(lake, batch)
    rows = published.filter(pc.is_in(published.column("uid"), value_set=uids))
    source = "published rows of this run"
    if rows.num_rows == 0:  # a refused batch: show what was checked instead
        from recap_tasks.batches import candidate_rows

        rows = candidate_rows(lake, batch.shards, uids).select(published.column_names)
        source = "checked rows of this run (not published)"
    flags = lake.read(tables.CAPTIONS, ["uid", "is_refusal", "prompt_echo", "distinct_ngram_ratio"], shards=batch.shards)
    pairs = lake.read(tables.PAIRS, [*_POINTERS, "org_caption", "references"], shards=batch.shards)
    rows = rows.join(flags, "uid", join_type="left outer").join(pairs.drop_columns(["org_caption"]), "uid",
                                                               join_type="left outer")
    return rows.sort_by("uid"), source, pairs


def run_metrics(rows, *, min_distinct_ratio: float) -> dict:
    """The report's per-run figures (also saved beside the report, for the index's trends)."""
    org, re_ = rows.column("org_caption").to_pylist(), rows.column("re_caption").to_pylist()
    refs = [quality.parse_references(r) for r in rows.column("references").to_pylist()]
    hallucination = quality.chair(re_, refs)
    hallucination_org = quality.chair(org, refs)
    return {
        "rows": rows.num_rows,
        # The published word counts (hygiene.word_count), the same the cards and histograms show.
        "length": {"recaption": quality.length_stats(rows.column("re_length").to_pylist()),
                   "original": quality.length_stats(rows.column("org_length").to_pylist())},
        "vocabulary": quality.vocabulary(org, re_),
        "clip_win_rate": quality.win_rate(rows.column("re_clip_score").to_pylist(),
                                          rows.column("org_clip_score").to_pylist()),
        "hygiene": quality.hygiene(rows.column("is_refusal").to_pylist(), rows.column("prompt_echo").to_pylist(),
                                   rows.column("distinct_ngram_ratio").to_pylist(),
                                   min_distinct_ratio=min_distinct_ratio),
        "hallucination": {k: v for k, v in hallucination.items() if k != "per_row"},
        "hallucination_original": {k: v for k, v in hallucination_org.items() if k != "per_row"},
        "_per_row_hallucinated": hallucination["per_row"],
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _run_page(lake: Lake, batch: Batch) -> str:
    """The report page of one validated batch; writes the batch's metrics beside it."""
    from recap_tasks.config import ValidateConfig

    status = lake_status(lake)
    rows, source, pairs = _run_rows(lake, batch)
    metrics = run_metrics(rows, min_distinct_ratio=ValidateConfig().min_distinct_ngram_ratio)
    metrics["face_boxes"] = face_sources(lake, batch.shards, rows.column("uid").combine_chunks())
    hal_of = dict(zip(rows.column("uid").to_pylist(), metrics.pop("_per_row_hallucinated")))
    lake.write_json(f"_reports/runs/{batch.batch_id}/metrics.json", {"batch_id": batch.batch_id, **metrics})
    org_len = np.asarray(rows.column("org_length").to_pylist() or [], dtype=float)
    re_len = np.asarray(rows.column("re_length").to_pylist() or [], dtype=float)
    samples, lowest_clip, most_hal = _picked_rows(rows, hal_of)
    quarantined = _quarantined_rows(lake, batch, pairs)
    thumbs = _thumbnails(lake, [*samples, *lowest_clip, *most_hal, *quarantined])
    parts = [
        f"<h1>Recap quality report: {html.escape(batch.batch_id)}</h1>",
        f"<p class=muted>Validated {html.escape(batch.validated_at)} · lake {html.escape(lake.uri)} · "
        f"figures over the {source} · <a href='../../index.html'>all runs</a></p>",
        _test_model_note(rows),
        _cards(batch, metrics, status, org_len, re_len),
        "<h2>Recaptions against originals</h2>", _paper_table(metrics, test_model=bool(test_models(rows))),
        "<h2>Distributions</h2><div class=plots>" + _plots(rows, status, org_len, re_len) + "</div>",
        "<h2>Sample rows</h2>", _samples_table(samples, thumbs, hal_of),
        "<h2>Worst rows</h2>",
        "<h3>Lowest CLIP score of the recaption</h3>", _samples_table(lowest_clip, thumbs, hal_of),
        "<h3>Most hallucinated objects</h3>", _samples_table(most_hal, thumbs, hal_of),
        "<h3>Quarantined by the quality gate</h3>", _samples_table(quarantined, thumbs, hal_of),
        "<h2>Face boxes</h2>", _face_table(metrics["face_boxes"]),
        _clip_evaluation_section(lake),
        "<h2>Validation results</h2>", _results_table(batch),
        _config_section(lake, batch),
        "<h2>Where every row went</h2>", _status_table(status),
    ]
    return _page(f"Recap report {batch.batch_id}", "".join(parts))


def _cards(batch: Batch, metrics: dict, status: dict, org_len: np.ndarray, re_len: np.ndarray) -> str:
    """The headline figures of a batch, one card each."""
    vocab, wins, hal = metrics["vocabulary"], metrics["clip_win_rate"], metrics["hallucination"]
    verdict = "published" if batch.published else ("valid, not yet published" if batch.success else "REFUSED")
    cards = [("rows checked", batch.rows), ("quarantined", batch.quarantined), ("verdict", verdict),
             ("mean words, recaption", f"{re_len.mean():.1f}" if len(re_len) else "-"),
             ("mean words, original", f"{org_len.mean():.1f}" if len(org_len) else "-"),
             ("recaptions cover", f"{_pct(vocab['recaption_coverage'])} of vocabulary"),
             ("CLIP win rate, recaption", _pct(wins["rate"])),
             ("hallucination CHAIR-s", _pct(hal["chair_s"])),
             ("published in lake", status["published"])]
    return "<div class=grid>" + "".join(f"<div class=card>{html.escape(k)}<b>{html.escape(str(v))}</b></div>"
                                        for k, v in cards) + "</div>"


def _plots(rows: pa.Table, status: dict, org_len: np.ndarray, re_len: np.ndarray) -> str:
    """Caption lengths, the recaptions' top words, CLIP scores and the lake's funnel."""
    return "".join([
        _plot_lengths(org_len, re_len),
        _plot_top_words(quality.top_words(rows.column("re_caption").to_pylist()), "Top words in recaptions"),
        _plot_clip(_floats(rows.column("org_clip_score").to_pylist()),
                   _floats(rows.column("re_clip_score").to_pylist())),
        _plot_funnel(status),
    ])


def _picked_rows(rows: pa.Table, hal_of: dict[str, list]) -> tuple[list[dict], list[dict], list[dict]]:
    """(the first rows, the lowest CLIP scores of the recaption, the most hallucinated objects)."""
    records = rows.to_pylist()
    scored = [r for r in records if r.get("re_clip_score") is not None]
    lowest_clip = sorted(scored, key=lambda r: r["re_clip_score"])[:_WORST]
    most_hal = sorted((r for r in records if hal_of.get(r["uid"])), key=lambda r: -len(hal_of[r["uid"]]))[:_WORST]
    return records[:_SAMPLES], lowest_clip, most_hal


def _clip_evaluation_section(lake: Lake) -> str:
    """The latest `recap evaluate clip` of this lake, when one ran."""
    try:
        from recap_tasks.evaluate import clip_section_html, latest_clip_evaluation
    except ImportError:  # pragma: no cover - evaluate needs torch, installed with the cpu/gpu extras
        return ""
    result = latest_clip_evaluation(lake)
    return "" if result is None else "<h2>CLIP trained on this lake</h2>" + clip_section_html(result)


TEST_MODEL_MARKER = "RECAP_TEST_MODEL.json"  # written by captioning/tiny_model.py beside its weights


def test_models(rows) -> list[str]:
    """The models of `rows` that are the tiny random test model (a local folder holding its marker)."""
    from pathlib import Path

    names = set(rows.column("model").to_pylist()) if "model" in rows.column_names else set()
    found = []
    for name in sorted(n for n in names if n):
        try:
            if (Path(name) / TEST_MODEL_MARKER).is_file():
                found.append(name)
        except OSError:
            continue
    return found


def _test_model_note(rows) -> str:
    models = test_models(rows)
    if not models:
        return ""
    return ("<p class=warn><b>Test model.</b> These captions come from the tiny randomly initialised test model "
            f"({html.escape(', '.join(models))}; see its {TEST_MODEL_MARKER}): they are meaningless words, so the "
            "comparisons with the paper below say nothing about a real captioner.</p>")


def _paper_table(m: dict, *, test_model: bool = False) -> str:
    """The Recap-DataComp-1B paper's comparisons, and the hygiene and hallucination rates."""
    v, w, h = m["vocabulary"], m["clip_win_rate"], m["hygiene"]
    hal, hal_org = m["hallucination"], m["hallucination_original"]

    def mean(x):
        return "-" if x is None else f"{x:.1f}"

    lines = [
        ("mean / median words", f"{mean(m['length']['original']['mean'])} / {m['length']['original']['median']}",
         f"{mean(m['length']['recaption']['mean'])} / {m['length']['recaption']['median']}",
         "paper: ~10 vs ~49" + (" (LLaVA-1.5-LLaMA3-8B; this run used the random test model)" if test_model else "")),
        ("vocabulary (distinct words)", v["original"], v["recaption"], f"union {v['union']}"),
        ("coverage of the joint vocabulary", _pct(v["original_coverage"]), _pct(v["recaption_coverage"]),
         "paper: recaptions cover 82.86%"),
        ("CLIP score wins", "-", f"{_pct(w['rate'])} of {w['rows']}", "share of rows where the recaption scores higher"),
        ("refusals", "-", _pct(h["refusal_rate"]), f"{h['refusals']} rows"),
        ("prompt echoes", "-", _pct(h["prompt_echo_rate"]), f"{h['prompt_echoes']} rows"),
        ("degenerate repetition", "-", _pct(h["repetition_rate"]), f"{h['repetitive']} rows"),
        ("hallucination CHAIR-i", _pct(hal_org["chair_i"]), _pct(hal["chair_i"]),
         f"objects named but absent from the references; {hal['rows']} rows carry references"),
        ("hallucination CHAIR-s", _pct(hal_org["chair_s"]), _pct(hal["chair_s"]), "captions with such an object"),
    ]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in line) + "</tr>" for line in lines)
    return f"<table><tr><th>measure</th><th>original</th><th>recaption</th><th>note</th></tr>{body}</table>"


def face_sources(lake: Lake, shards: list[str], uids: pa.Array) -> dict[str, int]:
    """How many of the rows `uids` had their face boxes from the source's metadata, from CenterFace,
    or from neither (the faces filter is not in the chain, or a lake filtered before it recorded this)."""
    verdicts = lake.read(tables.FILTER_RESULTS, ["uid", "face_source"], shards=shards)
    verdicts = verdicts.filter(pc.is_in(verdicts.column("uid"), value_set=uids))
    counts = Counter(verdicts.column("face_source").to_pylist())
    return {"metadata": counts["metadata"], "detector": counts["detector"],
            "none": len(uids) - counts["metadata"] - counts["detector"]}


def _face_table(counts: dict[str, int]) -> str:
    lines = [("from the source's metadata (pairs.face_bboxes)", counts["metadata"]),
             ("detected by CenterFace", counts["detector"]), ("no face boxes recorded", counts["none"])]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in lines)
    return (f"<table><tr><th>face boxes of this run's rows (filter.face_boxes)</th><th>rows</th></tr>{body}</table>"
            "<p class=muted>With filter.blur_faces on (the default) the captioner read the image with those boxes "
            "blurred, whichever source they came from.</p>")


def _quarantined_rows(lake: Lake, batch: Batch, pairs) -> list[dict]:
    """The batch's quarantined rows (at most _WORST) with their original captions and image pointers."""
    q = lake.read(tables.QUARANTINE, ["uid", "batch_id", "failed", "re_caption"], shards=batch.shards)
    q = q.filter(pc.equal(q.column("batch_id"), batch.batch_id)).slice(0, _WORST)
    if q.num_rows == 0:
        return []
    rows = q.join(pairs.drop_columns(["references"]), "uid", join_type="inner").to_pylist()
    for r in rows:
        r["note"] = "failed: " + ", ".join(r.get("failed") or [])
    return rows


def _thumbnails(lake: Lake, rows: list[dict], side: int = 160) -> dict[str, str]:
    """uid -> a small JPEG data URI of the image the captioner read (the face-blurred copy where
    faces were blurred); rows whose image cannot be read have none."""
    import pyarrow as pa
    from PIL import Image

    from recap_tasks.images import read_images, upright

    unique = {r["uid"]: r for r in rows if r.get("source_uri")}
    if not unique:
        return {}
    table = pa.Table.from_pylist([{c: r.get(c) for c in _POINTERS} for r in unique.values()])
    out = {}
    for uid, data in zip(unique, read_images(table, lake)):
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = upright(im).convert("RGB")
                im.thumbnail((side, side))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=70)
        except Exception as exc:  # a thumbnail is a courtesy: never fail a report over one image
            log.debug("no thumbnail for %s: %s", uid, exc)
            continue
        out[uid] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


def _index_page(lake: Lake, batches: list[Batch]) -> str:
    trend = _plot_trends(lake, batches) + _plot_quality_trends(lake, batches)
    rows = "".join(
        f"<tr><td><a href='runs/{html.escape(quote(b.batch_id, safe=''))}/report.html'>{html.escape(b.batch_id)}</a>"
        f"</td>"
        f"<td>{html.escape(b.validated_at)}</td><td>{b.rows}</td><td>{b.quarantined}</td>"
        f"<td class={'ok' if b.success else 'bad'}>{'passed' if b.success else 'refused'}</td>"
        f"<td>{'yes' if b.published else 'no'}</td><td>{html.escape(', '.join(b.failed))}</td></tr>"
        for b in reversed(batches))
    body = (f"<h1>Recap quality reports</h1><p class=muted>lake {html.escape(lake.uri)}</p>"
            f"<h2>Trends across runs</h2>{trend}<h2>Runs</h2><table><tr><th>run</th><th>validated</th><th>rows</th>"
            f"<th>quarantined</th><th>gate</th><th>published</th><th>failed expectations</th></tr>{rows}</table>")
    return _page("Recap quality reports", body)


# Plots ------------------------------------------------------------------------------------------

def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    return plt, fig, ax


def _img(plt, fig, alt: str, *, layout: bool = True) -> str:
    buf = io.BytesIO()
    if layout:
        fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></figure>"


def _plot_lengths(org: np.ndarray, re_: np.ndarray) -> str:
    plt, fig, ax = _figure()
    top = max([1.0, *(org.tolist()), *(re_.tolist())])
    bins = np.linspace(0, top + 1, 31)
    ax.hist(org, bins=bins, alpha=0.6, label=f"original (mean {org.mean() if len(org) else 0:.1f})")
    ax.hist(re_, bins=bins, alpha=0.6, label=f"recaption (mean {re_.mean() if len(re_) else 0:.1f})")
    ax.set_xlabel("caption length (words)")
    ax.set_ylabel("rows")
    ax.set_title("Caption length: original vs recaption")
    ax.legend()
    return _img(plt, fig, "caption length histogram")


def _plot_top_words(words: Counter, title: str) -> str:
    plt, fig, ax = _figure()
    common = [(w, n) for w, n in words.most_common(60) if w not in _STOP][:20]
    if common:
        ax.barh([w for w, _ in reversed(common)], [n for _, n in reversed(common)], color="#486581")
    ax.set_title(f"{title} (vocabulary {len(words)})")
    ax.set_xlabel("occurrences")
    return _img(plt, fig, "top words")


def _plot_clip(org: np.ndarray, re_: np.ndarray) -> str:
    plt, fig, ax = _figure()
    if len(org) or len(re_):
        both = np.concatenate([org, re_])
        bins = np.linspace(min(-0.1, both.min() - 0.02), max(0.6, both.max() + 0.02), 36)
        ax.hist(org, bins=bins, alpha=0.6, label=f"original (mean {org.mean() if len(org) else float('nan'):.3f})")
        ax.hist(re_, bins=bins, alpha=0.6, label=f"recaption (mean {re_.mean() if len(re_) else float('nan'):.3f})")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no CLIP scores in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("CLIP cosine similarity (image, caption)")
    ax.set_title("CLIP score: original vs recaption")
    return _img(plt, fig, "CLIP score distributions")


def _plot_funnel(status: dict) -> str:
    plt, fig, ax = _figure()
    by_stage = status["rejected"]["by_stage"]
    downloaded = status.get("downloaded") or {}
    steps = [("read from shards", status["ingested"]),
             *([("downloaded", status["ingested"] - downloaded["failed"])] if downloaded.get("rows") else []),
             ("passed ingest", status["passed_ingest"]),
             ("kept by filter", status["filtered"]["kept"]),
             ("captioned", status["captioned"]),
             ("published", status["published"])]
    ax.barh([s for s, _ in reversed(steps)], [n for _, n in reversed(steps)], color="#2f8132")
    for i, (_, n) in enumerate(reversed(steps)):
        ax.text(n, i, f" {n}", va="center")
    drops = [f"{stage}/{reason}: {n}" for stage, reasons in by_stage.items() for reason, n in reasons.items()]
    ax.set_title("Filter funnel (whole lake)")
    ax.set_xlabel("rows")
    fig.tight_layout()
    if drops:
        fig.subplots_adjust(right=0.62)
        fig.text(0.64, 0.5, "dropped:\n" + "\n".join(drops[:12]), ha="left", va="center", fontsize=7,
                 color="#c62828")
    return _img(plt, fig, "filter funnel", layout=False)


def run_label(run_id: str) -> str:
    """A short axis label for a run id: `manual__2026-12-05T13:26:24.591638+00:00` -> `manual 12-05 13:26:24`."""
    import re

    m = re.match(r"^([A-Za-z_]+?)_*(\d{4})-(\d\d-\d\d)[T ](\d\d:\d\d(?::\d\d)?)", run_id)
    if m:
        return f"{m.group(1).strip('_')} {m.group(3)} {m.group(4)}".strip()
    return run_id if len(run_id) <= 24 else run_id[:23] + "\u2026"


# Distinct markers and line styles: equal series (rows checked = published) stay visible.
_STYLES = [dict(marker="o", linestyle="-"), dict(marker="s", linestyle="--", markerfacecolor="none"),
           dict(marker="^", linestyle=":"), dict(marker="D", linestyle="-.", markerfacecolor="none"),
           dict(marker="v", linestyle=(0, (5, 1)))]


def _plot_trends(lake: Lake, batches: list[Batch]) -> str:
    plt, fig, ax = _figure()
    names = [run_label(b.batch_id) for b in batches]
    x = np.arange(len(batches))
    ax.bar(x, [b.rows for b in batches], color="#d9e2ec", label="rows checked")
    ax.plot(x, [b.rows - b.quarantined if b.success else 0 for b in batches], label="published", **_STYLES[0])
    ax.plot(x, [b.quarantined for b in batches], label="quarantined", **_STYLES[1])
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("rows")
    ax.set_title("Runs over time")
    ax.legend()
    return _img(plt, fig, "trends across runs")


def _plot_quality_trends(lake: Lake, batches: list[Batch]) -> str:
    """Per-run caption quality (from each report's metrics.json): coverage, win rate, CHAIR-s, words."""
    runs = [(b, lake.read_json(f"_reports/runs/{b.batch_id}/metrics.json")) for b in batches]
    runs = [(b, m) for b, m in runs if m]
    if not runs:
        return ""
    plt, fig, ax = _figure()
    x = np.arange(len(runs))

    def series(get):
        return [np.nan if get(m) is None else 100 * get(m) for _, m in runs]

    lines = [(series(lambda m: m["vocabulary"]["recaption_coverage"]), "recaption vocabulary coverage %"),
             (series(lambda m: m["clip_win_rate"]["rate"]), "CLIP win rate %"),
             (series(lambda m: m["hallucination"]["chair_s"]), "CHAIR-s %"),
             ([m["length"]["recaption"]["mean"] or np.nan for _, m in runs], "mean words, recaption"),
             ([m["length"]["original"]["mean"] or np.nan for _, m in runs], "mean words, original")]
    for (values, label), style in zip(lines, _STYLES):
        ax.plot(x, values, label=label, **style)
    ax.set_xticks(x, [run_label(b.batch_id) for b, _ in runs], rotation=30, ha="right", fontsize=7)
    ax.set_title("Caption quality over runs")
    ax.legend(fontsize=7)
    return _img(plt, fig, "caption quality trends")


# Tables -----------------------------------------------------------------------------------------

def _results_table(batch: Batch) -> str:
    if not batch.results:
        return "<p class=muted>No expectations ran (empty batch).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(r['expectation'])}</td><td>{'row' if r.get('row_level') else 'batch'}</td>"
        f"<td class={'ok' if r['success'] else 'bad'}>{'pass' if r['success'] else 'FAIL'}</td>"
        f"<td>{html.escape(str(r.get('unexpected_count') if r.get('unexpected_count') is not None else ''))}</td>"
        f"<td>{html.escape(_short(r.get('observed')))}</td></tr>" for r in batch.results)
    docs = f"<p class=muted>Great Expectations Data Docs: {_docs_link(batch.report)}</p>"
    return (f"<table><tr><th>expectation</th><th>level</th><th>result</th><th>failing rows</th><th>observed</th>"
            f"</tr>{rows}</table>{docs}")


def _status_table(status: dict) -> str:
    lines = [("read from shards", status["ingested"]), ("published", status["published"]),
             ("quarantined", status["quarantined"]), ("in flight", status["in_flight"])]
    for stage, reasons in status["rejected"]["by_stage"].items():
        for reason, n in reasons.items():
            lines.append((f"rejected at {stage}: {reason}", n))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in lines)
    ok = "<span class=ok>yes</span>" if status["balanced"] else "<span class=bad>NO</span>"
    return f"<table>{body}</table><p>Every row accounted for exactly once: {ok}</p>"


def _samples_table(samples: list[dict], thumbs: dict[str, str], hallucinated: dict[str, list | None]) -> str:
    if not samples:
        return "<p class=muted>No rows.</p>"
    body = []
    for s in samples:
        uri = thumbs.get(s["uid"])
        img = (f"<img class=thumb alt='image {html.escape(s['uid'][:12])}' src='{uri}'>" if uri
               else "<span class=muted>no image</span>")
        notes = []
        if s.get("re_clip_score") is not None:
            notes.append(f"CLIP {s['re_clip_score']:.3f} (original {s.get('org_clip_score') or 0:.3f})")
        if hallucinated.get(s["uid"]):
            notes.append("not in references: " + ", ".join(hallucinated[s["uid"]]))
        if s.get("note"):
            notes.append(s["note"])
        body.append(f"<tr><td>{img}</td><td>{html.escape(s.get('org_caption') or '')}</td>"
                    f"<td>{html.escape(s.get('re_caption') or '')}</td>"
                    f"<td class=muted>{html.escape('; '.join(notes))}</td></tr>")
    return ("<table><tr><th>image</th><th>original caption</th><th>recaption</th><th>notes</th></tr>"
            f"{''.join(body)}</table>")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>")


def _floats(values: list) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=float)


def _short(value) -> str:
    text = str(value) if value is not None else ""
    return text if len(text) < 200 else text[:197] + "..."
