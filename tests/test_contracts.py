"""infra.contracts: the artifacts between stages round-trip, hash stably and refuse to load broken."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from infra.contracts import (DOCUMENT_SCHEMA, QUARANTINE_SCHEMA, SHARD_SCHEMA, DomainShards, Manifest, Mixture,
                             ShardInfo, StageStats, TokenizerInfo, TrainerState, artifact_sha256, check_table_schema,
                             dump_artifact, load_manifest, load_mixture, load_trainer_state, parse_artifact,
                             sha256_bytes, write_artifact)
from infra.errors import ContractError
from infra.storage import Storage, join


def make_manifest() -> Manifest:
    def shard(domain, split, i, rows, tokens):
        return ShardInfo(path=f"shards/{domain}/part-{i:05d}.parquet", split=split, rows=rows, tokens=tokens,
                         bytes=1000 + rows, text_bytes=4 * tokens, sha256=f"{domain}{i}".ljust(64, "0"))

    return Manifest(
        created_at=1700000000.5,
        config_hash="0123456789abcdef",
        mlflow_run_id="run123",
        tokenizer=TokenizerInfo(path="tokenizer.json", sha256="ab" * 32, vocab_size=4096,
                                special_ids={"pad": 0, "mask": 1, "bos": 2, "eos": 3}),
        domains={
            "web": DomainShards(shards=[shard("web", "train", 0, 10, 1200), shard("web", "train", 1, 5, 600),
                                        shard("web", "validation", 2, 2, 90)]),
            "code": DomainShards(shards=[shard("code", "train", 0, 7, 3000)]),
        },
        stages=[StageStats(name="exact_dedup", docs_in=30, docs_out=26, removed={"duplicate": 4},
                           extra={"clusters": 3})],
    )


def make_mixture() -> Mixture:
    return Mixture(created_at=1700000001.0, weights={"web": 0.25, "code": 0.75}, method="doremi",
                   reference_weights={"web": 0.5, "code": 0.5}, manifest_sha256="cd" * 32,
                   tokenizer_sha256="ab" * 32, mlflow_run_id="run456", details={"rounds": 3, "eta": 1.0})


def make_state() -> TrainerState:
    return TrainerState(step=120, tokens_seen=120 * 8 * 128,
                        sampler={"cursors": {"web": [3, 17], "code": [0, 4]}, "epochs": {"web": 1, "code": 0}},
                        rng={"python": [3, [1, 2, 3], None], "numpy": {"state": 42}, "torch": "AAEC"},
                        config_hash="fedcba9876543210", manifest_sha256="cd" * 32, mixture_sha256="ef" * 32)


ARTIFACTS = [
    (make_manifest, load_manifest, "manifest.json"),
    (make_mixture, load_mixture, "mixture.json"),
    (make_state, load_trainer_state, "trainer_state.json"),
]


def round_trip(make, load, name, base, storage):
    obj = make()
    uri = join(base, "run", name)
    sha = write_artifact(obj, uri, storage)
    raw = storage.read_bytes(uri)
    assert sha == sha256_bytes(raw) == artifact_sha256(obj)
    back = load(uri, storage)
    assert type(back) is type(obj)
    assert back == obj
    assert back.model_dump() == obj.model_dump()
    assert artifact_sha256(back) == sha
    return back


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make, load, name", ARTIFACTS)
def test_round_trip_local(tmp_path, make, load, name):
    back = round_trip(make, load, name, str(tmp_path), Storage())
    assert back.schema_version == 1
    assert sorted(os.listdir(tmp_path / "run")) == [name]


@pytest.mark.s3
@pytest.mark.parametrize("make, load, name", ARTIFACTS)
def test_round_trip_s3(s3_bucket, make, load, name):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    round_trip(make, load, name, base, storage)
    assert storage.list_files(base) == [f"{base}/run/{name}"]


def test_round_trip_keeps_numbers():
    m = Manifest.model_validate(json.loads(dump_artifact(make_manifest())))
    assert m.domains["web"].tokens("train") == 1800
    assert m.domains["web"].tokens("validation") == 90
    assert m.domains["web"].rows() == 15
    assert m.domains["code"].rows("validation") == 0
    assert [s.path for s in m.domains["web"].split("validation")] == ["shards/web/part-00002.parquet"]
    assert m.domain_names() == ["code", "web"]
    assert m.created_at == 1700000000.5
    assert m.stages[0].removed == {"duplicate": 4}
    mix = Mixture.model_validate(json.loads(dump_artifact(make_mixture())))
    assert mix.weights == {"web": 0.25, "code": 0.75}
    st = TrainerState.model_validate(json.loads(dump_artifact(make_state())))
    assert st.tokens_seen == 122880 and st.sampler["cursors"]["web"] == [3, 17]


def test_dump_is_canonical_and_sha_stable():
    a, b = make_manifest(), make_manifest()
    assert dump_artifact(a) == dump_artifact(b)
    assert artifact_sha256(a) == artifact_sha256(b)
    text = dump_artifact(a).decode()
    assert text.endswith("}\n")
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    # insertion order of dict fields does not change the bytes
    reordered = make_manifest()
    reordered.domains = {"code": a.domains["code"], "web": a.domains["web"]}
    assert artifact_sha256(reordered) == artifact_sha256(a)
    # any value change does
    changed = make_manifest()
    changed.domains["web"].shards[0].tokens += 1
    assert artifact_sha256(changed) != artifact_sha256(a)
    # a reload dumps to the same bytes
    assert dump_artifact(parse_artifact(Manifest, dump_artifact(a), "m")) == dump_artifact(a)


def test_sha256_bytes_known_value():
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_write_overwrites_and_returns_new_sha(tmp_path):
    uri = str(tmp_path / "mixture.json")
    first = write_artifact(make_mixture(), uri)
    mix = make_mixture()
    mix.weights = {"web": 0.5, "code": 0.5}
    second = write_artifact(mix, uri)
    assert first != second
    assert load_mixture(uri).weights == {"web": 0.5, "code": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["mixture.json"]


# --------------------------------------------------------------------------- broken artifacts


def broken(tmp_path, data, name="artifact.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def contract_error(load, uri) -> str:
    with pytest.raises(ContractError) as exc:
        load(uri)
    msg = str(exc.value)
    assert msg.startswith(uri), msg  # every error names the file
    return msg


def manifest_dict() -> dict:
    return json.loads(dump_artifact(make_manifest()))


def mixture_dict() -> dict:
    return json.loads(dump_artifact(make_mixture()))


def state_dict() -> dict:
    return json.loads(dump_artifact(make_state()))


@pytest.mark.parametrize("load, make_dict, field", [
    (load_manifest, manifest_dict, "config_hash"),
    (load_manifest, manifest_dict, "tokenizer"),
    (load_mixture, mixture_dict, "weights"),
    (load_mixture, mixture_dict, "manifest_sha256"),
    (load_trainer_state, state_dict, "tokens_seen"),
    (load_trainer_state, state_dict, "rng"),
])
def test_missing_field_is_named(tmp_path, load, make_dict, field):
    data = make_dict()
    del data[field]
    msg = contract_error(load, broken(tmp_path, data))
    assert f"{field}: Field required" in msg


def test_missing_nested_field_names_its_path(tmp_path):
    data = manifest_dict()
    del data["domains"]["web"]["shards"][1]["sha256"]
    msg = contract_error(load_manifest, broken(tmp_path, data))
    assert "domains.web.shards.1.sha256: Field required" in msg
    assert "invalid Manifest" in msg


def test_wrong_type(tmp_path):
    data = state_dict()
    data["step"] = "one hundred"
    msg = contract_error(load_trainer_state, broken(tmp_path, data))
    assert "step:" in msg and "integer" in msg
    data = manifest_dict()
    data["domains"]["web"]["shards"][0]["rows"] = -1
    assert "domains.web.shards.0.rows" in contract_error(load_manifest, broken(tmp_path, data))


def test_unknown_field(tmp_path):
    data = mixture_dict()
    data["wieghts"] = {"web": 1.0}
    msg = contract_error(load_mixture, broken(tmp_path, data))
    assert "wieghts: Extra inputs are not permitted" in msg


@pytest.mark.parametrize("version, fragment", [
    (None, "no schema_version (a Manifest needs schema_version=1)"),
    (2, "schema_version 2 is not supported"),
    ("1", "schema_version '1' is not supported"),
    (0, "schema_version 0 is not supported"),
])
def test_missing_or_unsupported_schema_version(tmp_path, version, fragment):
    data = manifest_dict()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    msg = contract_error(load_manifest, broken(tmp_path, data))
    assert fragment in msg


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"a string"', "expected a JSON object, got str"),
])
def test_not_json_or_not_an_object(tmp_path, text, fragment):
    assert fragment in contract_error(load_mixture, broken(tmp_path, text))


def test_not_utf8(tmp_path):
    path = tmp_path / "mixture.json"
    path.write_bytes(b"\xff\xfe\xfa garbage")
    assert "not valid JSON" in contract_error(load_mixture, str(path))


@pytest.mark.parametrize("weights, fragment", [
    ({"web": 0.5, "code": 0.4}, "weights must sum to 1, they sum to 0.90000000"),
    ({"web": 1.2, "code": -0.2}, "weights must be finite and >= 0, got {'code': -0.2}"),
    ({"web": float("nan"), "code": 1.0}, "weights must be finite"),
    ({}, "weights must name at least one domain"),
])
def test_bad_mixture_weights(tmp_path, weights, fragment):
    data = mixture_dict()
    data["weights"] = weights
    data["reference_weights"] = None
    msg = contract_error(load_mixture, broken(tmp_path, data))
    assert fragment in msg
    assert "weights:" in msg


def test_weights_within_tolerance_accepted(tmp_path):
    data = mixture_dict()
    data["weights"] = {"web": 1 / 3, "code": 2 / 3}
    data["reference_weights"] = {"web": 0.1, "code": 0.9 + 5e-7}
    mix = load_mixture(broken(tmp_path, data))
    assert sum(mix.weights.values()) == pytest.approx(1.0)


def test_bad_reference_weights(tmp_path):
    data = mixture_dict()
    data["reference_weights"] = {"web": 0.5, "math": 0.5}
    msg = contract_error(load_mixture, broken(tmp_path, data))
    assert "reference_weights must name the same domains as weights" in msg
    data["reference_weights"] = {"web": 0.7, "code": 0.7}
    assert "reference_weights: " in contract_error(load_mixture, broken(tmp_path, data))


def test_manifest_without_domains(tmp_path):
    data = manifest_dict()
    data["domains"] = {}
    msg = contract_error(load_manifest, broken(tmp_path, data))
    assert "domains:" in msg and "a manifest needs at least one domain" in msg


def test_tokenizer_needs_mask_id(tmp_path):
    data = manifest_dict()
    del data["tokenizer"]["special_ids"]["mask"]
    msg = contract_error(load_manifest, broken(tmp_path, data))
    assert "tokenizer.special_ids" in msg and "lacks ['mask']" in msg


def test_bad_split_name(tmp_path):
    data = manifest_dict()
    data["domains"]["code"]["shards"][0]["split"] = "test"
    assert "domains.code.shards.0.split" in contract_error(load_manifest, broken(tmp_path, data))


def test_file_not_found(tmp_path):
    uri = str(tmp_path / "missing" / "manifest.json")
    assert contract_error(load_manifest, uri) == f"{uri}: no such Manifest file"


def test_directory_instead_of_file(tmp_path):
    # e.g. a checkpoint folder passed where its trainer_state.json was meant
    (tmp_path / "ckpt").mkdir()
    uri = str(tmp_path / "ckpt")
    assert contract_error(load_trainer_state, uri) == f"{uri}: is a directory, not a TrainerState file"


@pytest.mark.s3
def test_s3_missing_and_broken(s3_bucket):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    uri = f"{base}/nope/mixture.json"
    with pytest.raises(ContractError, match="no such Mixture file"):
        load_mixture(uri, storage)
    storage.write_bytes(uri, b'{"schema_version": 1, "weights": {"a": 1.0}}')
    with pytest.raises(ContractError) as exc:
        load_mixture(uri, storage)
    assert str(exc.value).startswith(uri) and "method: Field required" in str(exc.value)


def test_parse_artifact_accepts_dict_and_reports_where():
    mix = parse_artifact(Mixture, mixture_dict(), "inline")
    assert mix.method == "doremi"
    with pytest.raises(ContractError, match=r"^inline: invalid Mixture: method: Field required"):
        parse_artifact(Mixture, {k: v for k, v in mixture_dict().items() if k != "method"}, "inline")


# --------------------------------------------------------------------------- Arrow schemas


def shard_table(**columns):
    base = {
        "doc_id": pa.array(["a", "b"], pa.string()),
        "input_ids": pa.array([[4, 5], [6]], pa.list_(pa.int32())),
        "n_tokens": pa.array([2, 1], pa.int32()),
        "n_bytes": pa.array([6, 3], pa.int64()),
    }
    base.update(columns)
    return pa.table({k: v for k, v in base.items() if v is not None})


def test_check_table_schema_accepts_matching_and_extra_columns():
    check_table_schema(shard_table(), SHARD_SCHEMA, "shard")
    check_table_schema(shard_table(extra=pa.array([1, 2])), SHARD_SCHEMA, "shard")
    docs = pa.table({"id": ["1"], "domain": ["web"], "text": ["hi"], "source": ["a.jsonl#L1"], "meta": [None]},
                    schema=DOCUMENT_SCHEMA)
    check_table_schema(docs, DOCUMENT_SCHEMA, "documents")


def test_check_table_schema_missing_column():
    with pytest.raises(ContractError) as exc:
        check_table_schema(shard_table(n_bytes=None), SHARD_SCHEMA, "shards/web/part-00000.parquet")
    assert str(exc.value) == "shards/web/part-00000.parquet: missing column 'n_bytes' (expected int64)"


def test_check_table_schema_wrong_type():
    with pytest.raises(ContractError) as exc:
        check_table_schema(shard_table(input_ids=pa.array([[4, 5], [6]], pa.list_(pa.int64()))), SHARD_SCHEMA, "s")
    assert str(exc.value) == "s: column 'input_ids' has type list<item: int64>, expected list<item: int32>"
    with pytest.raises(ContractError, match="column 'reason' has type int64, expected string"):
        check_table_schema(pa.table({"source": ["x"], "reason": [1], "raw": ["r"]}), QUARANTINE_SCHEMA, "q")


def test_trainer_state_written_before_the_guard_and_masked_counter_still_loads():
    """Version-1 files from before masked_tokens_seen/nonfinite existed load with their defaults."""
    from infra.contracts import TrainerState, parse_artifact

    old = {"schema_version": 1, "step": 5, "tokens_seen": 640, "sampler": {"ranks": []}, "rng": {"ranks": []},
           "config_hash": "abc", "manifest_sha256": "m", "mixture_sha256": "x"}
    state = parse_artifact(TrainerState, old, "old/trainer_state.json")
    assert state.step == 5 and state.masked_tokens_seen == 0 and state.nonfinite == {}


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.parquet", "shards/../../x.parquet", ""])
def test_manifest_paths_stay_inside_the_manifest_folder(path):
    # A crafted manifest must not point training or the export (which copies the tokenizer into
    # MLflow) at any file of the machine.
    with pytest.raises(ValueError, match="relative to the manifest folder"):
        ShardInfo(path=path, split="train", rows=1, tokens=1, bytes=1, text_bytes=1, sha256="0" * 64)
    with pytest.raises(ValueError, match="relative to the manifest folder"):
        TokenizerInfo(path=path, sha256="0" * 64, vocab_size=8, special_ids={"pad": 0, "mask": 1})
    assert ShardInfo(path="s3://bucket/shards/a.parquet", split="train", rows=1, tokens=1, bytes=1, text_bytes=1,
                     sha256="0" * 64).path.startswith("s3://")
