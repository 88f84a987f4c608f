"""ANLS equals the DocVQA / InfographicVQA official rule (restated in tests/references/anls_official.py)
on the same answers, and hand-computed cases (docs/metrics.md#anls)."""
import random

import pytest

from nanopali.metrics.anls import anls, anls_scores, levenshtein
from references.anls_official import edit_distance, method_score, question_score


def _variants(rng, word):
    """The word as a model or annotator might write it: case, spacing, typos."""
    out = word
    if rng.random() < 0.3:
        out = out.upper() if rng.random() < 0.5 else out.title()
    if rng.random() < 0.3:
        i = rng.randrange(len(out) + 1)
        out = out[:i] + rng.choice("xyz .,-") + out[i:]
    if rng.random() < 0.2:
        out = out.replace(" ", "  ")
    if rng.random() < 0.2:
        out = " " + out + "\t"
    return out


def test_anls_equals_the_official_rule_on_noisy_answers():
    rng = random.Random(0)
    words = ["1,000", "$5.50", "John Smith", "st. louis", "ANNUAL REPORT", "q3 2019", "yes", "no", "straße", "",
             "10 mg", "ab", "a b", "12/03/1998"]
    for _ in range(500):
        refs = [_variants(rng, rng.choice(words)) for _ in range(rng.randint(1, 4))]
        pred = _variants(rng, rng.choice(words + refs))
        assert abs(anls(pred, refs) - question_score(refs, pred)) <= 1e-12, (pred, refs)


def test_the_mean_equals_the_official_overall_anls():
    gt = [{"questionId": i, "answers": a} for i, a in enumerate([["Total"], ["1,000", "1000"], ["Dr. Who"]])]
    sub = [{"questionId": 2, "answer": "dr who"}, {"questionId": 0, "answer": "total:"},
           {"questionId": 1, "answer": "100"}]
    preds = [next(s["answer"] for s in sub if s["questionId"] == g["questionId"]) for g in gt]
    assert anls_scores(preds, [g["answers"] for g in gt])["anls"] == pytest.approx(method_score(gt, sub), abs=1e-12)


def test_levenshtein_equals_the_full_table_on_random_strings():
    rng = random.Random(1)
    for _ in range(300):
        a = "".join(rng.choices("abcd ", k=rng.randint(0, 9)))
        b = "".join(rng.choices("abcd ", k=rng.randint(0, 9)))
        assert levenshtein(a, b) == edit_distance(a, b)


def test_hand_computed_scores_and_the_threshold():
    assert levenshtein("kitten", "sitting") == 3
    assert anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    assert anls("abcd", ["abxy"]) == 0.5                    # NL = 0.5: at the threshold, kept
    assert anls("abcde", ["abxyz"]) == 0.0                  # NL = 0.6: below, 0
    assert anls("Hello World", ["hello   world "]) == 1.0     # case and spaces do not count
    assert anls("Hello Worlds", ["hello   world "]) == pytest.approx(1 - 1 / 14)   # divided by the length as given
    assert anls("wrong", ["nope", "Wrong"]) == 1.0          # the best reference counts
