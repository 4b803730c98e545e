"""A real local stack (`maskmix stack up`) for tests, and running `maskmix` as a user does.

``local_stack`` starts it in a subprocess exactly as a user would, yields what `stack up` printed
(the Jobs API address, the token file, the tracking URI) and on exit runs `stack down` and checks
that every process of every process group it recorded is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil

MASKMIX = [sys.executable, "-m", "infra.cli"]


def maskmix_env(token_path: str | None = None, home: Path | None = None, **extra) -> dict:
    """The test process's environment without any Ray token or address, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    if home is not None:  # no ~/.ray/auth_token of the developer's
        env["HOME"] = str(home)
    env.update(extra)
    return env


def run_maskmix(args, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(MASKMIX + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@contextlib.contextmanager
def local_stack(root: Path, up_args=()):
    stack_dir = root / "stack"
    home = root / "home"
    home.mkdir(exist_ok=True)
    # `stack up` from a shell that still holds a launcher's world, its MASTER_PORT taken: a job that
    # inherited it would fail with EADDRINUSE (seen in CI, where earlier in-process trainings had set
    # these in the test process). The head must not pass them on.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(taken.getsockname()[1])}
    up = run_maskmix(["stack", "up", "--dir", stack_dir, *up_args], root, maskmix_env(home=home, **world))
    state = stack_dir / "stack.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        services = json.loads(state.read_text())["services"]
        exports = dict(line.strip().removeprefix("export ").split("=", 1)
                       for line in up.stdout.splitlines() if line.strip().startswith("export "))
        yield {"root": root, "dir": stack_dir, "home": home, "services": services,
               "address": exports["RAY_API_SERVER_ADDRESS"], "token_path": exports["RAY_AUTH_TOKEN_PATH"],
               "mlflow": exports["MLFLOW_TRACKING_URI"]}
    finally:
        pids = [s["pid"] for s in json.loads(state.read_text())["services"].values()] if state.exists() else []
        groups = {g for g in map(_pgid, pids) if g is not None}
        tree = [c for p in pids if psutil.pid_exists(p) for c in psutil.Process(p).children(recursive=True)]
        down = run_maskmix(["stack", "down", "--dir", stack_dir], root, maskmix_env(home=home))
        assert down.returncode == 0, down.stdout + down.stderr
        # Exactly what it started is gone: every process of every group it recorded, and every
        # descendant (a job's driver runs in a session of its own).
        left = [p.pid for p in psutil.process_iter() if _pgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE]
        left += [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"processes left by the stack: {left}"
        assert not state.exists()
        taken.close()
