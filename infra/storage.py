"""One way to read, write and list local paths and ``s3://`` URIs.

pyarrow.fs does the work for both (it is what Ray Data and Parquet use anyway); boto3 is built
from the same settings for what pyarrow does not reach (bucket creation, presigned URLs).
pyarrow's S3FileSystem ignores AWS_ENDPOINT_URL, so the endpoint always comes from
``StorageConfig`` (which itself reads the environment, see infra.config).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from infra.config import StorageConfig


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path pieces for either a local path or a URI (always with '/')."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def relative_to(uri: str, base: str) -> str:
    if is_s3(uri) != is_s3(base):
        raise ValueError(f"{uri} and {base} are not on the same filesystem")
    if is_s3(uri):
        return posixpath.relpath(uri[len("s3://"):], base[len("s3://"):])
    return os.path.relpath(uri, base)


class Storage:
    """Filesystem access configured once from a ``StorageConfig`` (None = local only + env)."""

    def __init__(self, config: "StorageConfig | None" = None):
        self.config = config
        self._s3: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    # ------------------------------------------------------------------ filesystems

    def s3_filesystem(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            kwargs = {}
            cfg = self.config
            endpoint = cfg.endpoint_url if cfg else os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                parsed = urlparse(endpoint)
                kwargs["endpoint_override"] = parsed.netloc or parsed.path
                kwargs["scheme"] = parsed.scheme or "https"
            region = (cfg.region if cfg else None) or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            kwargs["region"] = region
            if cfg and cfg.access_key_id and cfg.secret_access_key:
                kwargs["access_key"] = cfg.access_key_id.get_secret_value()
                kwargs["secret_key"] = cfg.secret_access_key.get_secret_value()
                if cfg.session_token:
                    kwargs["session_token"] = cfg.session_token.get_secret_value()
            kwargs["allow_bucket_creation"] = True
            self._s3 = pafs.S3FileSystem(**kwargs)
        return self._s3

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem for ``uri`` and the path to use with it."""
        if is_s3(uri):
            return self.s3_filesystem(), uri[len("s3://"):]
        return self._local, os.path.abspath(uri)

    def boto3_client(self):
        import boto3

        cfg = self.config
        kwargs = {}
        if cfg:
            if cfg.endpoint_url:
                kwargs["endpoint_url"] = cfg.endpoint_url
            if cfg.region:
                kwargs["region_name"] = cfg.region
            if cfg.access_key_id and cfg.secret_access_key:
                kwargs["aws_access_key_id"] = cfg.access_key_id.get_secret_value()
                kwargs["aws_secret_access_key"] = cfg.secret_access_key.get_secret_value()
                if cfg.session_token:
                    kwargs["aws_session_token"] = cfg.session_token.get_secret_value()
        return boto3.client("s3", **kwargs)

    # ------------------------------------------------------------------ operations

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def makedirs(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        fs.create_dir(path, recursive=True)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(uri)
        if info.type == pafs.FileType.Directory:
            raise IsADirectoryError(uri)
        # compression=None: bytes as stored (pyarrow would otherwise gunzip a ".gz" by its suffix).
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write so that a reader never sees half a file: temp + rename locally; one PUT on S3."""
        fs, path = self.filesystem(uri)
        parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
        if parent:
            fs.create_dir(parent, recursive=True)
        # compression=None: the bytes are stored as given (pyarrow would gzip again by a ".gz" suffix).
        if is_s3(uri):
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def open_input(self, uri: str):
        """The raw bytes of ``uri`` as a stream (no decompression by suffix: callers decide)."""
        fs, path = self.filesystem(uri)
        return fs.open_input_stream(path, compression=None)

    def open_input_file(self, uri: str):
        """Random-access file (what Parquet readers want)."""
        fs, path = self.filesystem(uri)
        return fs.open_input_file(path)

    def size(self, uri: str) -> int:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(uri)
        return info.size

    def list_files(self, uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
        """Every file below ``uri`` (or ``uri`` itself if it is a file), sorted, as full URIs."""
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(uri)
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        out = []
        for i in infos:
            if i.type != pafs.FileType.File:
                continue
            if suffixes and not i.path.endswith(suffixes):
                continue
            out.append(("s3://" + i.path) if is_s3(uri) else i.path)
        return sorted(out)

    def delete_dir(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
