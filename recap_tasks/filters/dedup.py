"""Duplicates: exact (image sha256), near (perceptual hash within a Hamming distance), boilerplate
captions (the same normalised alt text on many images).

Survivors are deterministic: a row kept by an earlier run always wins; among new rows the image
with the most pixels wins, then the smallest uid.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

import numpy as np
import pyarrow as pa
from PIL import Image

from recap_tasks.config import FilterConfig
from recap_tasks.filters import CorpusFilter, FilterDecision, PairImage

_BITS = 64


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (the pHash of the `imagehash` package), as a signed int64."""
    from scipy.fft import dct

    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(gray, axis=0), axis=1)[:8, :8]
    bits = (low > np.median(low)).flatten()
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & ((1 << 64) - 1)).bit_count()


class _Groups:
    """Union-find over row indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(hashes: list[int], max_distance: int):
    """Index pairs whose hashes differ in at most `max_distance` bits.

    Pigeonhole banding: split the 64 bits into max_distance + 1 bands; two hashes that close agree
    exactly on at least one band, so only rows sharing a band value are compared.
    """
    bands = max_distance + 1
    width = -(-_BITS // bands)
    seen: set[tuple[int, int]] = set()
    for b in range(bands):
        shift, mask = b * width, (1 << min(width, _BITS - b * width)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            buckets[((h & ((1 << 64) - 1)) >> shift) & mask].append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    i, j = members[x], members[y]
                    if (i, j) not in seen and hamming(hashes[i], hashes[j]) <= max_distance:
                        seen.add((i, j))
                        yield i, j


def _survivors(n: int, n_hist: int, rank: list, link) -> tuple[np.ndarray, list[int]]:
    """Group n rows (the first n_hist from history) by `link`; in each group keep a history row if
    there is one, else the best-ranked row. Returns the keep mask and each row's survivor."""
    groups = _Groups(n)
    link(groups)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[groups.find(i)].append(i)
    keep = np.ones(n, dtype=bool)
    survivor = list(range(n))
    for rows in members.values():
        if len(rows) == 1:
            continue
        hist = [i for i in rows if i < n_hist]
        best = min(hist) if hist else min(rows, key=lambda i: rank[i])
        for i in rows:
            if i != best and i >= n_hist:
                keep[i] = False
                survivor[i] = best
    return keep, survivor


class ImageDedupFilter(CorpusFilter):
    """Drops exact duplicates (same sha256) and near duplicates (pHash within `max_phash_distance`)."""

    name = "image_dedup"
    needs_image = True

    def __init__(self, config: FilterConfig):
        self.max_distance = config.max_phash_distance

    def decide(self, batch: pa.Table, images: list[PairImage] | None = None) -> list[FilterDecision]:
        hashes = np.array([phash(im.rgb) for im in images], dtype=np.int64)
        return [FilterDecision(np.ones(len(images), dtype=bool), "near_duplicate_image", {"phash": hashes})]

    def decide_corpus(self, rows: pa.Table, history: pa.Table) -> list[FilterDecision]:
        n_hist = history.num_rows
        uids = history.column("uid").to_pylist() + rows.column("uid").to_pylist()
        shas = history.column("sha256").to_pylist() + rows.column("sha256").to_pylist()
        hashes = history.column("phash").to_pylist() + rows.column("phash").to_pylist()
        pixels = [0] * n_hist + [int(w or 0) * int(h or 0) for w, h in zip(rows.column("width").to_pylist(),
                                                                            rows.column("height").to_pylist())]
        rank = [(-p, u) for p, u in zip(pixels, uids)]

        def by_sha(groups: _Groups) -> None:
            first: dict[str, int] = {}
            for i, s in enumerate(shas):
                if s is not None:
                    groups.union(first.setdefault(s, i), i)

        keep_exact, surv_exact = _survivors(len(uids), n_hist, rank, by_sha)
        # Near duplicates among what the exact pass kept (and all history rows).
        live = [i for i in range(len(uids)) if keep_exact[i] and hashes[i] is not None]
        live_hashes = [hashes[i] for i in live]

        def by_phash(groups: _Groups) -> None:
            for a, b in near_pairs(live_hashes, self.max_distance):
                groups.union(a, b)

        n_hist_live = sum(1 for i in live if i < n_hist)
        keep_near_live, surv_near_live = _survivors(len(live), n_hist_live, [rank[i] for i in live], by_phash)
        keep_near = np.ones(len(uids), dtype=bool)
        duplicate_of: list[str | None] = [None] * len(uids)
        distance: list[int | None] = [None] * len(uids)
        for i in range(len(uids)):
            if not keep_exact[i]:
                duplicate_of[i], distance[i] = uids[surv_exact[i]], 0
        for k, i in enumerate(live):
            if not keep_near_live[k]:
                j = live[surv_near_live[k]]
                keep_near[i] = False
                duplicate_of[i], distance[i] = uids[j], hamming(hashes[i], hashes[j])
        new = slice(n_hist, None)
        scores = {"duplicate_of": duplicate_of[new], "phash_distance": distance[new]}
        return [FilterDecision(keep_exact[new], "duplicate_image", scores),
                FilterDecision(keep_near[new], "near_duplicate_image", scores)]


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_DIGITS = re.compile(r"\d+")


def normalise_caption(text: str | None) -> str:
    """Case, accents, punctuation, spacing and numbers folded: "IMG_0042.JPG" == "img 17 jpg"."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = _DIGITS.sub("0", text)
    return " ".join(_NON_WORD.sub(" ", text).split())


class CaptionBoilerplateFilter(CorpusFilter):
    """Drops every pair whose normalised caption appears on more than `max_caption_repeats` images.

    Alt text repeated across many different images ("click to enlarge", "product image 3") says
    nothing about any of them. Exact duplicates of one image are the image filter's business, so
    repeats are counted over distinct image hashes.
    """

    name = "caption_boilerplate"

    def __init__(self, config: FilterConfig):
        self.max_repeats = config.max_caption_repeats

    def decide_corpus(self, rows: pa.Table, history: pa.Table) -> list[FilterDecision]:
        norm = [normalise_caption(c) for c in rows.column("org_caption").to_pylist()]
        shas = rows.column("sha256").to_pylist()
        images: dict[str, set] = defaultdict(set)
        for i, (c, s) in enumerate(zip(norm, shas)):
            images[c].add(s if s is not None else i)
        repeats = np.array([len(images[c]) for c in norm], dtype=np.int32)
        return [FilterDecision(repeats <= self.max_repeats, "caption_boilerplate", {"caption_repeats": repeats})]
