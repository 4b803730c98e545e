"""The demo corpus is harvested from this very environment, so the tests check properties
(fields, caps, determinism, duplicates) rather than exact contents."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from infra.contracts import DOCUMENT_SCHEMA
from pipelines.demo_corpus import (
    DOMAINS,
    code_candidates,
    harvest,
    harvest_domain,
    installed_distributions,
    is_license_file,
)
from pipelines.synthetic import jaccard, word_shingles

CAP = 300_000
DOCUMENT_FIELDS = ("id", "domain", "text", "source", "meta")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    stats = harvest(output_dir, max_bytes_per_domain=CAP)
    records = {domain: read_jsonl(output_dir / f"{domain}.jsonl") for domain in DOMAINS}
    return output_dir, stats, records


def test_four_domains_each_non_empty(harvested):
    output_dir, stats, records = harvested
    assert set(stats) == set(DOMAINS) == {"code", "reference", "readme", "license"}
    for domain in DOMAINS:
        assert stats[domain]["path"] == str(output_dir / f"{domain}.jsonl")
        assert stats[domain]["docs"] == len(records[domain]) > 0
        assert stats[domain]["bytes"] == sum(len(r["text"].encode()) for r in records[domain])


def test_byte_cap_is_respected_within_one_document(harvested):
    _, stats, records = harvested
    for domain in DOMAINS:
        last_doc_bytes = len(records[domain][-1]["text"].encode())
        assert stats[domain]["bytes"] - last_doc_bytes < CAP, domain


def test_tiny_cap_keeps_exactly_one_document_per_domain(tmp_path):
    stats = harvest(tmp_path, max_bytes_per_domain=1)
    assert {domain: s["docs"] for domain, s in stats.items()} == {domain: 1 for domain in DOMAINS}


def test_two_harvests_write_identical_files(harvested, tmp_path):
    output_dir, stats, _ = harvested
    again = harvest(tmp_path, max_bytes_per_domain=CAP)
    for domain in DOMAINS:
        assert Path(again[domain]["path"]).read_bytes() == (output_dir / f"{domain}.jsonl").read_bytes()
        assert {k: v for k, v in again[domain].items() if k != "path"} == {
            k: v for k, v in stats[domain].items() if k != "path"
        }


def test_records_are_documents_with_unique_ids(harvested):
    _, _, records = harvested
    everything = [r for domain in DOMAINS for r in records[domain]]
    ids = [r["id"] for r in everything]
    assert len(set(ids)) == len(ids)
    for domain in DOMAINS:
        for r in records[domain]:
            assert set(r) == set(DOCUMENT_FIELDS)
            assert all(isinstance(r[f], str) for f in DOCUMENT_FIELDS)
            assert r["domain"] == domain and r["id"].startswith(f"{domain}/") and r["text"].strip()
            json.loads(r["meta"])
    table = pa.Table.from_pylist(everything, schema=DOCUMENT_SCHEMA)
    assert table.num_rows == len(everything)


def test_sources_say_where_each_text_came_from(harvested):
    _, _, records = harvested
    for r in records["code"]:
        path = Path(r["source"])
        assert path.suffix == ".py" and path.read_bytes().decode("utf-8") == r["text"]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(path.parts)
    assert all(r["source"].startswith("pydoc_data.topics#") for r in records["reference"])
    for r in records["license"]:
        assert Path(r["source"]).read_bytes().decode("utf-8") == r["text"]


def test_license_domain_holds_near_duplicates(harvested):
    _, _, records = harvested
    texts = [r["text"] for r in records["license"]]
    exact_copies = sum(n - 1 for n in Counter(texts).values())
    shingles = [word_shingles(t) for t in texts]
    near_pairs = sum(
        1 for i in range(len(texts)) for j in range(i + 1, len(texts)) if jaccard(shingles[i], shingles[j]) >= 0.7
    )
    assert exact_copies + near_pairs >= 1


def test_code_skips_tests_site_packages_and_undecodable_files(tmp_path):
    stdlib = tmp_path / "stdlib"
    for relative, content in {
        "a.py": b"x = 1\n",
        "pkg/b.py": b"y = 2\n",
        "pkg/tests/test_b.py": b"assert True\n",
        "test/test_a.py": b"assert True\n",
        "site-packages/dep.py": b"z = 3\n",
        "latin1.py": "caf\u00e9 = 1\n".encode("latin-1"),
        "empty.py": b"",
        "notes.txt": b"not python\n",
    }.items():
        (stdlib / relative).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / relative).write_bytes(content)
    stats = harvest_domain("code", code_candidates(stdlib), tmp_path / "code.jsonl")
    records = read_jsonl(tmp_path / "code.jsonl")
    assert [json.loads(r["meta"])["relpath"] for r in records] == ["a.py", "pkg/b.py"]
    assert stats["skipped"] == {"empty": 1, "undecodable": 1}
    assert stats["docs"] == 2 and stats["bytes"] == len(b"x = 1\ny = 2\n")


def test_license_file_selection():
    assert is_license_file("foo-1.0.dist-info/LICENSE")
    assert is_license_file("foo-1.0.dist-info/COPYING.txt")
    assert is_license_file("foo-1.0.dist-info/licenses/vendor/bar/NOTICE")
    assert is_license_file("foo/_vendor/bar-2.0.dist-info/LICENCE")
    assert not is_license_file("foo-1.0.dist-info/METADATA")
    assert not is_license_file("foo/LICENSE")


def test_own_distribution_is_not_harvested():
    assert "maskmix" not in {name for name, _ in installed_distributions()}


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown domain"):
        harvest(tmp_path, domains=("code", "poetry"))


def test_cli_prints_the_stats(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.demo_corpus", str(tmp_path), "--max-bytes", "2000", "--domains", "reference"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    stats = json.loads(result.stdout)
    assert list(stats) == ["reference"] and stats["reference"]["docs"] >= 1
    assert (tmp_path / "reference.jsonl").exists()
