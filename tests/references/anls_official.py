"""The DocVQA / InfographicVQA ANLS rule, restated from the official evaluation scripts for
tests/test_metrics_anls.py.

Source: the RRC evaluation distributed by https://www.docvqa.org and https://rrc.cvc.uab.es/?ch=17
(InfographicVQA's `infographicsVQA_eval.py`, `evaluate_method`; DocVQA's script has the same loop).
The script states no licence, so it is not copied here: this file follows its steps one by one, in
its order, with its quirks (the length divided by is that of the answers as given, upper-cased,
before their whitespace is collapsed; 0.5 itself passes the threshold), and computes the edit
distance with the full dynamic-programming table rather than our single row.
"""


def edit_distance(a: str, b: str) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (0 if a[i - 1] == b[j - 1] else 1))
    return table[len(a)][len(b)]


def question_score(gt_answers: list, det_answer: str, threshold: float = 0.5) -> float:
    values = []
    for answer in gt_answers:
        gt = " ".join(answer.strip().lower().split())
        det = " ".join(det_answer.strip().lower().split())
        dist = edit_distance(gt, det)
        length = max(len(answer.upper()), len(det_answer.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    result = 1 - min(values)
    if result < threshold:
        result = 0
    return result


def method_score(gt_data: list, submission: list, threshold: float = 0.5) -> float:
    """The script's "Overall ANLS": gt_data rows {"questionId", "answers"}, submission rows {"questionId", "answer"}."""
    by_id = {int(r["questionId"]): r for r in submission}
    total = sum(question_score(g["answers"], by_id[int(g["questionId"])]["answer"], threshold) for g in gt_data)
    return 0 if len(gt_data) == 0 else total / len(gt_data)
