"""Small data builders for tests: JPEGs, PNGs, img2dataset tar shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def jpeg(width: int = 320, height: int = 240, color=(200, 80, 40), quality: int = 85) -> bytes:
    im = Image.new("RGB", (width, height), color)
    # Some structure, so truncating the file really cuts image data.
    for x in range(0, width, 7):
        for y in range(0, height, 5):
            im.putpixel((x, y), ((x * 3) % 255, (y * 5) % 255, (x + y) % 255))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, caption: str | bytes = "a red square on a plain background", image: bytes | None = None,
           ext: str = "jpg", url: str | None = None) -> list[tuple[str, bytes]]:
    """The members of one img2dataset sample."""
    members = [(f"{key}.{ext}", image if image is not None else jpeg())]
    members.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    members.append((f"{key}.json", json.dumps({"key": key, "url": url or f"https://example.com/{key}.jpg"}).encode()))
    return members
