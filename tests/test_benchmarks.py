"""Benchmarks run as smoke tests: their code paths stay working where CI has no GPU."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.shared_data
def test_caption_gpu_benchmark_smoke_on_cpu(shared_data):
    proc = subprocess.run([sys.executable, "benchmarks/caption_gpu.py", "--tiny", "--images", "8"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line for line in proc.stdout.splitlines() if ":" in line}
    assert "CPU (tiny model smoke test)" in lines["device"]
    images_per_s = float(lines["end-to-end"].split()[1])
    assert images_per_s > 0 and "tokens/s" in lines["decode-only"]


@pytest.mark.gpu
def test_caption_on_gpu_in_bf16(tmp_path, tiny_model):
    from recap_tasks.captioning.transformers_backend import TransformersCaptioner
    from recap_tasks.config import CaptionConfig
    from PIL import Image

    captioner = TransformersCaptioner(str(tiny_model), CaptionConfig(device="cuda"))
    assert str(captioner.model.dtype) == "torch.bfloat16"
    texts = captioner.caption([Image.new("RGB", (320, 240), "red")] * 4)
    assert len(texts) == 4 and all(t.strip() for t in texts)


@pytest.mark.shared_data
def test_scale_benchmark_smoke(shared_data):
    """The scale benchmark's code path on a small lake: seeding through the writers, one run."""
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--rows", "0", "20000", "--shard-rows", "5000"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for stage in ("ingest", "filter", "caption", "validate", "publish", "report", "status", "peak"):
        assert stage in lines, proc.stdout
    assert "'published': 238" in proc.stdout and "'balanced': True" in proc.stdout


def test_download_benchmark_smoke():
    """The download benchmark's code path: its own server process, 1 and 2 worker processes."""
    proc = subprocess.run([sys.executable, "benchmarks/download.py", "--images", "200", "--repeats", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1] in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[1]) > 0 for r in rows), proc.stdout


def test_dedup_index_benchmark_smoke(tmp_path):
    """The dedup index benchmark's code path on small indexes: seeding, lookups, recall on planted copies."""
    proc = subprocess.run([sys.executable, "benchmarks/dedup_index.py", "--entries", "20000", "40000", "--radius", "2",
                           "--batch", "40", "--repeat", "1", "--compare", "--data", str(tmp_path / "no-data")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [line for line in proc.stdout.splitlines() if "new images," in line]
    assert len(runs) == 4 and all("recall 1.000" in line for line in runs), proc.stdout
    # The product's lookup reads the runs, not Parquet; the comparison path reads Parquet only.
    assert all(" 0 row groups" in line and " 0 run reads" not in line for line in runs if "runs:" in line), proc.stdout
    assert all(" 0 run reads" in line for line in runs if "footers:" in line), proc.stdout


def test_lake_commits_benchmark_smoke():
    """The table-metadata benchmark's code path on small lakes: seeding in commits, a checkpointed baseline."""
    proc = subprocess.run([sys.executable, "benchmarks/lake_commits.py", "--lakes", "40:1", "40:1:checkpointed", "200:8",
                           "--repeat", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if " shards / " in line]
    assert len(rows) == 3 and "checkpointed" in rows[1], proc.stdout
    assert rows[0].split()[-2] == "1.00x" and rows[1].split()[-1] == "1.00x", proc.stdout  # each baseline's own ratio
    bad = subprocess.run([sys.executable, "benchmarks/lake_commits.py", "--lakes", "5:9"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "0 < COMMITS <= SHARDS" in bad.stderr


def test_progress_records_benchmark_smoke():
    """The progress-records benchmark's code path: folded (few files) and not (a file per record)."""
    proc = subprocess.run([sys.executable, "benchmarks/progress_records.py", "--records", "12", "--last", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {" ".join(line.split()[1:3]).replace(" ", "_") if "not" in line else line.split()[1]: line.split()
            for line in proc.stdout.splitlines() if line.strip().startswith("12 ")}
    assert int(rows["folded"][2]) < 4 and int(rows["not_folded"][3]) == 12, proc.stdout
