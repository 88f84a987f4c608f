"""The COCO caption toolkit's tokenization, in Python: what CIDEr and BLEU count as words.

pycocoevalcap (`tokenizer/ptbtokenizer.py`, `PTBTokenizer.tokenize`) pipes every caption through
Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`, a Java jar) and then drops the
tokens in its PUNCTUATIONS list. `ptb_tokenize` reproduces the jar on what captions hold: case,
sentence punctuation, quotes (straight and curly), brackets, contractions (n't 's 'll 're 've 'd 'm),
hyphens and dashes, numbers (1,000 3.5 10:30 1/2 -5), abbreviations and initials that keep their
period (mr. u.s. j.). tests/test_metrics_caption.py compares it with the jar on tricky captions;
docs/metrics.md#tokenization lists what it does not reproduce (rare forms such as y'all, 'tis).
"""
from __future__ import annotations

import re

# pycocoevalcap's list, as written. The jar lowercases "-LRB-" to "-lrb-" before the list is applied,
# so brackets are *kept* as -lrb- / -rrb- / -lsb- / ... words: a quirk every published CIDEr includes.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])
# Words that keep their period (probed on the 3.4.1 jar: "a mr. b" stays "mr.", "a fig. b" splits).
ABBREVIATIONS = frozenset("""mr mrs ms dr drs prof st ste jr sr inc ltd co cos corp vs etc mt ave gen col lt sgt
    capt rev blvd rd esq jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri calif ariz fla penn
    va ga dept univ assn bros est sq ft tel al cf""".split())
CAPITALIZED_ABBREVIATIONS = frozenset(["Miss", "Tex", "Mass", "Wash", "Pa", "Ore"])   # these only when capitalized
# Capitalized words after which the jar reads "b." as a sentence end, not an initial (probed: "plan b. The
# cat" splits, "plan b. Smith cat" does not).
SENTENCE_STARTS = frozenset("""A An At But He However If In It Now She So That The There They This We What When
    While Yet You Some Many Her Our Their These One Then After As Since Here About Such Other More""".split())
# Tokens the jar rewrites: brackets, and a straight double quote (`` or '', both dropped later).
REWRITES = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
# Curly quotes and dashes become their ASCII forms, as the jar's output shows them.
_NORMALIZE = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ",
                            "\u2013": " -- ", "\u2026": " ... "})
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'ll|'re|'ve|'d|'m)$")
_ALONE = re.compile(r"(?i)^'(s|ll|re|ve|d|m)$")            # "a man 's hat": the jar keeps "'s" as a word
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
# Inside a word: brackets, quotes, --, * + = ;, and , : unless between two digits (1,000 and 10:30 stay whole).
_INNER = re.compile(r"([()\[\]{}*=;\"]|(?<=.)\+|--|(?<!\d)[,:]|[,:](?!\d))")
_LEADING = re.compile(r"^(``|''|[\"'`(\[{$*=/]|#(?=\d)|--|-(?!\d)|\+(?!\d))")
_TRAILING = re.compile(r"(''|\.\.\.|[!?]+|[\"'`)\]},;:%$#*+=/]|--|-)$")


def ptb_tokenize(caption: str, next_line: str = "") -> str:
    """One caption as the toolkit scores it: lower-case words joined by single spaces, punctuation gone.
    The jar reads all captions as one text, one a line, and looks across the line break: `next_line`
    is the caption after this one in its input (it decides whether a final "b." is an initial)."""
    chunks = caption.translate(_NORMALIZE).split()
    following = chunks[1:] + next_line.translate(_NORMALIZE).split()[:1]
    starts_next = [c in SENTENCE_STARTS for c in following] + [False] * (len(chunks) - len(following))
    tokens = [t for chunk, start in zip(chunks, starts_next) for t in _split(chunk, start)]
    return " ".join(t for t in (t.lower() for t in tokens) if t not in PUNCTUATIONS)


def ptb_tokenize_lines(captions: list[str]) -> list[str]:
    """ptb_tokenize of captions the toolkit sends to the jar together, in this order (one line each)."""
    return [ptb_tokenize(c, captions[i + 1] if i + 1 < len(captions) else "") for i, c in enumerate(captions)]


def _split(word: str, sentence_next: bool) -> list[str]:
    """The PTB tokens of one whitespace-separated chunk."""
    if _ALONE.match(word):
        return [word]
    head, tail = [], []
    while (m := _LEADING.match(word)) and len(word) > 1:
        head.append(REWRITES.get(m.group(1), m.group(1)))
        word = word[m.end():]
    while word:
        if (m := _TRAILING.search(word)) and m.start() > 0 and not _ALONE.match(word):
            tail.insert(0, REWRITES.get(m.group(1), m.group(1)))
            word = word[:m.start()]
        elif word.endswith(".") and len(word) > 1 and not _keeps_period(word[:-1], sentence_next and not tail):
            tail.insert(0, ".")
            word = word[:-1]
        else:
            break
    middle = [REWRITES.get(p, p) for p in _INNER.split(word) if p]
    return head + [t for p in middle for t in _contraction(p)] + tail


def _contraction(word: str) -> list[str]:
    if word.lower() in _SPLIT_WORDS:
        a, b = _SPLIT_WORDS[word.lower()]
        return [word[:len(a)], word[len(a):]]
    m = _CONTRACTION.match(word)
    return [m.group(1), m.group(2)] if m else [word]


def _keeps_period(stem: str, sentence_next: bool) -> bool:
    """Whether "stem." stays one token: an abbreviation, an acronym with inner periods (u.s., a.m.),
    or a single letter (an initial) unless a sentence visibly starts after it ("plan b. The cat")."""
    if stem.lower() in ABBREVIATIONS or stem in CAPITALIZED_ABBREVIATIONS:
        return True
    if re.fullmatch(r"[A-Za-z](\.[A-Za-z])+", stem):
        return True
    return bool(re.fullmatch(r"[A-Za-z]", stem)) and not sentence_next
