"""`maskmix` command line: one verb per stage, each reading one YAML config.

    maskmix pipeline run CONFIG   raw corpora -> shards + manifest.json
    maskmix mix baseline CONFIG   manifest -> mixture.json (natural | uniform | temperature)
    maskmix mix doremi CONFIG     manifest -> mixture.json (+ DoReMi-shaped export) from proxy runs
    maskmix mix laws CONFIG       manifest -> mixture.json from a proxy sweep + fitted mixing law
    maskmix train CONFIG          manifest + mixture -> checkpoint (+ per-domain eval)
    maskmix eval CONFIG           checkpoint -> per-domain NELBO, perplexity bound, bits/byte
    maskmix sample [CONFIG]       checkpoint + the manifest's tokenizer -> generated texts
    maskmix demo                  all of the above on a corpus harvested from this machine

Every verb takes ``--set key.path=value`` overrides. Errors in config or artifacts print one
clear message and exit with status 2; nothing is half-done before the config is validated.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from infra.errors import MaskmixError

app = typer.Typer(help=__doc__.split("\n\n")[0] + "\n\nmaskmix: data pipeline, mixture optimizer and "
                  "trainer for masked-diffusion language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
pipeline_app = typer.Typer(help="Corpus pipelines on Ray Data.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
mix_app = typer.Typer(help="Compute a mixture (the `mix:` section) and write mixture.json: "
                      "baseline | doremi | laws, each an MLflow run.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(mix_app, name="mix")
app.add_typer(config_app, name="config")
dedup_app = typer.Typer(help="Near-dedup tools (MinHash LSH).", no_args_is_help=True)
app.add_typer(dedup_app, name="dedup")

ConfigArg = typer.Argument(..., exists=False, help="YAML config file (see configs/).")
SetOpt = typer.Option(None, "--set", help="Override a config value, e.g. --set train.steps=100 (repeatable).")


def _setup_logging(verbose: bool) -> None:
    from infra.tracking import RedactingFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from infra import tracking
    from infra.config import RESOLVED_ENV, load_config

    if os.environ.get(RESOLVED_ENV) == "1":  # a submitted job: its compiled kernels first (infra/jobs.py)
        from infra.jobs import install_compile_cache

        install_compile_cache()

    cfg = load_config(config, overrides or [])
    for secret in (cfg.storage.access_key_id, cfg.storage.secret_access_key, cfg.storage.session_token):
        if secret is not None:
            tracking.register_secret(secret.get_secret_value())
    tracking.configure(cfg.tracking)
    return cfg


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@pipeline_app.command("run")
def pipeline_run(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt,
                 force: Optional[list[str]] = typer.Option(
                     None, "--force", help="Redo STAGE and every stage after it, even if finished: read, unique_ids, "
                     "quality_filter, exact_dedup, near_dedup, tokenizer, tokenize_shard, or 'all' (repeatable)."),
                 progress_bars: Optional[bool] = typer.Option(
                     None, "--progress-bars/--no-progress-bars",
                     help="Ray Data progress bars (default: on when stderr is a terminal)."),
                 verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")):
    """Read, clean, deduplicate, tokenize and shard the corpora of the `pipeline:` section.

    Resumable: finished stages (``<output_dir>/_stages/*/_DONE.json`` matching the inputs and the
    config) are loaded instead of re-run, and a finished pipeline does nothing.
    """
    _setup_logging(verbose)
    try:
        from infra.stages import run_pipeline_stage
        from pipelines.stage_store import resolve_force

        try:
            resolve_force(force)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--force") from None
        cfg = _load(config, set_)
        bars = sys.stderr.isatty() if progress_bars is None else progress_bars  # bars in a log file are noise
        manifest, uri = run_pipeline_stage(cfg, force=force, progress_bars=bars)
    except MaskmixError as e:
        _fail(e)
    typer.echo(f"manifest: {uri}")
    for name, shards in sorted(manifest.domains.items()):
        typer.echo(f"  {name:<16} {shards.rows('train'):>8} train docs {shards.tokens('train'):>10} tokens "
                   f"{shards.rows('validation'):>6} validation docs")


def _weights_table(mixture) -> str:
    ref = mixture.reference_weights or {}
    # DoReMi's reference weights are whatever mix.doremi.reference_weights named; the others record natural.
    ref_label = "reference" if mixture.method == "doremi" else "natural"
    lines = [f"{'domain':<16} {'weight':>8} {ref_label:>9}"]
    lines += [f"{d:<16} {w:>8.4f} {ref.get(d, float('nan')):>9.4f}" for d, w in sorted(mixture.weights.items())]
    return "\n".join(lines)


def _mix(method: str, config: Path, set_: Optional[list[str]], verbose: bool) -> None:
    _setup_logging(verbose)
    try:
        from infra.stages import run_mix_stage

        cfg = _load(config, set_)
        mixture = run_mix_stage(cfg, method, progress=lambda msg: typer.echo(msg, err=True))
    except MaskmixError as e:
        _fail(e)
    typer.echo(f"mixture ({mixture.method}): {cfg.mix.output}")
    typer.echo(_weights_table(mixture))
    if method == "doremi":
        from mixing.run import doremi_export_path

        typer.echo(f"DoReMi-shaped export: {doremi_export_path(cfg.mix.output)}")
        limit = mixture.details["split_half_limit"]
        for i, distance in enumerate(mixture.details["round_split_half"]):
            typer.echo(f"round {i + 1}: split-half distance {distance:.3f} "
                       f"({'stable' if distance <= limit else 'UNSTABLE'}: limit {limit})")
    if method == "laws":
        details = mixture.details
        intervals = (details.get("intervals") or {}).get("loss", {})
        level = (details.get("intervals") or {}).get("level")
        typer.echo(f"\npredicted validation loss (nats/token){f' with {level:.0%} bootstrap intervals' if level else ''}:")
        for d, loss in sorted(details["predicted_losses"].items()):
            lo_hi = intervals.get(d)
            typer.echo(f"  {d:<16} {loss:.4f}" + (f"  [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""))
        held = (details.get("fit") or {}).get("held_out")
        if held:
            typer.echo(f"held-out fit error: mae {held['mae']:.4f} nats over {held['n']} runs")


VerboseOpt = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")


@mix_app.command("baseline")
def mix_baseline(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, verbose: bool = VerboseOpt):
    """Baseline mixture (mix.method: natural | uniform | temperature) -> mixture.json."""
    _mix("baseline", config, set_, verbose)


@mix_app.command("doremi")
def mix_doremi(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, verbose: bool = VerboseOpt):
    """DoReMi with masked-diffusion proxies (mix.doremi) -> mixture.json + <stem>.doremi.json."""
    _mix("doremi", config, set_, verbose)


@mix_app.command("laws")
def mix_laws(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, verbose: bool = VerboseOpt):
    """Data mixing laws: proxy sweep (mix.sweep), fit and capped optimum (mix.laws) -> mixture.json."""
    _mix("laws", config, set_, verbose)


@app.command()
def train(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt,
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")):
    """Train a masked-diffusion model on DeepSpeed (the `train:` section); resumes from its output_dir."""
    _setup_logging(verbose)
    try:
        from infra.stages import run_train_stage

        result = run_train_stage(_load(config, set_))
    except MaskmixError as e:
        _fail(e)
    typer.echo(f"checkpoint: {result.checkpoint_dir}  steps: {result.steps}  final loss: {result.final_loss:.4f}")


@app.command("eval")
def evaluate(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt,
             checkpoint: Optional[str] = typer.Option(None, help="Checkpoint folder (default: train.output_dir)."),
             manifest: Optional[str] = typer.Option(None, help="manifest.json (default: train.manifest).")):
    """Per-domain NELBO (nats/token, perplexity bound, bits/byte, 95% interval) of a checkpoint."""
    _setup_logging(False)
    try:
        from infra.stages import run_eval_stage

        results = run_eval_stage(_load(config, set_), checkpoint, manifest)
    except MaskmixError as e:
        _fail(e)
    from infra.demo import format_eval_table

    typer.echo(format_eval_table(results))


@app.command()
def demo(config: Optional[Path] = typer.Option(None, help="Optional YAML to adjust the demo (see configs/demo.yaml)."),
         set_: Optional[list[str]] = SetOpt,
         output_dir: Optional[str] = typer.Option(None, help="Where the demo writes (default demo-out/)."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")):
    """Harvest a real corpus from this Python install, then run pipeline -> mix -> train -> eval."""
    _setup_logging(verbose)
    try:
        from infra.demo import run_demo

        overrides = list(set_ or []) + ([f"demo.output_dir={output_dir}"] if output_dir else [])
        run_demo(_load(config, overrides))
    except MaskmixError as e:
        _fail(e)


@app.command("sample")
def sample_text(config: Optional[Path] = typer.Argument(None, help="Optional YAML (its train:/eval: sections "
                                                                    "supply the checkpoint and manifest)."),
                set_: Optional[list[str]] = SetOpt,
                checkpoint: Optional[str] = typer.Option(None, help="Checkpoint or training output folder "
                                                         "(default: eval.checkpoint, then train.output_dir)."),
                manifest: Optional[str] = typer.Option(None, help="manifest.json whose tokenizer decodes "
                                                       "(default: eval.manifest, then train.manifest)."),
                n: int = typer.Option(4, "--n", "-n", help="Number of samples."),
                length: int = typer.Option(64, help="Tokens to generate per sample (after the prompt)."),
                steps: Optional[int] = typer.Option(None, help="Unmasking steps (default: length)."),
                temperature: float = typer.Option(1.0, help="Sampling temperature (0: greedy)."),
                block_length: Optional[int] = typer.Option(None, help="Semi-autoregressive block length "
                                                           "(must divide length; default: one block)."),
                seed: int = typer.Option(0, help="Random seed (same seed, same text)."),
                prompt: Optional[str] = typer.Option(None, help="Text kept fixed at the start of every sample."),
                jsonl: bool = typer.Option(False, "--jsonl", help="One JSON object per sample instead of text.")):
    """Generate text from a checkpoint with the masked-diffusion sampler."""
    _setup_logging(False)
    try:
        from infra.config import load_config
        from infra.errors import ConfigError
        from infra.storage import Storage
        from training.generate import generate

        # No MLflow run: sampling reads artifacts and writes nothing.
        cfg = load_config(config, set_ or [])
        sections = [s for s in (cfg.eval, cfg.train.eval if cfg.train else None) if s is not None]
        checkpoint = checkpoint or next((s.checkpoint for s in sections if s.checkpoint), None) or \
            (cfg.train.output_dir if cfg.train else None)
        manifest = manifest or next((s.manifest for s in sections if s.manifest), None) or \
            (cfg.train.manifest if cfg.train else None)
        if not checkpoint or not manifest:
            raise ConfigError("sample needs --checkpoint and --manifest (or a config with a train: section)")
        samples = generate(checkpoint, manifest, n=n, length=length, steps=steps, temperature=temperature,
                           block_length=block_length, seed=seed, prompt=prompt, storage=Storage(cfg.storage))
    except MaskmixError as e:
        _fail(e)
    for i, s in enumerate(samples):
        if jsonl:
            typer.echo(json.dumps({"sample": i, "text": s.text, "token_ids": s.token_ids, "n_prompt": s.n_prompt}))
        else:
            typer.echo(f"--- sample {i + 1}/{len(samples)} ---\n{s.text}")


@config_app.command("show")
def config_show(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt):
    """Print the resolved config (file + environment + --set), secrets masked."""
    try:
        from infra.config import load_config

        cfg = load_config(config, set_ or [])
    except MaskmixError as e:
        _fail(e)
    import yaml

    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))


@config_app.command("schema")
def config_schema():
    """Print the JSON schema of a config file (every key, type, default and description)."""
    from infra.config import MaskmixConfig

    typer.echo(json.dumps(MaskmixConfig.model_json_schema(), indent=2))


@dedup_app.command("scurve")
def dedup_scurve(bands: Optional[int] = typer.Option(None, min=1, help="LSH bands (default 14)"),
                 rows: Optional[int] = typer.Option(None, min=1, help="rows per band (default 8)"),
                 preset: Optional[str] = typer.Option(None, help="default | strict"),
                 threshold: Optional[float] = typer.Option(None, help="derive bands x rows for this similarity"),
                 min_recall: Optional[float] = typer.Option(None, "--min-recall", help="with --threshold (default 0.9)")):
    """Print the S-curve P(candidate | Jaccard s) = 1 - (1 - s^rows)^bands, given or derived."""
    from pydantic import ValidationError

    from infra.config import NearDedupConfig
    from pipelines.lsh_params import format_s_curve

    given = {"bands": bands, "rows": rows, "preset": preset, "threshold": threshold, "min_recall": min_recall}
    try:
        cfg = NearDedupConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        _fail(ValueError("; ".join(err["msg"] for err in e.errors())))
    typer.echo(format_s_curve(cfg.bands, cfg.rows))


@dedup_app.command("index-info")
def dedup_index_info(uri: str = typer.Argument(..., help="a near-dedup index (local folder or s3://)"),
                     config: Optional[str] = typer.Option(None, "--config", help="YAML config (storage endpoint)"),
                     set_: Optional[list[str]] = SetOpt):
    """Print a persistent near-dedup index's parameters, partitions and runs as JSON."""
    from infra.config import load_config
    from pipelines.dedup_index import index_info

    # Only the storage section (S3 endpoint, credentials: config, environment, --set) is needed;
    # no tracking set-up, so stdout is the JSON alone.
    try:
        typer.echo(json.dumps(index_info(uri, load_config(config, set_ or []).storage), indent=2))
    except Exception as e:  # noqa: BLE001 - a missing or foreign index is the user's error
        _fail(e)


# --------------------------------------------------------------------------- cluster jobs and the local stack

jobs_app = typer.Typer(help="Jobs submitted with `maskmix submit` (Ray Jobs API).", no_args_is_help=True)
stack_app = typer.Typer(help="A local stack: Ray head (token auth) + MLflow server + dashboard, on loopback.",
                        no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(stack_app, name="stack")
AddressOpt = typer.Option(..., "--address", envvar="RAY_API_SERVER_ADDRESS",
                          help="The cluster's Jobs API, http://HEAD:8265 (env RAY_API_SERVER_ADDRESS).")
TokenOpt = typer.Option(None, "--token", help="Ray auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                        "~/.ray/auth_token).")
StackDirOpt = typer.Option(".maskmix/stack", "--dir", help="Where the stack keeps its state, logs and stores.")


def _jobs_client(address: str, token: Optional[str]):
    from infra.jobs import JobsClient

    return JobsClient(address, token)


@app.command()
def submit(stage: str = typer.Argument(..., help="pipeline | mix | train | eval"),
           config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt,
           address: Optional[str] = typer.Option(None, "--address", envvar="RAY_API_SERVER_ADDRESS",
                                                 help="The cluster's Jobs API, http://HEAD:8265; none: run here, "
                                                 "in this process, as the stage's own command does."),
           method: str = typer.Option("doremi", help="mix: baseline | doremi | laws"),
           cpus: Optional[float] = typer.Option(None, help="CPUs reserved for the job's driver"),
           gpus: Optional[float] = typer.Option(None, help="GPUs: for the driver, or per train worker with --workers"),
           workers: Optional[int] = typer.Option(None, help="train: Ray Train workers (sets train.launch.mode=ray)"),
           job_id: Optional[str] = typer.Option(None, "--job-id", help="submission id (default: readable, unique)"),
           token: Optional[str] = TokenOpt,
           wait: bool = typer.Option(False, "--wait", help="Follow the logs until the job ends; exit 1 unless it "
                                     "SUCCEEDED.")):
    """Submit a stage to a Ray cluster through the Jobs API (the same config runs here without --address)."""
    _setup_logging(False)
    if address is None:
        local = {"pipeline": pipeline_run, "train": train, "eval": evaluate}
        if stage == "mix":
            return _mix(method, config, set_, False)
        if stage not in local:
            _fail(ValueError(f"unknown stage {stage!r}; choose pipeline, mix, train or eval"))
        kwargs = {"config": config, "set_": set_}
        if stage == "pipeline":
            kwargs |= {"force": None, "progress_bars": False, "verbose": False}
        elif stage == "train":
            kwargs |= {"verbose": False}
        else:
            kwargs |= {"checkpoint": None, "manifest": None}
        return local[stage](**kwargs)
    try:
        from infra.jobs import submit as submit_job

        job = submit_job(stage, str(config), address, set_, token=token, cpus=cpus, gpus=gpus, workers=workers,
                         job_id=job_id, method=method)
    except MaskmixError as e:
        _fail(e)
    typer.echo(f"submitted {job.job_id} to {job.address}: {job.entrypoint}")
    typer.echo(f"  follow: maskmix jobs logs {job.job_id} --follow --address {job.address}")
    if wait:
        _follow(_jobs_client(address, token), job.job_id)


def _follow(client, job_id: str) -> None:
    for chunk in client.follow(job_id):
        typer.echo(chunk, nl=False)
    status = client.status(job_id)
    typer.echo(f"\njob {job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(address: str = AddressOpt, token: Optional[str] = TokenOpt,
              all_jobs: bool = typer.Option(False, "--all", help="Also jobs not submitted by maskmix.")):
    """Jobs on the cluster: id, status, stage, user, config hash, start time."""
    try:
        jobs = _jobs_client(address, token).list(all_jobs)
    except MaskmixError as e:
        _fail(e)
    import datetime

    typer.echo(f"{'job id':<58} {'status':<10} {'stage':<14} {'user':<10} {'config':<12} started")
    for j in jobs:
        md = j.metadata or {}
        started = datetime.datetime.fromtimestamp(j.start_time / 1000).isoformat(timespec="seconds") \
            if j.start_time else "-"
        typer.echo(f"{j.submission_id or j.job_id:<58} {j.status.value:<10} {md.get('stage', '-'):<14} "
                   f"{md.get('user', '-'):<10} {md.get('config_hash', '-'):<12} {started}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = AddressOpt, token: Optional[str] = TokenOpt):
    """A job's status and message."""
    try:
        info = _jobs_client(address, token).info(job_id)
    except MaskmixError as e:
        _fail(e)
    typer.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = AddressOpt, token: Optional[str] = TokenOpt,
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends.")):
    """A job's driver logs."""
    try:
        client = _jobs_client(address, token)
        if follow:
            return _follow(client, job_id)
        typer.echo(client.logs(job_id), nl=False)
    except MaskmixError as e:
        _fail(e)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = AddressOpt, token: Optional[str] = TokenOpt):
    """Stop a running job and wait until it has stopped."""
    try:
        status = _jobs_client(address, token).stop(job_id)
    except MaskmixError as e:
        _fail(e)
    typer.echo(f"{job_id}: {status}")


@stack_app.command("up")
def stack_up(directory: Path = StackDirOpt,
             host: str = typer.Option("127.0.0.1", help="Address the services bind to (loopback by default)."),
             cpus: Optional[int] = typer.Option(None, help="CPUs the Ray head offers (default: all)."),
             object_store_mb: int = typer.Option(1024, "--object-store-mb", min=75,
                                                 help="Ray object store (shared memory), MiB."),
             artifacts: Optional[str] = typer.Option(None, help="MLflow artifact destination: a folder or s3:// "
                                                     "(default <dir>/mlartifacts)."),
             config: Optional[Path] = typer.Option(None, "--config", help="YAML whose storage: section (S3 endpoint "
                                                   "and credentials) the MLflow server uses for s3:// artifacts."),
             set_: Optional[list[str]] = SetOpt):
    """Start a Ray head, an MLflow server and the dashboard; print what to export to use them."""
    from infra.config import load_config
    from infra.stack import Stack

    try:
        storage = load_config(config, set_ or []).storage
        services = Stack(directory).up(host=host, ray_cpus=cpus, artifacts=artifacts, storage=storage,
                                       object_store_memory=object_store_mb * 1024**2)
    except MaskmixError as e:
        _fail(e)
    for name, svc in services.items():
        typer.echo(f"{name:<7} {svc.url}  pid {svc.pid}  log {svc.log}")
    typer.echo("\nto use it:")
    for key, value in Stack(directory).env().items():
        typer.echo(f"  export {key}={value}")


@stack_app.command("status")
def stack_status(directory: Path = StackDirOpt):
    """Each service of the stack: running, answering, its URL."""
    from infra.stack import Stack

    stack = Stack(directory)
    status = stack.status()
    if not status:
        typer.echo(f"no stack in {stack.dir}")
        raise typer.Exit(1)
    for name, s in status.items():
        state = "up" if s["answers"] else ("running, not answering" if s["running"] else "down")
        typer.echo(f"{name:<7} {state:<24} {s['url']}  pid {s['pid']}")
    for key, value in stack.env().items():
        typer.echo(f"  export {key}={value}")
    if not all(s["answers"] for s in status.values()):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(directory: Path = StackDirOpt):
    """Stop exactly the processes `stack up` started."""
    from infra.stack import Stack

    for name, result in Stack(directory).down().items():
        typer.echo(f"{name:<7} {result}")


tracking_app = typer.Typer(help="MLflow tracking tools.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("redeliver")
def tracking_redeliver(file: Path = typer.Argument(..., help="An mlflow-undelivered-<run>.jsonl file (written in "
                                                   "the output folder when the tracking server stayed down)."),
                       tracking_uri: Optional[str] = typer.Option(
                           None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                           help="The MLflow store the run is on (default: $MLFLOW_TRACKING_URI, else "
                           "sqlite:///./mlflow.db).")):
    """Deliver the metric values, artifacts and tags a run could not deliver during an outage."""
    from infra import tracking
    from infra.config import TrackingConfig

    _setup_logging(False)
    if not file.is_file():
        _fail(MaskmixError(f"{file}: no such file"))
    result = tracking.redeliver(str(file), tracking_uri or TrackingConfig().uri)
    typer.echo(" ".join(f"{k}={v}" for k, v in result.items()))
    if result["left"]:
        typer.echo(f"{result['left']} rows not delivered, kept in {file}", err=True)
        raise typer.Exit(1)


@app.command("dashboard")
def dashboard(tracking_uri: Optional[str] = typer.Option(
                  None, "--tracking-uri", help="MLflow store to read (default: $MLFLOW_TRACKING_URI, else "
                  "sqlite:///./mlflow.db); a sqlite file, a folder or an http(s) tracking server."),
              host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
              port: int = typer.Option(8501, help="Port to serve on."),
              mlflow_ui_url: Optional[str] = typer.Option(
                  None, "--mlflow-ui-url", help="Where run links point (default: the tracking server, "
                  "else http://127.0.0.1:5000 for `mlflow ui`).")):
    """Start the analysts' dashboard (Streamlit): mixtures, data pipeline and training runs from MLflow."""
    from dashboards.serve import exec_server

    typer.echo(f"maskmix dashboard on http://{host}:{port} (Ctrl-C stops it)", err=True)
    exec_server(tracking_uri, host, port, mlflow_ui_url)  # this process becomes the server


def main() -> None:  # python -m infra.cli
    app()


if __name__ == "__main__":
    main()
