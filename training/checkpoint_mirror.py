"""A remote copy of the checkpoints (``train.checkpoint_uri``, e.g. s3://bucket/run), kept in step.

DeepSpeed writes and reads checkpoints in a local (or mounted) folder; the mirror makes them
outlive the machine:

    <checkpoint_uri>/step-00000200/...   a copy of <output_dir>/checkpoints/step-00000200/
    <checkpoint_uri>/latest              the tag, uploaded LAST

Upload: after a checkpoint is complete locally, its folder is copied (pyarrow.fs.copy_files,
streamed, several files at once) and then ``latest`` is replaced, so the remote pointer only
ever names a folder that is fully there, the same rule as the local layout (training.checkpoint).
The copy runs on a background thread while training goes on; the next checkpoint waits for it
first (and logs a failure: training goes on, that newer checkpoint is uploaded in turn), the end
of train() waits for the last one and raises if it failed.

Download: when a run starts and the mirror has a newer checkpoint than the local folder (none
at all on a fresh machine), the folder ``latest`` names is copied under a temporary name,
renamed into place, and the local pointer written last; then the usual local resume takes over.

Like the rest of the trainer's checkpointing, this assumes that output_dir is one folder all
ranks see (one machine, or a shared filesystem); rank 0 does all the copying.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow.fs as pafs

from infra.storage import Storage, is_s3, join
from training import checkpoint as ckpt

log = logging.getLogger(__name__)


class CheckpointMirror:
    def __init__(self, uri: str, storage: Storage):
        self.uri = uri.rstrip("/")
        self.storage = storage
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future | None = None

    # ------------------------------------------------------------------ upload

    def upload(self, folder: str) -> None:
        """Copy a complete local checkpoint folder, then point the remote ``latest`` at it (blocking)."""
        tag = os.path.basename(os.path.normpath(folder))
        fs, remote = self.storage.filesystem(join(self.uri, tag))
        if not is_s3(self.uri):  # a mounted folder: copy_files does not create the top directory
            os.makedirs(remote, exist_ok=True)
        pafs.copy_files(os.path.abspath(folder), remote, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        self.storage.write_bytes(join(self.uri, ckpt.LATEST_FILE), tag.encode())
        log.info("mirrored %s to %s", folder, join(self.uri, tag))

    def upload_async(self, folder: str) -> None:
        """Start ``upload(folder)`` on the background thread, once the previous upload is done.

        A failed previous upload is logged, not raised: this runs on rank 0 in the middle of
        training, the local checkpoint is intact, and this newer checkpoint supersedes it anyway.
        """
        self.wait(raise_errors=False)
        self._pending = self._pool.submit(self.upload, folder)

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the pending upload is done; re-raise (or log) its error, if any."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as e:
            message = f"uploading a checkpoint to {self.uri} failed: {e} (the local checkpoint is intact)"
            if raise_errors:
                raise RuntimeError(message) from e
            log.error("%s; the next checkpoint is uploaded again", message)

    def close(self) -> None:
        """Wait for the last upload (raising if it failed) and stop the upload thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ download

    def is_newer_than_local(self, output_dir: str) -> bool:
        """True when the mirror's latest checkpoint is a later step than the local one (or there is none)."""
        tag = self.latest_tag()
        if tag is None:
            return False
        local = ckpt.latest_checkpoint(output_dir, verify=False)  # compares steps, never loads
        return local is None or _step_of(tag) > _step_of(os.path.basename(local))

    def latest_tag(self) -> str | None:
        try:
            return self.storage.read_bytes(join(self.uri, ckpt.LATEST_FILE)).decode().strip() or None
        except FileNotFoundError:
            return None

    def download_latest(self, output_dir: str) -> str | None:
        """Copy the remote latest checkpoint into ``output_dir``; returns the local folder, or None if none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        root = ckpt.checkpoints_root(output_dir)
        final = os.path.join(root, tag)
        tmp = os.path.join(root, f".download-{tag}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        fs, remote = self.storage.filesystem(join(self.uri, tag))
        try:
            pafs.copy_files(remote, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            if os.path.exists(final):  # an incomplete local copy (no pointer named it)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ckpt.write_latest(output_dir, tag)
        log.info("downloaded %s from %s", final, join(self.uri, tag))
        return final


def _step_of(tag: str) -> int:
    return int(tag.rsplit("-", 1)[-1])
