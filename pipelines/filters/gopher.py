"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", arXiv:2112.11446, §A.1.1 and Table A1), as datatrove
0.10.1 implements them (``datatrove/pipeline/filters/gopher_{quality,repetition}_filter.py``):
the same words (spaCy's English tokenizer, see text.py), the same order of rules, the same
arithmetic, so the keep/remove decisions agree document by document.
"""

from __future__ import annotations

import re
from collections import Counter

from infra.config import GopherQualityConfig, GopherRepetitionConfig
from pipelines.filters.base import Doc, QualityFilter, Result
from pipelines.filters.text import PUNCTUATION_SET

# token -> 1 (has a non-punctuation char) | 2 (has an alphabetic char), +4 so it is never falsy
_TOKEN_FLAGS: dict[str, int] = {}


def _flags(token: str) -> int:
    f = _TOKEN_FLAGS.get(token)
    if f is None:
        f = 4 | (0 if PUNCTUATION_SET.issuperset(token) else 1) | (2 if any(c.isalpha() for c in token) else 0)
        if len(_TOKEN_FLAGS) > 500_000:
            _TOKEN_FLAGS.clear()
        _TOKEN_FLAGS[token] = f
    return f


class GopherQualityFilter(QualityFilter):
    """Document-level quality heuristics. Defaults (datatrove 0.10.1 = the Gopher paper):

    - 50 <= non-symbol words <= 100,000 (a word made only of punctuation does not count)
    - 3 <= mean length of the non-symbol words <= 10
    - '#' per word <= 0.1, and ('...' + '…') per word <= 0.1 (words here include punctuation)
    - lines starting with '•' or '-' <= 90%; lines ending with '...' or '…' <= 30%
    - words with at least one alphabetic character >= 80%
    - at least 2 of the stop words {the, be, to, of, and, that, have, with} (case-sensitive)

    One difference from datatrove: a threshold of 0 is a threshold here, not "off" (use null).
    """

    name = "gopher_quality"
    rules = {
        "short_doc": "gopher_short_doc", "long_doc": "gopher_long_doc",
        "short_words": "gopher_below_avg_threshold", "long_words": "gopher_above_avg_threshold",
        "hash_ratio": "gopher_too_many_hashes", "ellipsis_ratio": "gopher_too_many_ellipsis",
        "bullet_lines": "gopher_too_many_bullets", "ellipsis_lines": "gopher_too_many_end_ellipsis",
        "alpha_words": "gopher_below_alpha_threshold", "stop_words": "gopher_enough_stop_words",
    }
    scores = ("n_words", "mean_word_length", "hash_ratio", "ellipsis_ratio", "bullet_lines_ratio",
              "ellipsis_lines_ratio", "alpha_words_ratio", "stop_words")

    def __init__(self, cfg: GopherQualityConfig):
        super().__init__(cfg)

    def check(self, doc: Doc, cfg: GopherQualityConfig, annotate: bool) -> Result:
        res = Result()
        s = res.scores
        text, words = doc.text, doc.words
        n_words = len(words)
        flags = [_TOKEN_FLAGS.get(w) or _flags(w) for w in words]
        lengths = [len(w) for w, f in zip(words, flags) if f & 1]
        n = s["n_words"] = len(lengths)

        def fail(rule: str, detail: str) -> bool:
            if res.rule is None:
                res.rule, res.detail = rule, detail
            return not annotate

        if cfg.min_doc_words is not None and n < cfg.min_doc_words:
            if fail("short_doc", f"{n} words < {cfg.min_doc_words}"):
                return res
        if cfg.max_doc_words is not None and n > cfg.max_doc_words:
            if fail("long_doc", f"{n} words > {cfg.max_doc_words}"):
                return res
        if n_words == 0:  # nothing below is defined (datatrove divides by zero here)
            return res
        mean = s["mean_word_length"] = sum(lengths) / n if n else 0.0
        if cfg.min_avg_word_length is not None and mean < cfg.min_avg_word_length:
            if fail("short_words", f"mean word length {mean:.3f} < {cfg.min_avg_word_length}"):
                return res
        if cfg.max_avg_word_length is not None and mean > cfg.max_avg_word_length:
            if fail("long_words", f"mean word length {mean:.3f} > {cfg.max_avg_word_length}"):
                return res
        limit = cfg.max_symbol_word_ratio
        r = s["hash_ratio"] = text.count("#") / n_words
        if limit is not None and r > limit:
            if fail("hash_ratio", f"'#' per word {r:.4f} > {limit}"):
                return res
        r = s["ellipsis_ratio"] = (text.count("...") + text.count("…")) / n_words
        if limit is not None and r > limit:
            if fail("ellipsis_ratio", f"ellipses per word {r:.4f} > {limit}"):
                return res
        lines = text.splitlines()
        if lines:
            r = s["bullet_lines_ratio"] = sum(1 for x in lines if x.lstrip().startswith(("•", "-"))) / len(lines)
            if cfg.max_bullet_lines_ratio is not None and r > cfg.max_bullet_lines_ratio:
                if fail("bullet_lines", f"bullet lines {r:.4f} > {cfg.max_bullet_lines_ratio}"):
                    return res
            r = s["ellipsis_lines_ratio"] = sum(1 for x in lines if x.rstrip().endswith(("...", "…"))) / len(lines)
            if cfg.max_ellipsis_lines_ratio is not None and r > cfg.max_ellipsis_lines_ratio:
                if fail("ellipsis_lines", f"ellipsis lines {r:.4f} > {cfg.max_ellipsis_lines_ratio}"):
                    return res
        r = s["alpha_words_ratio"] = sum(1 for f in flags if f & 2) / n_words
        if cfg.min_alpha_words_ratio is not None and r < cfg.min_alpha_words_ratio:
            if fail("alpha_words", f"words with a letter {r:.4f} < {cfg.min_alpha_words_ratio}"):
                return res
        k = s["stop_words"] = len(set(cfg.stop_words).intersection(words))
        if cfg.min_stop_words is not None and k < cfg.min_stop_words:
            fail("stop_words", f"{k} stop words < {cfg.min_stop_words}")
        return res


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, their characters): datatrove's ``find_duplicates``."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int | None:
    """Characters of the most frequent word n-gram (joined by spaces) times its count."""
    if len(words) < n:
        return None
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, k = counts.most_common(1)[0]  # ties: the first seen, as datatrove's Counter
    return (sum(map(len, gram)) + n - 1) * k


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """datatrove's ``find_all_duplicate``: characters of n-grams (joined without spaces) seen
    before, skipping past each repeat."""
    keys = list(map("".join, zip(*(words[i:] for i in range(n)))))
    if len(set(keys)) == len(keys):
        return 0  # no repeat at all: the common case, decided in C
    seen: set[str] = set()
    repeated, idx, end = 0, 0, len(keys)
    while idx < end:
        g = keys[idx]
        if g in seen:
            repeated += len(g)
            idx += n
        else:
            seen.add(g)
            idx += 1
    return repeated


_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


class GopherRepetitionFilter(QualityFilter):
    """Repetition heuristics of Gopher Table A1 (defaults = datatrove 0.10.1 = the paper):

    - duplicate paragraphs (split on blank lines) <= 30% of paragraphs; their chars <= 20% of text
    - duplicate lines <= 30% of lines; their chars <= 20% of text
    - chars of the most frequent 2/3/4-gram x its count <= 20% / 18% / 16% of text
    - chars of repeated 5..10-grams <= 15% / 14% / 13% / 12% / 11% / 10% of text
    """

    name = "gopher_repetition"
    rules = {"empty": "empty", "dup_para_frac": "dup_para_frac", "dup_para_char_frac": "dup_para_char_frac",
             "dup_line_frac": "dup_line_frac", "dup_line_char_frac": "dup_line_char_frac",
             **{f"top_{n}_gram": f"top_{n}_gram" for n in range(1, 21)},
             **{f"dup_{n}_gram": f"duplicated_{n}_n_grams" for n in range(1, 21)}}

    def __init__(self, cfg: GopherRepetitionConfig):
        super().__init__(cfg)
        self.scores = ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
                       *(f"top_{n}_gram" for n in sorted(cfg.top_n_grams)),
                       *(f"dup_{n}_gram" for n in sorted(cfg.dup_n_grams)))

    def check(self, doc: Doc, cfg: GopherRepetitionConfig, annotate: bool) -> Result:
        res = Result()
        s = res.scores
        text = doc.text
        if not text:
            res.rule, res.detail = "empty", "empty text"
            return res

        def over(rule: str, value: float, limit: float | None) -> bool:
            s[rule] = value
            if limit is not None and value > limit and res.rule is None:
                res.rule, res.detail = rule, f"{value:.4f} > {limit}"
                return not annotate
            return False

        size = len(text)
        paragraphs = _PARAGRAPH.split(text.strip())
        n, chars = find_duplicates(paragraphs)
        if over("dup_para_frac", n / len(paragraphs), cfg.dup_para_frac) or \
                over("dup_para_char_frac", chars / size, cfg.dup_para_char_frac):
            return res
        lines = _LINES.split(text)
        n, chars = find_duplicates(lines)
        if over("dup_line_frac", n / len(lines), cfg.dup_line_frac) or \
                over("dup_line_char_frac", chars / size, cfg.dup_line_char_frac):
            return res
        words = doc.words
        for n, limit in cfg.top_n_grams.items():
            top = _top_ngram_chars(words, n)
            if top is not None and over(f"top_{n}_gram", top / size, limit):
                return res
        for n, limit in cfg.dup_n_grams.items():
            if over(f"dup_{n}_gram", _duplicate_ngram_chars(words, n) / size, limit):
                return res
        return res
