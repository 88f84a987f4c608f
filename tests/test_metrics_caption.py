"""BLEU-1..4 and CIDEr-D equal the COCO caption toolkit's (pycocoevalcap) on the same captions, and our
PTB tokenization equals its Java tokenizer on caption-like and tricky text (docs/metrics.md#captioning)."""
import math
import random
import shutil

import pytest

from nanopali.metrics.caption import bleu, caption_scores, cider_d
from nanopali.metrics.ptb import ptb_tokenize, ptb_tokenize_lines

pycocoevalcap = pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (the test extra) is the reference")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

TOL = 1e-6   # the brief's agreement; measured: 0 for BLEU, <= 2e-16 for CIDEr (float sums in another order)

WORDS = "a the man dog cat on in with red blue sitting standing table field of two near".split()

# Captions a tokenizer can get wrong: COCO-style references, and the forms the jar treats specially.
TRICKY = [
    "A man riding a wave on top of a surfboard.", "A plate of food with broccoli, carrots and rice.",
    "The cat is laying on the laptop's keyboard.", "a stop sign that says 'stop' on it",
    "An old-fashioned clock tower.", "A kitchen w/ stainless steel appliances", "A sign reads \"No Parking\".",
    "A vase of flowers (roses) on a table.", "Several people stand around; one holds an umbrella.",
    "This is a man's tie...", "A man in his 20's skateboarding", "A woman who isn't smiling holds a cake.",
    "The dogs' owner walks them at 5:30 p.m. on Main St.", "There's a cat on the T.V. stand.",
    "An airplane flying over a city at dusk -- beautiful!", "What a cute puppy!!", "A TEDDY BEAR ON A BED.",
    "A sandwich cut in half: turkey and cheese.", "a man wearing a suit and tie , standing in front of a building .",
    "A bowl of fruit (apples, bananas & oranges).", "A box of donuts -- glazed, chocolate, etc.",
    "Kids playing soccer at 10 a.m.", "It's a clock that reads 12:45.", "They're eating; we'll see; you've got it.",
    "A cake that says \"Happy 50th Birthday, Mom!\"", "Dr. Smith's office has a couch.", "The bus is red/white.",
    "A 1,000 piece puzzle and a $20 bill.", "A horse-drawn carriage in Central Park, N.Y.",
    "A 50% off sign in a shop window.", "Isn't this a lovely view? Don't park here: tow-away zone.",
    "the dog\u2019s \u201ctoy\u201d isn\u2019t \u2018here\u2019", "a dog\u2014a cat \u2013 a bird \u2026 end\u2026",
    "-5 degrees and +5 and a -5", "cat(s) [b] {c} and star*s", "A Dog. A cat. J. Smith walks. a b c.",
    "plan b. a cat", "plan b. The cat", "a b C.",
    "I'M HERE AND YOU'RE THERE, DON'T GO", "can not cannot gonna wanna", "'' `` quotes and ''quoted''",
    "e.g., a cat vs. a dog", "red,blue and red;blue and a:b and 1,000,000", "AT&T and a & b and R&B",
    "$5 and 5$ and #5 and 5# and #hashtag", "a 3-year-old boy's 10-speed bike.", "hello?\" wow!' (hello.)",
]

# The jar's output (after pycocoevalcap drops punctuation) for a few of them, recorded from
# stanford-corenlp-3.4.1.jar: the tokenizer is checked where Java is not installed too.
RECORDED = {
    "The cat is laying on the laptop's keyboard.": "the cat is laying on the laptop 's keyboard",
    "A vase of flowers (roses) on a table.": "a vase of flowers -lrb- roses -rrb- on a table",
    "A woman who isn't smiling holds a cake.": "a woman who is n't smiling holds a cake",
    "The dogs' owner walks them at 5:30 p.m. on Main St.": "the dogs owner walks them at 5:30 p.m. on main st.",
    "A 1,000 piece puzzle and a $20 bill.": "a 1,000 piece puzzle and a $ 20 bill",
    "What a cute puppy!!": "what a cute puppy !!",
    "A Dog. A cat. J. Smith walks. a b c.": "a dog a cat j. smith walks a b c.",
    "can not cannot gonna wanna": "can not can not gon na wan na",
}


def _random_sets(seed, n_sets):
    rng = random.Random(seed)
    for s in range(n_sets):
        n = rng.randint(1, 10)
        preds = [" ".join(rng.choices(WORDS, k=rng.randint(0 if s % 4 == 0 else 1, 12))) for _ in range(n)]
        refs = [[" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) for _ in range(rng.randint(1, 5))]
                for _ in range(n)]
        yield preds, refs


def test_bleu_1_to_4_equal_pycocoevalcap_on_random_caption_sets():
    for preds, refs in _random_sets(0, 40):
        ours = bleu(preds, refs)
        theirs, _ = Bleu(4).compute_score({i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)},
                                          verbose=0)
        assert max(abs(a - b) for a, b in zip(ours, theirs)) <= TOL


def test_cider_d_equals_pycocoevalcap_per_image_and_for_the_corpus():
    for preds, refs in _random_sets(1, 40):
        ours, ours_each = cider_d(preds, refs)
        theirs, theirs_each = Cider().compute_score({i: r for i, r in enumerate(refs)},
                                                    {i: [p] for i, p in enumerate(preds)})
        assert abs(ours - theirs) <= TOL
        assert max(abs(a - b) for a, b in zip(ours_each, theirs_each)) <= TOL


def test_bleu_closest_reference_length_prefers_the_shorter_on_a_tie():
    # 4 words against references of 3 and 5 words: both 1 away, the rule takes 3, so no brevity penalty
    # (taking 5 would multiply by exp(1 - 5/4) = 0.78).
    (b1, *_), = [bleu(["a b c d"], [["a b c", "a b c d e"]], n=1)]
    assert b1 == pytest.approx(1.0, abs=1e-8)
    short = bleu(["a b"], [["a b c d"]], n=1)[0]   # c = 2, r = 4: penalty exp(1 - 4/2)
    assert short == pytest.approx(math.exp(-1), abs=1e-8)


def test_cider_of_one_image_alone_is_zero_because_its_ngrams_have_no_idf():
    # log(#images) - log(df) = log 1 - log 1 = 0 for every n-gram of the only image's references.
    assert cider_d(["a man on a horse"], [["a man on a horse"]])[0] == 0.0


def test_recorded_jar_tokenizations_are_reproduced_without_java():
    for text, expected in RECORDED.items():
        assert ptb_tokenize(text) == expected, text


@pytest.fixture(scope="module")
def jar_tokens():
    if shutil.which("java") is None:
        pytest.skip("java is not installed: pycocoevalcap's PTBTokenizer runs Stanford CoreNLP's jar")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return lambda texts: [v[0] for v in PTBTokenizer().tokenize(
        {i: [{"caption": t}] for i, t in enumerate(texts)}).values()]


def test_ptb_tokenize_equals_the_java_tokenizer_on_tricky_captions(jar_tokens):
    assert ptb_tokenize_lines(TRICKY) == jar_tokens(TRICKY)


def test_the_jar_reads_a_final_initial_by_the_next_caption_and_so_do_we(jar_tokens):
    lines = ["a plan b.", "The cat", "a plan b.", "the cat"]   # "b." before "The" ends a sentence
    assert ptb_tokenize_lines(lines) == jar_tokens(lines) == ["a plan b", "the cat", "a plan b.", "the cat"]


def test_caption_scores_of_raw_captions_equal_the_toolkit_pipeline(jar_tokens):
    rng = random.Random(2)
    refs = [rng.sample(TRICKY, 4) for _ in range(12)]
    preds = [rng.choice(r) if i % 3 else rng.choice(TRICKY) for i, r in enumerate(refs)]
    tok_refs = jar_tokens([r for rs in refs for r in rs])
    tok_refs = [tok_refs[4 * i:4 * i + 4] for i in range(len(refs))]
    tok_preds = jar_tokens(preds)
    gts, res = dict(enumerate(tok_refs)), {i: [p] for i, p in enumerate(tok_preds)}
    expected = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    expected["cider"] = Cider().compute_score(gts, res)[0]
    ours = caption_scores(preds, refs)
    assert ours.keys() == expected.keys()
    assert all(abs(ours[k] - expected[k]) <= TOL for k in ours), (ours, expected)
