"""The filter protocol, the chain that runs filters in one pass, and the filter report.

A filter never drops rows itself. ``apply(batch)`` writes ``drop_reason``/``drop_detail`` for the
rows it rejects (a row that already has a reason is left alone: the first failing filter of a
chain wins, and later filters do not even look at it), and, for domains where it runs in
*annotate* mode, adds score columns ``<filter>.<score>`` plus ``<filter>.reason`` (what it would
have removed) and rejects nothing. Every column a filter adds is named ``<filter>.<...>``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from infra.config import QualityFilterConfig

MARKS = ("drop_reason", "drop_detail")


class Doc:
    """One document's text with the statistics several filters share, computed once on demand."""

    __slots__ = ("text", "_words", "_split_words")

    def __init__(self, text: str, split_words: Callable[[str], list[str]]):
        self.text = text
        self._words: list[str] | None = None
        self._split_words = split_words

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = self._split_words(self.text)
        return self._words


@dataclass
class Result:
    """A filter's verdict on one document: ``rule`` is None when it passes."""

    rule: str | None = None
    detail: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    text: str | None = None  # the rewritten text (line filters), None when unchanged
    lines_removed: dict[str, int] | None = None


class QualityFilter:
    """Base of the published filters: per-domain settings, modes, and the batch loop.

    Subclasses set ``name``, ``rules`` (rule -> the datatrove reason it corresponds to, None where
    datatrove has no such reason), ``scores`` (the score columns of annotate mode) and implement
    ``check(doc, cfg, annotate)``; in filter mode ``check`` may stop at the first failing rule.
    """

    name: str = ""
    rules: dict[str, str | None] = {}
    scores: tuple[str, ...] = ()
    line_rules: tuple[str, ...] = ()  # rules that remove lines, not documents (their counts are columns)

    def __init__(self, cfg: QualityFilterConfig):
        self.cfg = cfg
        self._by_domain: dict[str, QualityFilterConfig | None] = {}

    def for_domain(self, domain: str) -> QualityFilterConfig | None:
        if domain not in self._by_domain:
            self._by_domain[domain] = self.cfg.for_domain(domain)
        return self._by_domain[domain]

    @property
    def annotates(self) -> bool:
        """Whether any domain runs in annotate mode (then the score columns exist in every batch)."""
        return self.cfg.mode == "annotate" or any(o.get("mode") == "annotate" for o in self.cfg.domains.values())

    @property
    def active(self) -> bool:
        return self.cfg.enabled or any(o.get("enabled") for o in self.cfg.domains.values())

    def check(self, doc: Doc, cfg: Any, annotate: bool) -> Result:
        raise NotImplementedError

    def decide(self, text: str, domain: str = "") -> str | None:
        """The rule that rejects ``text`` (filter mode, this filter alone), or None."""
        from pipelines.filters.text import word_splitter

        cfg = self.for_domain(domain)
        return None if cfg is None else self.check(Doc(text, word_splitter("fast")), cfg, False).rule

    def run_rows(self, docs: list[Doc], domains: list[str], reasons: list, details: list,
                 columns: dict[str, list]) -> None:
        """Apply to rows in place: ``docs`` may be replaced (rewritten text), reasons/details set."""
        for i, doc in enumerate(docs):
            cfg = self.for_domain(domains[i])
            if cfg is None:
                continue
            annotate = cfg.mode == "annotate"
            if not annotate and reasons[i] is not None:
                continue
            res = self.check(doc, cfg, annotate)
            if self.line_rules:
                for rule in self.line_rules:
                    columns[f"{self.name}.lines.{rule}"][i] = (res.lines_removed or {}).get(rule, 0)
            if annotate:
                for key in self.scores:
                    columns[f"{self.name}.{key}"][i] = res.scores.get(key)
                columns[f"{self.name}.reason"][i] = f"{self.name}.{res.rule}" if res.rule else None
            elif res.rule is not None:
                reasons[i], details[i] = f"{self.name}.{res.rule}", res.detail
            elif res.text is not None:
                docs[i] = Doc(res.text, doc._split_words)

    def column_types(self) -> dict[str, pa.DataType]:
        cols: dict[str, pa.DataType] = {}
        if self.active:
            cols.update({f"{self.name}.lines.{r}": pa.int32() for r in self.line_rules})
        if self.active and self.annotates:
            cols.update({f"{self.name}.{k}": pa.float64() for k in self.scores})
            cols[f"{self.name}.reason"] = pa.string()
        return cols


class FilterChain:
    """Filters run in order over one batch; the first rejecting filter names the reason.

    ``apply`` is what the pipeline's single ``map_batches`` pass calls. ``report`` accumulates
    counters of every batch this object has seen (in-process use: tests, benchmarks); the pipeline
    computes the same with ``FilterReport.from_batch`` on the marked dataset.
    """

    def __init__(self, filters: list, word_tokenizer: str = "fast", examples_per_rule: int = 5):
        from pipelines.filters.text import word_splitter

        self.filters = filters
        self.word_tokenizer = word_tokenizer
        self.examples_per_rule = examples_per_rule
        self._split = None
        self.report = FilterReport(examples_per_rule=examples_per_rule)
        self.track_report = True  # the pipeline counts on the marked dataset instead
        self._word_splitter = word_splitter

    @property
    def split_words(self):
        if self._split is None:  # resolved lazily: the chain is pickled to Ray workers
            self._split = self._word_splitter(self.word_tokenizer)
        return self._split

    def __getstate__(self):
        return {**self.__dict__, "_split": None}

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.filters]

    def added_columns(self) -> dict[str, pa.DataType]:
        cols: dict[str, pa.DataType] = {}
        for f in self.filters:
            if hasattr(f, "column_types"):
                cols.update(f.column_types())
        return cols

    def apply(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        texts = batch.column("text").to_pylist()
        domains = batch.column("domain").to_pylist()
        marks = {m: batch.column(m).to_pylist() if m in batch.column_names else [None] * n for m in MARKS}
        reasons, details = marks["drop_reason"], marks["drop_detail"]
        extra = self.added_columns()
        columns: dict[str, list] = {c: [None] * n for c in extra}
        for c, t in extra.items():
            if t == pa.int32():
                columns[c] = [0] * n
        docs = [Doc(t, self.split_words) for t in texts]
        for f in self.filters:
            f.run_rows(docs, domains, reasons, details, columns)
        new_texts = [d.text for d in docs]
        out = batch.drop_columns([c for c in (*MARKS, *extra) if c in batch.column_names])
        if new_texts != texts:
            out = out.set_column(out.column_names.index("text"), "text", pa.array(new_texts, pa.string()))
        out = out.append_column("drop_reason", pa.array(reasons, pa.string()))
        out = out.append_column("drop_detail", pa.array(details, pa.string()))
        for c, t in extra.items():
            out = out.append_column(c, pa.array(columns[c], t))
        if self.track_report:
            self.report.merge(FilterReport.from_batch(out, self.examples_per_rule))
        return out

    __call__ = apply


@dataclass
class FilterReport:
    """Counters of a filter run: docs seen, removed by rule (per domain) with example ids, lines
    removed by line rule, and in annotate mode what each rule *would* have removed."""

    docs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    removed: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    would_remove: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lines_removed: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    examples_per_rule: int = 5

    @classmethod
    def from_batch(cls, batch: pa.Table, examples_per_rule: int = 5) -> "FilterReport":
        rep = cls(examples_per_rule=examples_per_rule)
        domains = batch.column("domain").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else [None] * len(domains)
        for d in domains:
            rep.docs[d] += 1
        for col in batch.column_names:
            if col == "drop_reason" or col.endswith(".reason"):
                target = rep.removed if col == "drop_reason" else rep.would_remove
                values = batch.column(col)
                if values.null_count == len(values):
                    continue
                for i, (r, d) in enumerate(zip(values.to_pylist(), domains)):
                    if r is not None:
                        target[r][d] += 1
                        if col == "drop_reason" and len(rep.examples[r]) < examples_per_rule and ids[i] is not None:
                            rep.examples[r].append(ids[i])
            elif ".lines." in col:
                rule = col.replace(".lines.", ".", 1)
                for d, k in zip(domains, batch.column(col).to_pylist()):
                    if k:
                        rep.lines_removed[rule][d] += k
        return rep

    def merge(self, other: "FilterReport") -> "FilterReport":
        for d, k in other.docs.items():
            self.docs[d] += k
        for mine, theirs in ((self.removed, other.removed), (self.would_remove, other.would_remove),
                             (self.lines_removed, other.lines_removed)):
            for r, per in theirs.items():
                for d, k in per.items():
                    mine[r][d] += k
        for r, ex in other.examples.items():
            room = self.examples_per_rule - len(self.examples[r])
            if room > 0:
                self.examples[r].extend(ex[:room])
        return self

    def to_dict(self) -> dict:
        def plain(x: dict) -> dict:
            return {r: dict(sorted(per.items())) for r, per in sorted(x.items())}

        return {
            "docs": dict(sorted(self.docs.items())),
            "removed": plain(self.removed),
            "removed_total": {r: sum(per.values()) for r, per in sorted(self.removed.items())},
            "examples": {r: sorted(v) for r, v in sorted(self.examples.items()) if v},
            "lines_removed": plain(self.lines_removed),
            "would_remove": plain(self.would_remove),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, examples_per_rule: int = 5) -> "FilterReport":
        rep = cls(examples_per_rule=examples_per_rule)
        rep.docs.update(data.get("docs", {}))
        for key in ("removed", "would_remove", "lines_removed"):
            target = getattr(rep, key)
            for r, per in data.get(key, {}).items():
                target[r].update(per)
        for r, ex in data.get("examples", {}).items():
            rep.examples[r].extend(ex)
        return rep
