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
    from recap_tasks.captioning.test_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    from recap_tasks.sample_data import make_sample_data

    return make_sample_data(tmp_path_factory.mktemp("sample") / "shards")
