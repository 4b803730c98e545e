"""infra.storage: the same operations on local paths and on s3:// (moto on loopback)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.config import StorageConfig
from infra.storage import Storage, is_s3, join, relative_to


def populate(storage: Storage, base: str) -> dict[str, bytes]:
    files = {
        "b/part-00001.parquet": b"P" * 11,
        "a/part-00000.parquet": b"P" * 7,
        "a/notes.txt": b"hello",
        "manifest.json": b"{}",
        "a/deeper/x.json": b"[1]",
    }
    for rel, data in files.items():
        storage.write_bytes(join(base, rel), data)
    return files


# --------------------------------------------------------------------------- helpers


def test_is_s3_and_join():
    assert is_s3("s3://b/k") and not is_s3("/tmp/x") and not is_s3("s3:/b")
    assert join("s3://bucket/run", "shards", "a.parquet") == "s3://bucket/run/shards/a.parquet"
    assert join("/tmp/run", "shards", "a.parquet") == os.path.join("/tmp/run", "shards", "a.parquet")


def test_relative_to():
    assert relative_to("s3://b/run/shards/web/p.parquet", "s3://b/run") == "shards/web/p.parquet"
    assert relative_to("/data/run/shards/p.parquet", "/data/run") == os.path.join("shards", "p.parquet")
    with pytest.raises(ValueError, match="not on the same filesystem"):
        relative_to("s3://b/x", "/data")


# --------------------------------------------------------------------------- local


def test_local_write_read_overwrite_is_atomic(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "new" / "dir" / "file.bin")  # parents are created
    storage.write_bytes(uri, b"first version")
    assert storage.read_bytes(uri) == b"first version"
    storage.write_bytes(uri, b"v2")
    assert storage.read_bytes(uri) == b"v2"
    assert storage.size(uri) == 2
    assert os.listdir(tmp_path / "new" / "dir") == ["file.bin"]  # no temp file left behind


def test_local_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "state.json")
    storage.write_bytes(uri, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(uri, 12345)  # not bytes: fails while writing the temp file
    assert storage.read_bytes(uri) == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_local_empty_file(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "empty")
    storage.write_bytes(uri, b"")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"" and storage.size(uri) == 0


def test_local_exists_list_size(tmp_path):
    storage = Storage()
    base = str(tmp_path / "run")
    files = populate(storage, base)
    assert storage.exists(base)
    assert storage.exists(join(base, "a"))
    assert storage.exists(join(base, "manifest.json"))
    assert not storage.exists(join(base, "nope.json"))

    listed = storage.list_files(base)
    assert listed == sorted(os.path.join(base, rel) for rel in files)
    assert all(os.path.isabs(p) for p in listed)
    assert storage.list_files(base, suffixes=(".parquet",)) == [
        os.path.join(base, "a/part-00000.parquet"), os.path.join(base, "b/part-00001.parquet")]
    assert storage.list_files(base, suffixes=(".json", ".txt")) == [
        os.path.join(base, "a/deeper/x.json"), os.path.join(base, "a/notes.txt"), os.path.join(base, "manifest.json")]
    assert storage.list_files(base, suffixes=(".zst",)) == []
    single = join(base, "a", "notes.txt")
    assert storage.list_files(single) == [single]
    assert storage.list_files(single, suffixes=(".json",)) == []
    assert [storage.size(join(base, rel)) for rel in sorted(files)] == [len(files[rel]) for rel in sorted(files)]


def test_local_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage()
    storage.write_bytes("rel/f.txt", b"x")
    assert storage.list_files("rel") == [str(tmp_path / "rel" / "f.txt")]
    assert storage.read_bytes(str(tmp_path / "rel" / "f.txt")) == b"x"


def test_local_open_input(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"0123456789")
    with storage.open_input(uri) as f:
        assert f.read(4) == b"0123"
    with storage.open_input_file(uri) as f:
        f.seek(6)
        assert f.read() == b"6789"


def test_local_delete_dir(tmp_path):
    storage = Storage()
    base = str(tmp_path / "run")
    populate(storage, base)
    storage.write_bytes(str(tmp_path / "keep.txt"), b"k")
    storage.delete_dir(base)
    assert not storage.exists(base)
    assert os.listdir(tmp_path) == ["keep.txt"]
    storage.delete_dir(base)  # deleting what is not there is fine


def test_local_missing_raises_file_not_found(tmp_path):
    storage = Storage()
    missing = str(tmp_path / "missing.json")
    for op in (storage.read_bytes, storage.size, storage.list_files):
        with pytest.raises(FileNotFoundError, match="missing.json"):
            op(missing)


def test_local_read_of_directory_is_an_error(tmp_path):
    with pytest.raises(IsADirectoryError):
        Storage().read_bytes(str(tmp_path))


def test_local_parquet_through_filesystem(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "t.parquet")
    table = pa.table({"x": pa.array([1, 2, 3], pa.int32()), "s": ["a", "b", "c"]})
    fs, path = storage.filesystem(uri)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    with storage.open_input_file(uri) as f:
        assert pq.read_table(f).column("x").to_pylist() == [1, 2, 3]


# --------------------------------------------------------------------------- S3 (moto)


@pytest.mark.s3
def test_s3_write_read_exists_size(s3_bucket):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    uri = f"{base}/dir/obj.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"first")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"first"
    storage.write_bytes(uri, b"second, longer")
    assert storage.read_bytes(uri) == b"second, longer"
    assert storage.size(uri) == 14
    with storage.open_input_file(uri) as f:
        f.seek(8)
        assert f.read() == b"longer"
    assert storage.exists(f"{base}/dir")
    assert storage.exists(base)


@pytest.mark.s3
def test_s3_list_files_returns_s3_uris(s3_bucket):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    files = populate(storage, f"{base}/run")
    listed = storage.list_files(f"{base}/run")
    assert listed == sorted(f"{base}/run/{rel}" for rel in files)  # files only, no directory markers
    assert storage.list_files(base) == listed
    assert storage.list_files(f"{base}/run", suffixes=(".parquet",)) == [
        f"{base}/run/a/part-00000.parquet", f"{base}/run/b/part-00001.parquet"]
    single = f"{base}/run/manifest.json"
    assert storage.list_files(single) == [single]
    assert [storage.size(f"{base}/run/{rel}") for rel in sorted(files)] == [len(files[r]) for r in sorted(files)]


@pytest.mark.s3
def test_s3_missing_and_delete_dir(s3_bucket):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    for op in (storage.read_bytes, storage.size, storage.list_files):
        with pytest.raises(FileNotFoundError):
            op(f"{base}/missing.json")
    populate(storage, f"{base}/run")
    storage.write_bytes(f"{base}/keep.txt", b"k")
    storage.delete_dir(f"{base}/run")
    assert not storage.exists(f"{base}/run/manifest.json")
    assert storage.list_files(base) == [f"{base}/keep.txt"]
    storage.delete_dir(f"{base}/run")  # idempotent


@pytest.mark.s3
def test_s3_parquet_via_pyarrow_and_boto3_sees_it(s3_bucket):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    uri = f"{base}/shards/web/part-00000.parquet"
    table = pa.table({"doc_id": ["d1", "d2", "d3"],
                      "input_ids": pa.array([[4, 5], [6], [7, 8, 9]], pa.list_(pa.int32())),
                      "n_tokens": pa.array([2, 1, 3], pa.int32())})
    fs, path = storage.filesystem(uri)
    assert path == uri[len("s3://"):]
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    back = pq.read_table(path, filesystem=fs)
    assert back.equals(table)
    with storage.open_input_file(uri) as f:
        assert pq.ParquetFile(f).metadata.num_rows == 3

    bucket, key = uri[len("s3://"):].split("/", 1)
    client = storage.boto3_client()
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == storage.size(uri) > 0
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body[:4] == b"PAR1" and body == storage.read_bytes(uri)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert key in keys


@pytest.mark.s3
def test_s3_boto3_write_visible_to_pyarrow(s3_bucket):
    base, cfg = s3_bucket
    storage = Storage(cfg)
    bucket = base[len("s3://"):]
    storage.boto3_client().put_object(Bucket=bucket, Key="from/boto3.txt", Body=b"via boto3")
    assert storage.read_bytes(f"{base}/from/boto3.txt") == b"via boto3"
    assert storage.list_files(f"{base}/from") == [f"{base}/from/boto3.txt"]


def test_boto3_client_uses_config():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:1", region="eu-west-3", access_key_id="AKID",
                        secret_access_key="SECRETKEY", session_token="SESSIONTOKEN")
    client = Storage(cfg).boto3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:1"
    assert client.meta.region_name == "eu-west-3"
    creds = client._request_signer._credentials.get_frozen_credentials()
    assert (creds.access_key, creds.secret_key, creds.token) == ("AKID", "SECRETKEY", "SESSIONTOKEN")


@pytest.mark.s3
def test_compressed_names_are_stored_and_read_as_given(s3_bucket, tmp_path):
    # A ".gz"/".zst" object holds exactly the bytes written, and reads back the same (pyarrow's
    # by-suffix (de)compression is off): an uploaded gzip corpus is not gzipped twice.
    import gzip

    base, cfg = s3_bucket
    storage = Storage(cfg)
    payload = gzip.compress(b'{"text": "hello"}\n')
    for uri in (f"{base}/c/a.jsonl.gz", str(tmp_path / "a.jsonl.gz")):
        storage.write_bytes(uri, payload)
        assert storage.read_bytes(uri) == payload
        assert storage.size(uri) == len(payload)
