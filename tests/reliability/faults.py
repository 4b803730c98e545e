"""Fault injection helpers for the reliability suite: real faults, no mocks.

* ``flip_bytes`` / ``truncate``: damage a file on disk the way a bad disk, a partial copy or a
  killed writer would;
* ``PythonProcess``: a child Python process whose output is read line by line while it runs, so a
  test can kill it (SIGKILL, by its pid) at an exact point it reports or that the filesystem shows;
* ``MlflowServer``: a real ``mlflow server`` (sqlite backend in a tmp folder) on a loopback port,
  stopped by its pid and restarted on the same port and backend;
* ``wait_for``: poll a condition (a test never sleeps for a fixed time and hopes).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 300.0, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout`` s.

    The timeout only bounds a hung test; no assertion depends on how long anything took.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- damaged files


def flip_bytes(path, n: int = 16, at: float = 0.5) -> None:
    """XOR ``n`` bytes with 0xFF starting at fraction ``at`` of the file (size unchanged)."""
    data = bytearray(Path(path).read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def truncate(path, fraction: float = 0.5) -> None:
    """Cut the file to ``fraction`` of its size (a partial copy, a writer killed mid-file)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


# --------------------------------------------------------------------------- child processes


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class PythonProcess:
    """``python -c script args...`` with stdout+stderr read by a thread into ``lines``."""

    def __init__(self, script: str, args: list[str] = (), env: dict[str, str] | None = None, cwd=None):
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=cwd or REPO_ROOT,
                                     env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, predicate: Callable[[str], bool], what: str, timeout: float = 300.0) -> str:
        """Block until a line satisfying ``predicate`` is printed; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            if self.proc.poll() is not None and not self._reader.is_alive() and seen == len(self.lines):
                raise AssertionError(f"process exited ({self.proc.returncode}) before {what}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}:\n{self.output[-4000:]}")
            try:
                self._new.get(timeout=0.05)
            except queue.Empty:
                pass

    def kill(self) -> int:
        """SIGKILL by pid (no cleanup handler of the child runs); returns its exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def wait(self, timeout: float = 600.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return rc

    def finish(self, timeout: float = 600.0) -> str:
        """Wait for a normal exit; fail with the output tail if it did not exit 0."""
        rc = self.wait(timeout)
        assert rc == 0, f"exit status {rc}:\n{self.output[-6000:]}"
        return self.output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


# --------------------------------------------------------------------------- MLflow server


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1:<port> with a sqlite backend and artifacts in ``root``.

    Started in its own session so that ``stop()`` kills the server and its web workers by the
    group of the pid we started (and nothing else). ``start()`` again: same port, same backend.
    """

    def __init__(self, root, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "server.log"

    def start(self, timeout: float = 240.0) -> None:
        import urllib.request

        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        env = child_env()
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(name, None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, f"mlflow server on {self.uri}", timeout=timeout, interval=0.25)

    def stop(self) -> None:
        """SIGKILL the server's process group (the pid we started leads it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
