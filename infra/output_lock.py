"""One writer per output location: a lease file ``<output>/_LOCK.json``.

Two runs pointed at the same pipeline ``output_dir``, training ``output_dir`` or sweep folder
would interleave stage checkpoints, shards or checkpoints and leave a mix of both. The second run
is refused before it writes anything, with a message naming the run that holds the location.

The lease is created atomically: ``O_CREAT | O_EXCL`` on a local file system, a conditional put
(``If-None-Match: *``) on S3. A lease whose holder is gone is taken over, so a killed run resumes
without manual clean-up: on the same host the holder is gone when its pid no longer runs (or was
reused by a younger process); from another host, when the holder's heartbeat (rewritten every
``heartbeat_s``) is older than ``stale_after_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator

import psutil

from infra.errors import MaskmixError
from infra.storage import Storage, is_s3, join

LOCK_NAME = "_LOCK.json"


class OutputInUse(MaskmixError):
    """Another live run holds the output location."""


def _holder_alive(lock: dict, stale_after_s: float) -> bool:
    if lock.get("host") == socket.gethostname():
        try:
            return abs(psutil.Process(int(lock["pid"])).create_time() - float(lock["pid_start"])) < 1e-3
        except (psutil.Error, KeyError, ValueError, TypeError):
            return False
    return time.time() - float(lock.get("heartbeat", 0)) < stale_after_s


class OutputLock:
    def __init__(self, uri: str, storage: Storage | None = None, stage: str = "",
                 heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.uri = uri
        self.storage = storage or Storage()
        self.lock_uri = join(uri, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        me = psutil.Process()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": me.create_time(),
                       "stage": stage, "token": uuid.uuid4().hex, "since": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ file operations

    def _create(self) -> bool:
        """Write the lease if none exists; False if one does."""
        data = json.dumps(self.record).encode()
        if is_s3(self.lock_uri):
            bucket, key = self.lock_uri[len("s3://"):].split("/", 1)
            try:
                self.storage.boto3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except Exception as e:  # botocore ClientError: 412 PreconditionFailed (or 409 on a race)
                code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return False
                raise
        os.makedirs(self.uri, exist_ok=True)
        try:
            fd = os.open(self.lock_uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(self.lock_uri))
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _delete(self) -> None:
        if is_s3(self.lock_uri):
            bucket, key = self.lock_uri[len("s3://"):].split("/", 1)
            self.storage.boto3_client().delete_object(Bucket=bucket, Key=key)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock_uri)

    # ------------------------------------------------------------------ the lease

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            held = self._read()
            if held is None:  # removed between our create and read: try again
                continue
            if _holder_alive(held, self.stale_after_s):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("since", 0))))
                raise OutputInUse(
                    f"{self.uri} is in use by another run ({held.get('stage') or 'a maskmix stage'}, pid "
                    f"{held.get('pid')} on {held.get('host')}, since {since}): two runs writing one location would "
                    f"corrupt each other. Wait for it to finish, stop it, or choose another output location "
                    f"(a lease left by a run that died is taken over automatically: {self.lock_uri})")
            self._delete()  # the holder died: take over its lease
        raise OutputInUse(f"could not take the lease {self.lock_uri}: other runs keep creating it")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                held = self._read()
                if held is None or held.get("token") != self.record["token"]:
                    return  # taken over (we were presumed dead): never overwrite another run's lease
                self.record["heartbeat"] = time.time()
                self.storage.write_bytes(self.lock_uri, json.dumps(self.record).encode())

        self._thread = threading.Thread(target=beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("token") == self.record["token"]:
            self._delete()


@contextlib.contextmanager
def output_lock(uri: str, storage: Storage | None = None, stage: str = "", **kwargs) -> Iterator[OutputLock]:
    """Hold the lease on ``uri`` for the duration of the block (see module doc)."""
    lock = OutputLock(uri, storage, stage, **kwargs)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
