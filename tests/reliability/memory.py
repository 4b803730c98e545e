"""Run a command and record the peak resident memory of every process of its tree (Linux).

Each process's ``VmHWM`` (/proc/<pid>/status) is the peak RSS over its whole life, so sampling the
tree every 50 ms loses no peak: a process only needs to be seen once before it exits, and Ray's
workers live until the driver shuts Ray down. (``getrusage(RUSAGE_CHILDREN)`` would report only
the largest *waited-for* descendant, which for embedded Ray is the driver, never the workers.)
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil

MiB = 1 << 20


def _hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class TreePeaks:
    returncode: int
    output: str
    driver: int  # peak RSS of the command's own process, bytes
    processes: dict[int, tuple[int, str]] = field(default_factory=dict)  # pid -> (peak bytes, command line)

    @property
    def workers(self) -> dict[int, int]:
        """Peak RSS of each Ray worker process (the processes that run the pipeline's tasks)."""
        def is_worker(cmd: str) -> bool:
            if cmd.startswith("ray::"):  # a worker after it named itself; not Ray's agents
                return "Agent" not in cmd
            program = cmd.split(" ", 1)[0]
            return "python" in os.path.basename(program) and "default_worker.py" in cmd  # (the raylet names it too)

        return {pid: peak for pid, (peak, cmd) in self.processes.items() if is_worker(cmd)}

    @property
    def max_worker(self) -> int:
        return max(self.workers.values(), default=0)


def run_measured(cmd: list[str], cwd: str, env: dict, timeout: float = 900) -> TreePeaks:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    seen: dict[int, tuple[int, str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} still running after {timeout}s")
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = [root]
            for p in tree:
                peak = _hwm_bytes(p.pid)
                if peak is None:
                    continue
                old_peak, old_cmd = seen.get(p.pid, (0, ""))
                if not old_cmd.startswith("ray::"):  # a worker renames itself ray::<task> once started
                    try:
                        old_cmd = " ".join(p.cmdline())
                    except psutil.Error:
                        pass
                seen[p.pid] = (max(peak, old_peak), old_cmd)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:  # only our own child, by its pid
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    return TreePeaks(returncode=proc.returncode, output="".join(chunks), driver=seen.get(proc.pid, (0, ""))[0],
                     processes=seen)
