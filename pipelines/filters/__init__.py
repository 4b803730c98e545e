"""Quality filters: the published heuristics, each a small named step with its own counters.

    word_count_filter -> gopher_repetition -> gopher_quality -> c4_quality -> fineweb_quality

(datatrove's FineWeb order, after the quick legacy word count). Each rule annotates instead of
dropping (``drop_reason``), can run in annotate mode (score columns, nothing removed), and is
configured per domain (``pipeline.filters`` in infra/config.py). Defaults are datatrove 0.10.1's,
which are the papers' except where a docstring says so; tests/test_filters.py checks decision
agreement with datatrove on a sample corpus.
"""

from __future__ import annotations

from infra.config import FiltersConfig, WordCountFilterConfig
from pipelines.filters.base import Doc, FilterChain, FilterReport, QualityFilter, Result
from pipelines.filters.c4 import C4QualityFilter
from pipelines.filters.fineweb import FineWebQualityFilter
from pipelines.filters.gopher import GopherQualityFilter, GopherRepetitionFilter
from pipelines.filters.word_count import WordCountFilter, count_words

__all__ = ["C4QualityFilter", "Doc", "FilterChain", "FilterReport", "FineWebQualityFilter", "GopherQualityFilter",
           "GopherRepetitionFilter", "QualityFilter", "Result", "WordCountFilter", "build_chain", "count_words"]

FILTER_CLASSES = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
                  "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}


def build_chain(filters: FiltersConfig, word_count: WordCountFilterConfig | None = None) -> FilterChain:
    """The chain a pipeline runs: word count (if enabled), then every enabled published filter."""
    steps: list = [WordCountFilter(word_count)] if word_count is not None and word_count.enabled else []
    for name, cls in FILTER_CLASSES.items():
        f = cls(getattr(filters, name))
        if f.active:
            steps.append(f)
    return FilterChain(steps, filters.word_tokenizer, filters.examples_per_rule)
