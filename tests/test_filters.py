"""Quality filters (pipelines/filters): each rule at its threshold, modes, domains, the chain,
counters, and decision agreement with datatrove's own filters on a sample corpus."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from infra.config import (C4QualityConfig, FiltersConfig, FineWebQualityConfig, GopherQualityConfig,
                          GopherRepetitionConfig, PipelineConfig, WordCountFilterConfig, parse_config)
from pipelines.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter,
                               build_chain)
from pipelines.filters.base import Doc
from pipelines.filters.text import count_sentences, english_words

WORDS = "the quick brown fox jumps with great speed and that old dog of mine to be seen".split()


def prose(n: int, words: list[str] = WORDS) -> str:
    """n words of prose-like text (letters only, stop words included), 10 words per line."""
    ws = [words[i % len(words)] for i in range(n)]
    return "\n".join(" ".join(ws[i:i + 10]) + "." for i in range(0, n, 10))


def gq(text: str, **cfg) -> str | None:
    return GopherQualityFilter(GopherQualityConfig(enabled=True, **cfg)).decide(text)


def scores(f, text: str) -> dict:
    return f.check(Doc(text, english_words()), f.cfg.model_copy(update={"mode": "annotate"}), True).scores


# --------------------------------------------------------------------------- words


def test_words_follow_spacy_english_rules():
    w = english_words()
    assert w("Hello, world! It's a test... don't e.g. U.S.A. x-ray #tag 3.14") == [
        "Hello", ",", "world", "!", "It", "'s", "a", "test", "...", "do", "n't", "e.g.", "U.S.A.",
        "x", "-", "ray", "#", "tag", "3.14"]
    assert w("def f(x): see https://github.com/a/b.") == ["def", "f(x", "):", "see", "https://github.com/a/b", "."]
    assert count_sentences(w("One. Two! Three? four")) == 4
    assert count_sentences(w("e.g. this is one sentence.")) == 1


# --------------------------------------------------------------------------- Gopher quality at its thresholds


def test_gopher_word_count_bounds():
    assert gq(prose(49)) == "short_doc"
    assert gq(prose(50)) is None
    assert gq(prose(51)) is None
    assert gq(prose(60), max_doc_words=60) is None
    assert gq(prose(61), max_doc_words=60) == "long_doc"
    # punctuation-only tokens are not words: 49 words and 20 commas are still too few
    assert gq(prose(49) + " , " * 20) == "short_doc"
    assert GopherQualityConfig().max_doc_words == 100_000


def test_gopher_mean_word_length_bounds():
    assert gq(prose(60, ["abc"]), min_stop_words=None) is None  # mean exactly 3
    assert gq(prose(60, ["abc"] * 9 + ["ab"]), min_stop_words=None) == "short_words"
    assert gq(prose(60, ["a" * 10]), min_stop_words=None) is None  # mean exactly 10
    assert gq(prose(60, ["a" * 10] * 9 + ["a" * 11]), min_stop_words=None) == "long_words"


def test_gopher_symbol_ratios():
    base = prose(90)  # 90 words + 9 periods = 99 tokens
    assert gq(base + " #") is None  # 1/100 hashes
    assert gq(base + " #" * 11) is None  # 11/110 = 0.1: not above
    assert gq(base + " #" * 12) == "hash_ratio"  # 12/111
    assert gq(base + " ..." * 11) is None
    assert gq(base + " ..." * 12) == "ellipsis_ratio"


def test_gopher_bullet_and_ellipsis_lines():
    lines = [" ".join(WORDS[:10]) + "." for _ in range(10)]
    nine = ["- " + x for x in lines[:9]] + lines[9:]
    assert gq("\n".join(nine)) is None  # 0.9
    assert gq("\n".join("• " + x for x in lines)) == "bullet_lines"  # 1.0
    three = [x[:-1] + " …" for x in lines[:3]] + lines[3:]
    assert gq("\n".join(three)) is None  # 0.3
    four = [x[:-1] + " …" for x in lines[:4]] + lines[4:]
    assert gq("\n".join(four)) == "ellipsis_lines"  # 0.4


def test_gopher_alpha_words_and_stop_words():
    # 80 letter words and 20 number tokens: 0.8 exactly (no punctuation tokens)
    letters = " ".join(WORDS[i % len(WORDS)] for i in range(80))
    assert gq(letters + " 42" * 20) is None
    assert gq(letters + " 42" * 21) == "alpha_words"
    no_stop = prose(60, ["cat", "dog", "bird", "sky"])
    assert gq(no_stop) == "stop_words"
    assert gq(no_stop + " the") == "stop_words"  # one distinct stop word
    assert gq(no_stop + " the the") == "stop_words"
    assert gq(no_stop + " The And") == "stop_words"  # case-sensitive, as datatrove
    assert gq(no_stop + " the and") is None


# --------------------------------------------------------------------------- Gopher repetition at its thresholds


def only(**rules) -> GopherRepetitionFilter:
    off = dict(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=None, dup_para_char_frac=None,
               top_n_grams={}, dup_n_grams={})
    return GopherRepetitionFilter(GopherRepetitionConfig(enabled=True, **{**off, **rules}))


def test_gopher_repetition_duplicate_lines_and_paragraphs():
    text = "\n".join([f"unique {i}" for i in range(7)] + ["dup"] * 4)  # 11 lines, 3 of them repeats
    assert only(dup_line_frac=3 / 11).decide(text) is None  # at the threshold: not above
    assert only(dup_line_frac=3 / 11 - 1e-9).decide(text) == "dup_line_frac"
    paras = "\n\n".join(["para one here", "para two here", "para one here", "para three"])
    assert only(dup_para_frac=0.25).decide(paras) is None  # 1/4
    assert only(dup_para_frac=0.24).decide(paras) == "dup_para_frac"
    s = scores(only(dup_para_char_frac=1.0), paras)
    assert s["dup_para_char_frac"] == pytest.approx(len("para one here") / len(paras))


def test_gopher_repetition_char_fractions_at_the_boundary():
    text = "\n".join(["aaaa bbbb", "cccc dddd", "aaaa bbbb"])  # 29 chars, 9 in the repeated line
    value = 9 / len(text)
    assert only(dup_line_char_frac=value).decide(text) is None
    assert only(dup_line_char_frac=value - 1e-9).decide(text) == "dup_line_char_frac"


def test_gopher_repetition_ngrams():
    text = "one two one two one two three four five six seven eight"
    # top 2-gram "one two" (7 chars) x 3 = 21 chars
    value = 21 / len(text)
    assert only(top_n_grams={2: value}).decide(text) is None
    assert only(top_n_grams={2: value - 1e-9}).decide(text) == "top_2_gram"
    rep = " ".join(["alpha beta gamma delta epsilon"] * 2 + ["zeta eta theta iota kappa lambda"])
    # the second copy of the 5-gram repeats: its chars joined without spaces
    dup = len("alphabetagammadeltaepsilon") / len(rep)
    assert scores(only(dup_n_grams={5: 1.0}), rep)["dup_5_gram"] == pytest.approx(dup)
    assert only(dup_n_grams={5: dup}).decide(rep) is None
    assert only(dup_n_grams={5: dup - 1e-9}).decide(rep) == "dup_5_gram"
    assert GopherRepetitionFilter(GopherRepetitionConfig(enabled=True)).decide("") == "empty"


# --------------------------------------------------------------------------- C4


def c4(text: str, **cfg):
    f = C4QualityFilter(C4QualityConfig(enabled=True, **cfg))
    return f.check(Doc(text, english_words()), f.cfg, False)


SENT = "This is a fine sentence."


def test_c4_sentences_and_line_rules():
    assert c4("\n".join([SENT] * 4)).rule == "too_few_sentences"
    r = c4("\n".join([SENT] * 5))
    assert r.rule is None and r.text is None
    assert c4(" ".join([SENT] * 5)).rule is None  # five sentences on one line
    doc = "\n".join([SENT] * 5 + ["no terminal punctuation here", "Ends with an ellipsis...", "Two words.",
                                 "Please enable JavaScript to view.", "Read our privacy policy here.",
                                 "A citation at the end.[1]", "word " + "x" * 1001 + " ok."])
    r = c4(doc)
    assert r.rule is None
    assert r.text.split("\n") == [SENT] * 5 + ["A citation at the end."]
    assert r.lines_removed == {"too_long_word": 1, "no_terminal_punct": 2, "too_few_words": 1,
                               "javascript": 1, "policy": 1}
    assert c4("\n".join([SENT] * 5 + ["x" * 1000 + " is long."])).text is None  # 1000 chars is allowed


def test_c4_document_rules():
    assert c4("\n".join([SENT] * 5 + ["Lorem ipsum dolor sit amet."])).rule == "lorem_ipsum"
    assert c4("\n".join([SENT] * 5 + ["Here is {a brace}."])).rule == "curly_bracket"
    # a brace on a line that a line rule removes first does not count
    assert c4("\n".join([SENT] * 5 + ["x = {1: 2}"])).rule is None
    assert c4("\n".join([SENT] * 4), min_num_sentences=4).rule is None


# --------------------------------------------------------------------------- FineWeb


def fw(text: str, **cfg) -> str | None:
    loose = dict(line_punct_thr=0.0, short_line_thr=1.0, char_duplicates_ratio=1.0, new_line_ratio=100.0)
    return FineWebQualityFilter(FineWebQualityConfig(enabled=True, **{**loose, **cfg})).decide(text)


def test_fineweb_rules_at_their_thresholds():
    long_line = "this line is longer than thirty characters for sure"
    lines = [long_line + f" {i}" for i in range(25)]
    three = "\n".join([x + "." for x in lines[:3]] + lines[3:])  # 3/25 = 0.12
    assert fw(three, line_punct_thr=0.12) is None
    two = "\n".join([x + "." for x in lines[:2]] + lines[2:])
    assert fw(two, line_punct_thr=0.12) == "line_punct_ratio"
    assert fw(two.replace(".", ""), line_punct_thr=0.12, line_punct_exclude_zero=True) is None
    short = [f"short {i}" for i in range(67)] + [long_line + f" {i}." for i in range(33)]
    assert fw("\n".join(short), short_line_thr=0.67) is None  # 0.67
    short[67] = "short 67"
    assert fw("\n".join(short), short_line_thr=0.67) == "short_line_ratio"  # 0.68
    dup = "\n".join(lines + [lines[0]])
    value = len(lines[0]) / (len(dup) - dup.count("\n"))
    assert fw(dup, char_duplicates_ratio=value) is None
    assert fw(dup, char_duplicates_ratio=value - 1e-9) == "char_dup_ratio"
    listy = "\n".join(["one two three"] * 3)  # 2 newlines / 9 words
    assert fw(listy, new_line_ratio=2 / 9) is None
    assert fw(listy, new_line_ratio=2 / 9 - 1e-9) == "list_ratio"
    assert fw("\n \n") == "empty"
    assert FineWebQualityConfig().char_duplicates_ratio == 0.01  # datatrove's default, not the paper's 0.1


# --------------------------------------------------------------------------- chain, modes, domains, counters


def batch(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"id": [r[0] for r in rows], "domain": [r[1] for r in rows], "text": [r[2] for r in rows]})


GOOD = "\n".join(f"{SENT[:-1]} with the number {i} and the rest of it, to be sure." for i in range(8))
SHORT = "The cat and the dog."


def test_chain_first_reason_wins_and_existing_reasons_stay():
    cfg = FiltersConfig(gopher_quality={"enabled": True}, c4_quality={"enabled": True})
    chain = build_chain(cfg, WordCountFilterConfig(min_words=3))
    b = batch([("a", "web", GOOD), ("b", "web", SHORT), ("c", "web", "one two"), ("d", "web", GOOD)])
    b = b.append_column("drop_reason", pa.array([None, None, None, "earlier_stage"], pa.string()))
    out = chain.apply(b)
    assert out.column("drop_reason").to_pylist() == [None, "gopher_quality.short_doc", "word_count_below_min",
                                                     "earlier_stage"]
    assert "5 words < 50" in out.column("drop_detail").to_pylist()[1]
    assert chain.names == ["word_count", "gopher_quality", "c4_quality"]


def test_annotate_mode_removes_nothing_and_adds_scores():
    cfg = FiltersConfig(gopher_quality={"enabled": True, "mode": "annotate"},
                        fineweb_quality={"enabled": True, "mode": "annotate"})
    chain = build_chain(cfg)
    out = chain.apply(batch([("a", "web", GOOD), ("b", "web", SHORT)]))
    assert out.column("drop_reason").to_pylist() == [None, None]
    assert out.column("gopher_quality.n_words").to_pylist()[1] == 5
    assert out.column("gopher_quality.reason").to_pylist() == [None, "gopher_quality.short_doc"]
    assert out.column("gopher_quality.mean_word_length").to_pylist()[1] == pytest.approx(3.0)
    assert "fineweb_quality.line_punct_ratio" in out.column_names
    assert chain.report.to_dict()["would_remove"]["gopher_quality.short_doc"] == {"web": 1}
    assert chain.report.to_dict()["removed"] == {}


def test_domains_skip_and_override():
    cfg = FiltersConfig(gopher_quality={"enabled": True, "skip_domains": ["code"],
                                        "domains": {"notes": {"min_doc_words": 5}, "draft": {"mode": "annotate"}}})
    out = build_chain(cfg).apply(batch([("a", "code", SHORT), ("b", "notes", SHORT), ("c", "web", SHORT),
                                        ("d", "draft", SHORT)]))
    assert out.column("drop_reason").to_pylist() == [None, None, "gopher_quality.short_doc", None]
    assert out.column("gopher_quality.reason").to_pylist() == [None, None, None, "gopher_quality.short_doc"]
    with pytest.raises(ValueError, match="domains.x"):
        GopherQualityConfig(domains={"x": {"min_doc_wordz": 3}})


def test_c4_rewrites_text_in_chain_and_counts_lines():
    text = GOOD + "\nPlease enable javascript in your browser now.\nno punctuation"
    cfg = FiltersConfig(c4_quality={"enabled": True})
    chain = build_chain(cfg, None)
    out = chain.apply(batch([("a", "web", text), ("b", "web", SHORT)]))
    assert out.column("text").to_pylist()[0] == GOOD
    assert out.column("drop_reason").to_pylist() == [None, "c4_quality.too_few_sentences"]
    rep = chain.report.to_dict()
    assert rep["lines_removed"]["c4_quality.javascript"] == {"web": 1}
    assert rep["lines_removed"]["c4_quality.no_terminal_punct"] == {"web": 1}
    assert rep["examples"]["c4_quality.too_few_sentences"] == ["b"]
    assert rep["docs"] == {"web": 2}


def test_report_counts_per_rule_domain_and_examples():
    cfg = FiltersConfig(gopher_quality={"enabled": True}, examples_per_rule=2)
    chain = build_chain(cfg)
    rows = [(f"s{i}", "web" if i % 2 else "news", SHORT) for i in range(5)] + [("g", "web", GOOD)]
    chain.apply(batch(rows[:3]))
    chain.apply(batch(rows[3:]))
    rep = chain.report.to_dict()
    assert rep["removed"] == {"gopher_quality.short_doc": {"news": 3, "web": 2}}
    assert rep["removed_total"] == {"gopher_quality.short_doc": 5}
    assert rep["examples"]["gopher_quality.short_doc"] == ["s0", "s1"]
    assert rep["docs"] == {"news": 3, "web": 3}


def test_pipeline_config_filters_section_from_yaml():
    cfg = parse_config({"pipeline": {"inputs": [{"path": "x"}], "output_dir": "o", "filters": {
        "word_tokenizer": "fast", "c4_quality": {"enabled": True, "mode": "annotate", "skip_domains": ["code"]},
        "gopher_repetition": {"enabled": True, "top_n_grams": {2: 0.25}}}}}, use_env=False)
    f = cfg.pipeline.filters
    assert f.c4_quality.for_domain("code") is None and f.c4_quality.for_domain("web").mode == "annotate"
    assert f.gopher_repetition.top_n_grams == {2: 0.25}
    assert not PipelineConfig(inputs=[{"path": "x"}], output_dir="o").filters.gopher_quality.enabled


# --------------------------------------------------------------------------- agreement with datatrove


def _sample_corpus(tmp_path) -> list[str]:
    from pipelines.demo_corpus import harvest

    harvest(str(tmp_path / "corpus"), max_bytes_per_domain=120_000)
    texts = [json.loads(line)["text"] for f in sorted((tmp_path / "corpus").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    # shorter documents near the thresholds: runs of paragraphs of the same texts
    for t in texts[:120]:
        parts = t.split("\n\n")
        texts += ["\n\n".join(parts[i:i + 3]) for i in range(0, min(len(parts), 12), 3)]
    hand = [prose(n) for n in (48, 49, 50, 51)] + [GOOD, SHORT, "", "\n\n", "# " * 60, "- item\n" * 30,
                                                    "\n".join([SENT] * 4), "\n".join([SENT] * 5),
                                                    "Lorem ipsum dolor sit amet. " * 10, "{" + GOOD + "}"]
    return texts + hand


def _datatrove_filters(language):
    from datatrove.pipeline.filters import (C4QualityFilter as DC, FineWebQualityFilter as DF,
                                            GopherQualityFilter as DQ, GopherRepetitionFilter as DR)

    return {"gopher_quality": DQ(language=language), "gopher_repetition": DR(language=language),
            "c4_quality": DC(language=language), "fineweb_quality": DF(language=language)}


def _ours():
    return {"gopher_quality": GopherQualityFilter(GopherQualityConfig(enabled=True)),
            "gopher_repetition": GopherRepetitionFilter(GopherRepetitionConfig(enabled=True)),
            "c4_quality": C4QualityFilter(C4QualityConfig(enabled=True)),
            "fineweb_quality": FineWebQualityFilter(FineWebQualityConfig(enabled=True))}


def agreement(texts: list[str], language) -> dict[str, tuple[float, list]]:
    from datatrove.data import Document

    out = {}
    ours = _ours()
    for name, ref in _datatrove_filters(language).items():
        mine, same, diffs = ours[name], 0, []
        for i, text in enumerate(texts):
            doc = Document(text=text, id=str(i))
            verdict = ref.filter(doc)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            res = mine.check(Doc(text, english_words()), mine.cfg, False)
            ok = keep == (res.rule is None) and (keep or mine.rules[res.rule] == reason)
            if keep and ok:  # C4 rewrites kept documents: the text must match too
                ok = (res.text if res.text is not None else text) == doc.text
            same += ok
            if not ok:
                diffs.append((i, reason, res.rule, res.detail))
        out[name] = (same / len(texts), diffs)
    return out


class OurWords:
    """Our tokenizer in datatrove's WordTokenizer shape: compares the rules' logic without spaCy."""

    def __new__(cls):
        from datatrove.utils.word_tokenizers import WordTokenizer

        class _Words(WordTokenizer):
            def word_tokenize(self, text):
                return english_words()(text)

            def sent_tokenize(self, text):
                raise NotImplementedError

            def span_tokenize(self, text):  # sentence spans from our sentencizer emulation
                n = count_sentences(english_words()(text)) if text.strip() else 0
                return [(0, len(text))] * n

        return _Words("en")


@pytest.mark.slow
def test_decisions_agree_with_datatrove_rule_logic(tmp_path):
    """datatrove's filters on our word tokenizer: any disagreement is a difference in a rule."""
    pytest.importorskip("datatrove")
    texts = _sample_corpus(tmp_path)
    assert len(texts) >= 300
    for name, (rate, diffs) in agreement(texts, OurWords()).items():
        assert rate >= 0.99, (name, rate, diffs[:5])


@pytest.mark.slow
def test_decisions_agree_with_datatrove_and_spacy(tmp_path):
    """datatrove exactly as shipped (its English words come from spaCy, which must be installed)."""
    pytest.importorskip("datatrove")
    spacy = pytest.importorskip("spacy")
    texts = _sample_corpus(tmp_path)
    tok = spacy.blank("en").tokenizer
    same_words = sum(english_words()(t) == [w.text.strip() for w in tok(t) if w.text.strip()] for t in texts)
    assert same_words / len(texts) >= 0.99
    for name, (rate, diffs) in agreement(texts, "en").items():
        assert rate >= 0.99, (name, rate, diffs[:5])
