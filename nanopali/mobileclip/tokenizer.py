"""CLIP's byte-level BPE tokenizer, written out (open_clip `SimpleTokenizer`, from OpenAI CLIP).

text → clean (a subset of ftfy.fix_text, HTML unescape, whitespace runs → one space, lowercase) → split
into words as CLIP's regex does → each word's UTF-8 bytes as printable characters (`bytes_to_unicode`),
the last one marked end-of-word (`</w>`) → merge the pair of lowest rank until none applies → ids.
Rows are [SOT] ids [EOT] padded with 0 to the context length (77); a longer text is cut and its last
id replaced by EOT, as open_clip does. The merges file is CLIP's `bpe_simple_vocab_16e6.txt.gz`
(open_clip ships it) or the same list as Hugging Face's `merges.txt`; ids are 256 bytes, 256 bytes +
`</w>`, one per merge, then `<start_of_text>` and `<end_of_text>` (49406, 49407 with the full file).
The regex and ftfy packages are not dependencies: the word split is a scan over Unicode categories
(letters \\p{L}, numbers \\p{N}) and the cleaning keeps ftfy's fixes for well-formed text (see `clean`).
"""
from __future__ import annotations

import functools
import gzip
import html
import os
import re
import unicodedata
from typing import Sequence

import torch

from ..formats.files import CheckpointError

BPE_FILES = ("bpe_simple_vocab_16e6.txt.gz", "merges.txt")
SPECIALS = ("<start_of_text>", "<end_of_text>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Byte → a printable character: printable Latin-1 bytes map to themselves, the rest to 256+n, so
    BPE never sees whitespace or control characters and every byte string has a spelling."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---- cleaning: ftfy.fix_text's fixes that apply to well-formed text, then open_clip's own steps ----
_QUOTES = {**{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}, **{c: '"' for c in range(0x201C, 0x2020)}}
_LIGATURES = {ord(k): v for k, v in {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ",
    "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl",
    "ﬅ": "ſt", "ﬆ": "st"}.items()}
_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                           if unicodedata.normalize("NFKC", chr(i)) != chr(i)}}
_CONTROL = {i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)]}
_FIXES = {**_QUOTES, **_LIGATURES, **_WIDTH}
_ENTITY = re.compile(r"&#?[0-9A-Za-z]+;")
_ANSI = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")


def _c1(ch: str) -> str:
    """A C1 control character (U+0080–U+009F) read as the Windows-1252 byte it almost always was."""
    try:
        return bytes([ord(ch)]).decode("cp1252")
    except UnicodeDecodeError:
        return ch


def _ftfy(text: str) -> str:
    """ftfy.fix_text for text that is not mojibake: its fixers in its order, to a fixed point. The
    mojibake repair (re-decoding text that was decoded with the wrong codec) is not reproduced; such
    text is tokenised as it is."""
    unescape = "<" not in text                                  # ftfy's unescape_html="auto"
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        text = re.sub("[\x80-\x9f]", lambda m: _c1(m.group(0)), text)
        text = text.translate(_FIXES)
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
        text = _ANSI.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def clean(text: str) -> str:
    """open_clip `_clean_lower`: basic_clean (ftfy, HTML unescaped twice, strip), whitespace runs → one
    space, lowercase."""
    text = html.unescape(html.unescape(_ftfy(text))).strip()
    return " ".join(text.split()).lower()


def _kind(ch: str) -> str:
    c = unicodedata.category(ch)[0]
    return "L" if c == "L" else "N" if c == "N" else " " if ch.isspace() else "P"


def words(text: str) -> list[str]:
    """CLIP's split, `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`,
    as a scan: at each position the first alternative that matches wins (regex alternation order)."""
    out, i, n = [], 0, len(text)
    while i < n:
        rest = text[i:i + 16].lower()
        match = next((t for t in (*SPECIALS, *_CONTRACTIONS) if rest.startswith(t)), None)
        if match is None:
            k, j = _kind(text[i]), i + 1
            if k == " ":
                i += 1
                continue
            if k != "N":                                    # letters, or other symbols: the longest run
                while j < n and _kind(text[j]) == k:
                    j += 1
            match = text[i:j]
        out.append(match)
        i += len(match)
    return out


class BPETokenizer:
    """texts → (J, context_length) ids, open_clip `SimpleTokenizer()(texts)`."""

    def __init__(self, bpe_path: str, context_length: int = 77):
        self.context_length = context_length
        lines = read_merges(bpe_path)
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]   # line 0 is a version header
        vocab = list(bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(SPECIALS)
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SPECIALS[0]], self.encoder[SPECIALS[1]]
        self.cache = {t: [t] for t in SPECIALS}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Merge the adjacent pair with the lowest rank, everywhere it occurs, until no pair has a rank."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without SOT / EOT and without truncation."""
        b2u = bytes_to_unicode()
        return [self.encoder[p] for w in words(clean(text))
                for p in self.bpe("".join(b2u[b] for b in w.encode("utf-8")))]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        L = self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)                                  # (J, L), pad 0
        for j, t in enumerate(texts):
            ids = [self.sot_id, *self.encode(t), self.eot_id][:L]
            ids[-1] = self.eot_id
            out[j, :len(ids)] = torch.tensor(ids)
        return out


def read_merges(path: str) -> list[str]:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            return f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CheckpointError(f"Cannot read the BPE merges file {path} ({e})") from None


def find_bpe_file(folder: str) -> str:
    for name in BPE_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"No tokenizer in {folder}: expected {' or '.join(BPE_FILES)} (CLIP's BPE merges; "
                          "open_clip ships bpe_simple_vocab_16e6.txt.gz in its package folder: copy it here)")


__all__ = ["BPETokenizer", "bytes_to_unicode", "clean", "words", "find_bpe_file"]
