"""Text normalization: Unicode form, line endings, control characters, trailing whitespace.

Indentation is kept (code is a domain too); only what no reader could see is removed.
"""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

from infra.config import NormalizeConfig

# C0/C1 control characters except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n)")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control_chars:
        text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    return text.strip()


def normalize_batch(batch: pa.Table, cfg: NormalizeConfig) -> pa.Table:
    """Ray map_batches function over Document rows (pyarrow format)."""
    texts = [normalize_text(t, cfg) for t in batch.column("text").to_pylist()]
    idx = batch.schema.get_field_index("text")
    return batch.set_column(idx, "text", pa.array(texts, pa.string()))
