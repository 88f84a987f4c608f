"""CLIP's byte-level BPE tokenizer, written out (open_clip `SimpleTokenizer`, from OpenAI CLIP).

text → clean (ftfy.fix_text, HTML unescaped twice, whitespace runs → one space, lowercase) → split
into words by CLIP's regex → each word's UTF-8 bytes as printable characters (`bytes_to_unicode`),
the last one marked end-of-word (`</w>`) → merge the pair of lowest rank until none applies → ids.
Rows are [SOT] ids [EOT] padded with 0 to the context length (77); a longer text is cut and its last
id replaced by EOT, as open_clip does. The merges file is CLIP's `bpe_simple_vocab_16e6.txt.gz`
(open_clip ships it) or the same list as Hugging Face's `merges.txt`; ids are 256 bytes, 256 bytes +
`</w>`, one per merge, then `<start_of_text>` and `<end_of_text>` (49406, 49407 with the full file).
Cleaning and splitting call ftfy and the regex package, as open_clip does (the `clip` extra): ftfy
repairs mojibake by heuristics too large to restate, and `\\p{L}` / `\\p{N}` are the regex package's
Unicode tables, newer than many Pythons' `unicodedata`, so a copy written against the standard library
gave other ids for such text, and different ids on different Python versions.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Sequence

import torch

from ..formats.files import CheckpointError

BPE_FILES = ("bpe_simple_vocab_16e6.txt.gz", "merges.txt")
SPECIALS = ("<start_of_text>", "<end_of_text>")
# open_clip's `SimpleTokenizer.pat`, matched with re.IGNORECASE: at each position the first alternative wins.
WORD_PATTERN = "|".join(SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


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


def text_packages():
    """(ftfy, regex), the two packages open_clip's cleaning and split are defined by."""
    try:
        import ftfy
        import regex
    except ImportError as e:
        raise ImportError(f"MobileCLIP's tokenizer needs {e.name} (open_clip cleans text with ftfy and splits it "
                          "with the regex package): pip install -e \".[clip]\"") from None
    return ftfy, regex


def clean(text: str) -> str:
    """open_clip `_clean_lower`: basic_clean (ftfy.fix_text, HTML unescaped twice, strip), whitespace runs
    → one space (str.split's whitespace), lowercase."""
    ftfy, _ = text_packages()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def words(text: str) -> list[str]:
    """CLIP's split of a cleaned text: `re.findall(pat, text)` with open_clip's pattern."""
    _, regex = text_packages()
    return regex.findall(WORD_PATTERN, text, regex.IGNORECASE)


class BPETokenizer:
    """texts → (J, context_length) ids, open_clip `SimpleTokenizer()(texts)`."""

    def __init__(self, bpe_path: str, context_length: int = 77):
        text_packages()                       # a missing package is named at load, not at the first text
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


__all__ = ["BPETokenizer", "bytes_to_unicode", "clean", "words", "find_bpe_file", "text_packages"]
