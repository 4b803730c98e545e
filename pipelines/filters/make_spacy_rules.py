"""Regenerate ``spacy_en_rules.json``: spaCy's English tokenizer rules, as data.

datatrove's English word tokenizer is ``spacy.blank("en")`` (its tokenizer_assignment.csv). The
filters here re-implement that tokenizer's algorithm in pure Python (pipelines/filters/text.py)
on these rules, so their word statistics match datatrove's without spaCy installed at run time.
spaCy is MIT-licensed (c) ExplosionAI GmbH. Needs spaCy only to regenerate:

    python -m pipelines.filters.make_spacy_rules
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("spacy_en_rules.json")


def main() -> None:
    import spacy
    from spacy.attrs import ORTH

    tok = spacy.blank("en").tokenizer
    rules = {
        "spacy_version": spacy.__version__,
        "prefix": tok.prefix_search.__self__.pattern,
        "suffix": tok.suffix_search.__self__.pattern,
        "infix": tok.infix_finditer.__self__.pattern,
        "url": tok.url_match.__self__.pattern,
        "specials": {k: [t[ORTH] for t in v] for k, v in sorted(tok.rules.items())},
    }
    OUT.write_text(json.dumps(rules, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, spaCy {spacy.__version__})")


if __name__ == "__main__":
    main()
