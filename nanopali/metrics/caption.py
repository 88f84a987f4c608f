"""Captioning scores: BLEU-1..4 and CIDEr-D exactly as the COCO caption toolkit computes them.

The references are pycocoevalcap's `bleu/bleu_scorer.py` (`BleuScorer.compute_score`, option
"closest", as `Bleu.compute_score` calls it) and `cider/cider_scorer.py` (`CiderScorer`, the CIDEr-D
of Vedantam et al. 2015 as the toolkit ships it, n = 4, sigma = 6). Both score captions after the
toolkit's PTB tokenization (ptb.py); the paper tables print CIDEr x 100 (PaliGemma 2 3B: COCO 141.9
is 1.419 here). tests/test_metrics_caption.py compares every number with pycocoevalcap on the same
captions; the toolkit's quirks that move the numbers are kept and named where they happen.
"""
from __future__ import annotations

import math
from collections import Counter

from .ptb import ptb_tokenize_lines

SMALL, TINY = 1e-9, 1e-15   # BleuScorer's guards: a zero n-gram precision still gives a tiny, nonzero BLEU


def ngrams(words: list[str], n: int = 4) -> Counter:
    """Counts of every 1..n-gram (as tuples), in the order the toolkit's `precook` makes them."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(predictions: list[str], references: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenized captions (words split on spaces).

    One corpus-level score, not a mean of sentence scores: clipped n-gram matches and candidate
    n-grams are summed over all captions, then one brevity penalty exp(1 - r/c) if c < r, where c
    is the total candidate length and r sums, per caption, the reference length closest to the
    candidate's (the shorter one on a tie)."""
    test_len, ref_len, guess, correct = 0, 0, [0] * n, [0] * n
    for pred, refs in zip(predictions, references):
        words = pred.split()
        best: dict[tuple, int] = {}          # per n-gram, its largest count in any one reference
        lengths = []
        for ref in refs:
            ref_words = ref.split()
            lengths.append(len(ref_words))
            for g, c in ngrams(ref_words, n).items():
                best[g] = max(best.get(g, 0), c)
        ref_len += min((abs(length - len(words)), length) for length in lengths)[1]
        test_len += len(words)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for g, c in ngrams(words, n).items():
            correct[len(g) - 1] += min(best.get(g, 0), c)
    scores, product = [], 1.0
    for k in range(n):                       # the geometric mean of precisions 1..k+1
        product *= (correct[k] + TINY) / (guess[k] + SMALL)
        scores.append(product ** (1 / (k + 1)))
    ratio = (test_len + TINY) / (ref_len + SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(predictions: list[str], references: list[list[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-caption scores) of tokenized captions.

    Each n-gram is weighted by tf-idf, the document frequencies counted over the references of the
    evaluated set (so a score depends on which other images are scored with it); per n, the cosine
    of the candidate with each reference, the candidate's weights clipped at the reference's, times
    a Gaussian penalty on the length difference; averaged over n and references, times 10."""
    refs_counts = [[ngrams(r.split(), n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_counts:
        df.update({g for counts in refs for g in counts})
    log_images = math.log(float(len(refs_counts)))

    def weights(counts: Counter):
        vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = w = float(tf) * (log_images - math.log(max(1.0, df[g])))
            norm[k] += w ** 2
            if k == 1:           # the toolkit's `counts2vec` counts bigrams: words - 1, the same difference
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for pred, refs in zip(predictions, refs_counts):
        vec, norm, length = weights(ngrams(pred.split(), n))
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = weights(ref)
            penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"bleu1".."bleu4", "cider"} of raw captions, PTB-tokenized as the toolkit does."""
    if not predictions or len(predictions) != len(references) or not all(references):
        raise ValueError("caption scores need one prediction per example and at least one reference each")
    # The toolkit tokenizes all references in one run of the jar, image by image, then all predictions.
    flat = iter(ptb_tokenize_lines([r for rs in references for r in rs]))
    refs = [[next(flat) for _ in rs] for rs in references]
    preds = ptb_tokenize_lines(predictions)
    out = {f"bleu{k + 1}": s for k, s in enumerate(bleu(preds, refs))}
    out["cider"] = cider_d(preds, refs)[0]
    return out
