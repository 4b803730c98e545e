"""Readers (JSONL plain/.gz/.zst, Parquet, text folders, HF save_to_disk; local and s3://), quarantine of
bad records and files, normalization and language id."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from pydantic import ValidationError

from infra.config import InputSpec, NormalizeConfig, PipelineConfig
from infra.contracts import DOCUMENT_LANGUAGE_FIELDS, DOCUMENT_SCHEMA, QUARANTINE_SCHEMA
from infra.storage import Storage, join
from pipelines.normalize import (
    identify_language, normalize_batch, normalize_text, normalize_unicode, normalize_whitespace, strip_control_chars,
)
from pipelines.readers import input_items, parse_file

DOMAIN = "rt"

# --------------------------------------------------------------------------- helpers


def _records(n: int = 40) -> list[dict]:
    """Records whose id is what a text folder derives ("<domain>/<relative path>"), so every format,
    text included, must give back exactly these Documents."""
    texts = ["Plain ASCII line.", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001F600",
             "two\nlines\n\n  indented", "tabs\tand \"quotes\" and \\backslashes\\"]
    return [{"id": f"{DOMAIN}/docs/{i // 10}/{i:04d}.txt", "text": f"{texts[i % len(texts)]} #{i}",
             "domain": DOMAIN, "score": i * 0.5} for i in range(n)]


def _jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_jsonl(records: list[dict], path: Path) -> Path:
    data = _jsonl_bytes(records)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_parquet(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=7)
    return path


def write_text_folder(records: list[dict], folder: Path) -> Path:
    for r in records:
        domain, rel = r["id"].split("/", 1)
        assert domain == DOMAIN
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(r["text"].encode())
    return folder


def write_hf(records: list[dict], folder: Path, splits: bool = False) -> Path:
    import datasets

    datasets.disable_progress_bars()
    if splits:
        half = len(records) // 2
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:half]),
                              "test": datasets.Dataset.from_list(records[half:])}).save_to_disk(str(folder))
    else:  # several Arrow shards, so the reader walks state.json's file list
        datasets.Dataset.from_list(records).save_to_disk(str(folder), num_shards=3)
    return folder


def upload(local: Path, uri: str, storage: Storage) -> str:
    """Copy a file or a folder tree to ``uri`` byte for byte; returns ``uri``.

    Not Storage.write_bytes: pyarrow's open_output_stream compresses by suffix unless told not to,
    so a .gz written through it lands on S3 gzipped twice.
    """
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        fs, path = storage.filesystem(uri if local.is_file() else join(uri, f.relative_to(local).as_posix()))
        with fs.open_output_stream(path, compression=None) as out:
            out.write(f.read_bytes())
    return uri


def read_rows(specs: list[InputSpec], storage_cfg=None, items: list[dict] | None = None) -> tuple[list, list]:
    """What the pipeline's read does per file, without Ray: (documents, quarantined rows)."""
    items = input_items(specs, Storage(storage_cfg)) if items is None else items
    rows = [row for item in items for row in parse_file(item, specs, storage_cfg)]
    return [r for r in rows if r["reason"] is None], [r for r in rows if r["reason"] is not None]


def _key(docs: list[dict], meta: bool = False) -> list[tuple]:
    return sorted((d["id"], d["domain"], d["text"]) + ((d["meta"],) if meta else ()) for d in docs)


def _expected(records: list[dict], meta: bool = False) -> list[tuple]:
    return sorted((r["id"], r["domain"], r["text"]) + ((json.dumps({"score": r["score"]}),) if meta else ())
                  for r in records)


# --------------------------------------------------------------------------- round trips


def _write_every_format(records: list[dict], root: Path) -> dict[str, InputSpec]:
    """The same records in every format; the InputSpec that reads each back."""
    return {
        "jsonl": InputSpec(path=str(write_jsonl(records, root / "plain" / "a.jsonl"))),
        "jsonl.gz": InputSpec(path=str(write_jsonl(records, root / "gz" / "a.jsonl.gz"))),
        "jsonl.zst": InputSpec(path=str(write_jsonl(records, root / "zst" / "a.jsonl.zst"))),
        "parquet": InputSpec(path=str(write_parquet(records, root / "pq" / "a.parquet"))),
        "text": InputSpec(path=str(write_text_folder(records, root / "text")), format="text", domain=DOMAIN),
        "hf": InputSpec(path=str(write_hf(records, root / "hf"))),
        "hf_splits": InputSpec(path=str(write_hf(records, root / "hf_dict", splits=True)), format="hf"),
    }


def test_every_format_round_trips_to_identical_documents(tmp_path):
    records = _records()
    specs = _write_every_format(records, tmp_path)
    for name, spec in specs.items():
        docs, bad = read_rows([spec])
        assert bad == [], name
        assert _key(docs) == _expected(records), name
        if name != "text":  # extra fields ride along as meta (a text file has none)
            assert _key(docs, meta=True) == _expected(records, meta=True), name
        assert len({d["source"] for d in docs}) == len(records), name


def test_sources_name_file_and_position(tmp_path):
    records = _records(12)
    specs = _write_every_format(records, tmp_path)
    docs, _ = read_rows([specs["jsonl.gz"]])
    assert [d["source"] for d in docs] == [f"{specs['jsonl.gz'].path}#L{i}" for i in range(1, 13)]
    docs, _ = read_rows([specs["parquet"]])
    assert [d["source"] for d in docs] == [f"{specs['parquet'].path}#row{i}" for i in range(12)]
    docs, _ = read_rows([specs["hf"]])
    assert all(".arrow#row" in d["source"] and d["source"].startswith(specs["hf"].path) for d in docs)
    assert [d["id"] for d in docs] == [r["id"] for r in records]  # dataset order is kept across shards
    docs, _ = read_rows([specs["text"]])
    assert {d["source"] for d in docs} == {str(tmp_path / "text" / r["id"].split("/", 1)[1]) for r in records}


def test_derived_ids_are_stable_and_unique(tmp_path):
    records = [{"text": f"document number {i}"} for i in range(50)]
    write_jsonl(records[:25], tmp_path / "in" / "a.jsonl.zst")
    write_parquet(records[25:], tmp_path / "in" / "b.parquet")
    spec = InputSpec(path=str(tmp_path / "in"), domain="web")
    first, _ = read_rows([spec])
    second, _ = read_rows([spec])
    assert [d["id"] for d in first] == [d["id"] for d in second]
    assert len({d["id"] for d in first}) == 50
    # a text folder's ids do not depend on where the folder lives
    write_text_folder(_records(5), tmp_path / "t1")
    write_text_folder(_records(5), tmp_path / "elsewhere" / "t2")
    a, _ = read_rows([InputSpec(path=str(tmp_path / "t1"), format="text", domain=DOMAIN)])
    b, _ = read_rows([InputSpec(path=str(tmp_path / "elsewhere" / "t2"), format="text", domain=DOMAIN)])
    assert _key(a) == _key(b)


def test_relative_input_path_gives_the_same_text_ids(tmp_path, monkeypatch):
    write_text_folder(_records(3), tmp_path / "t")
    monkeypatch.chdir(tmp_path)
    docs, _ = read_rows([InputSpec(path="t", format="text", domain=DOMAIN)])
    assert _key(docs) == _expected(_records(3))
    single, _ = read_rows([InputSpec(path="t/docs/0/0001.txt", format="text", domain=DOMAIN)])
    assert [d["id"] for d in single] == [f"{DOMAIN}/0001.txt"]


def test_domain_from_config_or_from_a_field(tmp_path):
    write_jsonl([{"id": "a", "text": "x y", "domain": "web"}, {"id": "b", "text": "x z", "domain": "code"},
                 {"id": "c", "text": "no domain here"}], tmp_path / "d.jsonl")
    docs, bad = read_rows([InputSpec(path=str(tmp_path / "d.jsonl"))])
    assert {d["id"]: d["domain"] for d in docs} == {"a": "web", "b": "code"}
    assert [(b["reason"], b["source"]) for b in bad] == [("missing_domain", f"{tmp_path / 'd.jsonl'}#L3")]
    docs, bad = read_rows([InputSpec(path=str(tmp_path / "d.jsonl"), domain="fixed")])
    assert {d["domain"] for d in docs} == {"fixed"} and len(docs) == 3 and not bad
    write_jsonl([{"id": "a", "body": "t", "kind": "books"}], tmp_path / "f.jsonl")
    docs, _ = read_rows([InputSpec(path=str(tmp_path / "f.jsonl"), text_field="body", domain_field="kind")])
    assert (docs[0]["domain"], docs[0]["text"]) == ("books", "t")
    with pytest.raises(ValidationError, match="domain"):
        InputSpec(path=str(tmp_path), format="text")


# --------------------------------------------------------------------------- quarantine


def _hostile_corpus(root: Path, seed: int = 0) -> dict:
    """~1,000 JSONL records with every kind of bad one mixed in, plus bad Parquet rows, bad text files,
    a truncated .gz and a corrupt Parquet file. Returns what a correct reader must find."""
    rng = random.Random(seed)
    limit = 4096
    good_ids: set[str] = set()
    bad: dict[str, str] = {}  # source -> reason

    def line_for(kind: str, i: int) -> bytes:
        rec = {"id": f"j{i}", "domain": "web", "text": f"good text {i}"}
        return {
            "good": lambda: json.dumps(rec).encode(),
            "invalid_json": lambda: b'{"id": "j%d", "text": ' % i,
            "invalid_utf8": lambda: b'{"id": "j%d", "domain": "web", "text": "caf\xe9 \xff"}' % i,
            "missing_text": lambda: json.dumps({"id": f"j{i}", "domain": "web"}).encode(),
            "text_not_string": lambda: json.dumps(dict(rec, text=["a", "list"])).encode(),
            "not_an_object": lambda: b"[1, 2, 3]",
            "empty_text": lambda: json.dumps(dict(rec, text="  \n ")).encode(),
            "too_large": lambda: json.dumps(dict(rec, text="x" * (limit + 10))).encode(),
        }[kind]()

    kinds = ["invalid_json", "invalid_utf8", "missing_text", "text_not_string", "not_an_object", "empty_text",
             "too_large"]
    i = 0
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        lines = []
        for line_no in range(1, 331):
            kind = "good" if rng.random() < 0.7 else rng.choice(kinds)
            lines.append(line_for(kind, i))
            source = f"{root / name}#L{line_no}"
            if kind == "good":
                good_ids.add(f"j{i}")
            else:
                bad[source] = kind
            i += 1
        data = b"\n".join(lines) + b"\n"
        data = gzip.compress(data) if name.endswith(".gz") else data
        data = zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else data
        (root / name).write_bytes(data)
    # Parquet: a null text and an oversized one among good rows.
    texts = [f"parquet text {k}" for k in range(30)]
    texts[4], texts[9] = None, "y" * (limit + 1)
    pq.write_table(pa.table({"id": [f"p{k}" for k in range(30)], "text": texts, "domain": ["web"] * 30}),
                   root / "d.parquet", row_group_size=8)
    good_ids |= {f"p{k}" for k in range(30) if k not in (4, 9)}
    bad[f"{root / 'd.parquet'}#row4"], bad[f"{root / 'd.parquet'}#row9"] = "missing_text", "too_large"
    # A Parquet file whose footer is garbage, a .gz cut in half.
    (root / "e.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    bad[str(root / "e.parquet")] = "corrupt_file"
    truncated = gzip.compress(_jsonl_bytes([{"id": f"t{k}", "domain": "web", "text": f"truncated record {k} " * 20}
                                            for k in range(200)]))
    (root / "f.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    return {"good_ids": good_ids, "bad": bad, "limit": limit, "truncated": str(root / "f.jsonl.gz")}


def _hostile_text_folder(folder: Path, limit: int) -> dict:
    folder.mkdir(parents=True)
    for k in range(20):
        (folder / f"ok{k}.txt").write_text(f"a good text file {k}", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (folder / "big.txt").write_bytes(b"z" * (limit + 1))
    (folder / "blank.txt").write_bytes(b" \n\t\n")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 header")
    return {"good_ids": {f"books/ok{k}.txt" for k in range(20)},
            "bad": {str(folder / "latin1.txt"): "invalid_utf8", str(folder / "big.txt"): "too_large",
                    str(folder / "blank.txt"): "empty_text", str(folder / "binary.txt"): "nul_byte"}}


def _check_hostile(docs: list[dict], bad_rows: list[dict], corpus: dict, text: dict) -> None:
    ids = {d["id"] for d in docs}
    truncated = sorted((d for d in docs if d["source"].startswith(corpus["truncated"])),
                       key=lambda d: int(d["source"].rsplit("#L", 1)[1]))
    recovered = len(truncated)
    # the truncated .gz: every line before the cut is kept in order, the cut is quarantined where it is
    assert 0 < recovered < 200
    assert [d["id"] for d in truncated] == [f"t{k}" for k in range(recovered)]
    expected_bad = {**corpus["bad"], **text["bad"], f"{corpus['truncated']}#L{recovered + 1}": "corrupt_file"}
    assert ids == corpus["good_ids"] | text["good_ids"] | {d["id"] for d in truncated}  # no good record lost
    got_bad = {r["source"]: r["reason"] for r in bad_rows}
    assert len(got_bad) == len(bad_rows)  # one row per bad record
    assert got_bad == expected_bad
    assert all(r["raw"] is not None and len(r["raw"]) <= 2000 for r in bad_rows)


def test_bad_records_and_files_are_quarantined_and_nothing_good_is_lost(tmp_path):
    (tmp_path / "in").mkdir()
    corpus = _hostile_corpus(tmp_path / "in")
    text = _hostile_text_folder(tmp_path / "text", corpus["limit"])
    specs = [InputSpec(path=str(tmp_path / "in"), max_doc_bytes=corpus["limit"]),
             InputSpec(path=str(tmp_path / "text"), format="text", domain="books", max_doc_bytes=corpus["limit"])]
    docs, bad_rows = read_rows(specs)
    assert len(docs) + len(bad_rows) > 1000
    _check_hostile(docs, bad_rows, corpus, text)


def test_unreadable_files_are_quarantined(tmp_path):
    write_jsonl(_records(3), tmp_path / "in" / "a.jsonl")
    write_jsonl(_records(3), tmp_path / "in" / "gone.jsonl.gz")
    write_parquet(_records(3), tmp_path / "in" / "gone.parquet")
    write_text_folder(_records(3), tmp_path / "text")
    specs = [InputSpec(path=str(tmp_path / "in")), InputSpec(path=str(tmp_path / "text"), format="text",
                                                              domain=DOMAIN)]
    items = input_items(specs, Storage())
    # files that vanish (or turn into folders) between listing and reading
    (tmp_path / "in" / "gone.jsonl.gz").unlink()
    (tmp_path / "in" / "gone.parquet").unlink()
    victim = tmp_path / "text" / "docs" / "0" / "0001.txt"
    victim.unlink()
    victim.mkdir()
    docs, bad = read_rows(specs, items=items)
    assert {(r["source"], r["reason"]) for r in bad} == {
        (str(tmp_path / "in" / "gone.jsonl.gz"), "unreadable_file"),
        (str(tmp_path / "in" / "gone.parquet"), "unreadable_file"), (str(victim), "unreadable_file")}
    assert all("Error" in r["raw"] for r in bad)
    assert len(docs) == 3 + 2


def test_broken_hf_folder_is_quarantined_and_its_arrow_files_still_read(tmp_path):
    records = _records(12)
    folder = write_hf(records, tmp_path / "hf")
    (folder / "state.json").write_text("{not json")
    arrow = sorted(folder.glob("*.arrow"))
    arrow[-1].write_bytes(arrow[-1].read_bytes()[:-50])  # the last shard cut short
    docs, bad = read_rows([InputSpec(path=str(folder))])
    reasons = {(r["source"].rsplit("/", 1)[1], r["reason"]) for r in bad}
    assert ("state.json", "unreadable_file") in reasons
    assert len(bad) == 2 and {r for _, r in reasons} == {"unreadable_file", "corrupt_file"}
    assert {d["id"] for d in docs} < {r["id"] for r in records} and len(docs) >= 8  # the first two shards


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_quarantined(tmp_path):
    path = write_jsonl(_records(2), tmp_path / "secret.jsonl")
    path.chmod(0)
    try:
        docs, bad = read_rows([InputSpec(path=str(path))])
    finally:
        path.chmod(0o644)
    assert docs == [] and [(r["source"], r["reason"]) for r in bad] == [(str(path), "unreadable_file")]


def test_an_endless_line_is_skipped_without_holding_it(tmp_path):
    lines = [b'{"text": "before", "id": "1"}', b'{"text": "' + b"w" * (3 << 20) + b'"}',
             b'{"text": "after", "id": "3"}']
    write_jsonl([], tmp_path / "x.jsonl").write_bytes(b"\n".join(lines))
    docs, bad = read_rows([InputSpec(path=str(tmp_path / "x.jsonl"), domain="d", max_doc_bytes=1000)])
    assert [d["id"] for d in docs] == ["1", "3"]
    assert [(r["source"].rsplit("#", 1)[1], r["reason"]) for r in bad] == [("L2", "too_large")]
    assert bad[0]["raw"].startswith('{"text": "www')


def test_binary_text_column_is_decoded_or_quarantined(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "text": pa.array([b"caf\xc3\xa9", b"caf\xe9"], pa.binary())}),
                   tmp_path / "b.parquet")
    docs, bad = read_rows([InputSpec(path=str(tmp_path / "b.parquet"), domain="d")])
    assert [(d["id"], d["text"]) for d in docs] == [("a", "caf\u00e9")]
    assert [r["reason"] for r in bad] == ["invalid_utf8"]


@pytest.mark.slow
def test_pipeline_read_quarantines_the_hostile_corpus_on_ray(tmp_path, ray_session):
    from pipelines.run import CorpusPipeline

    (tmp_path / "in").mkdir()
    corpus = _hostile_corpus(tmp_path / "in", seed=1)
    text = _hostile_text_folder(tmp_path / "text", corpus["limit"])
    cfg = PipelineConfig(inputs=[
        InputSpec(path=str(tmp_path / "in"), max_doc_bytes=corpus["limit"]),
        InputSpec(path=str(tmp_path / "text"), format="text", domain="books", max_doc_bytes=corpus["limit"]),
    ], output_dir=str(tmp_path / "out"))
    pipeline = CorpusPipeline(cfg, progress=lambda m: None)
    docs = pipeline.read().take_all()
    quarantine = pq.read_table(tmp_path / "out" / "quarantine" / "quarantine.parquet")
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    _check_hostile(docs, quarantine.to_pylist(), corpus, text)
    read = next(s for s in pipeline.stages if s.name == "read")
    by_reason: dict[str, int] = {}
    for reason in quarantine.column("reason").to_pylist():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert read.removed == by_reason and read.docs_out == len(docs)
    assert set(docs[0]) == set(DOCUMENT_SCHEMA.names)


# --------------------------------------------------------------------------- s3://


@pytest.mark.s3
@pytest.mark.slow
def test_every_format_reads_from_s3(tmp_path, s3_bucket):
    base, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    records = _records(25)
    local = _write_every_format(records, tmp_path)
    for name, spec in local.items():
        uri = upload(Path(spec.path), join(base, "in", name, Path(spec.path).name), storage)
        s3_spec = spec.model_copy(update={"path": uri})
        docs, bad = read_rows([s3_spec], storage_cfg)
        assert bad == [], name
        assert _key(docs) == _expected(records), name
        assert all(d["source"].startswith(uri) for d in docs), name


@pytest.mark.s3
@pytest.mark.slow
def test_s3_bad_files_are_quarantined_with_s3_sources(tmp_path, s3_bucket):
    base, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    (tmp_path / "in").mkdir()
    corpus = _hostile_corpus(tmp_path / "in", seed=2)
    uri = upload(tmp_path / "in", join(base, "hostile"), storage)
    docs, bad = read_rows([InputSpec(path=uri, max_doc_bytes=corpus["limit"])], storage_cfg)
    local_prefix = str(tmp_path / "in")
    got = {r["source"].replace(uri, local_prefix): r["reason"] for r in bad}
    assert {k: v for k, v in got.items() if not k.startswith(corpus["truncated"])} == corpus["bad"]
    assert corpus["good_ids"] <= {d["id"] for d in docs}
    # a file listed but gone by the time it is read
    items = input_items([InputSpec(path=uri)], storage)
    storage.s3_filesystem().delete_file(items[0]["path"][len("s3://"):])
    _, bad = read_rows([InputSpec(path=uri)], storage_cfg, items=items[:1])
    assert [(r["source"], r["reason"]) for r in bad] == [(items[0]["path"], "unreadable_file")]


@pytest.mark.s3
@pytest.mark.slow
def test_pipeline_reads_and_writes_s3(tmp_path, s3_bucket, ray_session):
    from pipelines.run import CorpusPipeline

    base, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    records = _records(20)
    jsonl = upload(write_jsonl(records[:10] + [{"id": "broken"}], tmp_path / "a.jsonl.gz"),
                   join(base, "in", "a.jsonl.gz"), storage)
    text = upload(write_text_folder(records[10:], tmp_path / "text"), join(base, "text"), storage)
    cfg = PipelineConfig(inputs=[InputSpec(path=jsonl), InputSpec(path=text, format="text", domain=DOMAIN)],
                         output_dir=join(base, "out"))
    pipeline = CorpusPipeline(cfg, storage_cfg, progress=lambda m: None)
    docs = pipeline.normalize(pipeline.read()).take_all()
    assert _key(docs) == _expected(records)
    assert all(isinstance(d["language"], str) and isinstance(d["language_score"], float) for d in docs)
    quarantine = pq.read_table(pa.BufferReader(storage.read_bytes(join(base, "out", "quarantine",
                                                                       "quarantine.parquet"))))
    assert quarantine.to_pylist() == [{"source": f"{jsonl}#L11", "reason": "missing_text",
                                       "raw": '{"id": "broken"}'}]


# --------------------------------------------------------------------------- normalization


def test_unicode_forms():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    assert normalize_unicode(decomposed, "NFC") == composed == normalize_unicode(composed, "NFC")
    assert normalize_unicode("\ufb01ne \u2460", "NFKC") == "fine 1"  # ligature and circled digit folded
    assert normalize_unicode("\ufb01ne", "NFC") == "\ufb01ne"
    assert normalize_unicode(decomposed, "none") == decomposed
    assert normalize_text(decomposed, NormalizeConfig(unicode_form="none")) == decomposed


def test_control_characters_go_tabs_and_newlines_stay():
    assert strip_control_chars("a\x00b\x07c\x1bd\x7fe\x85f\x9fg\th\ni") == "abcdefg\th\ni"
    assert normalize_text("bell\x07 and\x0c feed", NormalizeConfig()) == "bell and feed"
    assert normalize_text("bell\x07", NormalizeConfig(strip_control_chars=False)) == "bell\x07"


def test_whitespace_normalization():
    cfg = NormalizeConfig()
    assert normalize_text("a\u00a0b\u2003c\u3000d", cfg) == "a b c d"  # no-break, em, ideographic spaces
    assert normalize_text("line\u2028next\u2029para\r\nwin\rmac", cfg) == "line\nnext\npara\nwin\nmac"
    assert normalize_text("zero\u200bwidth\ufeff", cfg) == "zerowidth"
    assert normalize_text("\U0001F468\u200d\U0001F469 \u0646\u200c\u0645", cfg) == \
        "\U0001F468\u200d\U0001F469 \u0646\u200c\u0645"  # ZWJ / ZWNJ carry meaning
    assert normalize_text("x  \t\ny   \n", cfg) == "x\ny"  # trailing spaces cut ...
    assert normalize_text("def f():\n    return  1", cfg) == "def f():\n    return  1"  # ... indentation kept
    assert normalize_whitespace("a" + "\n" * 9 + "b", max_blank_lines=2) == "a\n\n\nb"
    assert normalize_whitespace("a\n\n\nb", max_blank_lines=2) == "a\n\n\nb"  # two blank lines (PEP 8) survive
    assert normalize_whitespace("a\n\n\nb", max_blank_lines=0) == "a\nb"
    assert normalize_text("a\u00a0b", NormalizeConfig(normalize_whitespace=False)) == "a\u00a0b"


SENTENCES = {
    "en": "The committee will publish its final report on the economy next week, after the elections.",
    "fr": "Le comité publiera son rapport final sur l'économie la semaine prochaine, après les élections.",
    "de": "Der Ausschuss wird seinen Abschlussbericht über die Wirtschaft nächste Woche veröffentlichen.",
    "es": "El comité publicará su informe final sobre la economía la próxima semana, después de las elecciones.",
}


def test_language_identification():
    for lang, sentence in SENTENCES.items():
        found, score = identify_language(sentence)
        assert found == lang, sentence
        assert 0.5 < score <= 1.0
    assert identify_language("ok 123") == ("und", 0.0)
    assert identify_language("1234567890 " * 10) == ("und", 0.0)  # no letters, no language


def test_normalize_batch_records_language_columns():
    table = pa.Table.from_pylist(
        [{"id": lang, "domain": "d", "text": f"  {s}\x07 ", "source": "s", "meta": None}
         for lang, s in SENTENCES.items()] + [{"id": "short", "domain": "d", "text": "hi", "source": "s",
                                               "meta": None}], schema=DOCUMENT_SCHEMA)
    out = normalize_batch(table, NormalizeConfig())
    assert out.column_names == DOCUMENT_SCHEMA.names + DOCUMENT_LANGUAGE_FIELDS.names
    for field in DOCUMENT_LANGUAGE_FIELDS:
        assert out.schema.field(field.name).type == field.type
    rows = {r["id"]: r for r in out.to_pylist()}
    assert {k: r["language"] for k, r in rows.items()} == {"en": "en", "fr": "fr", "de": "de", "es": "es",
                                                           "short": "und"}
    assert rows["short"]["language_score"] == 0.0
    assert rows["en"]["text"] == SENTENCES["en"]
    again = normalize_batch(out, NormalizeConfig())  # idempotent, no duplicated columns
    assert again.column_names == out.column_names and again.column("text") == out.column("text")
    off = normalize_batch(table, NormalizeConfig(language_id=False))
    assert off.column_names == DOCUMENT_SCHEMA.names
    assert normalize_batch(table.slice(0, 0), NormalizeConfig()).column_names == out.column_names
