"""One writer per output location (infra.output_lock), locally, on S3, and for two real runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from infra.output_lock import LOCK_NAME, OutputInUse, OutputLock, output_lock
from infra.storage import Storage


def _dead_pid_record() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    import psutil

    start = psutil.Process(proc.pid).create_time()
    proc.wait()
    return {"host": socket.gethostname(), "pid": proc.pid, "pid_start": start, "stage": "pipeline",
            "token": "old", "since": time.time() - 60, "heartbeat": time.time() - 60}


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    out = str(tmp_path / "out")
    with output_lock(out, stage="pipeline"):
        with pytest.raises(OutputInUse) as err:
            OutputLock(out, stage="train").acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "(pipeline," in msg and out in msg
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released
    with output_lock(out):  # and free again
        pass


def test_the_lease_of_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps(_dead_pid_record()))
    with output_lock(str(out), stage="pipeline") as lock:
        assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.record["token"]


def test_other_hosts_are_judged_by_their_heartbeat(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    record = {"host": "another-node", "pid": 1, "pid_start": 0.0, "stage": "train", "token": "t",
              "since": time.time(), "heartbeat": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(OutputInUse, match="on another-node"):
        OutputLock(str(out), stale_after_s=300).acquire()
    record["heartbeat"] = time.time() - 301
    (out / LOCK_NAME).write_text(json.dumps(record))
    with output_lock(str(out), stale_after_s=300):
        pass


def test_heartbeat_refreshes_the_lease_and_never_overwrites_a_takeover(tmp_path):
    out = str(tmp_path / "out")
    lock = OutputLock(out, heartbeat_s=0.05)
    lock.acquire()
    first = lock.record["heartbeat"]
    time.sleep(0.3)
    assert json.loads(open(os.path.join(out, LOCK_NAME)).read())["heartbeat"] > first
    # Someone took the lease over (we were presumed dead): our heartbeat and release leave it alone.
    other = {**lock.record, "token": "someone-else"}
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump(other, f)
    time.sleep(0.2)
    lock.release()
    assert json.loads(open(os.path.join(out, LOCK_NAME)).read())["token"] == "someone-else"


def test_on_s3_the_lease_is_a_conditional_put(s3_bucket):
    bucket, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    out = f"{bucket}/run1"
    with output_lock(out, storage, stage="pipeline"):
        assert storage.exists(f"{out}/{LOCK_NAME}")
        with pytest.raises(OutputInUse, match="is in use by another run"):
            OutputLock(out, storage).acquire()
    assert not storage.exists(f"{out}/{LOCK_NAME}")
    storage.write_bytes(f"{out}/{LOCK_NAME}", json.dumps(_dead_pid_record()).encode())
    with output_lock(out, storage):  # a dead holder's lease is taken over on S3 too
        pass


@pytest.mark.slow
def test_two_pipeline_runs_on_one_output_dir_the_second_is_refused(tmp_path):
    from pipelines.demo_corpus import harvest

    harvest(tmp_path / "corpus", domains=("code",), max_bytes_per_domain=60_000)
    out = tmp_path / "out"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "ray": {"num_cpus": 1}, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"},
        "pipeline": {"inputs": [{"path": str(tmp_path / "corpus"), "domain_field": "domain"}],
                     "output_dir": str(out), "word_count_filter": {"min_words": 5},
                     "tokenizer": {"vocab_size": 300}}}))
    cmd = [sys.executable, "-m", "infra.cli", "pipeline", "run", str(cfg)]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"is in use by another run (pipeline, pid {first.pid}" in second.stderr
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-2000:]
    assert (out / "manifest.json").exists() and not (out / LOCK_NAME).exists()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]  # finished and released: the next run resumes
