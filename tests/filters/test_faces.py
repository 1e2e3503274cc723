"""Faces: CenterFace finds faces on photos of people, keeps boxes, blurs them in what captioning reads."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from recap_tasks import lake as tables
from recap_tasks.captioning import Captioner
from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.filters.chain import decode
from recap_tasks.filters.faces import FaceFilter
from recap_tasks.images import read_images
from tests.filters.util import by_key, make_lake, photo


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _face_change(original: bytes, blurred: bytes, box) -> tuple[float, float]:
    """Mean absolute pixel change inside the box and outside it."""
    a, b = _pixels(original), _pixels(blurred)
    diff = np.abs(a - b).mean(axis=2)
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    inside = np.zeros(diff.shape, dtype=bool)
    inside[y1:y2, x1:x2] = True
    return float(diff[inside].mean()), float(diff[~inside].mean())


def test_astronaut_face_found_and_blurred_in_place():
    data = photo("astronaut")
    flt = FaceFilter(FilterConfig())
    [decision] = flt.decide(pa.table({"uid": ["a"]}), [decode(data, 640)])
    assert decision.keep.all() and decision.scores["faces"][0] == 1
    [box] = json.loads(decision.scores["face_boxes"][0])
    x1, y1, x2, y2, score = box
    assert score > 0.5 and 150 < x1 < x2 < 300 and 50 < y1 < y2 < 250  # her face, upper middle-left
    inside, outside = _face_change(data, decision.images[0], box)
    assert inside > 8 * outside and inside > 5  # the face is smeared, the rest only re-encoded


def test_no_face_no_blur():
    flt = FaceFilter(FilterConfig())
    images = [decode(photo(name), 640) for name in ("coffee", "rocket")]
    [decision] = flt.decide(pa.table({"uid": ["a", "b"]}), images)
    assert list(decision.scores["faces"]) == [0, 0] and decision.images == {}


def test_stage_stores_boxes_and_captioning_reads_the_blurred_copy(tmp_path):
    lake = make_lake(tmp_path, {"00000.tar": [("000000001", "an astronaut in her orange suit with a flag", photo("astronaut")),
                                              ("000000002", "a cup of coffee on a saucer on a table", photo("coffee"))]})
    source = tmp_path / "src" / "00000.tar"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    run_filter(lake, config=FilterConfig(chain="datacomp", executor="local"))
    verdicts = by_key(lake, tables.FILTER_RESULTS)
    assert verdicts["000000001"]["faces"] == 1 and verdicts["000000002"]["faces"] == 0
    assert len(json.loads(verdicts["000000001"]["face_boxes"])) == 1
    rows = lake.read(tables.PAIRS)
    rows = rows.take(pa.compute.sort_indices(rows, [("key", "ascending")]))
    original, blurred = read_images(rows), read_images(rows, lake=lake)
    assert blurred[0] != original[0] and blurred[1] == original[1]
    box = json.loads(verdicts["000000001"]["face_boxes"])[0]
    inside, outside = _face_change(original[0], blurred[0], box)
    assert inside > 8 * outside
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before  # the source shard is untouched


@pytest.mark.shared_data
def test_faces_on_coco_photos_of_people(shared_data):
    tar = tarfile.open(shared_data / "coco-mini-wds" / "00000.tar")
    members = {m.name: m for m in tar.getmembers()}
    people = []
    for name, m in members.items():
        if name.endswith(".txt"):
            caption = tar.extractfile(m).read().decode().lower()
            if any(w in caption.split() for w in ("man", "woman", "person", "people", "boy", "girl")):
                people.append(tar.extractfile(members[name[:-4] + ".jpg"]).read())
    people = people[:12]
    assert len(people) >= 8
    flt = FaceFilter(FilterConfig())
    [decision] = flt.decide(pa.table({"uid": [str(i) for i in range(len(people))]}),
                            [decode(d, 640) for d in people])
    counts = np.asarray(decision.scores["faces"])
    assert (counts > 0).sum() >= 3  # COCO people are often small or turned away; some faces are clear
    assert set(decision.images) == set(np.flatnonzero(counts > 0).tolist())
    for i, blurred in decision.images.items():
        box = max(json.loads(decision.scores["face_boxes"][i]), key=lambda b: b[4])
        inside, outside = _face_change(people[i], blurred, box)
        assert inside > 3 * outside


class PixelCaptioner(Captioner):
    """A deterministic captioner that describes each image by its size and keeps what it was given."""

    def __init__(self):
        self.seen: list[Image.Image] = []

    def prepare(self, images):
        return list(images)

    def generate(self, prepared):
        self.seen += prepared
        return [f"an image of {im.size[0]} by {im.size[1]} pixels" for im in prepared]

    def provenance(self):
        return {"model": "pixel-captioner", "prompt": "-", "generation": "{}"}


def test_captioning_sees_the_blurred_face(tmp_path):
    from recap_tasks.stages.caption import run_caption

    original = photo("astronaut")
    lake = make_lake(tmp_path, {"00000.tar": [("000000001", "an astronaut in her orange suit with a flag", original)]})
    run_filter(lake, config=FilterConfig(chain="datacomp", executor="local"))
    captioner = PixelCaptioner()
    assert run_caption(lake, captioner=captioner).captioned == 1
    box = json.loads(by_key(lake, tables.FILTER_RESULTS)["000000001"]["face_boxes"])[0]
    seen = io.BytesIO()
    captioner.seen[0].save(seen, format="PNG")
    inside, outside = _face_change(original, seen.getvalue(), box)
    assert inside > 8 * outside
