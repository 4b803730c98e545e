"""Issue 9, faults: a training process SIGKILLed (a) between two checkpoint writes and (b) DURING a
checkpoint write. Resuming must pick the last COMPLETE checkpoint (never the half-written folder,
even though it is the newest step folder on disk), and the run must then produce exactly the
losses and weights of a clean run that was never killed.

What makes (b) safe is training.checkpoint's protocol: DeepSpeed's files, the weights and the
JSON files go into ``step-NNNNNNNN/``, ``trainer_state.json`` is written last (temp + rename), and
only then is ``checkpoints/latest`` replaced (temp + rename). A resume follows ``latest``; a folder
without ``trainer_state.json`` is debris and is rewritten when training reaches that step again.

The kill in (b) is placed by watching the filesystem from the test: the moment the new step
folder has a file in it and no ``trainer_state.json`` yet, the process gets SIGKILL. If the write
won the race (the folder was already complete), the test resumes and tries the next checkpoint.

Tolerance: none. Every process runs the same CPU kernels with the same thread count, and a resume
restores weights, optimizer moments, sampler cursors and every RNG (trainer_state.json), so the
resumed losses and weights are bitwise those of the clean run; any difference is a resume bug.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.reliability.faults import PythonProcess, wait_for
from tests.training_fixtures import write_tiny_corpus

pytestmark = [pytest.mark.slow]

STEPS, EVERY = 12, 2

TRAIN_SCRIPT = r"""
import json, sys
from infra.config import ModelConfig, TrainConfig
from training.trainer import train

manifest, output_dir = sys.argv[1], sys.argv[2]
cfg = TrainConfig(manifest=manifest, output_dir=output_dir, model=ModelConfig(preset="test", dropout=0.1),
                  seq_len=32, micro_batch_size=4, steps=%d, checkpoint_every=%d, warmup_steps=2, lr=1e-2,
                  log_every=1, zero_stage=2, export=False)
result = train(cfg, progress=lambda m: print(m, flush=True))
print("RESULT", json.dumps({"steps": result.steps, "losses": result.losses}), flush=True)
""" % (STEPS, EVERY)


def start(corpus, output_dir) -> PythonProcess:
    return PythonProcess(TRAIN_SCRIPT, [corpus.manifest_path, output_dir])


def result_of(proc: PythonProcess) -> dict:
    line = next(l for l in proc.lines if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def ckpt_dir(output_dir, step: int) -> str:
    return os.path.join(str(output_dir), "checkpoints", f"step-{step:08d}")


def latest_tag(output_dir) -> str:
    return open(os.path.join(str(output_dir), "checkpoints", "latest")).read().strip()


def weights(output_dir, step: int):
    from training.checkpoint import load_weights

    return load_weights(ckpt_dir(output_dir, step))


def assert_same_weights(a, b) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), {"alpha": 1, "beta": 3})


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
    """The reference: the same run, never killed."""
    out = tmp_path_factory.mktemp("clean")
    with start(corpus, out) as proc:
        proc.finish()
    result = result_of(proc)
    assert result["steps"] == STEPS and len(result["losses"]) == STEPS
    return out, result["losses"]


def resume_and_compare(corpus, out, clean, expected_from: int) -> float:
    """Resume; it must start from ``expected_from`` and end exactly like the clean run."""
    clean_out, clean_losses = clean
    with start(corpus, out) as proc:
        proc.finish()
    resumed = [l for l in proc.lines if l.startswith("resumed from")]
    assert resumed == [f"resumed from {ckpt_dir(out, expected_from)} at step {expected_from}"], proc.output[-3000:]
    result = result_of(proc)
    assert result["losses"] == clean_losses[expected_from:]  # bitwise (see the module docstring)
    for step in range(expected_from + EVERY, STEPS + 1, EVERY):
        assert os.path.exists(os.path.join(ckpt_dir(out, step), "trainer_state.json"))
        assert_same_weights(weights(out, step), weights(clean_out, step))
    assert latest_tag(out) == f"step-{STEPS:08d}"
    return len(result["losses"])


def test_killed_between_checkpoint_writes(corpus, clean, tmp_path):
    out = tmp_path / "run"
    with start(corpus, out) as proc:
        # "step 5" is printed after step 5 (no checkpoint at 5) and before step 6's checkpoint starts.
        proc.wait_line(lambda l: l.startswith("step 5/"), "step 5")
        proc.kill()
    assert latest_tag(out) == "step-00000004"
    assert not os.path.exists(ckpt_dir(out, 6))
    redone = resume_and_compare(corpus, out, clean, expected_from=4)
    print(f"\nFIGURES training_killed_between: steps={STEPS} killed_after_step=5 resumed_from=4 "
          f"steps_redone={redone} losses_equal=bitwise")


def test_killed_during_checkpoint_write(corpus, clean, tmp_path):
    from training.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    target, landed, attempts = EVERY * 2, None, 0
    while landed is None and target < STEPS:
        attempts += 1
        folder = ckpt_dir(out, target)
        with start(corpus, out) as proc:
            # The first file of the new checkpoint is on disk: the write has begun.
            wait_for(lambda: os.path.isdir(folder) and os.listdir(folder) or proc.proc.poll() is not None,
                     f"checkpoint {target} to start", interval=0.0005)
            proc.kill()
        if not os.path.exists(os.path.join(folder, "trainer_state.json")):
            landed = (target, sorted(os.listdir(folder)))
        else:  # the write finished first: try the next checkpoint
            target = int(latest_tag(out)[5:]) + EVERY
    assert landed is not None, "no kill landed inside a checkpoint write"
    step, half_written_files = landed
    # The newest folder on disk is the half-written one; `latest` still names the one before it.
    assert latest_tag(out) == f"step-{step - EVERY:08d}"
    assert latest_checkpoint(str(out)) == ckpt_dir(out, step - EVERY)
    redone = resume_and_compare(corpus, out, clean, expected_from=step - EVERY)
    print(f"\nFIGURES training_killed_during_write: steps={STEPS} kill_attempts={attempts} "
          f"killed_while_writing=step-{step:08d} files_present_at_kill={half_written_files} "
          f"resumed_from={step - EVERY} steps_redone={redone} losses_equal=bitwise")
