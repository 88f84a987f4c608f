"""CLIP's BPE tokenizer (nanopali/mobileclip/tokenizer.py) gives open_clip's SimpleTokenizer ids, token for token.

CI compares with ids open_clip computed (tests/mobileclip_reference.py) on a merges file cut to its
first 3000 merges (the real file is 1.3 MB); where open_clip imports, the full file is compared live.
"""
import gzip
import json
import os

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


def _ids(name):
    with gzip.open(os.path.join(FIXTURES, name), "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cut_tokenizer():
    return BPETokenizer(SMALL_BPE)


def test_ids_equal_open_clip_on_varied_text(cut_tokenizer):
    ref = _ids("tokenizer_ids.json.gz")
    assert ref["texts"] == TEXTS
    ours = cut_tokenizer(TEXTS).tolist()
    bad = [t for t, a, b in zip(TEXTS, ours, ref["ids"]) if a != b]
    assert bad == []


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
