"""Built-in sample data: webdataset shards of scikit-image's bundled photos, with alt-text captions.

The demo needs real photos and no network. scikit-image ships these images inside its wheel; the
captions are short alt-text-style descriptions written for this project. A few samples are made
to be dropped (an icon, a banner, a one-word caption) or rejected (a truncated JPEG), so a demo run
shows every path a row can take.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

_BASE_URL = "https://raw.githubusercontent.com/scikit-image/scikit-image/main/skimage/data/"

# (file in skimage/data, caption)
PHOTOS = [
    ("astronaut.png", "Astronaut Eileen Collins posing in her orange flight suit with the American flag"),
    ("chelsea.png", "Chelsea the tabby cat looking to the side on a wooden floor"),
    ("coffee.png", "A cup of coffee with latte art on a saucer with a spoon"),
    ("rocket.jpg", "A rocket on the launch pad before lift off on a clear day"),
    ("hubble_deep_field.jpg", "Hubble deep field view of thousands of distant galaxies"),
    ("motorcycle_left.png", "Red motorcycle parked in front of a studio backdrop"),
    ("camera.png", "Black and white photo of a cameraman behind a camera on a tripod"),
    ("coins.png", "Ancient Greek coins from Pompeii on a dark background"),
    ("moon.png", "Close up of the cratered surface of the moon"),
    ("brick.png", "Texture of an old brick wall with mortar lines"),
    ("grass.png", "Close up texture of green grass blades"),
    ("gravel.png", "Gravel path texture seen from above"),
    ("ihc.png", "Microscope slide of immunohistochemistry stained tissue"),
    ("retina.jpg", "Fundus photograph of a human retina with blood vessels"),
    ("clock_motion.png", "Wall clock blurred by camera motion"),
    ("color.png", "Colorful test chart with overlapping circles"),
    ("cell.png", "Microscope image of a single cell"),
    ("horse.png", "Black silhouette of a horse standing on white"),
]


def _load(name: str) -> Image.Image:
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    im = Image.open(path)
    im.load()
    return im.convert("RGB")


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000  # fixed, so the shards are byte-identical on every machine
    tf.addfile(info, io.BytesIO(data))


def make_sample_data(out_dir: str | Path, *, shards: int = 2) -> Path:
    """Write `shards` webdataset tars (img2dataset layout) to `out_dir`; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[str, bytes, str, str | None]] = []  # (ext, image bytes, caption, url)
    for name, caption in PHOTOS:
        samples.append(("jpg", _jpeg(_load(name)), caption, _BASE_URL + name))
    coffee = _load("coffee.png")
    samples += [
        ("png", _png(coffee.resize((64, 48))), "Coffee cup icon for a cafe website menu", None),  # too small
        ("jpg", _jpeg(_load("hubble_deep_field.jpg").crop((0, 0, 1000, 250))),
         "Banner of the night sky full of galaxies", None),  # aspect ratio 4
        ("jpg", _jpeg(_load("chelsea.png")), "cat", None),  # one-word alt text
        ("jpg", _jpeg(coffee)[:6000], "A truncated photo of a coffee cup on a table", None),  # corrupt
    ]
    per_shard = (len(samples) + shards - 1) // shards
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, (ext, data, caption, url) in enumerate(samples[s * per_shard:(s + 1) * per_shard]):
                key = f"{s:05d}{i:04d}"
                _add(tf, f"{key}.{ext}", data)
                _add(tf, f"{key}.txt", caption.encode())
                meta = {"key": key, "url": url, "caption": caption, "status": "success"}
                _add(tf, f"{key}.json", json.dumps(meta).encode())
    return out


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
