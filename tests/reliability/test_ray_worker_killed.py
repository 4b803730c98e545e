"""Issue 9, faults: a Ray worker process SIGKILLed, by its pid, while it runs a task of
(a) MinHash signatures (near-dedup's bands pass), (b) LSH candidate pairs / edges, (c) tokenize +
shard. The pipeline (the real ``maskmix pipeline run``, embedded Ray, ``near_dedup.engine: ray``)
must finish through Ray's task retries with outputs byte-identical to a clean run's: manifest.json
(its shard list carries every shard's sha256), the shards, tokenizer, quarantine, removed records
and dedup/clusters.parquet.

The victim is found from outside, without any hook in the pipeline: Ray names a worker process
``ray::<task>`` while it executes a task, so the test watches the process tree of ITS pipeline
process (the machine may run other Ray clusters) and kills the first worker whose title names the
stage's function. Retries: Ray Data map tasks retry system failures without limit (max_retries=-1),
``_edges_task`` is a plain task with Ray's default 3 retries; every task writes its files under
names fixed by its input (a re-run task overwrites its own partial files), so a retry is exact.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.reliability.faults import PythonProcess, wait_for
from tests.test_pipeline_resume import _outputs

pytestmark = [pytest.mark.slow]

PIPELINE_SCRIPT = "import sys; from infra.cli import app; sys.argv = ['maskmix', 'pipeline', 'run', sys.argv[1]]; app()"

# stage -> the function a worker's title shows while it runs that stage's task
VICTIMS = {
    "signatures": "_write_band_batch",  # MinHash signatures + band rows (one pass over the docs)
    "lsh_edges": "_edges_task",  # candidate pairs per band partition, verified into edges
    "tokenize_shard": "write_domain_shards",  # tokenized docs of a domain -> parquet shards
}


def shared_folder(tmp_path_factory, name: str) -> Path:
    """``name`` under a folder every pytest-xdist worker of this run sees (their base temps share a
    parent), so that this file and tests/reliability/test_pipeline_killed.py, which may run on
    different workers, share one corpus and one clean run."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, _mlflow_template_db):
    from filelock import FileLock

    from pipelines.synthetic import default_domains, generate_corpus, plant_near_duplicates, write_jsonl

    root = shared_folder(tmp_path_factory, "ray-kill")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        if not (root / "corpus.ready").exists():
            domains = default_domains(seed=7, vocab_size=64, doc_length=(60, 120))[:2]
            records = generate_corpus(domains, docs_per_domain=1500, seed=7)
            records, _ = plant_near_duplicates(records, fraction=0.1, edit_rate=0.02, rng=np.random.default_rng(3))
            for i in range(4):
                write_jsonl(records[i::4], root / "in" / f"part-{i}.jsonl")
            # Each run's MLflow store starts as a copy of the suite's migrated sqlite DB
            # (tests/conftest.py): migrating a fresh one takes minutes on a loaded machine.
            shutil.copyfile(_mlflow_template_db, root / "mlflow-template.db")
            (root / "corpus.ready").touch()
    return root


def config(root: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    if not (root / f"{name}-mlflow.db").exists():
        shutil.copyfile(root / "mlflow-template.db", root / f"{name}-mlflow.db")
    path.write_text(yaml.safe_dump({
        "ray": {"num_cpus": 2, "object_store_memory": 256 * 1024**2},
        "tracking": {"uri": f"sqlite:///{root / name}-mlflow.db", "experiment": "ray-kill"},
        "pipeline": {
            "inputs": [{"path": str(root / "in"), "domain_field": "domain"}],
            "output_dir": str(root / name),
            "word_count_filter": {"min_words": 10},
            # engine ray: in-process near-dedup would have no Ray task to kill at this size
            "near_dedup": {"bands": 20, "rows": 5, "engine": "ray", "partitions": 8},
            "tokenizer": {"vocab_size": 300},
            "shards": {"max_rows": 400, "validation_fraction": 0.05},
        }}))
    return path


def outputs(out: Path) -> dict[str, bytes]:
    found = _outputs(out)  # manifest, tokenizer, shards, removed, quarantine (tests/test_pipeline_resume.py)
    found["dedup/clusters.parquet"] = (out / "dedup" / "clusters.parquet").read_bytes()
    return found


def start(root: Path, name: str) -> PythonProcess:
    """``maskmix pipeline run`` as its own process, in ``root`` (where MLflow puts its ./mlruns)."""
    return PythonProcess(PIPELINE_SCRIPT, [config(root, name)], cwd=root)


# Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py); on a CI box loaded far
# past its cores that start-up can miss it, before any pipeline code runs. Such a start is retried
# (up to 3 times): it is not the fault under test, and nothing of the run has happened yet.
RAY_START_TIMEOUT = "The current node timed out during startup"
STARTS = 3


def finish(root: Path, name: str) -> PythonProcess:
    """Run the pipeline to its end (exit 0 required)."""
    for _ in range(STARTS):
        proc = start(root, name)
        if proc.wait() == 0:
            return proc
        if RAY_START_TIMEOUT not in proc.output:
            break
    raise AssertionError(f"pipeline {name} failed:\n{proc.output[-4000:]}")


def start_until(root: Path, name: str, condition, what: str, interval: float = 0.01):
    """Start the pipeline and wait until ``condition(proc)`` returns something; (proc, that value)."""
    for _ in range(STARTS):
        proc = start(root, name)
        found = wait_for(lambda: ("hit", v) if (v := condition(proc)) else
                         (("ended", None) if proc.proc.poll() is not None else None), what, timeout=900,
                         interval=interval)
        if found[0] == "hit":
            return proc, found[1]
        proc.wait()
        if RAY_START_TIMEOUT not in proc.output:
            raise AssertionError(f"the pipeline ended before {what}:\n{proc.output[-4000:]}")
    raise AssertionError(f"Ray did not start in {STARTS} tries")


def run(root: Path, name: str) -> tuple[PythonProcess, float]:
    started = time.monotonic()
    proc = finish(root, name)
    return proc, time.monotonic() - started


@pytest.fixture(scope="session")
def clean(corpus):
    """A clean run's outputs and wall seconds: one run for both kill files (whichever asks first)."""
    from filelock import FileLock

    done = corpus / "clean.seconds"
    with FileLock(f"{corpus}/clean.lock"):
        if not done.exists():
            _, seconds = run(corpus, "clean")
            done.write_text(str(seconds))
    return outputs(corpus / "clean"), float(done.read_text())


def worker_running(driver_pid: int, function: str) -> psutil.Process | None:
    """A Ray worker below ``driver_pid`` whose process title says it runs ``function``."""
    try:
        children = psutil.Process(driver_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and function in title:
            return child
    return None


@pytest.mark.parametrize("stage", list(VICTIMS))
def test_worker_killed_mid_task_pipeline_finishes_identical(corpus, clean, stage):
    reference, clean_s = clean
    name = f"kill-{stage}"
    started = time.monotonic()
    proc, victim = start_until(corpus, name, lambda p: worker_running(p.pid, VICTIMS[stage]),
                               f"a worker running {VICTIMS[stage]}")
    with proc:
        title = " ".join(victim.cmdline())
        os.kill(victim.pid, signal.SIGKILL)
        assert psutil.wait_procs([victim], timeout=30)[0], "the worker survived SIGKILL"
        proc.finish()
    seconds = time.monotonic() - started

    got = outputs(corpus / name)
    assert got.keys() == reference.keys()
    assert [k for k in got if got[k] != reference[k]] == []  # byte-identical, file by file

    from infra.contracts import load_manifest

    manifest = load_manifest(str(corpus / name / "manifest.json"))
    docs_read = manifest.stages[0].docs_in
    rows = sum(s.rows for d in manifest.domains.values() for s in d.shards)
    print(f"\nFIGURES ray_worker_killed[{stage}]: killed pid {victim.pid} ({title[:80]}); docs_read={docs_read} "
          f"docs_in_shards={rows} (clean run: the same) lost=0 wall_s={seconds:.1f} clean_wall_s={clean_s:.1f}")
