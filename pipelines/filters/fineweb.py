"""FineWeb's own quality rules (Penedo et al. 2024, "The FineWeb Datasets", arXiv:2406.17557
§3.3.3), as datatrove 0.10.1's ``FineWebQualityFilter`` implements them with its defaults."""

from __future__ import annotations

from infra.config import FineWebQualityConfig
from pipelines.filters.base import Doc, QualityFilter, Result
from pipelines.filters.gopher import find_duplicates
from pipelines.filters.text import TERMINAL_PUNCTUATION


class FineWebQualityFilter(QualityFilter):
    """Defaults (datatrove 0.10.1):

    - lines (non-blank) ending in terminal punctuation >= 12%
    - lines of <= 30 characters <= 67%
    - characters in duplicated lines / characters (without newlines) <= 0.01 — datatrove's
      default; the FineWeb paper's text says 0.1 (see /work/shared/research/anchors_data.md)
    - newlines per word <= 0.3
    """

    name = "fineweb_quality"
    rules = {"empty": "empty", "line_punct_ratio": "line_punct_ratio", "short_line_ratio": "short_line_ratio",
             "char_dup_ratio": "char_dup_ratio", "list_ratio": "list_ratio"}
    scores = ("line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio")

    def __init__(self, cfg: FineWebQualityConfig):
        super().__init__(cfg)

    def check(self, doc: Doc, cfg: FineWebQualityConfig, annotate: bool) -> Result:
        res = Result()
        s = res.scores
        text = doc.text
        lines = [x for x in text.split("\n") if x.strip() != ""]
        if not lines:
            res.rule, res.detail = "empty", "no non-blank line"
            return res

        def fail(rule: str, detail: str) -> bool:
            if res.rule is None:
                res.rule, res.detail = rule, detail
            return not annotate

        r = s["line_punct_ratio"] = sum(1 for x in lines if x[-1] in TERMINAL_PUNCTUATION) / len(lines)
        if r < cfg.line_punct_thr and not (r == 0 and cfg.line_punct_exclude_zero):
            if fail("line_punct_ratio", f"{r:.4f} < {cfg.line_punct_thr}"):
                return res
        r = s["short_line_ratio"] = sum(1 for x in lines if len(x) <= cfg.short_line_length) / len(lines)
        if r > cfg.short_line_thr:
            if fail("short_line_ratio", f"{r:.4f} > {cfg.short_line_thr}"):
                return res
        r = s["char_dup_ratio"] = find_duplicates(lines)[1] / (len(text) - text.count("\n"))
        if r > cfg.char_duplicates_ratio:
            if fail("char_dup_ratio", f"{r:.4f} > {cfg.char_duplicates_ratio}"):
                return res
        r = s["list_ratio"] = text.count("\n") / len(doc.words)
        if r > cfg.new_line_ratio:
            fail("list_ratio", f"{r:.4f} > {cfg.new_line_ratio}")
        return res
