"""Run a benchmark's system in a child process and measure its whole process tree.

Each bench runs every system it compares (maskmix and the tool a user would otherwise pick) in a
fresh Python process, so that imports, start-up and memory are counted the same way for all of
them. Memory and CPU are sampled every 0.1 s over the child and all its descendants (Ray workers,
multiprocessing pools): peak RSS, peak PSS (shared pages counted once, fairer to forking tools)
and CPU seconds (user + system, comparable on a loaded machine, unlike wall time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def tree_usage(proc, cpu: dict[int, float], pss: bool = True) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in MB over ``proc`` and its descendants; ``cpu`` is updated with each
    process's latest user + system CPU seconds (by pid, so that exited workers still count)."""
    import psutil

    rss_total = pss_total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    for p in procs:
        try:
            rss_total += p.memory_info().rss
            if pss:
                pss_total += p.memory_full_info().pss
            t = p.cpu_times()
            cpu[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return rss_total / 2**20, pss_total / 2**20


def measure_child(script: str, system: str, spec: dict, folder: Path, cwd: Path, timeout: float | None = None,
                  pss: bool = True) -> dict:
    """``python script --child system spec.json result.json`` in ``folder``; the result dict it wrote,
    with process_s (wall time of the child process), peak_rss_mb, peak_pss_mb (when ``pss``) and cpu_s."""
    import psutil

    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / f"{system}.spec.json", folder / f"{system}.result.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, script, "--child", system, str(spec_path), str(result_path)],
                             cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(child.pid)
    peak = {"rss": 0.0, "pss": 0.0}
    cpu: dict[int, float] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss_mb = tree_usage(proc, cpu, pss)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss_mb)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
        raise RuntimeError(f"{system} timed out after {timeout} s:\n{output[-3000:]}")
    finally:
        done.set()
        sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{system} failed (exit {child.returncode}):\n{output[-5000:]}")
    result = json.loads(result_path.read_text())
    result.update(process_s=time.perf_counter() - started, peak_rss_mb=round(peak["rss"], 1),
                  cpu_s=round(sum(cpu.values()), 1))
    if pss:
        result["peak_pss_mb"] = round(peak["pss"], 1)
    return result
