"""Caption metrics: the COCO caption evaluation (pycocoevalcap), bootstrap intervals over
images, and the nearest-neighbour retrieval baseline.

``CaptionEvaluator`` scores generated captions against several references per image the
way the COCO server does: the Stanford PTB tokenizer (Java), then BLEU-1..4 (``closest``
reference length), METEOR 1.5 (Java; its process takes ~11 s to start, so one evaluator
scores every system of a run), ROUGE-L and CIDEr-D (pycocoevalcap's ``Cider``: tf-idf
n-grams with clipping and the Gaussian length penalty, x10). CIDEr's idf comes from the
references of the evaluated images, so a corpus is scored in one call; SPICE would
download Stanford CoreNLP and is not offered. Without Java, the captions are tokenized
by a Python rule that mimics the PTB tokenizer's output (lower-cased, punctuation
dropped) and METEOR is skipped; ``notes`` says so (the task logs it as a tag).

Intervals: the metrics are functions of per-image statistics (BLEU: n-gram matches,
candidate counts and lengths, summed before the corpus formula; CIDEr-D and ROUGE-L:
means of per-image scores with the corpus idf fixed), so a bootstrap over images
resamples those (``bootstrap``); ``paired_bootstrap`` resamples the same images for two
systems and gives the interval of the difference.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
# pycocoevalcap's PTBTokenizer drops these tokens
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing constants


def java_available() -> bool:
    return shutil.which("java") is not None


@dataclass
class CaptionScores:
    """Corpus metrics of one system and the per-image statistics behind them.

    ``bleu_stats`` [N, 10]: candidate length, closest reference length, candidate n-grams
    (n = 1..4) and clipped matches (n = 1..4) per image."""

    metrics: dict[str, float]
    bleu_stats: np.ndarray
    cider: np.ndarray
    rouge: np.ndarray
    meteor: np.ndarray | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cider)


def bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from summed statistics: ``stats`` [..., 10] -> [..., 4] (pycocoevalcap's
    corpus formula, its smoothing constants included)."""
    stats = np.asarray(stats, np.float64)
    testlen, reflen = stats[..., 0], stats[..., 1]
    guess, correct = stats[..., 2:6], stats[..., 6:10]
    log_p = np.log((correct + _TINY) / (guess + _SMALL))
    bleus = np.exp(np.cumsum(log_p, axis=-1) / np.arange(1, 5))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1.0)), 1.0)
    return bleus * penalty[..., None]


def ptb_like_tokens(text: str) -> str:
    """The Python fallback of the PTB tokenizer (no Java): lower-cased, punctuation split
    off and dropped as pycocoevalcap drops it."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"([.,!?;:()\"\[\]{}])", r" \1 ", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m|t)\b", r"\1 '\2", text)
    return " ".join(t for t in text.split() if t not in _PTB_PUNCTUATION)


class CaptionEvaluator:
    """Scores systems against references; one METEOR process for all of them.

    Args:
        meteor: bool. Compute METEOR (needs Java; skipped with a note otherwise).
        java: bool or None. Use Java (PTB tokenizer, METEOR); None: if it is installed.
    """

    def __init__(self, meteor: bool = True, java: bool | None = None):
        self.java = java_available() if java is None else bool(java)
        self.notes: dict[str, str] = {}
        self._meteor = None
        self._want_meteor = meteor
        if not self.java:
            self.notes["tokenizer"] = "python (java not found: PTB tokenizer unavailable)"
            if meteor:
                self.notes["meteor"] = "skipped: java not found (METEOR 1.5 is a Java program)"
                log.warning("METEOR skipped: java is not installed")
        else:
            self.notes["tokenizer"] = "ptb (stanford-corenlp 3.4.1)"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._meteor is not None:
            proc = self._meteor.meteor_p
            with self._meteor.lock:
                proc.stdin.close()
                proc.kill()
                proc.wait()
            self._meteor.meteor_p = _Finished()
            self._meteor = None

    def tokenize(self, captions: dict[int, list[str]]) -> dict[int, list[str]]:
        if self.java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            return PTBTokenizer().tokenize(
                {k: [{"caption": c} for c in v] for k, v in captions.items()}
            )
        return {k: [ptb_like_tokens(c) for c in v] for k, v in captions.items()}

    def _meteor_scorer(self):
        if self._meteor is None and self.java and self._want_meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            try:
                self._meteor = Meteor()
            except OSError as exc:  # java found but not runnable
                self.notes["meteor"] = f"skipped: {exc}"
                self._want_meteor = False
        return self._meteor

    def score(
        self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
    ) -> CaptionScores:
        """Corpus metrics of ``hypotheses`` (one per image) against ``references`` (the
        image's reference captions), with the per-image statistics for intervals."""
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} captions for {len(references)} images")
        if not hypotheses:
            raise ValueError("no captions to score")
        if any(not refs for refs in references):
            raise ValueError("every image needs at least one reference caption")
        n = len(hypotheses)
        gts = self.tokenize({i: list(references[i]) for i in range(n)})
        res = self.tokenize({i: [hypotheses[i]] for i in range(n)})
        ids = list(range(n))

        scorer = BleuScorer(n=4)
        for i in ids:
            scorer += (res[i][0], gts[i])
        scorer.compute_score(option="closest", verbose=0)
        stats = np.zeros((n, 10))
        for i, comps in enumerate(scorer.ctest):
            testlen = comps["testlen"]
            reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]
            stats[i] = [testlen, reflen, *comps["guess"], *comps["correct"]]
        bleus = bleu_from_stats(stats.sum(axis=0))

        cider, cider_scores = Cider().compute_score(gts, res)
        rouge, rouge_scores = Rouge().compute_score(gts, res)
        metrics = {f"bleu_{k + 1}": float(bleus[k]) for k in range(4)}
        metrics.update(rouge_l=float(rouge), cider=float(cider))
        meteor_scores = None
        meteor = self._meteor_scorer()
        if meteor is not None:
            value, per_image = meteor.compute_score(
                {i: gts[i] for i in ids}, {i: [res[i][0] or "."] for i in ids}
            )
            metrics["meteor"] = float(value)
            meteor_scores = np.asarray(per_image, np.float64)
        return CaptionScores(
            metrics,
            stats,
            np.asarray(cider_scores, np.float64),
            np.asarray(rouge_scores, np.float64),
            meteor_scores,
            dict(self.notes),
        )


class _Finished:
    """Stands in for a closed METEOR process (pycocoevalcap's ``__del__`` closes it again)."""

    class _Pipe:
        def close(self):
            pass

    stdin = _Pipe()

    def kill(self):
        pass

    def wait(self):
        pass


# ---------------------------------------------------------------- bootstrap


def _statistic(scores: CaptionScores, metric: str, idx: np.ndarray) -> np.ndarray:
    """``metric`` of every resample: ``idx`` [R, N] image indices -> [R]."""
    if metric.startswith("bleu_"):
        k = int(metric[-1]) - 1
        return bleu_from_stats(scores.bleu_stats[idx].sum(axis=1))[:, k]
    per_image = {"cider": scores.cider, "rouge_l": scores.rouge}.get(metric)
    if per_image is None:
        raise ValueError(f"no bootstrap for {metric!r}: use bleu_1..4, cider or rouge_l")
    return per_image[idx].mean(axis=1)


def resamples(n: int, count: int = 1000, seed: int = 0) -> np.ndarray:
    """``count`` bootstrap resamples of ``n`` images: indices [count, n]."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def bootstrap(
    scores: CaptionScores, metric: str, count: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``metric`` over images."""
    values = _statistic(scores, metric, resamples(len(scores), count, seed))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: CaptionScores,
    b: CaptionScores,
    metric: str,
    count: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(difference ``a - b`` on all images, and its interval): both systems are scored on
    the same resampled images."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap over {len(a)} and {len(b)} images")
    idx = resamples(len(a), count, seed)
    diff = _statistic(a, metric, idx) - _statistic(b, metric, idx)
    full = np.arange(len(a))[None, :]
    point = float((_statistic(a, metric, full) - _statistic(b, metric, full))[0])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diff, [tail, 100 - tail])
    return point, float(low), float(high)


# ---------------------------------------------------------------- baselines


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _overlap(a: list[str], b: list[str]) -> float:
    """Mean of the unigram and bigram F-measures of two token lists."""
    total = 0.0
    for n in (1, 2):
        ga, gb = _ngrams(a, n), _ngrams(b, n)
        common = sum((ga & gb).values())
        if common:
            p, r = common / max(1, sum(ga.values())), common / max(1, sum(gb.values()))
            total += 2 * p * r / (p + r)
    return total / 2


def nearest_neighbour_captions(
    train_features: np.ndarray,
    train_captions: Sequence[Sequence[str]],
    query_features: np.ndarray,
    k: int = 5,
) -> tuple[list[str], np.ndarray]:
    """Caption retrieval (Devlin et al. 2015, "Exploring Nearest Neighbor Approaches for
    Image Captioning"): the ``k`` training images closest to each query by cosine
    similarity of their features; of their captions, the one that agrees most with the
    others (mean unigram/bigram F-measure) is the query's caption.

    Returns (captions, index of the nearest training image per query)."""
    from data.text import tokenize

    def unit(x):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(query_features) @ unit(train_features).T
    k = max(1, min(k, len(train_captions)))
    nearest = np.argsort(-sims, axis=1)[:, :k]
    keys = [(i, j) for i, caps in enumerate(train_captions) for j in range(len(caps))]
    tokens = dict(zip(keys, tokenize([train_captions[i][j] for i, j in keys]), strict=True))
    out = []
    for row in nearest:
        candidates = [(i, j) for i in row for j in range(len(train_captions[i]))]
        best, best_score = candidates[0], -math.inf
        for cand in candidates:
            score = sum(
                _overlap(tokens[cand], tokens[other]) for other in candidates if other != cand
            )
            if score > best_score:
                best, best_score = cand, score
        out.append(train_captions[best[0]][best[1]])
    return out, nearest[:, 0]
