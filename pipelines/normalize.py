"""Text normalization (Unicode form, line endings, control characters, whitespace) and language id.

Each step is a pure function of one string; ``normalize_batch`` applies them to a Ray batch of
Document rows and adds the ``language`` / ``language_score`` columns (infra.contracts,
DOCUMENT_LANGUAGE_FIELDS). Indentation is kept (code is a domain too); only what no reader could
see is removed, and the document's own edges are stripped.

Language id is py3langid: langid.py's naive Bayes model (97 languages) as a numpy port, with the
model inside the wheel, so nothing is downloaded and every worker gives the same answer. Texts
shorter than ``language_min_chars`` get ``und`` (ISO 639 "undetermined"), score 0.
"""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

from infra.config import NormalizeConfig
from infra.contracts import DOCUMENT_LANGUAGE_FIELDS

UNDETERMINED = "und"

# C0/C1 control characters except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Characters that end a line besides \n (after \r\n and \r are handled): line/paragraph separators.
_LINE_SEPARATORS = re.compile(r"[\u2028\u2029]")
# Space characters that render as a plain space (no-break, en/em, thin, ideographic ...).
_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# Invisible characters with no meaning inside text. ZWJ/ZWNJ (\u200c, \u200d) stay: scripts and emoji use them.
_INVISIBLE = re.compile(r"[\u200b\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n)")


def normalize_unicode(text: str, form: str) -> str:
    """NFC (composed: 'e' + U+0301 -> 'é'), NFKC (also folds compatibility forms: 'ﬁ' -> 'fi'), or 'none'."""
    return text if form == "none" else unicodedata.normalize(form, text)


def normalize_line_endings(text: str) -> str:
    return _LINE_SEPARATORS.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))


def strip_control_chars(text: str) -> str:
    return _CONTROL.sub("", text)


def normalize_whitespace(text: str, max_blank_lines: int = 2) -> str:
    """Unicode spaces -> ' ', invisible characters dropped, trailing spaces cut, blank-line runs capped.

    Runs of spaces inside a line are kept: they are indentation or alignment in code and tables.
    """
    text = _INVISIBLE.sub("", _UNICODE_SPACES.sub(" ", text))
    text = _TRAILING_SPACE.sub("", text)
    return re.sub(r"\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    text = normalize_line_endings(normalize_unicode(text, cfg.unicode_form))
    if cfg.strip_control_chars:
        text = strip_control_chars(text)
    if cfg.normalize_whitespace:
        text = normalize_whitespace(text, cfg.max_blank_lines)
    else:
        text = _TRAILING_SPACE.sub("", text)
    return text.strip()


# --------------------------------------------------------------------------- language id

_IDENTIFIER = None  # one per worker process: loading the model takes ~1 s


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def identify_language(text: str, min_chars: int = 20, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text``'s language; ('und', 0.0) when it is too short to tell."""
    sample = text[:max_chars]
    if sum(c.isalpha() for c in sample) < min_chars:  # digits, symbols, markup say nothing about language
        return UNDETERMINED, 0.0
    lang, score = _identifier().classify(sample)
    return lang, float(score)


def normalize_batch(batch: pa.Table, cfg: NormalizeConfig) -> pa.Table:
    """Ray map_batches function over Document rows (pyarrow format)."""
    texts = [normalize_text(t, cfg) for t in batch.column("text").to_pylist()]
    idx = batch.schema.get_field_index("text")
    batch = batch.set_column(idx, "text", pa.array(texts, pa.string()))
    if cfg.language_id:
        found = [identify_language(t, cfg.language_min_chars, cfg.language_max_chars) for t in texts]
        for field, values in zip(DOCUMENT_LANGUAGE_FIELDS, zip(*found) if found else ([], [])):
            column = pa.array(values, field.type)
            if field.name in batch.column_names:  # normalized twice: replace, never duplicate
                batch = batch.set_column(batch.schema.get_field_index(field.name), field, column)
            else:
                batch = batch.append_column(field, column)
    return batch
