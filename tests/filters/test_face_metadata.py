"""Face boxes from the source's metadata (DataComp's `face_bboxes`): carried by ingest into
pairs.face_bboxes, used by the faces filter instead of CenterFace (filter.face_boxes), reported."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.errors import RecapError
from recap_tasks.filters import ModelLoadError
from recap_tasks.filters.chain import decode
from recap_tasks.filters.faces import FaceDetector, FaceFilter
from recap_tasks.images import read_images
from recap_tasks.lake import Lake
from recap_tasks.stages.filter import run_filter
from recap_tasks.stages.ingest import ingest
from tests.filters.test_faces import _face_change
from tests.filters.util import by_key, photo
from tests.helpers import write_tar

CAPTION = "an astronaut in her orange suit with a flag behind her"


def detected_box(data: bytes) -> list[float]:
    """CenterFace's one box on `data` (upright pixels, with its score)."""
    [decision] = FaceFilter(FilterConfig(face_boxes="detect")).decide(pa.table({"uid": ["a"]}), [decode(data, 640)])
    [box] = json.loads(decision.scores["face_boxes"][0])
    return box


def mirrored(data: bytes) -> bytes:
    """The photo flipped left to right: another image to the dedup filter, the same face to CenterFace."""
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(data))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def normalized(box: list[float], size: tuple[int, int]) -> list[float]:
    w, h = size
    return [box[0] / w, box[1] / h, box[2] / w, box[3] / h]


def members(key: str, image: bytes, meta: dict, caption: str = CAPTION) -> list[tuple[str, bytes]]:
    """One img2dataset sample whose .json carries `meta` (DataComp's columns, as save_additional_columns writes)."""
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"key": key, "url": f"https://example.com/{key}.jpg", **meta}).encode())]


def lake_of(tmp_path, samples: list[list[tuple[str, bytes]]]) -> tuple[Lake, dict]:
    tar = write_tar(tmp_path / "src" / "00000.tar", [m for s in samples for m in s])
    lake = Lake(tmp_path / "lake")
    return lake, ingest([str(tar)], lake).summary()


def pairs(lake: Lake) -> dict[str, dict]:
    return {r["key"]: r for r in lake.read(tables.PAIRS).to_pylist()}


def filtered(lake: Lake, **settings) -> dict[str, dict]:
    run_filter(lake, config=FilterConfig(chain="datacomp", executor="local", **settings))
    return by_key(lake, tables.FILTER_RESULTS)


# Ingest ------------------------------------------------------------------------------------

def test_ingest_carries_face_bboxes_and_the_source_clip_score_from_tar_json(tmp_path):
    image = photo("coffee")  # 600 x 400
    lake, summary = lake_of(tmp_path, [
        members("0", image, {"face_bboxes": [[0.1, 0.2, 0.3, 0.4]], "original_width": 1200, "original_height": 800,
                             "clip_l14_similarity_score": 0.27, "clip_b32_similarity_score": 0.31}),
        members("1", image, {"face_bboxes": [], "clip_b32_similarity_score": 0.31}),
        members("2", image, {"uid": "abc"}),
        members("3", image, {"face_bboxes": "[[0.5, 0.5, 0.6, 0.7]]"}),  # a JSON string (a CSV-born column)
    ])
    rows = pairs(lake)
    assert json.loads(rows["0"]["face_bboxes"]) == [[0.1, 0.2, 0.3, 0.4]]
    assert rows["1"]["face_bboxes"] == "[]"  # the source's detector ran and found none
    assert rows["2"]["face_bboxes"] is None  # no metadata
    assert json.loads(rows["3"]["face_bboxes"]) == [[0.5, 0.5, 0.6, 0.7]]
    assert rows["0"]["source_clip_score"] == pytest.approx(0.27)
    assert rows["0"]["source_clip_model"] == "ViT-L/14 (DataComp)"
    assert rows["1"]["source_clip_model"] == "ViT-B/32 (DataComp)" and rows["2"]["source_clip_score"] is None
    assert summary["metadata_ignored"] == {}


def test_malformed_face_bboxes_keep_the_row_and_are_counted(tmp_path):
    image = photo("coffee")  # 600 x 400
    bad = {"4": "not json", "5": [[0.5, 0.5, 0.2, 0.2]], "6": [[0, 0, 2, 2]], "7": [[0.1, 0.2, 0.3]],
           "8": [[0.1, 0.2, 0.3, float("nan")]], "9": {"x1": 0.1}, "10": [[False, 0, 0.5, 0.5]]}
    lake, summary = lake_of(tmp_path, [members(k, image, {"face_bboxes": v}) for k, v in bad.items()] + [
        # boxes of an original 1:1 image on a 3:2 copy (img2dataset's `border`/`center_crop`): they cannot map
        members("11", image, {"face_bboxes": [[0.1, 0.1, 0.2, 0.2]], "original_width": 500, "original_height": 500}),
        # an EXIF-rotated copy stores the pixels the other way round: same shape
        members("12", image, {"face_bboxes": [[0.1, 0.1, 0.2, 0.2]], "original_width": 400, "original_height": 600}),
    ])
    rows = pairs(lake)
    assert summary["rows"] == len(bad) + 2 and summary["rejected"] == 0  # no row lost
    assert all(rows[k]["face_bboxes"] is None for k in [*bad, "11"])
    assert rows["12"]["face_bboxes"] is not None
    assert summary["metadata_ignored"] == {"face_bboxes_malformed": len(bad), "face_bboxes_other_aspect": 1}


def test_ingest_carries_face_bboxes_from_a_parquet_column(tmp_path):
    image = photo("coffee")
    path = tmp_path / "src" / "part-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "uid": ["u0", "u1", "u2"], "text": [CAPTION] * 3, "image_bytes": [image] * 3,
        "face_bboxes": pa.array([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6]], [], None],
                                pa.list_(pa.list_(pa.float32()))),
        "clip_l14_similarity_score": pa.array([0.3, 0.25, None], pa.float32()),
    }), path)
    lake = Lake(tmp_path / "lake")
    ingest([str(path)], lake)
    rows = {r["source_uid"]: r for r in lake.read(tables.PAIRS).to_pylist()}
    assert np.allclose(json.loads(rows["u0"]["face_bboxes"]), [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6]])
    assert rows["u1"]["face_bboxes"] == "[]" and rows["u2"]["face_bboxes"] is None
    assert rows["u0"]["source_clip_score"] == pytest.approx(0.3) and rows["u2"]["source_clip_model"] is None


# The faces filter ------------------------------------------------------------------------------

@pytest.fixture
def no_detector(monkeypatch):
    """CenterFace made unavailable from here on: a row that reaches it fails (filter_error:faces)."""
    def refuse(self, rgb, threshold):
        raise RuntimeError("CenterFace was called")

    return lambda: monkeypatch.setattr(FaceDetector, "__call__", refuse)


@pytest.fixture(scope="module")
def astronaut() -> tuple[bytes, list[float]]:
    """The astronaut photo (512 x 512) and CenterFace's box on her face."""
    image = photo("astronaut")
    return image, detected_box(image)


def test_metadata_boxes_blur_what_the_detector_found_without_running_it(tmp_path, astronaut, no_detector):
    image, box = astronaut
    lake, _ = lake_of(tmp_path, [members("0", image, {"face_bboxes": [normalized(box, (512, 512))]})])
    no_detector()
    verdict = filtered(lake)["0"]
    assert verdict["kept"] and verdict["face_source"] == "metadata" and verdict["faces"] == 1
    [got] = json.loads(verdict["face_boxes"])
    assert np.allclose(got[:4], box[:4], atol=0.2) and got[4] is None
    rows = lake.read(tables.PAIRS)
    original, blurred = read_images(rows)[0], read_images(rows, lake=lake)[0]
    inside, outside = _face_change(original, blurred, box)
    assert inside > 8 * outside and inside > 5


def test_metadata_mode_never_loads_the_detector(tmp_path, astronaut):
    image, box = astronaut
    broken = tmp_path / "centerface.onnx"
    broken.write_bytes(b"not an onnx model")
    lake, _ = lake_of(tmp_path, [members("0", image, {"face_bboxes": [normalized(box, (512, 512))]}),
                                 members("1", photo("coffee"), {"face_bboxes": []}),
                                 members("2", photo("chelsea"), {}, caption="a tabby cat looking at the camera")])
    verdicts = filtered(lake, face_boxes="metadata", face_model=str(broken))
    assert [verdicts[k]["face_source"] for k in "012"] == ["metadata", "metadata", None]
    assert verdicts["1"]["faces"] == 0 and verdicts["1"]["kept"]
    # No boxes and no detector: not captioned unblurred, dropped with a reason.
    assert not verdicts["2"]["kept"] and verdicts["2"]["reason"] == "no_face_boxes"
    assert {r["reason"] for r in lake.read(tables.REJECTED).to_pylist()} == {"no_face_boxes"}
    # The same broken model where CenterFace may run fails to load.
    with pytest.raises(ModelLoadError, match="filter 'faces': cannot load model"):
        FaceFilter(FilterConfig(face_model=str(broken))).load()


def test_auto_detects_rows_without_boxes_and_detect_ignores_metadata(tmp_path, astronaut):
    image, _ = astronaut
    coffee = photo("coffee")  # 600 x 400, no face: a metadata box on it is the metadata's word alone
    lake, _ = lake_of(tmp_path, [members("0", image, {}),
                                 members("1", coffee, {"face_bboxes": [[0.25, 0.2, 0.5, 0.6]]},
                                         caption="a cup of coffee on a saucer on a table")])
    auto = filtered(lake)
    assert (auto["0"]["face_source"], auto["0"]["faces"]) == ("detector", 1)
    assert (auto["1"]["face_source"], auto["1"]["faces"]) == ("metadata", 1)
    assert json.loads(auto["1"]["face_boxes"]) == [[150.0, 80.0, 300.0, 240.0, None]]  # scaled to 600 x 400
    blurred = read_images(lake.read(tables.PAIRS).sort_by("key"), lake=lake)
    inside, outside = _face_change(coffee, blurred[1], [150, 80, 300, 240])
    assert inside > 8 * outside

    lake2, _ = lake_of(tmp_path / "again", [members("1", coffee, {"face_bboxes": [[0.25, 0.2, 0.5, 0.6]]},
                                                    caption="a cup of coffee on a saucer on a table")])
    detect = filtered(lake2, face_boxes="detect")
    assert (detect["1"]["face_source"], detect["1"]["faces"]) == ("detector", 0)


def test_boxes_scale_to_a_resized_and_rotated_copy(tmp_path, astronaut, no_detector):
    """DataComp's boxes are normalized to the original: a downloader's smaller copy stored with
    its pixels turned (EXIF orientation 6) still gets the box on her face, in upright pixels."""
    image, box = astronaut
    original = Image.open(io.BytesIO(image)).crop((0, 0, 512, 384))  # 4:3, her face in it
    copy = original.resize((384, 288))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise: a viewer turns it back clockwise
    buf = io.BytesIO()
    copy.rotate(90, expand=True).save(buf, format="JPEG", quality=92, exif=exif)
    lake, _ = lake_of(tmp_path, [members("0", buf.getvalue(), {"face_bboxes": [normalized(box, (512, 384))],
                                                               "original_width": 512, "original_height": 384})])
    assert pairs(lake)["0"]["face_bboxes"] is not None  # stored 288 x 384: the same shape turned
    no_detector()
    verdict = filtered(lake)["0"]
    [got] = json.loads(verdict["face_boxes"])
    assert verdict["face_source"] == "metadata" and np.allclose(got[:4], [v * 0.75 for v in box[:4]], atol=0.2)
    blurred = read_images(lake.read(tables.PAIRS), lake=lake)[0]  # upright, as the captioner reads it
    shown = io.BytesIO()
    copy.save(shown, format="PNG")
    inside, outside = _face_change(shown.getvalue(), blurred, got)
    assert inside > 4 * outside and inside > 5


def test_a_lake_from_before_the_columns(tmp_path, astronaut):
    """`pairs` and `filter_results` as a lake made before face_bboxes and face_source existed: its
    rows read as carrying no boxes (auto: CenterFace), a new shard's rows add the columns."""
    from deltalake import DeltaTable, write_deltalake

    from recap_tasks import schemas

    image, box = astronaut
    lake, _ = lake_of(tmp_path, [members("0", image, {})])
    new = {"face_bboxes", "source_clip_score", "source_clip_model"}
    old_pairs = lake.read(tables.PAIRS).drop_columns(sorted(new))
    write_deltalake(lake.path(tables.PAIRS), old_pairs, mode="overwrite", schema_mode="overwrite",
                    partition_by=list(schemas.PAIRS.partition_by))
    DeltaTable.create(lake.path(tables.FILTER_RESULTS),
                      pa.schema([f for f in schemas.FILTER_RESULTS.arrow if f.name != "face_source"]),
                      partition_by=list(schemas.FILTER_RESULTS.partition_by))
    assert not new & set(DeltaTable(lake.path(tables.PAIRS)).schema().to_arrow().names)
    later = write_tar(tmp_path / "src" / "00001.tar", members("1", photo("coffee"), {"face_bboxes": []},
                                                               caption="a cup of coffee on a saucer on a table"))
    ingest([str(later)], lake)
    verdicts = filtered(lake)
    assert (verdicts["0"]["face_source"], verdicts["0"]["faces"]) == ("detector", 1)
    assert (verdicts["1"]["face_source"], verdicts["1"]["faces"]) == ("metadata", 0)
    assert new <= set(DeltaTable(lake.path(tables.PAIRS)).schema().to_arrow().names)
    assert "face_source" in DeltaTable(lake.path(tables.FILTER_RESULTS)).schema().to_arrow().names


def test_report_counts_the_sources_of_face_boxes(tmp_path, astronaut, tiny_model):
    from dataclasses import replace

    from recap_tasks.config import RecapConfig
    from recap_tasks.pipeline import run_pipeline

    image, box = astronaut
    tar = write_tar(tmp_path / "src" / "00000.tar", members("0", image, {"face_bboxes": [normalized(box, (512, 512))]})
                    + members("1", mirrored(image), {}) + members("2", photo("coffee"), {"face_bboxes": []},
                                                       caption="a cup of coffee on a saucer on a table"))
    config = RecapConfig.load()
    config = replace(config, filter=replace(config.filter, chain="datacomp"))
    lake = Lake(tmp_path / "lake")
    summary = run_pipeline([str(tar)], lake, model=str(tiny_model), config=config, run_id="faces1")
    assert summary["filter"]["face_sources"] == {"metadata": 2, "detector": 1}
    metrics = lake.read_json("_reports/runs/faces1/metrics.json")
    assert metrics["face_boxes"] == {"metadata": 2, "detector": 1, "none": 0}
    page = open(summary["report"]).read()
    assert "<tr><td>from the source&#x27;s metadata (pairs.face_bboxes)</td><td>2</td></tr>" in page
    assert "<tr><td>detected by CenterFace</td><td>1</td></tr>" in page


def test_face_boxes_setting_is_checked():
    with pytest.raises(RecapError, match="filter.face_boxes must be"):
        FilterConfig(face_boxes="sometimes")
