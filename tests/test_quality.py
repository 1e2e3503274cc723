"""The report's caption-quality measures on crafted rows with known answers."""

import pytest

from recap_tasks import quality


def test_vocabulary_coverage_of_the_union():
    v = quality.vocabulary(["a red dog", "A dog."], ["a red dog on grass", None])
    # original {a, red, dog}; recaption {a, red, dog, on, grass}; union of 5 words
    assert v == {"original": 3, "recaption": 5, "union": 5, "original_coverage": 0.6, "recaption_coverage": 1.0}
    assert quality.vocabulary([], [])["recaption_coverage"] is None


def test_clip_win_rate_counts_rows_with_both_scores():
    w = quality.win_rate([0.3, 0.2, 0.5, None], [0.1, 0.4, 0.5, 0.2])
    assert w == {"rows": 3, "wins": 1, "rate": pytest.approx(1 / 3)}  # a tie is not a win


def test_hygiene_rates():
    h = quality.hygiene([True, False, False, None], [False, True, False, False], [0.9, 0.2, 0.34, None],
                        min_distinct_ratio=0.35)
    assert (h["refusal_rate"], h["prompt_echo_rate"], h["repetition_rate"]) == (0.25, 0.25, 0.5)


def test_objects_named_by_phrases_synonyms_and_plurals():
    assert quality.mentioned_objects("Two puppies chase a frisbee near the sofa") == {"dog", "frisbee", "couch"}
    assert quality.mentioned_objects("a hot dog on a plate") == {"hot dog"}  # not a dog
    assert quality.mentioned_objects("a teddy bear") == {"teddy bear"}
    assert quality.mentioned_objects("") == set()


def test_chair_flags_an_object_no_reference_names():
    refs = [["A dog runs on the beach.", "a puppy playing in the sand"], ["a man holding a phone"], None]
    captions = ["A dog and a frisbee on the beach", "a man with a cell phone", "a cat"]
    c = quality.chair(captions, refs)
    # row 1 names dog (in refs) and frisbee (not); row 2 names person and cell phone (both in refs);
    # row 3 has no references and is left out
    assert c["per_row"] == [["frisbee"], [], None]
    assert (c["rows"], c["objects_mentioned"], c["objects_hallucinated"]) == (2, 4, 1)
    assert c["chair_i"] == 0.25 and c["chair_s"] == 0.5


def test_references_column_parsing():
    assert quality.parse_references('["a", "b"]') == ["a", "b"]
    assert quality.parse_references(None) is None and quality.parse_references("not json") is None
