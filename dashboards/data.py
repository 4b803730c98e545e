"""MLflow -> pandas: everything the dashboard pages show, as plain functions of an ``MlflowClient``.

The pages (dashboards/pages/*.py) only lay these frames out; every number on screen comes from
here, so these functions are what the tests check against the runs the stages logged:

* mix runs (mixing/run.py): ``mixture.json`` artifact, ``weight/<d>`` metrics; DoReMi nests
  doremi -> doremi_round -> doremi_proxy, whose per-step metrics are ``doremi/weight/<d>`` and
  ``doremi/excess/<d>`` (mixing/doremi.py); mixing laws nest ``sweep_run`` children (params
  ``weights.<d>``, metrics ``eval/<d>/nats_per_token``) and a ``laws_fit`` child with
  ``laws_params.json`` (c, k, t) (mixing/laws_run.py).
* pipeline runs (pipelines/run.py): ``<stage>/docs_in[/<d>]``, ``<stage>/docs_out[/<d>]``,
  ``<stage>/removed/<reason>``, ``tokens/<d>`` metrics; ``manifest.json``, ``filters/report.json``
  and ``near_dedup/report.json`` artifacts.
* train runs (training/trainer.py): ``train/loss``, ``train/loss/<d>``, ``train/tokens_per_s``,
  ``train/mfu``, ``data/epochs/<d>`` per logged step; eval runs ``eval/<d>/nats_per_token``; the
  tag ``maskmix.mixture`` names the mixture.json the run trained on.

Nothing here raises for a run that is empty or still running: a missing artifact or metric is an
empty frame (or None), and the page says so.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlparse

import numpy as np
import pandas as pd

# Artifact downloads print tqdm bars to the server log otherwise, one per artifact read.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

STAGE_TAG = "maskmix.stage"
PARENT_TAG = "mlflow.parentRunId"
# The pipeline's stages in the order they run (pipelines/run.py); others sort after, alphabetically.
PIPELINE_STAGES = ("read", "unique_ids", "quality_filter", "word_count_filter", "exact_dedup", "near_dedup",
                   "tokenize_shard")
RUN_COLUMNS = ["run_id", "run_name", "stage", "status", "experiment_id", "parent_run_id", "start_time",
               "end_time", "label"]


# --------------------------------------------------------------------------- the store


def tracking_uri_default() -> str:
    """The dashboard's tracking URI: MASKMIX_DASHBOARD_TRACKING_URI, MLFLOW_TRACKING_URI, or maskmix's default."""
    return (os.environ.get("MASKMIX_DASHBOARD_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
            or "sqlite:///./mlflow.db")


def client_for(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def mlflow_ui_base(tracking_uri: str) -> str:
    """Where a run's MLflow page lives: the tracking server itself, else MASKMIX_MLFLOW_UI_URL (`mlflow ui`)."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return os.environ.get("MASKMIX_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def run_url(ui_base: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base}/#/experiments/{experiment_id}/runs/{run_id}"


def list_experiments(client) -> pd.DataFrame:
    """Active experiments: experiment_id, name (sorted by name)."""
    rows = [{"experiment_id": e.experiment_id, "name": e.name} for e in client.search_experiments()]
    return pd.DataFrame(rows, columns=["experiment_id", "name"]).sort_values("name", ignore_index=True)


def _ms(day: dt.date | None, end: bool = False) -> int | None:
    if day is None:
        return None
    moment = dt.datetime.combine(day, dt.time.max if end else dt.time.min, tzinfo=dt.timezone.utc)
    return int(moment.timestamp() * 1000)


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def run_filter(tags: dict[str, str] | None = None, since: dt.date | None = None,
               until: dt.date | None = None) -> str:
    """An MLflow search filter: every tag equal, started on/after ``since`` and on/before ``until`` (UTC days)."""
    parts = [f"tags.`{k}` = {_quote(v)}" for k, v in dict(tags or {}).items()]
    if since is not None:
        parts.append(f"attributes.start_time >= {_ms(since)}")
    if until is not None:
        parts.append(f"attributes.start_time <= {_ms(until, end=True)}")
    return " and ".join(parts)


def parse_tag_filter(text: str) -> dict[str, str]:
    """``"key=value, other=x"`` -> {"key": "value", "other": "x"}; a part without '=' is a ValueError."""
    out = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"tag filter {part!r}: write key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        if not key:
            raise ValueError(f"tag filter {part!r}: empty key")
        out[key] = value
    return out


def search_runs(client, experiment_ids: Iterable[str], tags: dict[str, str] | None = None,
                since: dt.date | None = None, until: dt.date | None = None, max_results: int = 5000) -> pd.DataFrame:
    """Runs of the experiments matching the selection, newest first, one row each (RUN_COLUMNS)."""
    return search_runs_filtered(client, experiment_ids, run_filter(tags, since, until), max_results)


def search_runs_filtered(client, experiment_ids: Iterable[str], filter_string: str = "",
                         max_results: int = 5000) -> pd.DataFrame:
    ids = [str(e) for e in experiment_ids]
    if not ids:
        return pd.DataFrame(columns=RUN_COLUMNS)
    runs = client.search_runs(ids, filter_string, max_results=max_results, order_by=["attributes.start_time DESC"])
    rows = []
    for r in runs:
        t = r.data.tags
        start = pd.to_datetime(r.info.start_time, unit="ms", utc=True) if r.info.start_time else pd.NaT
        rows.append({
            "run_id": r.info.run_id, "run_name": r.info.run_name, "stage": t.get(STAGE_TAG, ""),
            "status": r.info.status, "experiment_id": r.info.experiment_id, "parent_run_id": t.get(PARENT_TAG),
            "start_time": start,
            "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True) if r.info.end_time else pd.NaT,
            "label": run_label(r.info.run_name, r.info.run_id, t.get("maskmix.mix_method"), r.data.params.get("method")),
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def run_label(name: str | None, run_id: str, mix_method: str | None = None, method: str | None = None) -> str:
    """A short, unique label for legends: "<method or name> · <run id prefix>"."""
    what = method or mix_method or name or "run"
    return f"{what} · {run_id[:8]}"


def runs_of_stage(runs: pd.DataFrame, stage: str) -> pd.DataFrame:
    return runs[runs["stage"] == stage].reset_index(drop=True)


def descendants(runs: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Every run below ``run_id`` (children, grandchildren ...) among ``runs``."""
    found, frontier = [], {run_id}
    while frontier:
        children = runs[runs["parent_run_id"].isin(frontier)]
        frontier = set(children["run_id"]) - set(found)
        found.extend(frontier)
    return runs[runs["run_id"].isin(found)].reset_index(drop=True)


def run_tree(client, run_id: str) -> pd.DataFrame:
    """Every run below ``run_id``, read from the store (not from a filtered selection: a tag filter
    that picks a mix run must not hide its DoReMi rounds or sweep runs)."""
    experiment = client.get_run(run_id).info.experiment_id
    # MLflow's search has no IN for tags: read the experiment's runs once and walk the tree here.
    return descendants(search_runs_filtered(client, [experiment]), run_id)


def in_progress(runs: pd.DataFrame) -> list[str]:
    """Run ids of the selection still RUNNING (their artifacts may not be there yet)."""
    return runs.loc[runs["status"] == "RUNNING", "run_id"].tolist()


# --------------------------------------------------------------------------- artifacts and metrics


def load_json_artifact(client, run_id: str, path: str) -> dict | None:
    """A run's JSON artifact, or None when the run has none at ``path`` (not logged yet, or never)."""
    folder = posixpath.dirname(path)
    try:
        listed = {a.path for a in client.list_artifacts(run_id, folder or None)}
    except Exception:  # noqa: BLE001 - an unreachable artifact store reads as "not logged"
        return None
    if path not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        with open(local, encoding="utf-8") as f:
            return json.load(f)


def metric_history(client, run_id: str, keys: Iterable[str]) -> pd.DataFrame:
    """Long frame (key, step, value, timestamp) of the given metrics of one run."""
    rows = []
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.append({"key": key, "step": int(m.step), "value": float(m.value), "timestamp": int(m.timestamp)})
    frame = pd.DataFrame(rows, columns=["key", "step", "value", "timestamp"])
    # A key logged twice at one step (a resumed run) keeps its latest value.
    return frame.sort_values(["key", "step", "timestamp"]).drop_duplicates(["key", "step"], keep="last") \
                .reset_index(drop=True)


def latest_metrics(client, run_id: str) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics)


def _suffix_keys(metrics: dict[str, float], prefix: str) -> dict[str, str]:
    """{suffix: key} of the metrics ``<prefix><suffix>`` whose suffix holds no further '/'."""
    return {k[len(prefix):]: k for k in metrics if k.startswith(prefix) and "/" not in k[len(prefix):]}


# --------------------------------------------------------------------------- mixtures


@dataclass
class MixtureRun:
    run_id: str
    label: str
    method: str
    experiment_id: str
    status: str
    mixture: dict | None  # mixture.json, None while the run is in progress


def mixture_runs(client, runs: pd.DataFrame) -> list[MixtureRun]:
    """The selection's "mix" runs with their mixture.json (oldest first, so colors stay put as runs arrive)."""
    out = []
    mix = runs_of_stage(runs, "mix").sort_values("start_time", ignore_index=True)
    for row in mix.itertuples():
        mixture = load_json_artifact(client, row.run_id, "mixture.json")
        run = client.get_run(row.run_id)
        # mixture.json once written; before that the params run_mix logs first (method, mix_method).
        method = ((mixture or {}).get("method") or run.data.params.get("method")
                  or run.data.tags.get("maskmix.mix_method") or "?")
        out.append(MixtureRun(row.run_id, run_label(None, row.run_id, method=method), method,
                              row.experiment_id, row.status, mixture))
    return out


def final_weights(mixtures: list[MixtureRun]) -> pd.DataFrame:
    """Long frame (series, kind, run_id, domain, weight): each mixture's weights, plus "natural"
    (a natural mixture's weights, else the first mixture's reference weights) and "uniform"."""
    rows, natural = [], None
    done = [m for m in mixtures if m.mixture]
    for m in done:
        for d, w in m.mixture["weights"].items():
            rows.append({"series": m.label, "kind": m.method, "run_id": m.run_id, "domain": d, "weight": float(w)})
        if m.method == "natural" and natural is None:
            natural = m.mixture["weights"]
    if natural is None:
        natural = next((m.mixture["reference_weights"] for m in done if m.mixture.get("reference_weights")), None)
    domains = sorted({r["domain"] for r in rows})
    if natural is not None:
        rows += [{"series": "natural", "kind": "reference", "run_id": None, "domain": d,
                  "weight": float(natural.get(d, 0.0))} for d in domains]
    rows += [{"series": "uniform", "kind": "reference", "run_id": None, "domain": d, "weight": 1.0 / len(domains)}
             for d in domains]
    return pd.DataFrame(rows, columns=["series", "kind", "run_id", "domain", "weight"]) if domains else \
        pd.DataFrame(columns=["series", "kind", "run_id", "domain", "weight"])


def weights_table(weights: pd.DataFrame) -> pd.DataFrame:
    """final_weights as a table: one row per domain, one column per series."""
    if weights.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(weights["series"]))
    table = weights.pivot_table(index="domain", columns="series", values="weight", aggfunc="first")
    return table[order].reset_index().rename_axis(columns=None)


def _step_series(client, mix_run_id: str, prefix: str, value: str) -> pd.DataFrame:
    """(round, step, domain, <value>) of ``<prefix><domain>`` from the runs below a DoReMi mix run."""
    below = run_tree(client, mix_run_id)
    frames = []
    rounds = below[below["stage"] == "doremi_round"].sort_values("start_time")
    for round_index, rnd in enumerate(rounds.itertuples()):
        for run in [rnd.run_id, *descendants(below, rnd.run_id)["run_id"]]:
            keys = _suffix_keys(latest_metrics(client, run), prefix)
            if not keys:
                continue
            hist = metric_history(client, run, keys.values())
            hist["domain"] = hist["key"].str[len(prefix):]
            hist["round"] = round_index
            frames.append(hist.rename(columns={"value": value})[["round", "step", "domain", value]])
    if not frames:
        return pd.DataFrame(columns=["round", "step", "domain", value])
    return pd.concat(frames, ignore_index=True).sort_values(["round", "step", "domain"], ignore_index=True)


def doremi_trajectory(client, mix_run_id: str) -> pd.DataFrame:
    """DoReMi's α after every proxy step: (round, step, domain, weight), from doremi/weight/<d>."""
    return _step_series(client, mix_run_id, "doremi/weight/", "weight")


def doremi_excess(client, mix_run_id: str) -> pd.DataFrame:
    """The per-domain excess loss λ used at every step: (round, step, domain, excess)."""
    return _step_series(client, mix_run_id, "doremi/excess/", "excess")


def mixture_details(mixture: dict | None) -> dict:
    """mixture.json's method-specific details ({} for a run still in progress or a mixture without)."""
    return (mixture or {}).get("details") or {}


def doremi_stability(mixture: dict | None) -> pd.DataFrame:
    """(round, split_half, limit, stable) from a DoReMi mixture.json's details: per round, how far
    its weights averaged over the first and second half of the proxy's steps lie apart
    (mixing.doremi.split_half_distance). Empty for mixtures written before it was recorded."""
    details = mixture_details(mixture)
    distances = details.get("round_split_half") or []
    limit = details.get("split_half_limit")
    return pd.DataFrame([{"round": i + 1, "split_half": float(d), "limit": limit,
                          "stable": None if limit is None else bool(d <= limit)}
                         for i, d in enumerate(distances)], columns=["round", "split_half", "limit", "stable"])


def _child_of_stage(client, run_id: str, stage: str) -> pd.DataFrame:
    below = run_tree(client, run_id)
    return below[below["stage"] == stage].reset_index(drop=True)


def law_params(client, mix_run_id: str) -> dict | None:
    """laws_params.json ({domains, val_domains, c, k, t}) of the laws_fit child of a laws mix run."""
    fits = _child_of_stage(client, mix_run_id, "laws_fit")
    for run_id in fits["run_id"]:
        params = load_json_artifact(client, run_id, "laws_params.json")
        if params:
            return params
    return None


def interaction_matrix(params: dict) -> pd.DataFrame:
    """t_ij in the centered gauge (Σ_j t_ij = 0, the same law on the simplex; mixing.laws.canonical):
    long frame (target i = validation domain, source j = training domain, t, raw_t).

    t_ij < 0: more of domain j in the mixture lowers the loss on domain i more than the average
    domain does (helpful); t_ij > 0: raises it (harmful)."""
    t = np.atleast_2d(np.asarray(params["t"], dtype=float))
    centered = t - t.mean(axis=1, keepdims=True)
    rows = [{"target": vi, "source": dj, "t": float(centered[i, j]), "raw_t": float(t[i, j])}
            for i, vi in enumerate(params["val_domains"]) for j, dj in enumerate(params["domains"])]
    return pd.DataFrame(rows, columns=["target", "source", "t", "raw_t"])


def named_pairs(matrix: pd.DataFrame, n: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(helpful, harmful): the ``n`` most negative / most positive t_ij with i ≠ j."""
    cross = matrix[matrix["target"] != matrix["source"]]
    helpful = cross[cross["t"] < 0].sort_values("t").head(n)
    harmful = cross[cross["t"] > 0].sort_values("t", ascending=False).head(n)
    cols = ["source", "target", "t"]
    return helpful[cols].reset_index(drop=True), harmful[cols].reset_index(drop=True)


def law_predictions(client, mix_run_id: str, params: dict) -> pd.DataFrame:
    """Predicted vs observed validation loss for every sampled mixture (sweep_run child):
    (sweep_run, domain, observed, predicted); predicted = c_i + k_i exp(Σ_j t_ij r_j)."""
    sweeps = _child_of_stage(client, mix_run_id, "sweep_run")
    domains, val = list(params["domains"]), list(params["val_domains"])
    c, k, t = (np.asarray(params[x], dtype=float) for x in ("c", "k", "t"))
    rows = []
    for run_id in sweeps["run_id"]:
        run = client.get_run(run_id)
        try:
            r = np.array([float(run.data.params[f"weights.{d}"]) for d in domains])
        except KeyError:
            continue  # params not logged yet
        predicted = c + k * np.exp(np.atleast_2d(t) @ r)
        for i, d in enumerate(val):
            observed = run.data.metrics.get(f"eval/{d}/nats_per_token")
            if observed is not None:
                rows.append({"sweep_run": run_id, "domain": d, "observed": float(observed),
                             "predicted": float(predicted[i])})
    return pd.DataFrame(rows, columns=["sweep_run", "domain", "observed", "predicted"])


def repetition_table(mixture: dict | None) -> pd.DataFrame:
    """Epochs per domain against the repetition cap, from mixture.json's details.repetition:
    (domain, proportion, epochs, max_epochs, proportion_cap, exceeds_cap)."""
    cols = ["domain", "proportion", "epochs", "max_epochs", "proportion_cap", "exceeds_cap"]
    rep = mixture_details(mixture).get("repetition")
    if not rep or not rep.get("domains"):
        return pd.DataFrame(columns=cols)
    rows = [{"domain": d, "proportion": v["proportion"], "epochs": v["epochs"], "max_epochs": rep.get("max_epochs"),
             "proportion_cap": v.get("cap"), "exceeds_cap": bool(v.get("exceeds_cap"))}
            for d, v in sorted(rep["domains"].items())]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- data pipeline


def _stage_order(stages: Iterable[str], manifest: dict | None) -> list[str]:
    known = [s["name"] for s in (manifest or {}).get("stages", [])] or list(PIPELINE_STAGES)
    present = set(stages)
    return [s for s in known if s in present] + sorted(present - set(known))


def pipeline_funnel(client, run_id: str) -> pd.DataFrame:
    """Documents per domain into and out of every stage, as the pipeline logged them:
    (stage, domain, docs_in, docs_out, removed), stages in run order. The read stage logs no
    per-domain input (quarantined records may have no domain): its docs_in is NaN there."""
    metrics = latest_metrics(client, run_id)
    cells: dict[tuple[str, str], dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] in ("docs_in", "docs_out"):
            cells.setdefault((parts[0], parts[2]), {})[parts[1]] = value
    manifest = load_json_artifact(client, run_id, "manifest.json")
    order = _stage_order({s for s, _ in cells}, manifest)
    rows = [{"stage": s, "domain": d, "docs_in": v.get("docs_in", np.nan), "docs_out": v.get("docs_out", np.nan)}
            for (s, d), v in cells.items()]
    frame = pd.DataFrame(rows, columns=["stage", "domain", "docs_in", "docs_out"])
    # tokenize_shard logs only its input per domain: every document it reads lands in a shard.
    frame["docs_out"] = frame["docs_out"].where(frame["docs_out"].notna() | (frame["stage"] != "tokenize_shard"),
                                                frame["docs_in"])
    frame["removed"] = frame["docs_in"] - frame["docs_out"]
    frame["stage"] = pd.Categorical(frame["stage"], categories=order, ordered=True)
    return frame.sort_values(["stage", "domain"], ignore_index=True)


def stage_totals(client, run_id: str) -> pd.DataFrame:
    """(stage, docs_in, docs_out) totals per stage, in run order."""
    metrics = latest_metrics(client, run_id)
    stages = {k.split("/")[0] for k in metrics if k.count("/") == 1 and k.endswith(("/docs_in", "/docs_out"))}
    order = _stage_order(stages, load_json_artifact(client, run_id, "manifest.json"))
    return pd.DataFrame([{"stage": s, "docs_in": metrics.get(f"{s}/docs_in"), "docs_out": metrics.get(f"{s}/docs_out")}
                         for s in order], columns=["stage", "docs_in", "docs_out"])


def pipeline_tokens(client, run_id: str) -> pd.DataFrame:
    """Tokens per domain after tokenize_shard (tokens exist only from there on): (domain, split, tokens, docs);
    train tokens are the logged ``tokens/<d>`` metrics, validation from the run's manifest.json."""
    rows = []
    metrics = latest_metrics(client, run_id)
    manifest = load_json_artifact(client, run_id, "manifest.json")
    if manifest:
        for d, shards in sorted(manifest["domains"].items()):
            for split in ("train", "validation"):
                part = [s for s in shards["shards"] if s["split"] == split]
                rows.append({"domain": d, "split": split, "tokens": sum(s["tokens"] for s in part),
                             "docs": sum(s["rows"] for s in part)})
    else:
        rows = [{"domain": d, "split": "train", "tokens": v, "docs": np.nan}
                for d, v in sorted(_suffix_tokens(metrics).items())]
    return pd.DataFrame(rows, columns=["domain", "split", "tokens", "docs"])


def _suffix_tokens(metrics: dict[str, float]) -> dict[str, float]:
    return {k[len("tokens/"):]: v for k, v in metrics.items() if k.startswith("tokens/")}


def filter_removals(client, run_id: str) -> pd.DataFrame:
    """Documents removed per filter rule and domain (filters/report.json): (rule, filter, domain, mode, docs);
    mode "removed" or, for annotate-mode filters, "would remove"."""
    report = load_json_artifact(client, run_id, "filters/report.json")
    rows = []
    for key, mode in (("removed", "removed"), ("would_remove", "would remove")):
        for rule, per_domain in sorted(((report or {}).get(key) or {}).items()):
            for d, n in sorted(per_domain.items()):
                rows.append({"rule": rule, "filter": rule.split(".", 1)[0], "domain": d, "mode": mode, "docs": int(n)})
    return pd.DataFrame(rows, columns=["rule", "filter", "domain", "mode", "docs"])


def filter_examples(client, run_id: str) -> pd.DataFrame:
    """(rule, doc_id) example documents per removing rule, as the filter report logged them."""
    report = load_json_artifact(client, run_id, "filters/report.json") or {}
    rows = [{"rule": r, "doc_id": i} for r, ids in sorted((report.get("examples") or {}).items()) for i in ids]
    return pd.DataFrame(rows, columns=["rule", "doc_id"])


def example_texts(output_dir: str | None, doc_ids: list[str], chars: int = 400) -> dict[str, str]:
    """The start of each example document's text, read from the pipeline output's quality-filter stage
    checkpoint (``<output_dir>/_stages/*quality_filter*/``) when that folder is readable from here
    (a local pipeline run); {} otherwise."""
    if not output_dir or not doc_ids or not os.path.isdir(output_dir):
        return {}
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    stages = os.path.join(output_dir, "_stages")
    folders = [os.path.join(stages, f) for f in sorted(os.listdir(stages))
               if "quality_filter" in f] if os.path.isdir(stages) else []
    out: dict[str, str] = {}
    for folder in folders:
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f.endswith(".parquet"))
        if not files:
            continue
        try:
            table = ds.dataset(files, format="parquet").to_table(
                columns=["id", "text"], filter=pc.field("id").isin(list(doc_ids)))
        except Exception:  # noqa: BLE001 - an older checkpoint layout: no texts, the ids still show
            continue
        for i, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            out[i] = (text or "")[:chars]
    return out


def pipeline_output_dir(client, run_id: str) -> str | None:
    """The folder of the run's manifest.json (tag maskmix.manifest)."""
    manifest = client.get_run(run_id).data.tags.get("maskmix.manifest")
    return os.path.dirname(manifest) if manifest and "://" not in manifest else None


def cluster_sizes(client, run_id: str) -> pd.DataFrame:
    """Near-duplicate clusters by size (near_dedup/report.json): (size, clusters, documents)."""
    report = load_json_artifact(client, run_id, "near_dedup/report.json") or {}
    rows = [{"size": int(s), "clusters": int(n), "documents": int(s) * int(n)}
            for s, n in (report.get("cluster_sizes") or {}).items()]
    return pd.DataFrame(rows, columns=["size", "clusters", "documents"]).sort_values("size", ignore_index=True)


def quarantine_counts(client, run_id: str) -> pd.DataFrame:
    """Quarantined records by reason (the read stage's ``read/removed/<reason>`` metrics): (reason, records)."""
    metrics = latest_metrics(client, run_id)
    rows = [{"reason": k[len("read/removed/"):], "records": int(v)} for k, v in sorted(metrics.items())
            if k.startswith("read/removed/")]
    return pd.DataFrame(rows, columns=["reason", "records"])


# --------------------------------------------------------------------------- training


def training_curves(client, run_ids: Iterable[str], labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Loss curves of train runs: (run, run_id, step, metric, domain, value) for train/loss
    (domain "all") and train/loss/<d> (the per-domain NELBO training term)."""
    frames = []
    for run_id in run_ids:
        metrics = latest_metrics(client, run_id)
        keys = [k for k in metrics if k == "train/loss" or (k.startswith("train/loss/") and k.count("/") == 2)]
        hist = metric_history(client, run_id, keys)
        hist["domain"] = hist["key"].map(lambda k: "all" if k == "train/loss" else k.split("/", 2)[2])
        hist["metric"] = hist["key"].map(lambda k: "train/loss" if k == "train/loss" else "train/loss/<domain>")
        hist["run_id"] = run_id
        hist["run"] = (labels or {}).get(run_id, run_id[:8])
        frames.append(hist[["run", "run_id", "step", "metric", "domain", "value"]])
    cols = ["run", "run_id", "step", "metric", "domain", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def throughput(client, run_ids: Iterable[str], labels: dict[str, str] | None = None) -> pd.DataFrame:
    """(run, run_id, step, metric, value) for train/tokens_per_s and train/mfu (MFU only where peak_flops was set)."""
    frames = []
    for run_id in run_ids:
        hist = metric_history(client, run_id, [k for k in ("train/tokens_per_s", "train/mfu")
                                               if k in latest_metrics(client, run_id)])
        hist = hist.rename(columns={"key": "metric"})
        hist["run_id"] = run_id
        hist["run"] = (labels or {}).get(run_id, run_id[:8])
        frames.append(hist[["run", "run_id", "step", "metric", "value"]])
    cols = ["run", "run_id", "step", "metric", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def eval_nelbo(client, run_ids: Iterable[str], labels: dict[str, str] | None = None,
               steps: dict[str, int] | None = None) -> pd.DataFrame:
    """Per-domain ELBO evaluation (eval/<d>/nats_per_token, at every logged step): (run, run_id, step, domain, value).

    ``steps`` puts a run's evaluations at a given step: an "eval" run of a final checkpoint logs
    at step 0, and belongs at the last step of the training run it evaluates."""
    frames = []
    for run_id in run_ids:
        metrics = latest_metrics(client, run_id)
        keys = [k for k in metrics if k.startswith("eval/") and k.endswith("/nats_per_token") and k.count("/") == 2]
        hist = metric_history(client, run_id, keys)
        hist["domain"] = hist["key"].str.split("/").str[1]
        if steps and run_id in steps:
            hist["step"] = int(steps[run_id])
        hist["run_id"] = run_id
        hist["run"] = (labels or {}).get(run_id, run_id[:8])
        frames.append(hist[["run", "run_id", "step", "domain", "value"]])
    cols = ["run", "run_id", "step", "domain", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def linked_eval_runs(client, train_runs: pd.DataFrame, all_runs: pd.DataFrame) -> dict[str, list[str]]:
    """{train run id: [eval run ids]}: the "eval" runs whose checkpoint param is the train run's
    output_dir, or its checkpoint (tag maskmix.checkpoint) -- as `maskmix demo` / `maskmix eval` log them."""
    evals = runs_of_stage(all_runs, "eval")
    checkpoints = {r: client.get_run(r).data.params.get("checkpoint") for r in evals["run_id"]}
    out: dict[str, list[str]] = {}
    for run_id in train_runs["run_id"]:
        run = client.get_run(run_id)
        mine = (run.data.params.get("train.output_dir"), run.data.tags.get("maskmix.checkpoint"))
        out[run_id] = [e for e, ckpt in checkpoints.items() if any(_same_path(ckpt, m) for m in mine)]
    return out


def linked_mixtures(client, train_runs: pd.DataFrame, all_runs: pd.DataFrame) -> pd.DataFrame:
    """The mixture each train run used: (run_id, mixture, mix_run_id, weights) -- the tag
    maskmix.mixture, matched to the mix run that wrote that file (its ``output`` param) and the
    weights the trainer logged (params mixture_weights.<d>)."""
    mix_runs = runs_of_stage(all_runs, "mix")
    outputs = {}
    for run_id in mix_runs["run_id"]:
        out = client.get_run(run_id).data.params.get("output")
        if out:
            outputs.setdefault(os.path.abspath(out) if "://" not in out else out, run_id)
    rows = []
    for run_id in train_runs["run_id"]:
        run = client.get_run(run_id)
        path = run.data.tags.get("maskmix.mixture")
        key = os.path.abspath(path) if path and "://" not in path and path != "natural" else path
        weights = {k[len("mixture_weights."):]: float(v) for k, v in run.data.params.items()
                   if k.startswith("mixture_weights.")}
        rows.append({"run_id": run_id, "mixture": path, "mix_run_id": outputs.get(key),
                     "weights": json.dumps(dict(sorted(weights.items())))})
    return pd.DataFrame(rows, columns=["run_id", "mixture", "mix_run_id", "weights"])
