"""Quality filters. Each is a small named rule that annotates every document with a verdict.

A rule never drops rows itself: it writes ``drop_reason`` (null = keep), so the pipeline can count
removals by rule, keep a record of every removed document, or run a rule in annotate-only mode.
"""

from __future__ import annotations

import re

import pyarrow as pa

from infra.config import WordCountFilterConfig

_WORD = re.compile(r"\S+")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


class WordCountFilter:
    """Gopher quality rule: min_words <= number of whitespace-separated words <= max_words."""

    name = "word_count"

    def __init__(self, cfg: WordCountFilterConfig):
        self.cfg = cfg

    def verdict(self, text: str, domain: str) -> str | None:
        if not self.cfg.enabled or domain in self.cfg.skip_domains:
            return None
        n = count_words(text)
        if n < self.cfg.min_words:
            return "word_count_below_min"
        if n > self.cfg.max_words:
            return "word_count_above_max"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = [self.verdict(t, d) for t, d in zip(batch.column("text").to_pylist(),
                                                        batch.column("domain").to_pylist())]
        return batch.append_column("drop_reason", pa.array(reasons, pa.string()))
