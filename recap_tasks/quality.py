"""Caption-quality measures of a run: the Recap-DataComp-1B paper's analyses, and what it lacked.

Pure functions over lists of captions and scores, so the report, tests and notebooks compute the
same figures:
- vocabulary of originals, recaptions and their union, and each one's coverage of the union (the
  paper: recaptions cover 82.86% of the joint vocabulary);
- CLIP win rate: the share of rows whose recaption scores higher than the original;
- caption hygiene rates: refusals, prompt echoes, degenerate repetition;
- object hallucination (CHAIR, Rohrbach et al. 2018) against references the input carried: COCO's
  80 object classes with their synonyms; an object a caption names that none of the image's
  references name is hallucinated. CHAIR-i = hallucinated / mentioned objects, CHAIR-s = captions
  with at least one hallucinated object / captions. With references only (no segmentation
  labels), an object all five references left out counts as hallucinated: an upper bound.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable, Sequence

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

# COCO's 80 object classes and words naming them (after CHAIR's synonym list, abridged).
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid",
               "kids", "baby", "guy", "lady", "player", "skier", "surfer", "skateboarder", "snowboarder",
               "rider", "adult", "teenager", "toddler", "pedestrian", "worker", "chef", "officer"),
    "bicycle": ("bicycle", "bike", "cycle"), "car": ("car", "cars", "automobile", "sedan", "taxi", "suv"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped"), "airplane": ("airplane", "plane", "jet",
                                                                               "aircraft", "airliner"),
    "bus": ("bus", "buses"), "train": ("train", "locomotive", "tram"), "truck": ("truck", "lorry", "pickup"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry"),
    "traffic light": ("traffic light", "stoplight", "traffic signal"), "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",), "parking meter": ("parking meter",), "bench": ("bench",),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "swan", "owl"),
    "cat": ("cat", "kitten", "kitty"), "dog": ("dog", "puppy", "pup", "lab"), "horse": ("horse", "pony", "foal"),
    "sheep": ("sheep", "lamb", "ram"), "cow": ("cow", "cattle", "calf", "bull", "oxen"), "elephant": ("elephant",),
    "bear": ("bear",), "zebra": ("zebra",), "giraffe": ("giraffe",), "backpack": ("backpack",),
    "umbrella": ("umbrella", "parasol"), "handbag": ("handbag", "purse"), "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage"), "frisbee": ("frisbee",), "skis": ("skis", "ski"),
    "snowboard": ("snowboard",), "sports ball": ("ball", "football", "soccer ball", "baseball", "basketball"),
    "kite": ("kite",), "baseball bat": ("baseball bat", "bat"), "baseball glove": ("baseball glove", "mitt"),
    "skateboard": ("skateboard",), "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet"), "bottle": ("bottle",),
    "wine glass": ("wine glass",), "cup": ("cup", "mug"), "fork": ("fork",), "knife": ("knife", "knives"),
    "spoon": ("spoon",), "bowl": ("bowl",), "banana": ("banana",), "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub"), "orange": ("orange",), "broccoli": ("broccoli",),
    "carrot": ("carrot",), "hot dog": ("hot dog",), "pizza": ("pizza",), "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake"), "chair": ("chair", "stool"), "couch": ("couch", "sofa"),
    "potted plant": ("potted plant", "houseplant", "plant"), "bed": ("bed",),
    "dining table": ("table", "dining table", "desk"), "toilet": ("toilet",), "tv": ("tv", "television"),
    "laptop": ("laptop", "computer", "notebook"), "mouse": ("mouse",), "remote": ("remote", "controller"),
    "keyboard": ("keyboard",), "cell phone": ("cell phone", "phone", "cellphone", "smartphone"),
    "microwave": ("microwave",), "oven": ("oven", "stove"), "toaster": ("toaster",), "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"), "book": ("book",), "clock": ("clock",), "vase": ("vase",),
    "scissors": ("scissors",), "teddy bear": ("teddy bear", "teddy"), "hair drier": ("hair drier", "hair dryer"),
    "toothbrush": ("toothbrush",),
}


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _phrase_index() -> dict[tuple[str, ...], str]:
    out = {}
    for obj, names in COCO_SYNONYMS.items():
        for name in names:
            out[tuple(_singular(w) for w in name.split())] = obj
    return out


_PHRASES = _phrase_index()
_LONGEST = max(len(p) for p in _PHRASES)


def caption_tokens(text: str | None) -> list[str]:
    """Lower-case letter tokens of a caption, for vocabulary and object mentions (punctuation and
    digits dropped); a caption's word count is `hygiene.word_count`, the published lengths."""
    return _WORD.findall((text or "").lower())


def mentioned_objects(text: str | None) -> set[str]:
    """COCO object classes a text names (longest phrase first: "hot dog" is not a dog)."""
    tokens = [_singular(w) for w in caption_tokens(text)]
    found, i = set(), 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            obj = _PHRASES.get(tuple(tokens[i:i + n]))
            if obj is not None:
                found.add(obj)
                i += n
                break
        else:
            i += 1
    return found


def chair(captions: Sequence[str | None], references: Sequence[Sequence[str] | None]) -> dict:
    """CHAIR-i and CHAIR-s of `captions` against each row's reference texts (rows without
    references are left out) and, per row, the hallucinated objects (None where no references)."""
    mentioned = hallucinated = rows = rows_bad = 0
    per_row: list[list[str] | None] = []
    for caption, refs in zip(captions, references):
        if not refs:
            per_row.append(None)
            continue
        truth = set().union(*(mentioned_objects(r) for r in refs))
        said = mentioned_objects(caption)
        bad = sorted(said - truth)
        per_row.append(bad)
        rows += 1
        mentioned += len(said)
        hallucinated += len(bad)
        rows_bad += bool(bad)
    return {"rows": rows, "objects_mentioned": mentioned, "objects_hallucinated": hallucinated,
            "chair_i": hallucinated / mentioned if mentioned else None,
            "chair_s": rows_bad / rows if rows else None, "per_row": per_row}


def parse_references(raw: str | None) -> list[str] | None:
    """The `references` column (JSON list of strings) as a list; None when absent or unreadable."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else None


def vocabulary(originals: Iterable[str | None], recaptions: Iterable[str | None]) -> dict:
    """Distinct words of the originals, the recaptions, their union, and each one's share of the union."""
    org = set().union(*(set(caption_tokens(t)) for t in originals))
    re_ = set().union(*(set(caption_tokens(t)) for t in recaptions))
    union = org | re_
    n = len(union)
    return {"original": len(org), "recaption": len(re_), "union": n,
            "original_coverage": len(org) / n if n else None, "recaption_coverage": len(re_) / n if n else None}


def win_rate(recaption_scores: Sequence[float | None], original_scores: Sequence[float | None]) -> dict:
    """Share of rows (both scores present) where the recaption scores higher than the original."""
    pairs = [(r, o) for r, o in zip(recaption_scores, original_scores) if r is not None and o is not None]
    wins = sum(r > o for r, o in pairs)
    return {"rows": len(pairs), "wins": wins, "rate": wins / len(pairs) if pairs else None}


def hygiene(is_refusal: Sequence[bool | None], prompt_echo: Sequence[bool | None],
            distinct_ngram_ratio: Sequence[float | None], *, min_distinct_ratio: float) -> dict:
    """Rates of refusals, prompt echoes and degenerate repetition (distinct n-gram ratio below
    `min_distinct_ratio`, the validation gate's threshold) among the captions."""
    n = len(is_refusal)

    def rate(k: int) -> float | None:
        return k / n if n else None

    refusals = sum(bool(v) for v in is_refusal)
    echoes = sum(bool(v) for v in prompt_echo)
    repetitive = sum(v is not None and v < min_distinct_ratio for v in distinct_ngram_ratio)
    return {"rows": n, "refusal_rate": rate(refusals), "prompt_echo_rate": rate(echoes),
            "repetition_rate": rate(repetitive), "refusals": refusals, "prompt_echoes": echoes,
            "repetitive": repetitive}


def length_stats(counts: Iterable[int | None]) -> dict:
    """Mean and median of word counts (the tables' `re_length` / `org_length`)."""
    counts = sorted(c for c in counts if c is not None)
    if not counts:
        return {"mean": None, "median": None}
    mid = len(counts) // 2
    median = counts[mid] if len(counts) % 2 else (counts[mid - 1] + counts[mid]) / 2
    return {"mean": sum(counts) / len(counts), "median": median}


def top_words(texts: Iterable[str | None]) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        counts.update(caption_tokens(t))
    return counts
