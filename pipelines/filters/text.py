"""Text statistics shared by the quality filters: datatrove-compatible words, lines and sentences.

datatrove splits English text into words with ``spacy.blank("en")`` (its
``assets/tokenizer_assignment.csv`` maps ``en`` to ``SpaCyTokenizer``; no model download, but
spaCy itself must be installed) and drops tokens that are only whitespace. The filter thresholds
are defined on those words (Gopher's alphabetic-word ratio counts a comma as a word), so to agree
with datatrove's decisions the filters need the same words. ``words()`` re-implements spaCy's
tokenizer algorithm (whitespace chunks -> special cases -> prefix/suffix stripping -> URL match
-> infix splitting) in pure Python on spaCy 3.8's English rules, shipped as data in
``spacy_en_rules.json`` (regenerate with ``python -m pipelines.filters.make_spacy_rules``), with a
chunk cache as spaCy has. It is ~10-20x faster than calling spaCy per document.

Known difference: spaCy's second pass that re-matches special cases *across* tokens
(``Tokenizer._apply_special_cases``, e.g. an emoticon glued to a word) is not reproduced; on the
agreement corpus of tests/test_filters.py the token lists are identical for >99% of documents.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

# datatrove.utils.text.PUNCTUATION (0.10.1): ASCII/CJK punctuation, symbols and control characters.
PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))

# datatrove.utils.text.TERMINAL_PUNCTUATION (0.10.1): sentence-final marks of many scripts.
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a"
    "\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945"
    "\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d"
    "\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce"
    "\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f"
    "\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87"
    "\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141"
    "\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239"
    "\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca"
    "\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3"
    "\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e"
    "\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7"
    "\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016e98\U0001bc9f\U0001da88"
)
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
TERMINAL_PUNCTUATION_TUPLE = tuple(sorted(TERMINAL_PUNCTUATION))

# spaCy's Sentencizer.default_punct_chars (3.8): a token that is one of these ends a sentence.
SENTENCE_END = frozenset(
    "!.?\u0589\u061f\u06d4\u0700\u0701\u0702\u07f9\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e"
    "\u1735\u1736\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1c3b\u1c3c"
    "\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876"
    "\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01"
    "\uff0e\uff1f\uff61\U00010a56\U00010a57\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1"
    "\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238"
    "\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9"
    "\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2"
    "\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d"
    "\U0001173e\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00016a6e\U00016a6f"
    "\U00016af5\U00016b37\U00016b38\U00016b44\U0001bc9f\U0001da88"
)


class SpacyEnglishWords:
    """spaCy 3.8's English tokenizer (``spacy.blank("en").tokenizer``) re-implemented on its rules."""

    MAX_CACHE = 200_000

    def __init__(self, rules: dict):
        self.prefix = re.compile(rules["prefix"]).search
        self.suffix = re.compile(rules["suffix"]).search
        self.infix = re.compile(rules["infix"]).finditer
        self.url = re.compile(rules["url"]).match
        self.specials: dict[str, list[str]] = rules["specials"]
        self.cache: dict[str, list[str]] = {}
        # Special cases that the affix rules would split ("):", "''", "c.") are re-joined after
        # tokenizing (spaCy's _special_matcher / _apply_special_cases): token sequence -> tokens.
        self.phrases: dict[tuple[str, ...], list[str]] = {}
        for key, orths in self.specials.items():
            if self.prefix(key) or self.suffix(key) or any(True for _ in self.infix(key)):
                pattern = tuple(self._tokenize(key, with_specials=False))
                if len(pattern) > 1:
                    self.phrases[pattern] = orths
        self.max_phrase = max(map(len, self.phrases), default=0)

    def __call__(self, text: str) -> list[str]:
        cache, out = self.cache, []
        for chunk in text.split():
            toks = cache.get(chunk)
            if toks is None:
                toks = self.specials.get(chunk) or self._tokenize(chunk)
                if len(cache) >= self.MAX_CACHE:
                    cache.clear()
                cache[chunk] = toks
            out += toks
        return out

    def _tokenize(self, string: str, with_specials: bool = True) -> list[str]:
        # Tokenizer._split_affixes
        specials = self.specials if with_specials else {}
        prefixes: list[str] = []
        suffixes: list[str] = []
        last_size = 0
        while string and len(string) != last_size:
            if string in specials:
                break
            last_size = len(string)
            m = self.prefix(string)
            pre_len = m.end() - m.start() if m else 0
            if pre_len:
                prefix, minus_pre = string[:pre_len], string[pre_len:]
                if minus_pre and minus_pre in specials:
                    string = minus_pre
                    prefixes.append(prefix)
                    break
            m = self.suffix(string[pre_len:])
            suf_len = m.end() - m.start() if m else 0
            if suf_len:
                suffix, minus_suf = string[-suf_len:], string[:-suf_len]
                if minus_suf and minus_suf in specials:
                    string = minus_suf
                    suffixes.append(suffix)
                    break
            if pre_len and suf_len and pre_len + suf_len <= len(string):
                string = string[pre_len:-suf_len]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif pre_len:
                string = minus_pre
                prefixes.append(prefix)
            elif suf_len:
                string = minus_suf
                suffixes.append(suffix)
        # Tokenizer._attach_tokens
        out = prefixes
        if string:
            if string in specials:
                out += specials[string]
            elif self.url(string):
                out.append(string)
            else:
                start = 0
                for match in self.infix(string):
                    i0, i1 = match.start(), match.end()
                    if i0 == 0:  # an infix at the very start is not split off (start_before_infixes)
                        continue
                    if i0 != start:
                        out.append(string[start:i0])
                    if i0 != i1:
                        out.append(string[i0:i1])
                    start = i1
                if string[start:]:
                    out.append(string[start:])
        out += reversed(suffixes)
        if with_specials and len(out) > 1 and self.phrases:
            out = self._join_phrases(out)
        return [t for t in out if t.strip()]

    def _join_phrases(self, tokens: list[str]) -> list[str]:
        # Longest match first, then the earlier start (spaCy's _filter_special_spans order).
        found = []
        for n in range(min(self.max_phrase, len(tokens)), 1, -1):
            for i in range(len(tokens) - n + 1):
                if tuple(tokens[i:i + n]) in self.phrases:
                    found.append((i, n))
        if not found:
            return tokens
        taken: set[int] = set()
        keep = []
        for i, n in found:
            if i not in taken and i + n - 1 not in taken:
                keep.append((i, n))
            taken.update(range(i, i + n))
        out, pos = [], 0
        for i, n in sorted(keep):
            out += tokens[pos:i]
            out += self.phrases[tuple(tokens[i:i + n])]
            pos = i + n
        return out + tokens[pos:]


@lru_cache(maxsize=1)
def english_words() -> SpacyEnglishWords:
    rules = json.loads(Path(__file__).with_name("spacy_en_rules.json").read_text(encoding="utf-8"))
    return SpacyEnglishWords(rules)


@lru_cache(maxsize=1)
def spacy_words():
    """spaCy itself (optional dependency): exactly what datatrove's ``split_into_words`` returns."""
    import spacy

    tok = spacy.blank("en").tokenizer

    def words(text: str) -> list[str]:
        return [t.text.strip() for t in tok(text) if t.text.strip()]

    return words


def word_splitter(name: str):
    """``fast``: the pure-Python re-implementation; ``spacy``: spaCy itself (must be installed)."""
    if name == "spacy":
        return spacy_words()
    if name == "fast":
        return english_words()
    raise ValueError(f"unknown word tokenizer {name!r} (fast | spacy)")


@lru_cache(maxsize=65536)
def is_punct_token(token: str) -> bool:
    """spaCy's ``Lexeme.is_punct``: every character is in a Unicode punctuation category."""
    return all(unicodedata.category(c).startswith("P") for c in token)


def count_sentences(words: list[str]) -> int:
    """Sentences spaCy's ``sentencizer`` finds in a tokenized line (datatrove's split_into_sentences).

    A new sentence starts at the first token that is neither punctuation nor a sentence-final mark
    after a token that is a sentence-final mark. Lines here are never empty.
    """
    n, seen_end = 1, False
    for w in words:
        is_end = w in SENTENCE_END
        if seen_end and not is_end and not is_punct_token(w):
            n += 1
            seen_end = False
        elif is_end:
            seen_end = True
    return n
