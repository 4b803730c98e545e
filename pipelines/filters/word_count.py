"""The quick word-count rule (whitespace words), kept from the first pipeline.

It predates the published filters and its reasons (``word_count_below_min``/``_above_max``) and
config (``pipeline.word_count_filter``) stay as they were. Gopher's own word-count rule
(``filters.gopher_quality.min_doc_words``) counts datatrove's words (punctuation split off,
symbol-only tokens ignored) and is the one that agrees with datatrove; with both on, this one
runs first in the chain.
"""

from __future__ import annotations

import re

import pyarrow as pa

from infra.config import WordCountFilterConfig

_WORD = re.compile(r"\S+")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


class WordCountFilter:
    """min_words <= number of whitespace-separated words <= max_words."""

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

    def run_rows(self, docs: list, domains: list[str], reasons: list, details: list, columns: dict) -> None:
        for i, (doc, domain) in enumerate(zip(docs, domains)):
            if reasons[i] is None:
                reasons[i] = self.verdict(doc.text, domain)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.filters.base import FilterChain

        return FilterChain([self]).apply(batch)
