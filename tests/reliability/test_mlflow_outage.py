"""Issue 9, faults: the MLflow tracking server becomes unreachable during training.

A real ``mlflow server`` (sqlite backend, loopback port) is SIGKILLed, by its pid, once the
training process's first steps are on it. The training (a real DeepSpeed ``train()`` inside
``infra.tracking.stage_run``, in its own process) must go on without crashing or stalling, keep
every step's metrics in ``infra.tracking.MetricSink``'s buffer, and then:

* (a) server back (restarted on the same port and backend while training runs): the buffered
  values are delivered, the run's ``train/loss`` history on the server has EVERY step with the
  value the trainer computed, and the run ends FINISHED;
* (b) server not back before training ends: after a bounded wait the values are written to
  ``<output_dir>/mlflow-undelivered-<run>.jsonl`` and a warning says how many were lost; the
  process exits 0, and the run is not marked FAILED. Server history + the local file = every step
  (a step can be in both, with one value: delivery is at least once), and once the server is back
  ``maskmix tracking redeliver`` puts the file's values, the export and the end tag on it, each
  step's value once.

The kill and the restart are triggered by what the processes report (a step on the server, step
lines printed while the server is down), never by sleeping.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.reliability.faults import MlflowServer, PythonProcess, child_env, free_port, wait_for
from tests.training_fixtures import write_tiny_corpus


STEPS = 30
# The training holds after this step until the server is down: unheld, a fast training could finish
# all its steps before step 3 reached a loaded server, leaving no steps for the outage.
HOLD_AT = 5

TRAIN_SCRIPT = r"""
import json, logging, os, sys, time
import mlflow
from infra import tracking
from infra.config import MaskmixConfig
from infra.stages import run_train_stage

uri, manifest, output_dir, steps, export = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
gate = sys.argv[6]  # training holds after step HOLD_AT until the test creates this file (server killed by then)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
# The train stage as `maskmix train` runs it (infra.stages: its MLflow run, the trainer, the end tags).
cfg = MaskmixConfig.model_validate({
    "tracking": {"uri": uri, "experiment": "outage"},
    "train": {"manifest": manifest, "output_dir": output_dir, "model": {"preset": "test"}, "seq_len": 32,
              "micro_batch_size": 4, "steps": steps, "warmup_steps": 1, "lr": 1e-3, "log_every": 1,
              "zero_stage": 0, "export": export, "register_model": "outage-model" if export else None}})
tracking.configure(cfg.tracking)
said = []

def progress(message):
    if not said:
        said.append(1)
        print("RUN", mlflow.active_run().info.run_id, flush=True)
    print(message, flush=True)
    if message.startswith("step HOLD_AT/"):
        while not os.path.exists(gate):
            time.sleep(0.05)

result = run_train_stage(cfg, progress=progress)
print("RESULT", json.dumps({"steps": result.steps, "losses": result.losses, "lost": result.metrics_lost}), flush=True)
"""


def step_of(line: str) -> int | None:
    m = re.match(r"step (\d+)/\d+ loss", line)
    return int(m.group(1)) if m else None


def last_step(proc: PythonProcess) -> int:
    return max([s for s in map(step_of, list(proc.lines)) if s is not None], default=0)


def result_of(proc: PythonProcess) -> dict:
    line = next(l for l in proc.lines if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_id_of(proc: PythonProcess) -> str:
    return proc.wait_line(lambda l: l.startswith("RUN "), "the run id").split()[1]


def history(uri: str, run_id: str, key: str = "train/loss") -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


def start_training(tmp_path, server: MlflowServer, flush_wait_s: float, export: bool = False) -> PythonProcess:
    corpus = write_tiny_corpus(tmp_path / "corpus", ["alpha", "beta"])
    return PythonProcess(TRAIN_SCRIPT.replace("HOLD_AT", str(HOLD_AT)),
                         [server.uri, corpus.manifest_path, tmp_path / "run", STEPS, int(export), tmp_path / "gate"],
                         env=child_env(MASKMIX_MLFLOW_FLUSH_WAIT_S=str(flush_wait_s)))


def kill_server_after_first_steps(server: MlflowServer, proc: PythonProcess, run_id: str, gate) -> int:
    """SIGKILL the server once step 3 is on it, then let the training (held at HOLD_AT) go on;
    returns the last step the trainer had printed."""
    def step_3_on_server():
        if proc.proc.poll() is not None:  # a training that died is a failure now, not a 300 s wait
            raise AssertionError(f"training exited {proc.proc.returncode} before step 3:\n{proc.output[-4000:]}")
        return 3 in history(server.uri, run_id)

    wait_for(step_3_on_server, "step 3 of train/loss on the server")
    server.stop()
    killed_at = last_step(proc)
    gate.touch()
    return killed_at


def test_sink_keeps_values_while_nothing_listens_and_reports_them_lost(tmp_path, caplog):
    """The sink alone, against a loopback port nobody listens on: log() never raises or blocks on
    retries, values wait with their steps, and a flush that gives up writes them out and says so."""
    import logging

    from infra.tracking import MetricSink

    sink = MetricSink("0123456789abcdef", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="infra.tracking"):
        for step in range(1, 6):
            sink.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        assert len(sink.pending) == 10 and sink.delivered == 0
        assert sum("is unreachable" in r.message for r in caplog.records) == 1  # one warning, not one per step
        assert sink.flush(wait_s=0, lost_dir=str(tmp_path)) == 10
    assert sink.pending == [] and sink.lost == 10
    rows = [json.loads(line) for line in (tmp_path / "mlflow-undelivered-0123456789abcdef.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["key"]) for r in rows) == sorted((s, k) for s in range(1, 6)
                                                                  for k in ("train/loss", "train/lr"))
    assert any("LOST 10 metric values" in r.message for r in caplog.records)


@pytest.mark.slow
def test_metrics_buffered_through_outage_and_delivered(tmp_path):
    from mlflow.tracking import MlflowClient

    with MlflowServer(tmp_path / "mlflow") as server:
        # The end-of-run flush may wait long for the server: delivery, not timing, is under test.
        with start_training(tmp_path, server, flush_wait_s=600) as proc:
            run_id = run_id_of(proc)
            killed_at = kill_server_after_first_steps(server, proc, run_id, tmp_path / "gate")
            # Training goes on while the server is down: five more steps, and the sink says it buffers.
            proc.wait_line(lambda l: "is unreachable" in l and "buffering" in l, "the buffering warning")
            proc.wait_line(lambda l: (step_of(l) or 0) >= killed_at + 5, f"step {killed_at + 5} during the outage")
            steps_in_outage = last_step(proc) - killed_at
            server.start()  # same port, same sqlite backend
            output = proc.finish()

        result = result_of(proc)
        assert result["steps"] == STEPS and result["lost"] == 0
        got = history(server.uri, run_id)
        assert sorted(got) == list(range(1, STEPS + 1))  # every step, none lost
        # log_every=1: train/loss of step s is the loss the trainer computed at step s (same float).
        assert [got[s] for s in range(1, STEPS + 1)] == result["losses"]
        assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
        recovered = re.search(r"reachable again after ([\d.]+) s: delivered (\d+) buffered", output)
        assert recovered, output[-3000:]
        assert not list((tmp_path / "run").glob("mlflow-undelivered-*"))
        print(f"\nFIGURES mlflow_outage_recovered: steps={STEPS} steps_during_outage>={steps_in_outage} "
              f"values_buffered_then_delivered={recovered.group(2)} outage_s={recovered.group(1)} lost=0")


@pytest.mark.slow
def test_metrics_reported_lost_when_server_stays_down(tmp_path):
    from mlflow.tracking import MlflowClient

    with MlflowServer(tmp_path / "mlflow") as server:
        # The run ends with an export (and a model registration) while the server is still down.
        with start_training(tmp_path, server, flush_wait_s=3, export=True) as proc:
            run_id = run_id_of(proc)
            kill_server_after_first_steps(server, proc, run_id, tmp_path / "gate")
            output = proc.finish()  # exits 0 with the server still down

        result = result_of(proc)
        assert result["steps"] == STEPS
        lost_line = re.search(r"LOST (\d+) metric values of run (\w+)", output)
        assert lost_line and lost_line.group(2) == run_id, output[-3000:]
        files = list((tmp_path / "run").glob(f"mlflow-undelivered-{run_id}.jsonl"))
        assert len(files) == 1
        rows = [json.loads(line) for line in files[0].read_text().splitlines()]
        records = [r for r in rows if "key" in r]
        assert len(records) == int(lost_line.group(1)) == result["lost"] > 0
        # the export: written, not uploaded, and said so (where its files are), not registered
        export_dir = tmp_path / "run" / "export"
        assert (export_dir / "model.safetensors").is_file() and (export_dir / "config.json").is_file()
        [not_uploaded] = [r for r in rows if r.get("undelivered") == "artifacts export/"]
        assert not_uploaded["local_path"] == str(export_dir) and not_uploaded["run_id"] == run_id
        assert not_uploaded["register"]["name"] == "outage-model"  # what redeliver registers
        assert f"NOT DELIVERED artifacts export/ of run {run_id}" in output and str(export_dir) in output
        assert "register_model=outage-model: not registered" in output
        [tag] = [r for r in rows if r.get("undelivered") == "tag maskmix.checkpoint"]  # the stage's end tag
        assert tag["local_path"].startswith(str(tmp_path / "run" / "checkpoints"))

        server.start()  # back after the run: what it has and what the file has
        client = MlflowClient(server.uri)
        on_server = history(server.uri, run_id)
        in_file = {r["step"]: r["value"] for r in records if r["key"] == "train/loss"}
        # At least once: the batch sent as the server died can be stored with its answer lost, so
        # a step may be in both places, with the same value.
        both = set(on_server) & set(in_file)
        assert all(on_server[s] == in_file[s] for s in both)
        assert sorted({**on_server, **in_file}) == list(range(1, STEPS + 1))
        assert [{**on_server, **in_file}[s] for s in range(1, STEPS + 1)] == result["losses"]
        status = client.get_run(run_id).info.status
        assert status != "FAILED" and status == "RUNNING"  # the end status could not be recorded; never FAILED
        assert client.list_artifacts(run_id, "export") == []

        # `maskmix tracking redeliver`: every value once on the server, the export and the end tag there
        redelivered = subprocess.run([sys.executable, "-m", "infra.cli", "tracking", "redeliver", str(files[0]),
                                      "--tracking-uri", server.uri], capture_output=True, text=True,
                                     env=child_env(), timeout=300)
        assert redelivered.returncode == 0, redelivered.stderr[-2000:]
        assert f"metric_values={len(records)} artifacts=1 tags=1 model_versions=1 left=0" in redelivered.stdout
        assert not files[0].exists()
        losses = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # no step twice
        assert [m.value for m in sorted(losses, key=lambda m: m.step)] == result["losses"]
        assert {a.path for a in client.list_artifacts(run_id, "export")} >= {"export/model.safetensors",
                                                                            "export/config.json"}
        assert client.get_run(run_id).data.tags["maskmix.checkpoint"] == tag["tags"]["maskmix.checkpoint"]
        # the registration the outage skipped: a version of the run's delivered export, with its tags
        [version] = client.search_model_versions("name='outage-model'")
        assert version.run_id == run_id and version.source.endswith("/export")
        assert version.source.startswith(client.get_run(run_id).info.artifact_uri)
        assert version.tags["maskmix.step"] == str(STEPS)
        print(f"\nFIGURES mlflow_outage_lost: steps={STEPS} on_server={len(on_server)} "
              f"reported_lost_values={len(records)} lost_steps_in_file={len(in_file)} "
              f"steps_in_both={len(both)} status={status} export_not_uploaded_kept_at={export_dir.name}/ "
              f"redelivered_then_on_server={len(losses)}")


def test_an_upload_through_an_outage_is_retried_then_reported_with_where_the_files_are(tmp_path, mlflow_uri, caplog):
    """deliver_or_report alone: a transient failure is retried until the wait is over, then recorded
    (run, what, local path) and warned about; a refusal (4xx) is raised at once; no run, no work."""
    import logging

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from infra import tracking

    calls = []

    def unreachable():
        calls.append(1)
        raise ConnectionError("Connection refused")

    assert tracking.deliver_or_report("artifacts x/", unreachable, str(tmp_path), lost_dir=str(tmp_path)) is True
    assert calls == []  # no active run: nothing to deliver
    with mlflow.start_run() as run, caplog.at_level(logging.WARNING, logger="infra.tracking"):
        assert tracking.deliver_or_report("artifacts x/", unreachable, str(tmp_path / "x"), lost_dir=str(tmp_path),
                                         wait_s=1.5) is False
        assert len(calls) >= 2  # retried within the wait
        [row] = [json.loads(line) for line in (tmp_path / f"mlflow-undelivered-{run.info.run_id}.jsonl").read_text()
                 .splitlines()]
        assert row == {"run_id": run.info.run_id, "undelivered": "artifacts x/", "local_path": str(tmp_path / "x"),
                       "error": "Connection refused"}
        assert any("NOT DELIVERED artifacts x/" in r.message and str(tmp_path / "x") in r.message
                   for r in caplog.records)

        def refused():
            raise MlflowException("bad request", error_code=INVALID_PARAMETER_VALUE)  # a 400

        with pytest.raises(MlflowException):
            tracking.deliver_or_report("artifacts y/", refused, str(tmp_path), lost_dir=str(tmp_path), wait_s=60)
        def local_error():
            raise FileNotFoundError(str(tmp_path / "missing"))

        with pytest.raises(FileNotFoundError):  # a local error, not an outage: no 60 s of retries
            tracking.deliver_or_report("artifacts w/", local_error, str(tmp_path), lost_dir=str(tmp_path), wait_s=60)
        assert tracking.deliver_or_report("artifacts z/", lambda: None, str(tmp_path), lost_dir=str(tmp_path)) is True


def test_redeliver_sends_each_value_once_even_when_the_server_already_has_some(tmp_path, mlflow_uri):
    """The file can hold values the server stored (its answer was lost): redelivering them adds no
    second copy. Artifacts and tags are delivered from their rows; a row that still fails stays."""
    import mlflow

    from infra import tracking

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_metrics({"train/loss": 3.0}, step=1)
        tracking.flush_metrics(run_id)
    stored = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")[0]
    rows = [{"run_id": run_id, "key": "train/loss", "value": 3.0, "step": 1, "timestamp": stored.timestamp},
            {"run_id": run_id, "key": "train/loss", "value": 2.5, "step": 2, "timestamp": stored.timestamp + 1},
            {"run_id": run_id, "undelivered": "artifacts export/", "local_path": str(tmp_path / "export"),
             "error": "x", "artifact_path": "export"},
            {"run_id": run_id, "undelivered": "tag maskmix.checkpoint", "local_path": "/ck", "error": "x",
             "tags": {"maskmix.checkpoint": "/ck"}},
            {"run_id": "0" * 32, "undelivered": "tag a", "local_path": "/a", "error": "x", "tags": {"a": "b"}}]
    path = tmp_path / f"mlflow-undelivered-{run_id}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = tracking.redeliver(str(path), mlflow_uri)
    assert result == {"metric_values": 2, "artifacts": 1, "tags": 1, "model_versions": 0, "left": 1}
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.5)]  # step 1 once
    assert [a.path for a in client.list_artifacts(run_id, "export")] == ["export/config.json"]
    assert client.get_run(run_id).data.tags["maskmix.checkpoint"] == "/ck"
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[-1:]  # the unknown run's row


def test_redeliver_to_a_server_still_down_keeps_the_file(tmp_path):
    from infra import tracking

    rows = [{"run_id": "a" * 32, "key": "train/loss", "value": 1.0, "step": s, "timestamp": s} for s in (1, 2)]
    rows.append({"run_id": "a" * 32, "undelivered": "tag t", "local_path": "/x", "error": "x", "tags": {"t": "1"}})
    path = tmp_path / "mlflow-undelivered-x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tracking.redeliver(str(path), f"http://127.0.0.1:{free_port()}")
    assert result == {"metric_values": 0, "artifacts": 0, "tags": 0, "model_versions": 0, "left": 3}
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
