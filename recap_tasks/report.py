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
import pyarrow.compute as pc

from recap_tasks import lake as tables
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
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1rem}
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


def _run_page(lake: Lake, batch: Batch) -> str:
    status = lake_status(lake)
    published = lake.read(tables.RECAP, ["uid", "re_caption", "org_caption", "re_length", "org_length",
                                        "re_clip_score", "org_clip_score", "model", "url"], shards=batch.shards)
    uids = read_uids(lake, batch)
    rows = published.filter(pc.is_in(published.column("uid"), value_set=uids))
    source = "published rows of this run"
    if rows.num_rows == 0:  # a refused batch: show what was checked instead
        from recap_tasks.batches import candidate_rows

        rows = candidate_rows(lake, batch.shards, uids)
        source = "checked rows of this run (not published)"
    re_len = np.asarray(rows.column("re_length").to_pylist() or [], dtype=float)
    org_len = np.asarray(rows.column("org_length").to_pylist() or [], dtype=float)
    re_words = _words(rows.column("re_caption").to_pylist())
    org_words = _words(rows.column("org_caption").to_pylist())
    re_clip = _floats(rows.column("re_clip_score").to_pylist())
    org_clip = _floats(rows.column("org_clip_score").to_pylist())

    verdict = "published" if batch.published else ("valid, not yet published" if batch.success else "REFUSED")
    cards = [("rows checked", batch.rows), ("quarantined", batch.quarantined), ("verdict", verdict),
             ("mean words, recaption", f"{re_len.mean():.1f}" if len(re_len) else "-"),
             ("mean words, original", f"{org_len.mean():.1f}" if len(org_len) else "-"),
             ("vocabulary, recaption", len(re_words)), ("vocabulary, original", len(org_words)),
             ("published in lake", status["published"])]
    plots = [
        _plot_lengths(org_len, re_len),
        _plot_top_words(re_words, "Top words in recaptions"),
        _plot_clip(org_clip, re_clip),
        _plot_funnel(status),
    ]
    samples = rows.slice(0, 8).to_pylist()
    parts = [
        f"<h1>Recap quality report: {html.escape(batch.batch_id)}</h1>",
        f"<p class=muted>Validated {html.escape(batch.validated_at)} · lake {html.escape(lake.uri)} · "
        f"plots over the {source} · <a href='../../index.html'>all runs</a></p>",
        "<div class=grid>" + "".join(f"<div class=card>{html.escape(k)}<b>{html.escape(str(v))}</b></div>"
                                     for k, v in cards) + "</div>",
        "<h2>Distributions</h2><div class=plots>" + "".join(plots) + "</div>",
        "<h2>Validation results</h2>", _results_table(batch),
        _config_section(lake, batch),
        "<h2>Where every row went</h2>", _status_table(status),
        "<h2>Sample rows</h2>", _samples_table(samples),
    ]
    return _page(f"Recap report {batch.batch_id}", "".join(parts))


def _index_page(lake: Lake, batches: list[Batch]) -> str:
    trend = _plot_trends(lake, batches)
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
    steps = [("read from shards", status["ingested"]),
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


def _plot_trends(lake: Lake, batches: list[Batch]) -> str:
    plt, fig, ax = _figure()
    names = [b.batch_id[-18:] for b in batches]
    x = np.arange(len(batches))
    ax.plot(x, [b.rows for b in batches], marker="o", label="rows checked")
    ax.plot(x, [b.rows - b.quarantined if b.success else 0 for b in batches], marker="o", label="published")
    ax.plot(x, [b.quarantined for b in batches], marker="o", label="quarantined")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("rows")
    ax.set_title("Runs over time")
    ax.legend()
    return _img(plt, fig, "trends across runs")


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


def _samples_table(samples: list[dict]) -> str:
    if not samples:
        return "<p class=muted>No rows.</p>"
    body = "".join(f"<tr><td>{html.escape(s.get('org_caption') or '')}</td><td>{html.escape(s.get('re_caption') or '')}"
                   f"</td></tr>" for s in samples)
    return f"<table><tr><th>original caption</th><th>recaption</th></tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>")


def _words(texts: list[str | None]) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        counts.update(w.strip(".,;:!?\"'()").lower() for w in (t or "").split())
    counts.pop("", None)
    return counts


def _floats(values: list) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=float)


def _short(value) -> str:
    text = str(value) if value is not None else ""
    return text if len(text) < 200 else text[:197] + "..."
