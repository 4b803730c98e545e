"""Load: 20 jobs submitted at once to one local Ray head (the real `maskmix stack up`), pipelines
and small trainings mixed; every job reaches a terminal state and every result is right.

Right means: each pipeline job's manifest is the one a clean run writes (manifests are a function
of the inputs and the config only, so all of them agree exactly with each other), and each training
job ran its steps to a finite loss equal, to float tolerance, to every other training job's (same
data, same seed, same config). The figures (jobs, wall time, slowest job) are printed for
RELIABILITY.md.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from infra.jobs import JobsClient, submit
from tests.stack_fixtures import local_stack
from tests.training_fixtures import write_tiny_corpus

pytestmark = [pytest.mark.slow]

# A pipeline job cost about 4x a training job on one small head while the head killed each job's
# idle Ray Data workers between stages and every stage started new ones (10 + 10: 523 s); with the
# stack's idle-worker grace (infra/stack.py) a job keeps one worker and 6 + 14 take ~430 CPU s.
N_PIPELINES, N_TRAININGS = 6, 14


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    with local_stack(root, ["--cpus", 4, "--object-store-mb", 512]) as st:
        yield st


def _mlflow_store(root, name: str, template) -> str:
    """A copy of the suite's migrated sqlite DB (tests/conftest.py) for one job: twenty jobs each
    migrating an empty one cost over a minute of CPU on the head, none of it the load under test."""
    shutil.copyfile(template, root / name)
    return f"sqlite:///{root / name}"


def _pipeline_config(root, corpus, i: int, template):
    path = root / f"pipeline-{i:02d}.yaml"
    path.write_text(yaml.safe_dump({
        "ray": {"num_cpus": 1}, "tracking": {"uri": _mlflow_store(root, f"mlflow-pipeline-{i:02d}.db", template)},
        "pipeline": {"inputs": [{"path": str(corpus), "domain_field": "domain"}], "output_dir": str(root / f"p{i:02d}"),
                     "word_count_filter": {"min_words": 5}, "tokenizer": {"vocab_size": 300}}}))
    return path


def _train_config(root, manifest: str, i: int, template):
    path = root / f"train-{i:02d}.yaml"
    path.write_text(yaml.safe_dump({
        "tracking": {"uri": _mlflow_store(root, f"mlflow-train-{i:02d}.db", template)},
        "train": {"manifest": manifest, "output_dir": str(root / f"t{i:02d}"), "model": {"preset": "test"},
                  "seq_len": 32, "micro_batch_size": 4, "steps": 3, "warmup_steps": 1, "lr": 1e-3,
                  "zero_stage": 0, "checkpoint_every": 3, "seed": 0, "eval": {"mc_samples": 1}}}))
    return path


def test_twenty_concurrent_jobs_all_finish_with_correct_results(stack, tmp_path, _mlflow_template_db):
    from pipelines.demo_corpus import harvest

    corpus = tmp_path / "corpus"
    harvest(corpus, domains=("code",), max_bytes_per_domain=40_000)
    tiny = write_tiny_corpus(tmp_path / "tiny", vocab_size=32)
    configs = [("pipeline", _pipeline_config(tmp_path, corpus, i, _mlflow_template_db)) for i in range(N_PIPELINES)]
    configs += [("train", _train_config(tmp_path, tiny.manifest_path, i, _mlflow_template_db))
                for i in range(N_TRAININGS)]

    token = open(stack["token_path"]).read().strip()
    started = time.monotonic()
    with ThreadPoolExecutor(len(configs)) as pool:  # all at once
        jobs = list(pool.map(lambda sc: submit(sc[0], str(sc[1]), stack["address"], token=token), configs))
    assert len({j.job_id for j in jobs}) == len(configs)

    client = JobsClient(stack["address"], token)
    statuses = {j.job_id: client.wait(j.job_id, timeout_s=1500, poll_s=2) for j in jobs}
    wall = time.monotonic() - started
    failed = {k: client.logs(k)[-1500:] for k, v in statuses.items() if v != "SUCCEEDED"}
    assert not failed, failed

    infos = [client.info(j.job_id) for j in jobs]
    durations = [(i.end_time - i.start_time) / 1000 for i in infos]
    import statistics

    print(f"\nload: {len(jobs)} jobs ({N_PIPELINES} pipelines, {N_TRAININGS} trainings) on one head: "
          f"all SUCCEEDED in {wall:.0f} s wall; slowest job {max(durations):.0f} s; median pipeline job "
          f"{statistics.median(durations[:N_PIPELINES]):.0f} s, median training job "
          f"{statistics.median(durations[N_PIPELINES:]):.0f} s")

    manifests = [json.loads((tmp_path / f"p{i:02d}" / "manifest.json").read_text()) for i in range(N_PIPELINES)]
    assert all(m == manifests[0] for m in manifests[1:])  # identical: nothing of one job leaked into another
    assert manifests[0]["domains"]["code"]["shards"]

    losses = []
    for job in jobs[N_PIPELINES:]:
        found = re.search(r"steps: (\d+)\s+final loss: ([0-9.naninf]+)", client.logs(job.job_id))
        assert found, client.logs(job.job_id)[-1000:]
        assert int(found.group(1)) == 3
        losses.append(float(found.group(2)))
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), losses
