"""The HTML quality report renders with its plots, per run and as an index across runs."""

import base64
import re

import pytest

from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.pipeline import run_pipeline
from recap_tasks.stages.report import build_report


@pytest.fixture(scope="module")
def demo_lake(tmp_path_factory, sample_shards, tiny_model):
    lake = Lake(tmp_path_factory.mktemp("report") / "lake")
    summary = run_pipeline([str(sample_shards)], lake, model=str(tiny_model), run_id="r1")
    return lake, summary


def test_run_report_contains_every_plot(demo_lake):
    lake, summary = demo_lake
    path = summary["report"]
    assert path.endswith("_reports/runs/r1/report.html")
    page = open(path).read()
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", page)
    assert [alt for alt, _ in images] == ["caption length histogram", "top words", "CLIP score distributions",
                                          "filter funnel"]
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expect_column_values_to_be_between(re_length)" in page  # validation results table
    assert "row_count_reconciliation" in page
    assert "Every row accounted for exactly once: <span class=ok>yes</span>" in page


def test_report_length_figures_match_the_published_table(demo_lake):
    """The report's caption-length figures, recomputed here from the published rows with numpy."""
    import numpy as np

    from recap_tasks.hygiene import word_count

    lake, _ = demo_lake
    metrics = lake.read_json("_reports/runs/r1/metrics.json")
    recap = lake.read("recap", ["re_caption", "org_caption", "re_length", "org_length"])
    re_words = np.array([word_count(t) for t in recap.column("re_caption").to_pylist()])
    org_words = np.array([word_count(t) for t in recap.column("org_caption").to_pylist()])
    assert np.array_equal(re_words, recap.column("re_length").to_numpy())
    assert metrics["rows"] == recap.num_rows
    for key, counts in (("recaption", re_words), ("original", org_words)):
        assert metrics["length"][key]["mean"] == pytest.approx(float(np.mean(counts)))
        assert metrics["length"][key]["median"] == pytest.approx(float(np.median(counts)))


def test_index_lists_runs_with_trends(demo_lake):
    lake, _ = demo_lake
    build_report(lake, run_id="r1")
    index = (lake.root / "_reports" / "index.html").read_text()
    assert "runs/r1/report.html" in index and "alt='trends across runs'" in index


def test_unknown_run_is_a_clear_error(demo_lake):
    lake, _ = demo_lake
    with pytest.raises(RecapError, match="no validated batch 'nope'"):
        build_report(lake, run_id="nope")


@pytest.fixture(scope="module")
def coco_report(tmp_path_factory, shared_data, tiny_model):
    """One real COCO shard (5 human captions per image in its .json) through the pipeline."""
    from dataclasses import replace

    from recap_tasks.config import RecapConfig

    tar = sorted((shared_data / "coco-mini-wds").glob("*.tar"))[0]
    lake = Lake(tmp_path_factory.mktemp("coco") / "lake")
    config = RecapConfig.load()
    config = replace(config, validate=replace(config.validate, require_english=False))
    summary = run_pipeline([str(tar)], lake, model=str(tiny_model), config=config, run_id="coco1")
    return lake, summary["report"]


def test_report_has_thumbnails_worst_rows_and_the_paper_measures(coco_report):
    import io
    import json

    from PIL import Image

    lake, path = coco_report
    page = open(path).read()
    thumbs = re.findall(r"<img class=thumb alt='[^']+' src='data:image/jpeg;base64,([^']+)'>", page)
    assert len(thumbs) >= 8  # the samples, and again in the worst-rows tables
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0]))) as im:
        assert max(im.size) == 160
    for heading in ("Recaptions against originals", "coverage of the joint vocabulary", "CLIP score wins",
                    "hallucination CHAIR-i", "Lowest CLIP score of the recaption", "Most hallucinated objects",
                    "Quarantined by the quality gate"):
        assert heading in page
    metrics = json.loads((lake.root / "_reports" / "runs" / "coco1" / "metrics.json").read_text())
    rows = metrics["rows"]
    assert rows > 50 and metrics["hallucination"]["rows"] == rows  # every COCO row carries references
    # The original COCO caption is one of the references: it names nothing they leave out.
    assert metrics["hallucination_original"]["chair_i"] == 0.0
    assert 0 < metrics["vocabulary"]["recaption_coverage"] <= 1
    index = (lake.root / "_reports" / "index.html").read_text()
    assert "alt='caption quality trends'" in index


@pytest.mark.slow
def test_report_images_render_in_a_browser(coco_report, tmp_path):
    """Headless Chromium opens the report: every thumbnail and plot decodes; screenshots kept."""
    from tests.airflow.browser import browser_available, headless_chromium
    from tests.helpers import REPO

    reason = browser_available()
    if reason:
        pytest.skip(reason)
    _, path = coco_report
    out = REPO / "test-artifacts" / "report"
    out.mkdir(parents=True, exist_ok=True)
    driver = headless_chromium(str(tmp_path / "profile"))
    try:
        driver.get(f"file://{path}")
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.className, i.complete, i.naturalWidth]);")
        assert len([s for s in sizes if s[0] == "thumb"]) >= 8
        assert all(complete and width > 0 for _, complete, width in sizes), sizes
        driver.save_screenshot(str(out / "report-top.png"))
        driver.execute_script("document.querySelector('h2:nth-of-type(3)').scrollIntoView();")
        driver.save_screenshot(str(out / "report-samples.png"))
    finally:
        driver.quit()


def test_run_report_says_its_model_is_the_random_test_model(demo_lake, tiny_model):
    """The tiny model's captions are noise: the report says so beside the paper's figures."""
    assert (tiny_model / "RECAP_TEST_MODEL.json").is_file()
    page = open(demo_lake[1]["report"]).read()
    assert "<b>Test model.</b>" in page and str(tiny_model) in page
    assert "paper: ~10 vs ~49 (LLaVA-1.5-LLaMA3-8B; this run used the random test model)" in page


def test_trend_labels_name_the_run_not_a_cut_timestamp():
    from recap_tasks.stages.report import run_label

    assert run_label("manual__2026-12-05T13:26:24.591638+00:00") == "manual 12-05 13:26:24"
    assert run_label("scheduled__2026-12-05T13:00:00+00:00") == "scheduled 12-05 13:00:00"
    assert run_label("r1") == "r1"
    assert run_label("x" * 40) == "x" * 23 + "\u2026"


def test_data_docs_need_no_network(demo_lake):
    """GX's Data Docs load Bootstrap, jQuery and more from CDNs: the pages in the lake use local copies
    of what they need instead (static/recap/), so nothing is fetched from outside."""
    lake, _ = demo_lake
    docs = lake.root / "_reports" / "data_docs"
    pages = sorted(docs.rglob("*.html"))
    assert len(pages) >= 3  # index, expectation suite, validation result
    fetched = re.compile(r"""<(?:link|script|img)\b[^>]*\b(?:href|src)=["']https?://""", re.I)
    for page in pages:
        text = page.read_text()
        assert not fetched.search(text), page
        assert not re.search(r"url\(\s*['\"]?https?://", text), page
        root = "../" * (len(page.relative_to(docs).parts) - 1)
        assert f'href="{root}static/recap/offline.css"' in text and f'src="{root}static/recap/offline.js"' in text
    assert (docs / "static" / "recap" / "offline.css").stat().st_size > 1000
    assert (docs / "static" / "images" / "logo-long.png").is_file()
