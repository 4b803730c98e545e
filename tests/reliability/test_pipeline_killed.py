"""Issue 9, faults: the whole pipeline process SIGKILLed in the middle of a stage, then re-run.

tests/test_pipeline_resume.py::test_killed_run_resumes_to_byte_identical_shards_and_manifest already
proves resume after a run that dies (an exception) between near_dedup's rows and its marker, in
process. This is the real thing for two other stages: ``maskmix pipeline run`` as its own process,
SIGKILLed (no handler, no atexit, Ray torn down with it) while exact_dedup is writing its stage
checkpoint, or while tokenize_shard is writing shards. The re-run must resume (finished stages
loaded, not redone) and write outputs byte-identical to a clean run's (tests/test_pipeline_resume's
``_outputs`` plus dedup/clusters.parquet; the manifest lists every shard's sha256).

The moment of the kill is read from the filesystem: the stage's folder has files but no marker.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from pipelines.stage_store import MARKER, STAGES_DIR, StageStore
from tests.reliability.faults import PythonProcess
from tests.reliability.test_ray_worker_killed import clean, corpus, finish, outputs, start_until  # noqa: F401

pytestmark = [pytest.mark.slow]


def stage_writing(out, stage: str) -> bool:
    """The stage has begun writing its output and has not committed it."""
    if stage == "tokenize_shard":
        shards = out / "shards"
        return shards.is_dir() and any(p.is_file() for p in shards.rglob("*.parquet")) \
            and not (out / "manifest.json").exists()
    folder = out / STAGES_DIR / StageStore.folder_name(stage)
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*")) and not (folder / MARKER).exists()


def _running(process: psutil.Process) -> bool:
    """Not exited. A zombie has: it holds no memory, file or socket any more, only its pid entry."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(proc: PythonProcess) -> int:
    """SIGKILL the pipeline process by its pid; then any of its Ray processes left behind, by pid.

    Returns once every one of them has exited. The Ray processes are orphans by then, reaped by
    init whenever it gets to it (1-2 s here); their zombies are dead already, so they are not
    waited for (psutil.wait_procs would, since a zombie's pid still exists).
    """
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.kill()
    for child in tree:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 30  # as long as psutil.wait_procs(tree, timeout=30) waited
    while any(map(_running, tree)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(tree)


@pytest.mark.parametrize("stage", ["exact_dedup", "tokenize_shard"])
def test_pipeline_sigkilled_mid_stage_resumes_identical(corpus, clean, stage):  # noqa: F811
    name = f"sigkill-{stage}"
    out = corpus / name
    proc, _ = start_until(corpus, name, lambda p: stage_writing(out, stage), f"{stage} writing", interval=0.005)
    with proc:
        kill_tree(proc)
    assert stage_writing(out, stage)  # killed with the stage half done
    assert not (out / "manifest.json").exists()

    started = time.monotonic()
    output = finish(corpus, name).output
    seconds = time.monotonic() - started
    got = outputs(out)
    reference, _ = clean
    assert got.keys() == reference.keys()
    assert [k for k in got if got[k] != reference[k]] == []  # byte-identical, file by file
    # The stages before the killed one were loaded from their checkpoints, not run again.
    from pipelines.stage_store import STAGES

    before = STAGES[:STAGES.index(stage)]
    lines = output.splitlines()
    for done in before:
        assert any(line.startswith(f"[pipeline] {done}") and "resumed" in line for line in lines), \
            f"{done} was not resumed:\n{output[-3000:]}"
    from infra.contracts import load_manifest

    manifest = load_manifest(str(out / "manifest.json"))
    rows = sum(s.rows for d in manifest.domains.values() for s in d.shards)
    print(f"\nFIGURES pipeline_killed[{stage}]: docs_read={manifest.stages[0].docs_in} docs_in_shards={rows} "
          f"(clean: identical bytes) lost=0 stages_before_kill={len(before)} rerun_wall_s={seconds:.1f}")
    assert os.path.exists(out / "manifest.json")
