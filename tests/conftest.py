"""Shared fixtures: tiny models and data made here; real data from ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RECAP_QUIET", "1")
os.environ.setdefault("RECAP_CONFIG", str(Path(__file__).with_name("tiny-model.yaml")))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from recap_tasks.captioning.tiny_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    from recap_tasks.sample_data import make_sample_data

    return make_sample_data(tmp_path_factory.mktemp("sample") / "shards")


# Optional tests skip where their environment is missing (README "Skipped tests"). Two reporting
# hooks keep that from going unseen: every skip is listed in a block of its own at the end of the
# run, and RECAP_REQUIRE_VLLM=1 (set by .ci/run once it has built .venv-vllm) turns a skipped vLLM
# test into a failure, so a broken vLLM environment cannot pass CI as "skipped".
REQUIRE_VLLM = os.environ.get("RECAP_REQUIRE_VLLM") == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and REQUIRE_VLLM and item.get_closest_marker("vllm") is not None:
        report.outcome = "failed"
        report.longrepr = (f"RECAP_REQUIRE_VLLM=1 (the vLLM environment was built for this run), yet this vLLM "
                           f"test skipped: {_skip_reason(report)}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.when in ("setup", "call")]
    if not skipped:
        return
    tr = terminalreporter
    tr.write_sep("!", f"SKIPPED OPTIONAL TESTS: {len(skipped)} (not run here; README \"Skipped tests\")",
                 yellow=True, bold=True)
    for report in sorted(skipped, key=lambda r: r.nodeid):
        tr.write_line(f"SKIPPED OPTIONAL TEST {report.nodeid}: {_skip_reason(report)}", yellow=True)
