"""Each stage as one call: config in, artifact out, one MLflow run (a child when a parent is active).

The CLI and the demo both go through these, so a stage behaves the same whether it is run alone,
as part of the demo, or (later) as a Ray job. Stage packages are imported lazily: ``infra`` sits
below them in the import graph, and a `maskmix --help` should not pay for importing torch.
"""

from __future__ import annotations

import tempfile
from typing import Callable

from infra import tracking
from infra.config import MaskmixConfig, config_hash
from infra.output_lock import output_lock
from infra.storage import Storage, is_s3


def run_pipeline_stage(cfg: MaskmixConfig, progress: Callable[[str], None] = print,
                       force: list[str] | None = None, progress_bars: bool = False):
    """Run or resume the corpus pipeline; ``force`` names stages (or "all") to redo with all that follow."""
    from pipelines.run import run_pipeline

    pipeline = cfg.require("pipeline")
    # One writer per output_dir: a second run there would interleave its stage checkpoints and shards.
    with output_lock(pipeline.output_dir, Storage(cfg.storage), "pipeline"):
        return run_pipeline(pipeline, cfg.storage, cfg.ray, progress, force=force, progress_bars=progress_bars)


def run_mix_stage(cfg: MaskmixConfig, method: str = "baseline", progress: Callable[[str], None] | None = None):
    """`maskmix mix METHOD`: baseline (mix.method: natural | uniform | temperature), doremi or laws."""
    from mixing.run import run_mix

    mix = cfg.require("mix")
    if method != "laws":
        return run_mix(mix, cfg.storage, cfg.ray, method=method, progress=progress)
    # The laws' sweep folder is its resume state: two sweeps there would each take the other's runs.
    with output_lock(mix.sweep.output_dir, Storage(cfg.storage), "mix laws"):
        return run_mix(mix, cfg.storage, cfg.ray, method=method, progress=progress)


def run_train_stage(cfg: MaskmixConfig, progress: Callable[[str], None] = print):
    """Train, then evaluate per domain on the validation split; both logged in one 'train' run."""
    from training.launch import launch

    train_cfg = cfg.require("train")
    _check_train_inputs(train_cfg, Storage(cfg.storage))
    # The trainer logs its own params (config, model size, DeepSpeed config, weights).
    # One writer per output_dir: two runs there would write each other's checkpoints and `latest`.
    tags = {"maskmix.config_hash": config_hash(train_cfg), "maskmix.manifest": train_cfg.manifest,
            "maskmix.mixture": train_cfg.mixture or "natural"}
    with output_lock(train_cfg.output_dir, Storage(cfg.storage), "train"), \
            tracking.stage_run("train", system_metrics=True, tags=tags):
        # local (this process), torchrun (N ranks on this machine) or Ray Train, by train.launch.mode
        result = launch(train_cfg, cfg.storage, cfg.ray, progress=progress)
        # The training stands even if the tracking server is down by now (see deliver_or_report).
        tracking.tag_or_report({"maskmix.checkpoint": result.checkpoint_dir}, result.checkpoint_dir,
                               lost_dir=train_cfg.output_dir)
    return result


def _check_train_inputs(train_cfg, storage: Storage) -> None:
    """The manifest and the mixture load and agree, BEFORE the train run opens: a missing file or
    a mixture for other domains is one clear error, not a FAILED run in MLflow (the trainer loads
    them again; they are small JSON files)."""
    from infra.contracts import load_manifest, load_mixture
    from infra.errors import ContractError

    manifest = load_manifest(train_cfg.manifest, storage)
    if train_cfg.mixture:
        mixture = load_mixture(train_cfg.mixture, storage)
        unknown = sorted(set(mixture.weights) - set(manifest.domain_names()))
        if unknown:
            raise ContractError(f"{train_cfg.mixture}: weights for domains the manifest {train_cfg.manifest} does not "
                                f"have: {unknown} (it has {manifest.domain_names()})")


def run_eval_stage(cfg: MaskmixConfig, checkpoint: str | None = None, manifest: str | None = None):
    """Per-domain NELBO evaluation of a checkpoint; logs eval/<domain>/* metrics."""
    from infra.contracts import load_manifest
    from training.evaluate import evaluate, load_model, log_eval

    eval_cfg = cfg.eval or (cfg.train.eval if cfg.train else None)
    if eval_cfg is None:
        from infra.config import EvalConfig

        eval_cfg = EvalConfig()
    checkpoint = checkpoint or eval_cfg.checkpoint or (_train_checkpoint(cfg.train) if cfg.train else None)
    manifest_uri = manifest or eval_cfg.manifest or (cfg.train.manifest if cfg.train else None)
    if not checkpoint or not manifest_uri:
        from infra.errors import ConfigError

        raise ConfigError("eval needs a checkpoint and a manifest (eval.checkpoint/eval.manifest or a train: section)")
    storage = Storage(cfg.storage)
    manifest_obj = load_manifest(manifest_uri, storage)
    with tempfile.TemporaryDirectory(prefix="maskmix-eval-") as scratch:
        # The model loads before the run opens: a missing checkpoint is an error, not a FAILED run.
        model, args = load_model(_local_checkpoint(checkpoint, storage, scratch))
        # The resolved checkpoint and manifest last: eval_cfg's own (often None) must not mask what was evaluated.
        with tracking.stage_run("eval", params={**eval_cfg.model_dump(mode="json"), "checkpoint": checkpoint,
                                                "manifest": manifest_uri}):
            results = evaluate(model, manifest_obj, _parent(manifest_uri), eval_cfg, seq_len=args.max_seq_len,
                               storage=storage)
            log_eval(results)
    return results


def _train_checkpoint(train_cfg) -> str:
    """train.output_dir, or its checkpoint_uri mirror when that folder holds no checkpoint here.

    output_dir is local scratch: on another machine (or once it is cleaned up) the checkpoints
    live only in the mirror, and `maskmix eval` of the same config must still find them.
    """
    import os

    from training.checkpoint import LATEST_FILE, checkpoints_root

    if train_cfg.checkpoint_uri and not os.path.exists(os.path.join(checkpoints_root(train_cfg.output_dir),
                                                                    LATEST_FILE)):
        return train_cfg.checkpoint_uri
    return train_cfg.output_dir


def _local_checkpoint(checkpoint: str, storage: Storage, scratch: str) -> str:
    """``checkpoint`` itself, or for an s3:// one a copy in ``scratch``.

    load_model reads local files only, so an s3:// checkpoint (a train.checkpoint_uri mirror, whose
    ``latest`` names the step, or one step folder of it) would fail as "not a checkpoint"; it is
    copied to a temporary folder first, the way a run resumes from its mirror.
    """
    if not is_s3(checkpoint):
        return checkpoint
    import pyarrow.fs as pafs

    from training.checkpoint_mirror import CheckpointMirror

    mirror = CheckpointMirror(checkpoint, storage)
    try:
        if mirror.latest_tag() is not None:
            return mirror.download_latest(scratch)
    finally:
        mirror.close()
    fs, remote = storage.filesystem(checkpoint.rstrip("/"))
    pafs.copy_files(remote, scratch, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return scratch


def _parent(uri: str) -> str:
    import os
    import posixpath

    return posixpath.dirname(uri) if uri.startswith("s3://") else os.path.dirname(os.path.abspath(uri))
