"""C4's line and document rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning",
JMLR 21, §2.2; reference code tensorflow_datasets/text/c4_utils.py), as datatrove 0.10.1's
``C4QualityFilter`` implements them with its defaults (``split_paragraph=True``: a line is a
sentence group). Line rules remove lines and the document's text is rewritten to the kept lines;
document rules remove the document.
"""

from __future__ import annotations

import re

from infra.config import C4QualityConfig
from pipelines.filters.base import Doc, QualityFilter, Result
from pipelines.filters.text import count_sentences

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")


class C4QualityFilter(QualityFilter):
    """Defaults (datatrove 0.10.1; the C4 paper unless noted):

    line rules, in this order — drop a line that
      - has a word longer than 1000 characters (tfds code, not the paper)
      - after removing Wikipedia citations ([1], [edit], [citation needed]) does not end in
        . ? ! " ' or ends in ...
      - has fewer than 3 words
      - mentions javascript
      - contains a terms-of-use / privacy-policy / cookie phrase (tfds code)
    document rules — drop the document when a kept line contains "lorem ipsum" or "{", or the kept
    lines hold fewer than 5 sentences (sentences as spaCy's sentencizer splits them).
    """

    name = "c4_quality"
    rules = {"lorem_ipsum": "lorem_ipsum", "curly_bracket": "curly_bracket",
             "too_few_sentences": "too_few_sentences"}
    line_rules = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")
    scores = ("lines", "lines_kept", "sentences")

    def __init__(self, cfg: C4QualityConfig):
        super().__init__(cfg)

    def check(self, doc: Doc, cfg: C4QualityConfig, annotate: bool) -> Result:
        res = Result()
        removed = dict.fromkeys(self.line_rules, 0)
        res.lines_removed = removed
        split_words = doc._split_words
        kept: list[str] = []
        sentences = 0
        lines = doc.text.splitlines()
        for line in lines:
            line = line.strip()
            words = line.split()
            if cfg.max_word_length != -1 and any(len(w) > cfg.max_word_length for w in words):
                removed["too_long_word"] += 1
                continue
            if cfg.remove_citations:
                line = CITATION.sub("", line)
            if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                removed["no_terminal_punct"] += 1
                continue
            if len(words) < cfg.min_words_per_line:
                removed["too_few_words"] += 1
                continue
            lower = line.lower()
            if cfg.filter_lorem_ipsum and "lorem ipsum" in lower and res.rule is None:
                res.rule, res.detail = "lorem_ipsum", line[:200]
                if not annotate:
                    return res
            if cfg.filter_javascript and "javascript" in lower:
                removed["javascript"] += 1
                continue
            if cfg.filter_curly_bracket and "{" in line and res.rule is None:
                res.rule, res.detail = "curly_bracket", line[:200]
                if not annotate:
                    return res
            if cfg.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                removed["policy"] += 1
                continue
            if cfg.min_num_sentences != -1:
                sentences += count_sentences(split_words(line))
            kept.append(line)
        res.scores.update(lines=len(lines), lines_kept=len(kept), sentences=sentences)
        if sentences < cfg.min_num_sentences and res.rule is None:
            res.rule, res.detail = "too_few_sentences", f"{sentences} sentences < {cfg.min_num_sentences}"
            return res
        if res.rule is None and not annotate:
            new = "\n".join(kept).strip()
            if new != doc.text:
                res.text = new
        return res
