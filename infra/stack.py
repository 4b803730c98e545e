"""A local stack on one machine: a Ray head (Jobs API, token auth on), an MLflow tracking server and
the dashboard (dashboards/, reading that server).

``maskmix stack up`` starts each service as its own process group, bound to loopback unless told
otherwise, waits until each answers, and writes ``<dir>/stack.json``: every service's pid, its
process start time, port and URL. ``stack status`` checks them; ``stack down`` stops exactly the
process groups it recorded (a pid whose start time no longer matches belongs to someone else
and is left alone), SIGTERM first, SIGKILL after a grace period.

Ray binds loopback only when the node address resolves to 127.0.0.1: ``ray start`` turns
``--node-ip-address=127.0.0.1`` into the machine's routable address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-machine switch), which the stack sets for a
loopback head. Every port is chosen free at start, so a stack never collides with another Ray
(tests, an embedded run) on the same machine.

The Ray token is RAY_AUTH_TOKEN when set, else a new random one written to ``<dir>/ray_auth_token``
(mode 0600); clients find it through RAY_AUTH_TOKEN_PATH (``stack up`` prints the line to export).
MLflow keeps runs in ``<dir>/mlflow.db`` (sqlite) and artifacts in ``<dir>/mlartifacts`` or an
s3:// URI (the server proxies them: clients need no S3 credentials, the server takes them from
the ``storage:`` config / AWS_* environment).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from infra.config import StorageConfig
from infra.errors import MaskmixError

DEFAULT_DIR = ".maskmix/stack"
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
STATE_FILE = "stack.json"
TOKEN_FILE = "ray_auth_token"
# Ray kills an idle worker after 1 s once the node has more worker processes than CPUs, and
# every submitted job's JobSupervisor actor counts: with a few jobs on a small head, a job's
# Ray Data worker was killed in each pause between two stages (the driver writing a checkpoint,
# deduplicating or training a tokenizer) and the next stage started a new one, 2.5-5 CPU s each
# (Python, Ray, pyarrow, the stage's modules). Six small pipeline jobs at once started 106
# processes and spent 489 CPU s (328 s wall on 2 cores); with a 60 s grace, 28 processes,
# 130 CPU s, 96 s. A job's workers still end with the job; an idle one holds memory, not CPU.
IDLE_WORKER_GRACE_MS = 60_000
RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_GRACE_MS}


class StackError(MaskmixError):
    pass


@dataclass
class Service:
    name: str
    pid: int
    create_time: float
    url: str
    log: str
    port: int
    extra: dict = field(default_factory=dict)

    def process(self) -> psutil.Process | None:
        """The process we started, or None if it is gone (or the pid now belongs to another process)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 1e-3:
                return None
            return proc if proc.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None


def free_ports(n: int, exclude: set[int] = frozenset(), host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports, none in ``exclude``. Each socket stays bound until all are chosen:
    bound and closed one at a time, the OS may hand out one port twice (Ray then refuses to start:
    "metrics_export is trying to use a port number ... used by other components")."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < n:
            s = held.enter_context(socket.socket())
            s.bind((host, 0))
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
        return ports


def _answers(url: str, timeout: float = 2.0) -> bool:
    """The service answers HTTP (any status: Ray's API says 401 without a token and is up)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: str, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _bin(name: str) -> str:
    """An executable of this Python environment (ray, mlflow), wherever the venv is."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            raise StackError(f"`{name}` not found next to {sys.executable} or on PATH")
        return found
    return str(path)


class Stack:
    def __init__(self, directory: str | os.PathLike = DEFAULT_DIR):
        self.dir = Path(directory).resolve()
        self.state_path = self.dir / STATE_FILE
        self._ports_given: set[int] = set()  # to this stack's services (some bind them only later)

    def _free_ports(self, n: int) -> list[int]:
        ports = free_ports(n, exclude=self._ports_given)
        self._ports_given.update(ports)
        return ports

    # ------------------------------------------------------------------ state

    def services(self) -> dict[str, Service]:
        if not self.state_path.exists():
            return {}
        data = json.loads(self.state_path.read_text())
        return {name: Service(**svc) for name, svc in data["services"].items()}

    def _save(self, services: dict[str, Service], **info) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"services": {n: asdict(s) for n, s in services.items()}, **info}, indent=2))
        os.replace(tmp, self.state_path)

    def env(self) -> dict[str, str]:
        """What a client exports to use this stack."""
        services = self.services()
        out = {}
        if "ray" in services:
            out["RAY_API_SERVER_ADDRESS"] = services["ray"].url
            out["RAY_AUTH_TOKEN_PATH"] = services["ray"].extra["token_path"]
        if "mlflow" in services:
            out["MLFLOW_TRACKING_URI"] = services["mlflow"].url
        return out

    # ------------------------------------------------------------------ up

    def up(self, host: str = "127.0.0.1", ray_cpus: int | None = None, artifacts: str | None = None,
           storage: StorageConfig | None = None, timeout_s: float = 120.0,
           object_store_memory: int = 1024**3) -> dict[str, Service]:
        running = {n: s for n, s in self.services().items() if s.process() is not None}
        if running:
            raise StackError(f"a stack is already running from {self.dir} ({', '.join(running)}); "
                             "`maskmix stack down` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        started: dict[str, Service] = {}
        try:
            started["ray"] = self._start_ray(host, ray_cpus, object_store_memory)
            self._save(started, host=host)
            started["mlflow"] = self._start_mlflow(host, artifacts, storage or StorageConfig())
            self._save(started, host=host)
            started["dashboard"] = self._start_dashboard(host, started["mlflow"].url)
            self._save(started, host=host)
            for svc in started.values():
                self._wait_ready(svc, timeout_s)
        except BaseException:
            self._stop(started)
            self._save({}, host=host)
            raise
        return started

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], port: int, url: str, ready: str,
               **extra) -> Service:
        log = str(self.dir / f"{name}.log")
        with open(log, "ab") as out:
            # Its own session = its own process group: `down` signals the whole group (ray start
            # --block spawns gcs_server, raylet, dashboard ...; mlflow spawns its workers).
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=str(self.dir))
        return Service(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), url=url,
                       log=log, port=port, extra={"ready": ready, "cmd": cmd, **extra})

    def _token(self) -> tuple[str, str]:
        token_path = self.dir / TOKEN_FILE
        value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
        if not value:
            value = token_path.read_text().strip() if token_path.exists() else secrets.token_hex(32)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        os.chmod(token_path, 0o600)
        return value, str(token_path)

    def _start_ray(self, host: str, cpus: int | None, object_store_memory: int) -> Service:
        token, token_path = self._token()
        names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
                 "ray-client-server-port")
        ports = dict(zip(names, self._free_ports(len(names))))
        # Short, private session folder: Ray's unix sockets live under it (a 107-byte path limit).
        temp_dir = tempfile.mkdtemp(prefix="mmx-ray-")
        loopback = host in ("127.0.0.1", "localhost")
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
                   # jobs run `python -m infra.cli ...`: this environment's python, with maskmix's deps
                   PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        # A launcher's world (RANK, MASTER_PORT ...) left in the shell that runs `stack up` would be
        # inherited by every job's driver: each would join that one world on that one port
        # (EADDRINUSE as soon as two trainings run). A head carries no world; each job makes its own.
        for name in ("RAY_ADDRESS", *DISTRIBUTED_ENV):
            env.pop(name, None)
        if loopback:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        cmd = [_bin("ray"), "start", "--head", "--block", f"--node-ip-address={host}",
               f"--dashboard-host={host}", "--include-dashboard=true", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *[f"--{k}={v}" for k, v in ports.items()],
               # Ray's default object store takes 30% of RAM as shared memory: sized for a dedicated
               # node, not for a laptop that also runs the jobs' drivers.
               f"--object-store-memory={object_store_memory}",
               f"--system-config={json.dumps(RAY_SYSTEM_CONFIG, sort_keys=True)}"]
        if cpus:
            cmd.append(f"--num-cpus={cpus}")
        url = f"http://{host}:{ports['dashboard-port']}"
        return self._spawn("ray", cmd, env, ports["dashboard-port"], url, ready=url + "/api/version",
                           token_path=token_path, gcs_address=f"{host}:{ports['port']}", temp_dir=temp_dir)

    def _start_mlflow(self, host: str, artifacts: str | None, storage: StorageConfig) -> Service:
        [port] = self._free_ports(1)
        destination = artifacts or str(self.dir / "mlartifacts")
        env = dict(os.environ)
        if destination.startswith("s3://"):
            if storage.endpoint_url:
                env["MLFLOW_S3_ENDPOINT_URL"] = storage.endpoint_url
            for key, value in (("AWS_ACCESS_KEY_ID", storage.access_key_id),
                               ("AWS_SECRET_ACCESS_KEY", storage.secret_access_key),
                               ("AWS_SESSION_TOKEN", storage.session_token)):
                if value is not None:
                    env[key] = value.get_secret_value()
            if storage.region:
                env["AWS_DEFAULT_REGION"] = storage.region
        cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
               "--artifacts-destination", destination, "--serve-artifacts",
               "--host", host, "--port", str(port), "--workers", "1"]
        url = f"http://{host}:{port}"
        return self._spawn("mlflow", cmd, env, port, url, ready=url + "/health", artifacts=destination)

    def _start_dashboard(self, host: str, tracking_uri: str) -> Service:
        from dashboards.serve import command

        [port] = self._free_ports(1)
        argv, env = command(tracking_uri=tracking_uri, host=host, port=port, mlflow_ui_url=tracking_uri)
        url = f"http://{host}:{port}"
        return self._spawn("dashboard", argv, env, port, url, ready=url + "/_stcore/health")

    def _wait_ready(self, svc: Service, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if svc.process() is None:
                raise StackError(f"{svc.name} exited while starting; its log ({svc.log}) ends:\n{_tail(svc.log)}")
            if _answers(svc.extra["ready"]):
                return
            time.sleep(0.3)
        raise StackError(f"{svc.name} did not answer at {svc.extra['ready']} within {timeout_s:g} s; "
                         f"its log ({svc.log}) ends:\n{_tail(svc.log)}")

    # ------------------------------------------------------------------ status / down

    def status(self) -> dict[str, dict]:
        out = {}
        for name, svc in self.services().items():
            alive = svc.process() is not None
            out[name] = {"pid": svc.pid, "url": svc.url, "running": alive,
                         "answers": alive and _answers(svc.extra["ready"]), "log": svc.log}
        return out

    def down(self, grace_s: float = 20.0) -> dict[str, str]:
        services = self.services()
        result = self._stop(services, grace_s)
        for svc in services.values():
            if svc.extra.get("temp_dir"):
                shutil.rmtree(svc.extra["temp_dir"], ignore_errors=True)
        if self.state_path.exists():
            self.state_path.unlink()
        return result

    @staticmethod
    def _stop(services: dict[str, Service], grace_s: float = 20.0) -> dict[str, str]:
        """Stop each service and everything it started: SIGTERM, then SIGKILL what is left after ``grace_s``.

        "Everything it started" is the service's process group AND its descendants: Ray runs a
        job's driver in a session of its own, so the group alone would leave running jobs behind
        as orphans of a dead head.
        """
        result = {}
        owned: dict[str, tuple[int, list[psutil.Process]]] = {}
        for name, svc in services.items():
            proc = svc.process()
            if proc is None:
                result[name] = "not running"
                continue
            pgid = os.getpgid(svc.pid)
            owned[name] = (pgid, [proc, *_descendants(proc)])
            os.killpg(pgid, signal.SIGTERM)
            for p in owned[name][1]:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
        deadline = time.monotonic() + grace_s
        for name, (pgid, procs) in owned.items():
            # The grace is for what may still be writing: job drivers, task workers, MLflow.
            while _alive(pgid, procs, skip=CONTROL_PLANE) and time.monotonic() < deadline:
                time.sleep(0.2)
            graceful = not _alive(pgid, procs, skip=CONTROL_PLANE)
            if _alive(pgid, procs):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                while _alive(pgid, procs):
                    time.sleep(0.1)
            result[name] = "stopped" if graceful else "killed"
        return result


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


# Ray 2.60's control plane -- the `ray start --block` parent, gcs_server, the autoscaler's monitor,
# and with a job the raylet and the job's supervisor actor -- does not exit on SIGTERM: it waited
# out every grace period (20 s per `stack down`). It writes no user data (the GCS keeps its tables
# in memory), so once everything else -- job drivers, task workers, MLflow -- is gone it is killed
# at once instead of waited for.
CONTROL_PLANE = ("/ray/core/src/ray/gcs/gcs_server", "/ray/autoscaler/_private/monitor.py", "/bin/ray start",
                 "/ray/core/src/ray/raylet/raylet", "ray::JobSupervisor")


def _alive(pgid: int, procs: list[psutil.Process], skip: tuple[str, ...] = ()) -> bool:
    """Any live (non-zombie) process left in the group or among the recorded processes, other than
    those whose command line contains one of ``skip``."""
    def counts(p: psutil.Process) -> bool:
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return not skip or not any(s in " ".join(p.cmdline()) for s in skip)

    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and counts(p):
                return True
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and counts(proc):
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False
