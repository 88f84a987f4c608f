"""CLIP's BPE tokenizer (nanopali/mobileclip/tokenizer.py) gives open_clip's SimpleTokenizer ids, token for token.

CI compares with ids open_clip computed (tests/mobileclip_reference.py) on a merges file cut to its
first 3000 merges (the real file is 1.3 MB); where open_clip imports, the full file is compared live.
"""
import gzip
import json
import os
import sys

import pytest

from mobileclip_reference import FIXTURES, SMALL_BPE
from nanopali.mobileclip.tokenizer import BPETokenizer, clean, words

TEXTS = [
    "a photo of a cat.", "A Photo Of A CAT!!!", "", "   ", "two  spaces\tand a tab\nand a newline",
    "it's the dog's ball, isn't it? they'll've gone", "'quoted' \"double\" “curly” ‘single’",
    "numbers: 12345 and 3.14159 and 1,000,000", "email@example.com http://x.y/z?q=1&r=2",
    "café naïve résumé Ünïcödé", "cafe\u0301 (decomposed é)", "日本語のテキスト", "中文 文本 测试",
    "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "emoji 😀🐱‍👤 👍🏽 ☃", "ﬁne ﬂowers ﬀ",
    "ＦＵＬＬ　ＷＩＤＴＨ １２３", "ｶﾀｶﾅ",
    "&amp; &lt;b&gt; &quot;html&quot; &#39;x&#39;", "<b>bold</b> & more", "snake_case_words and CamelCase",
    "symbols #$%^*()[]{}<>~`|\\/", "—dashes– and … ellipsis", "<start_of_text> literal <end_of_text>",
    "x" * 300, " ".join(f"word{i}" for i in range(120)), "a" + "-b" * 60,
    "control\x07chars\x1b[31mred\x1b[0m", "C1 \x93quoted\x94", "zero\u200bwidth", "tab\x0bvt\x0cff",
]
# Where a hand-written cleaning and split parted from ftfy and the regex package (see the tests below).
SURROGATES = ["\ud83d\ude00 smile", "a lone \ud800 high half", "a lone \udc00 low half", "\ud83d\ude00", "\ufffd"]
ENTITIES = ["&NTILDE;and&uacute; &EACUTE;T&EACUTE;", "&AMP;lt; &Ntilde; &COPY;", "<b>&NTILDE;</b> stays"]
NEW_UNICODE = ["\U0001E4D0\U0001E4D1\U0001E4D2 \U0001E4F1\U0001E4F2",        # Nag Mundari (Unicode 15.0)
               "x\U00016D43\U00016D44 \U00016D71\U00016D72y"]                 # Kirat Rai (Unicode 16.0)
MOJIBAKE = ["cafÃ© naÃ¯ve", "Ã¼ber â€œquotedâ€\x9d"]
TEXTS += SURROGATES + ENTITIES + NEW_UNICODE + MOJIBAKE


def _ids(name):
    with gzip.open(os.path.join(FIXTURES, name), "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cut_tokenizer():
    return BPETokenizer(SMALL_BPE)


def test_ids_equal_open_clip_on_varied_text(cut_tokenizer):
    ref = _ids("tokenizer_ids.json.gz")
    assert ref["texts"] == [ascii(t) for t in TEXTS]
    ours = cut_tokenizer(TEXTS).tolist()
    bad = [t for t, a, b in zip(TEXTS, ours, ref["ids"]) if a != b]
    assert bad == []


def _reference(texts):
    """open_clip's recorded ids for some of TEXTS."""
    ref = _ids("tokenizer_ids.json.gz")
    table = dict(zip(ref["texts"], ref["ids"]))
    return [table[ascii(t)] for t in texts]


def test_surrogate_pairs_join_and_lone_surrogates_become_u_fffd_as_in_open_clip(cut_tokenizer):
    """Text from JSON or a UTF-16 source can hold surrogates; ftfy.fix_text joins a pair into its character
    and replaces a lone one with U+FFFD (`fix_surrogates`) before anything is encoded."""
    ours = cut_tokenizer(SURROGATES).tolist()
    assert ours == _reference(SURROGATES)
    assert ours[0] == cut_tokenizer("\U0001F600 smile")[0].tolist() and ours[3] != ours[4]


def test_upper_case_html_entities_decode_as_in_open_clip(cut_tokenizer):
    """ftfy knows `&NTILDE;`-style entities that html.unescape leaves alone, and unescapes nothing in a
    text with a `<` in it (its unescape_html="auto")."""
    ours = cut_tokenizer(ENTITIES).tolist()
    assert ours == _reference(ENTITIES)
    assert ours[0] == cut_tokenizer("ñandú été")[0].tolist()


def test_letters_and_digits_newer_than_pythons_unicode_tables_split_as_in_open_clip(cut_tokenizer):
    """`\\p{L}` and `\\p{N}` are the regex package's tables, not those of the running Python's unicodedata:
    the same ids on every Python version."""
    assert cut_tokenizer(NEW_UNICODE).tolist() == _reference(NEW_UNICODE)
    assert words(clean(NEW_UNICODE[0])) == ["\U0001E4D0\U0001E4D1\U0001E4D2", "\U0001E4F1", "\U0001E4F2"]


def test_mojibake_is_repaired_as_in_open_clip(cut_tokenizer):
    ours = cut_tokenizer(MOJIBAKE).tolist()
    assert ours == _reference(MOJIBAKE)
    assert ours[0] == cut_tokenizer("café naïve")[0].tolist()


@pytest.mark.parametrize("package", ["ftfy", "regex"])
def test_without_ftfy_or_regex_the_tokenizer_names_the_extra_to_install(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)           # what `import` sees when it is not installed
    with pytest.raises(ImportError, match=rf"needs {package}.*pip install -e \"\.\[clip\]\"") as info:
        BPETokenizer(SMALL_BPE)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_rows_are_sot_text_eot_then_zero_padding(cut_tokenizer):
    row = cut_tokenizer("a cat")[0].tolist()
    sot, eot = cut_tokenizer.sot_id, cut_tokenizer.eot_id
    assert (sot, eot) == (3512, 3513)              # 256 bytes, 256 with </w>, 3000 merges, then the specials
    n = row.index(eot)
    assert row[0] == sot and n > 1 and set(row[n + 1:]) == {0} and len(row) == 77


def test_long_text_is_cut_to_77_ids_ending_with_eot(cut_tokenizer):
    row = cut_tokenizer("x " * 200)[0].tolist()
    assert len(row) == 77 and row[-1] == cut_tokenizer.eot_id and 0 not in row


def test_cleaning_follows_ftfy_and_open_clip_on_well_formed_text():
    assert clean("  “Curly”  ‘quotes’ ") == "\"curly\" 'quotes'"
    assert clean("ﬁne ＦＵＬＬ　ｗｉｄｔｈ") == "fine full width"
    assert clean("cafe\u0301") == "café"                     # NFC
    assert clean("&amp;lt;") == "<"                          # unescaped until nothing changes
    assert clean("a\x07b\x1b[31mc") == "abc"                 # control characters and terminal escapes go


def test_words_split_as_clips_regex():
    assert words("it's 42 cats!? ok") == ["it", "'s", "4", "2", "cats", "!?", "ok"]
    assert words("?'s") == ["?'", "s"]                       # a punctuation run takes the apostrophe first
    assert words("x<start_of_text>y") == ["x", "<start_of_text>", "y"]


def test_full_vocabulary_matches_open_clip_live():
    """Runs where open_clip imports (the oracle environment of tests/mobileclip_reference.py)."""
    tokenizer_module = pytest.importorskip("open_clip.tokenizer",
                                           reason="open_clip is the oracle; see docs/mobileclip.md")
    ref = tokenizer_module.SimpleTokenizer()
    ours = BPETokenizer(tokenizer_module.default_bpe())
    assert ours(TEXTS).tolist() == ref(TEXTS).tolist()
    assert (ours.sot_id, ours.eot_id, ours.vocab_size) == (49406, 49407, 49408)
