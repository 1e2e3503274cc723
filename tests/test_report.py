"""The HTML quality report renders with its plots, per run and as an index across runs."""

import base64
import re

import pytest

from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.pipeline import run_pipeline
from recap_tasks.report import build_report


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


def test_index_lists_runs_with_trends(demo_lake):
    lake, _ = demo_lake
    build_report(lake, run_id="r1")
    index = (lake.root / "_reports" / "index.html").read_text()
    assert "runs/r1/report.html" in index and "alt='trends across runs'" in index


def test_unknown_run_is_a_clear_error(demo_lake):
    lake, _ = demo_lake
    with pytest.raises(RecapError, match="no validated batch 'nope'"):
        build_report(lake, run_id="nope")
