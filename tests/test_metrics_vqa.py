"""VQA accuracy equals the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py, vendored in
tests/references/) on the same answers, quirks included (docs/metrics.md#vqa-accuracy)."""
import random
import warnings
from types import SimpleNamespace

import pytest

from nanopali.metrics.vqa import normalize_answer, vqa_accuracy, vqa_scores

with warnings.catch_warnings():   # the official file's "\d" in a plain string literal warns when compiled
    warnings.simplefilter("ignore")
    from references.vqa_eval_official import VQAEval

# Answers that normalization treats differently: number words, articles, contractions, punctuation
# next to spaces or inside numbers, periods before digits, case, whitespace, and the all-equal case.
POOL = ["2", "two", "Two", "2.", "two.", "the dog", "a dog", "dog", "Dog!", "dogs", "don't", "dont", "do not",
        "1,000", "1000", "1,000.", "3.5", "3.5.", "3,5", "yes", "Yes", "yes.", "yes!", "no", "none", "0", "zero",
        "red-white", "red white", "red - white", "(red)", "red/blue", "red / blue", "it's", "its", "itll", "it'll",
        "ten", "10", "an apple", "apple", "the", "a", "", " ", "left\tside", "left side", "left\nside", "e.g.",
        "St. Louis", "st louis", "#1", "100%", "@home", "home", "1:30", "1 30", "o'clock", "oclock", "Im", "i'm",
        "$5", "5", "5 dollars", "youre", "you're", "that's", "thats", "2 3", "2,3", "12.5%", "...", ". . ."]


def official(predictions, answer_lists):
    """Per-question accuracies (0..1) from the vendored VQAEval, unrounded (n=15 digits)."""
    qa = {q: {"answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(answers)],
              "question_type": "what", "answer_type": "other"} for q, answers in enumerate(answer_lists)}
    vqa = SimpleNamespace(qa=qa, getQuesIds=lambda: list(qa))
    res = SimpleNamespace(qa={q: {"answer": p} for q, p in enumerate(predictions)})
    ev = VQAEval(vqa, res, n=15)
    ev.updateProgress = lambda progress: None
    ev.evaluate()
    return [ev.evalQA[q] / 100 for q in range(len(predictions))]


def test_vqa_accuracy_equals_the_official_evaluation_on_tricky_answers():
    rng = random.Random(0)
    preds, answers = [], []
    for k in range(400):
        pick = rng.sample(POOL, rng.randint(1, 4))
        ten = [rng.choice(pick) for _ in range(10)]
        if k % 5 == 0:
            ten = [pick[0]] * 10                    # all humans agree: the official code skips normalization
        preds.append(rng.choice(POOL + pick * 3))
        answers.append(ten)
    ours = [vqa_accuracy(p, a) for p, a in zip(preds, answers)]
    theirs = official(preds, answers)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-9


def test_at_most_32_periods_are_removed_as_in_the_official_code():
    answer = "." * 40 + "x"
    assert normalize_answer(answer) == "." * 8 + "x"
    assert official([answer], [[answer, "y"] * 5]) == [vqa_accuracy(answer, [answer, "y"] * 5)]


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_scores_by_hand(matching, expected):
    # Out of 10 subsets of 9, those that drop a matching answer see matching - 1 of them:
    # 3 matches give (3 * 2/3 + 7 * 1) / 10 = 0.9, and it takes 4 humans for full credit.
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_answers_are_normalized_only_when_the_humans_disagree():
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0                 # all agree: compared as written
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == 1.0          # they disagree: "two" → "2"


@pytest.mark.parametrize("raw, normalized", [
    ("The Dog.", "dog"), ("two", "2"), ("dont", "don't"), ("1,000", "1000"), ("3.5", "3.5"), ("yes!", "yes"),
    ("red-white", "red white"), ("red - white", "red white"), ("a (big) dog", "big dog"), ("None", "0")])
def test_normalization_by_hand(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_the_mean_over_questions_is_the_official_overall_divided_by_100():
    preds, answers = ["2", "dog", "yes"], [["two"] * 5 + ["2"] * 5, ["cat"] * 9 + ["dog"], ["yes"] * 10]
    assert vqa_scores(preds, answers)["vqa_accuracy"] == pytest.approx(sum(official(preds, answers)) / 3)
