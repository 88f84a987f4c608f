"""ANLS, the average normalized Levenshtein similarity of DocVQA, InfographicVQA and ST-VQA.

As the official evaluation computes it (the RRC / docvqa.org scripts, e.g. InfographicVQA's
`evaluate_method`; Biten et al. 2019, "Scene Text Visual Question Answering", Eq. 1): both answers
lower-cased, stripped and their whitespace collapsed; NL = edit distance / the longer length; the
question scores 1 - NL against its closest reference, and 0 when that is below the threshold (0.5).
One quirk is kept: the length divided by is that of the strings as given, before the whitespace
is collapsed. big_vision's `anls_metric` differs in two ways (no lower-casing; 1 - NL = 0.5 scores 0
there, 0.5 here), see docs/metrics.md#anls.
"""
from __future__ import annotations


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions that turn a into b (one row of the table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """The score of one answer against its references, in [0, 1]."""
    if not answers:
        raise ValueError("ANLS needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))   # the official script's length
        ref = " ".join(answer.strip().lower().split())
        distances.append(0.0 if length == 0 else levenshtein(ref, pred) / length)
    score = 1 - min(distances)
    return 0.0 if score < threshold else score


def anls_scores(predictions: list[str], references: list[list[str]], threshold: float = 0.5) -> dict[str, float]:
    """{"anls": the mean over questions}."""
    values = [anls(p, r, threshold) for p, r in zip(predictions, references)]
    return {"anls": sum(values) / len(values)}
