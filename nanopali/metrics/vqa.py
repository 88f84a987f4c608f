"""VQA accuracy as the official VQA evaluation computes it (VQAv2, and the VQA-style sets scored the same way).

The reference is GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (`VQAEval.evaluate`,
`processPunctuation`, `processDigitArticle`; https://visualqa.org/evaluation.html): an answer is right
in proportion to how many of the humans gave it, min(#matches / 3, 1), averaged over the 10 subsets
that leave one human answer out. Answers are compared after the official normalization, with its
quirks kept: it runs only when the human answers are not all the same string, and the period regex
removes at most 32 periods. big_vision's `vqav2` evaluator follows the same rules.
tests/test_metrics_vqa.py compares with the official code (vendored in tests/references/).
"""
from __future__ import annotations

import re

# The tables below are the official evaluation's, verbatim (vqaEval.py, Copyright (c) 2014 Aishwarya
# Agrawal, BSD 2-Clause licence). Keys with capitals ("Im") never match: the text is lower-cased first.
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# "(?!<=\d)" is a lookahead, not the lookbehind it was meant to be: every period not followed by a digit goes.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")
PERIODS_REMOVED = 32   # the official code passes re.UNICODE (= 32) as re.sub's `count`


def normalize_answer(answer: str) -> str:
    """processPunctuation then processDigitArticle: punctuation, number words → digits, articles, contractions."""
    out = answer
    for p in PUNCTUATION:   # next to a space (or anywhere in text with a digit comma) removed, else a space
        if p + " " in answer or " " + p in answer or _DIGIT_COMMA.search(answer):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, PERIODS_REMOVED)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The accuracy of one answer against the human answers (10 in VQAv2), in [0, 1]."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    if len(set(gts)) > 1:       # the official code normalizes only when the humans disagree
        pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def vqa_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"vqa_accuracy": the mean over questions} (the official "overall" is this x 100, rounded to 2 digits)."""
    accs = [vqa_accuracy(p, r) for p, r in zip(predictions, references)]
    return {"vqa_accuracy": sum(accs) / len(accs)}
