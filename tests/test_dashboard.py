"""The analysts' dashboard (dashboards/): each page under Streamlit's AppTest against a store filled
by real maskmix runs, the data functions on synthetic 2- and 30-domain runs, empty and in-progress
stores, the charts' colors, and the `maskmix dashboard` launch command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dashboards import charts, data
from tests import dashboard_fixtures as fx

REPO = Path(__file__).resolve().parents[1]
PAGES = REPO / "dashboards" / "pages"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, ray_session) -> fx.RealStore:
    """The tiny demo path + DoReMi + mixing laws, run for real once per session (about a minute)."""
    return fx.real_store(tmp_path_factory)


@pytest.fixture(scope="session")
def client(real_store):
    return data.client_for(real_store.uri)


@pytest.fixture(scope="session")
def runs(real_store, client):
    exp = client.get_experiment_by_name(real_store.experiment)
    return data.search_runs(client, [exp.experiment_id])


def run_page(name: str, uri: str, monkeypatch, experiments: list[str] | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MASKMIX_DASHBOARD_TRACKING_URI", uri)
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=180).run()
    if experiments is not None:
        at.multiselect(key="experiments").set_value(experiments)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_frames(at) -> list[pd.DataFrame]:
    """The data behind every chart on the page (Arrow datasets of the Vega-Lite elements)."""
    frames = []
    for element in at.get("vega_lite_chart"):
        for ds in element.proto.datasets:
            frames.append(pa.ipc.open_stream(ds.data.data).read_pandas())
    return frames


def frame_with(frames, *columns) -> list[pd.DataFrame]:
    return [f for f in frames if set(columns) <= set(f.columns)]


def table_with(at, *columns) -> pd.DataFrame:
    found = [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]
    assert found, f"no table with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}"
    return found[0]


# --------------------------------------------------------------------------- pages on real runs


@pytest.mark.slow  # the real store: pipeline on Ray, DeepSpeed training (once per session)
def test_mixtures_page_shows_the_logged_weights_trajectory_and_law(real_store, client, runs, monkeypatch):
    at = run_page("mixtures", real_store.uri, monkeypatch)
    assert [h.value for h in at.header][:4] == ["Final weights", "DoReMi", "Mixing law", "Repetition"]
    domains = sorted(real_store.manifest.domains)

    # Final weights: every mix run's column equals its mixture.json (as logged to MLflow and written).
    table = table_with(at, "domain", "natural", "uniform").set_index("domain")
    assert sorted(table.index) == domains
    for method, mixture in real_store.mixtures.items():
        logged = fx.json_artifact(client, mixture.mlflow_run_id, "mixture.json")
        column = f"{method} · {mixture.mlflow_run_id[:8]}"
        assert table[column].to_dict() == pytest.approx(logged["weights"], abs=0)
        assert logged["weights"] == pytest.approx(mixture.weights, abs=0)
    assert table["natural"].to_dict() == pytest.approx(real_store.mixtures["natural"].weights, abs=0)
    assert table["uniform"].to_dict() == pytest.approx({d: 1 / len(domains) for d in domains})
    bars = frame_with(chart_frames(at), "series", "weight")[0]
    assert len(bars) == len(domains) * (len(real_store.mixtures) + 2)

    # DoReMi: the stacked area is the α the round logged (doremi_round.json), step by step.
    doremi = real_store.mixtures["doremi"]
    rnd = data.descendants(runs, doremi.mlflow_run_id).query("stage == 'doremi_round'")["run_id"].iloc[0]
    logged = fx.json_artifact(client, rnd, "doremi_round.json")["trajectory"]
    trajectory = frame_with(chart_frames(at), "step", "weight")[0]
    assert sorted(trajectory["step"].unique()) == list(range(len(logged)))
    for row in trajectory.itertuples():
        assert row.weight == pytest.approx(logged[row.step][row.domain], abs=1e-12)
    recorded = doremi.details
    stability = table_with(at, "round", "split_half", "stable")
    assert stability["split_half"].tolist() == pytest.approx(recorded["round_split_half"], abs=0)
    assert stability["stable"].tolist() == [d <= recorded["split_half_limit"] for d in recorded["round_split_half"]]
    assert [w.value for w in at.warning if w.value.startswith("doremi round")] == recorded["stability_warnings"]
    excess = frame_with(chart_frames(at), "step", "excess")[0]
    proxy = data.descendants(runs, rnd).query("stage == 'doremi_proxy'")["run_id"].iloc[0]
    for d in domains:
        history = {m.step: m.value for m in client.get_metric_history(proxy, f"doremi/excess/{d}")}
        shown = excess[excess["domain"] == d].set_index("step")["excess"].to_dict()
        assert shown == pytest.approx(history, abs=0) and len(shown) == len(logged)

    # Mixing law: the heatmap is laws_params.json's t (centered per row), the pairs name its extremes.
    laws = real_store.mixtures["laws"]
    fit = data.descendants(runs, laws.mlflow_run_id).query("stage == 'laws_fit'")["run_id"].iloc[0]
    params = fx.json_artifact(client, fit, "laws_params.json")
    t = np.asarray(params["t"])
    centered = t - t.mean(axis=1, keepdims=True)
    heat = frame_with(chart_frames(at), "target", "source", "t")[0]
    assert len(heat) == len(domains) ** 2
    for row in heat.itertuples():
        i, j = params["val_domains"].index(row.target), params["domains"].index(row.source)
        assert row.t == pytest.approx(centered[i, j]) and row.raw_t == pytest.approx(t[i, j])
    helpful, harmful = [d.value for d in at.dataframe if list(d.value.columns) == ["source", "target", "t"]]
    off = [(centered[i, j], params["domains"][j], params["val_domains"][i])
           for i in range(len(domains)) for j in range(len(domains)) if i != j]
    assert helpful.iloc[0]["t"] == pytest.approx(min(v for v, _, _ in off))
    assert (helpful.iloc[0]["source"], helpful.iloc[0]["target"]) == min(off)[1:]
    assert harmful.iloc[0]["t"] == pytest.approx(max(v for v, _, _ in off))
    assert (helpful["t"] < 0).all() and (harmful["t"] > 0).all()

    # Predicted vs observed: one point per sweep run and domain; observed = the run's logged eval loss.
    points = frame_with(chart_frames(at), "sweep_run", "observed", "predicted")[0]
    sweeps = data.descendants(runs, laws.mlflow_run_id).query("stage == 'sweep_run'")["run_id"]
    assert set(points["sweep_run"]) == set(sweeps) and len(points) == len(sweeps) * len(domains)
    for row in points.itertuples():
        run = client.get_run(row.sweep_run)
        assert row.observed == run.data.metrics[f"eval/{row.domain}/nats_per_token"]
        r = np.array([float(run.data.params[f"weights.{d}"]) for d in params["domains"]])
        i = params["val_domains"].index(row.domain)
        expected = params["c"][i] + params["k"][i] * np.exp(t[i] @ r)
        assert row.predicted == pytest.approx(expected)

    # Repetition: epochs per domain and the cap, as mixture.json's details record them.
    rep = table_with(at, "domain", "epochs", "max_epochs")
    first = next(m for m in real_store.mixtures.values() if (m.details or {}).get("repetition"))
    recorded = first.details["repetition"]
    assert rep.set_index("domain")["epochs"].to_dict() == \
        pytest.approx({d: v["epochs"] for d, v in recorded["domains"].items()}, abs=0)
    assert set(rep["max_epochs"]) == {recorded["max_epochs"]}


@pytest.mark.slow  # the real store: pipeline on Ray, DeepSpeed training (once per session)
def test_data_page_funnel_filters_clusters_and_quarantine_equal_the_pipeline_logs(real_store, client, runs,
                                                                                  monkeypatch):
    at = run_page("data", real_store.uri, monkeypatch)
    assert [h.value for h in at.header][:4] == ["Funnel", "Removals by filter rule", "Near-duplicate clusters",
                                                "Quarantine"]
    pipeline = data.runs_of_stage(runs, "pipeline")["run_id"].iloc[0]
    metrics = client.get_run(pipeline).data.metrics
    stages = {s.name: s for s in real_store.manifest.stages}

    funnel = table_with(at, "stage", "domain", "docs_in", "docs_out")
    # Stages in the order they ran; every count equals the logged metric and the manifest's stats.
    assert list(dict.fromkeys(funnel["stage"])) == [s.name for s in real_store.manifest.stages]
    for row in funnel.itertuples():
        assert row.docs_out == metrics.get(f"{row.stage}/docs_out/{row.domain}", row.docs_in)
        extra = stages[row.stage].extra
        assert row.docs_out == extra.get("per_domain_out", extra.get("per_domain_in"))[row.domain]
        if row.stage != "read":
            assert row.docs_in == metrics[f"{row.stage}/docs_in/{row.domain}"] == extra["per_domain_in"][row.domain]
    stage_table = [d.value for d in at.dataframe if list(d.value.columns) == ["stage", "docs_in", "docs_out"]][0]
    assert {r.stage: (r.docs_in, r.docs_out) for r in stage_table.itertuples()} == \
        {s.name: (s.docs_in, s.docs_out) for s in real_store.manifest.stages}

    tokens = frame_with(chart_frames(at), "domain", "split", "tokens")[0]
    train_tokens = tokens[tokens["split"] == "train"].set_index("domain")["tokens"].to_dict()
    assert train_tokens == {d: metrics[f"tokens/{d}"] for d in real_store.manifest.domains}
    assert train_tokens == {d: s.tokens("train") for d, s in real_store.manifest.domains.items()}

    # Filter removals: the report's counts per rule and domain; examples with their text.
    report = fx.json_artifact(client, pipeline, "filters/report.json")
    removed = frame_with(chart_frames(at), "rule", "domain", "docs")[0]
    assert {(r.rule, r.domain): r.docs for r in removed.itertuples()} == \
        {(rule, d): n for rule, per in report["removed"].items() for d, n in per.items()}
    assert sum(report["removed_total"].values()) > 0
    examples = table_with(at, "rule", "doc_id", "text")
    assert {(r.rule, r.doc_id) for r in examples.itertuples()} == \
        {(rule, i) for rule, ids in report["examples"].items() for i in ids}
    assert all(examples["text"].str.len() > 0)

    # Duplicate clusters: the near-dedup report's histogram; quarantine: the two bad records by reason.
    clusters = frame_with(chart_frames(at), "size", "clusters")[0]
    nd = fx.json_artifact(client, pipeline, "near_dedup/report.json")
    assert {str(r.size): r.clusters for r in clusters.itertuples()} == nd["cluster_sizes"]
    # each cluster keeps one document: the others are the stage's near_duplicate removals
    assert sum((r.size - 1) * r.clusters for r in clusters.itertuples()) == metrics["near_dedup/removed/near_duplicate"]
    quarantine = table_with(at, "reason", "records")
    assert quarantine.set_index("reason")["records"].to_dict() == {"invalid_json": 1, "not_an_object": 1}
    assert quarantine.set_index("reason")["records"].to_dict() == stages["read"].removed


@pytest.mark.slow  # the real store: pipeline on Ray, DeepSpeed training (once per session)
def test_training_page_curves_throughput_and_linked_mixture(real_store, client, runs, monkeypatch):
    at = run_page("training", real_store.uri, monkeypatch)
    train_id = real_store.train_run_id
    doremi = real_store.mixtures["doremi"]
    linked = table_with(at, "run_id", "mixture", "mix_run_id")
    assert linked.iloc[0]["run_id"] == train_id and linked.iloc[0]["mix_run_id"] == doremi.mlflow_run_id
    assert json.loads(linked.iloc[0]["weights"]) == pytest.approx(doremi.weights)
    links = " ".join(m.value for m in at.markdown)
    assert f"/runs/{doremi.mlflow_run_id}" in links and f"/runs/{train_id}" in links

    frames = chart_frames(at)
    loss = [f for f in frame_with(frames, "step", "value", "domain") if set(f["domain"]) == {"all"}][0]
    history = {m.step: m.value for m in client.get_metric_history(train_id, "train/loss")}
    assert loss.set_index("step")["value"].to_dict() == history and len(history) >= 2
    per_domain = [f for f in frame_with(frames, "metric", "domain") if "all" not in set(f["domain"])][0]
    for d in real_store.manifest.domains:
        logged = {m.step: m.value for m in client.get_metric_history(train_id, f"train/loss/{d}")}
        assert per_domain[per_domain["domain"] == d].set_index("step")["value"].to_dict() == logged
    for key in ("train/tokens_per_s", "train/mfu"):
        shown = [f for f in frame_with(frames, "metric", "value") if set(f["metric"]) == {key}][0]
        logged = {m.step: m.value for m in client.get_metric_history(train_id, key)}
        assert shown.set_index("step")["value"].to_dict() == logged and all(v > 0 for v in logged.values())
    # Per-domain ELBO: the in-training evaluations (train.eval_every) and the eval run of the checkpoint.
    nelbo = frame_with(frames, "run", "step", "domain", "value")
    nelbo = [f for f in nelbo if "metric" not in f.columns][0]
    eval_run = data.runs_of_stage(runs, "eval")["run_id"].iloc[0]
    expected = {(train_id[:8], m.step, d): m.value for d in real_store.manifest.domains
                for m in client.get_metric_history(train_id, f"eval/{d}/nats_per_token")}
    last_step = max(m.step for m in client.get_metric_history(train_id, "train/loss"))  # the evaluated checkpoint
    expected |= {(f"{train_id[:8]} eval {eval_run[:8]}", last_step, d): client.get_run(eval_run).data.metrics[
        f"eval/{d}/nats_per_token"] for d in real_store.manifest.domains}
    assert {(r.run, r.step, r.domain): r.value for r in nelbo.itertuples()} == expected


@pytest.mark.slow  # the real store: pipeline on Ray, DeepSpeed training (once per session)
def test_run_selection_by_tag_and_date(real_store, client, monkeypatch):
    import datetime as dt

    exp = client.get_experiment_by_name(real_store.experiment).experiment_id
    doremi = data.search_runs(client, [exp], tags={"maskmix.mix_method": "doremi"})
    assert doremi["run_id"].tolist() == [real_store.mixtures["doremi"].mlflow_run_id]
    today = dt.datetime.now(dt.timezone.utc).date()
    assert len(data.search_runs(client, [exp], since=today, until=today)) == \
        len(data.search_runs(client, [exp]))
    assert data.search_runs(client, [exp], until=today - dt.timedelta(days=1)).empty
    # The page with a tag filter shows only the DoReMi mixture.
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MASKMIX_DASHBOARD_TRACKING_URI", real_store.uri)
    at = AppTest.from_file(str(PAGES / "mixtures.py"), default_timeout=180).run()
    at.text_input(key="tags").set_value("maskmix.mix_method=doremi").run()
    assert not at.exception
    table = table_with(at, "domain", "natural", "uniform")
    assert [c for c in table.columns if "·" in c] == [f"doremi · {real_store.mixtures['doremi'].mlflow_run_id[:8]}"]
    # its rounds do not carry the tag, and still show: children are read from the store, not the selection
    assert len(frame_with(chart_frames(at), "step", "weight")[0]) > 0
    at.text_input(key="tags").set_value("no equals sign").run()
    assert not at.exception and any("key=value" in w.value for w in at.warning)


# --------------------------------------------------------------------------- 2 and 30 domains


@pytest.fixture(scope="module", params=[2, 30])
def synthetic(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"synthetic-{request.param}")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    logged = fx.build_synthetic_store(uri, root / "mlruns", request.param, experiment="synthetic")
    return uri, logged


def test_data_functions_for_2_and_30_domains(synthetic):
    uri, logged = synthetic
    client = data.client_for(uri)
    exp = client.get_experiment_by_name("synthetic").experiment_id
    runs = data.search_runs(client, [exp])
    domains = logged["domains"]
    n = len(domains)

    mixtures = data.mixture_runs(client, runs)
    weights = data.final_weights(mixtures)
    table = data.weights_table(weights).set_index("domain")
    assert list(table.index) == sorted(domains)
    assert table[mixtures[0].label].to_dict() == logged["final"]
    assert table["natural"].to_dict() == logged["natural"]
    assert table["uniform"].to_dict() == pytest.approx({d: 1 / n for d in domains})

    trajectory = data.doremi_trajectory(client, logged["mix_run_id"])
    assert len(trajectory) == n * len(logged["trajectory"])
    for row in trajectory.itertuples():
        assert row.weight == logged["trajectory"][row.step][row.domain]
    excess = data.doremi_excess(client, logged["mix_run_id"])
    assert {(r.step, r.domain): r.excess for r in excess.itertuples()} == \
        {(s, d): v for s, per in enumerate(logged["excess"]) for d, v in per.items()}

    fit = data.runs_of_stage(runs, "laws_fit")["run_id"].iloc[0]
    params = data.load_json_artifact(client, fit, "laws_params.json")
    matrix = data.interaction_matrix(params)
    assert len(matrix) == n * n
    centered = logged["t"] - logged["t"].mean(axis=1, keepdims=True)
    assert matrix.pivot(index="target", columns="source", values="t").loc[domains, domains].to_numpy() == \
        pytest.approx(centered)
    helpful, harmful = data.named_pairs(matrix, n=3)
    assert len(helpful) == min(3, int(((centered < 0) & ~np.eye(n, dtype=bool)).sum()))
    assert (helpful["source"] != helpful["target"]).all() and (harmful["t"] > 0).all()

    rep = data.repetition_table(mixtures[0].mixture)
    assert len(rep) == n and set(rep["max_epochs"]) == {4.0}
    assert rep.set_index("domain")["exceeds_cap"].to_dict() == {d: bool(8 * w > 4) for d, w in logged["final"].items()}

    funnel = data.pipeline_funnel(client, logged["pipeline_run_id"])
    dedup = funnel[funnel["stage"] == "exact_dedup"].set_index("domain")
    assert dedup["docs_in"].to_dict() == dict(zip(domains, logged["before"].astype(float)))
    assert dedup["removed"].to_dict() == dict(zip(domains, (logged["before"] - logged["after"]).astype(float)))
    assert list(dict.fromkeys(funnel["stage"].astype(str))) == ["read", "exact_dedup"]

    curves = data.training_curves(client, [logged["train_run_id"]])
    assert set(curves["domain"]) == {"all", *domains}

    # Charts: one distinct color per domain, every legend entry shown.
    for chart, field in ((charts.weights_bar(weights), "series"), (charts.stacked_area(trajectory), "domain"),
                         (charts.heatmap(matrix), None), (charts.funnel(funnel), "domain")):
        spec = chart.to_dict()
        if field is None:
            continue
        color = spec["encoding"]["color"]
        categories = color["scale"]["domain"]
        assert len(set(color["scale"]["range"])) == len(categories) == len(set(categories))
        assert color["legend"]["symbolLimit"] == 0


def test_palette_never_repeats():
    for n in (1, 2, 10, 11, 20, 21, 30, 60):
        colors = charts.palette(n)
        assert len(colors) == len(set(colors)) == n


def test_pages_render_synthetic_30_domains(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = fx.build_synthetic_store(uri, tmp_path / "mlruns", 30, experiment="thirty")
    for page in ("mixtures", "data", "training"):
        at = run_page(page, uri, monkeypatch, experiments=["thirty"])
        assert at.get("vega_lite_chart"), page
    at = run_page("mixtures", uri, monkeypatch, experiments=["thirty"])
    table = table_with(at, "domain", "natural", "uniform").set_index("domain")
    assert table.shape[0] == 30 and table["natural"].to_dict() == logged["natural"]
    # DoReMi's stability as its mixture.json records it: the warning, and the split-half table.
    assert [w.value for w in at.warning] == ["doremi round 1: unstable weights (synthetic)"]
    stability = table_with(at, "round", "split_half", "stable")
    assert stability.to_dict("records") == [{"round": 1, "split_half": 0.42, "limit": 0.1, "stable": False}]


# --------------------------------------------------------------------------- empty and in progress


def test_empty_store_and_empty_experiment_show_a_message(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = data.client_for(uri)
    client.create_experiment("empty", artifact_location=str(tmp_path / "mlruns"))
    for page in ("mixtures", "data", "training"):
        at = run_page(page, uri, monkeypatch, experiments=["empty"])
        assert any("No runs in empty" in i.value for i in at.info), page
        assert not at.error
    assert data.search_runs(client, []).empty
    assert data.final_weights([]).empty and data.weights_table(data.final_weights([])).empty


def test_unreadable_store_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MASKMIX_DASHBOARD_TRACKING_URI", "http://127.0.0.1:9")
    at = AppTest.from_file(str(PAGES / "data.py"), default_timeout=120).run()
    assert not at.exception
    assert any("Cannot read the tracking store" in e.value for e in at.error)


def test_runs_in_progress_show_what_they_logged(monkeypatch, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("live", artifact_location=str(tmp_path / "mlruns"))
    mix = client.create_run(exp, tags={"maskmix.stage": "mix", "maskmix.mix_method": "doremi"}, run_name="mix")
    client.log_param(mix.info.run_id, "method", "doremi")  # what run_mix logs when it starts
    doremi = client.create_run(exp, tags={"maskmix.stage": "doremi", "mlflow.parentRunId": mix.info.run_id})
    rnd = client.create_run(exp, tags={"maskmix.stage": "doremi_round", "mlflow.parentRunId": doremi.info.run_id})
    for step in range(3):
        client.log_metric(rnd.info.run_id, "doremi/weight/a", 0.5 + 0.1 * step, step=step)
        client.log_metric(rnd.info.run_id, "doremi/weight/b", 0.5 - 0.1 * step, step=step)
    pipe = client.create_run(exp, tags={"maskmix.stage": "pipeline"}, run_name="pipeline")
    client.log_metric(pipe.info.run_id, "read/docs_out/a", 10)
    client.log_metric(pipe.info.run_id, "read/docs_in", 10)
    train = client.create_run(exp, tags={"maskmix.stage": "train"}, run_name="train")
    client.log_metric(train.info.run_id, "train/loss", 4.0, step=2)

    at = run_page("mixtures", uri, monkeypatch, experiments=["live"])
    assert any("still in progress" in i.value for i in at.info)
    assert any("not written mixture.json yet" in i.value for i in at.info)
    trajectory = frame_with(chart_frames(at), "step", "weight")[0]
    assert trajectory.set_index(["step", "domain"])["weight"].to_dict() == pytest.approx(
        {(s, "a"): 0.5 + 0.1 * s for s in range(3)} | {(s, "b"): 0.5 - 0.1 * s for s in range(3)})

    at = run_page("data", uri, monkeypatch, experiments=["live"])
    assert any("still in progress" in i.value for i in at.info)
    funnel = table_with(at, "stage", "domain", "docs_out")
    assert funnel[["stage", "domain", "docs_out"]].values.tolist() == [["read", "a", 10.0]]
    assert any("No filter report" in i.value for i in at.info)

    at = run_page("training", uri, monkeypatch, experiments=["live"])
    assert any("still in progress" in i.value for i in at.info)
    loss = frame_with(chart_frames(at), "step", "value", "domain")[0]
    assert loss[["step", "value"]].values.tolist() == [[2, 4.0]]
    assert any("tokens_per_s" in i.value for i in at.info)


# --------------------------------------------------------------------------- launching


def test_serve_command_is_headless_loopback_without_stats_or_watcher(tmp_path):
    from dashboards.serve import APP, command

    argv, env = command("sqlite:///./rel.db", port=8765, base_env={})
    assert argv[:4] == [sys.executable, "-m", "streamlit", "run"] and argv[4] == str(APP)
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8765"
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
    assert opts["--server.fileWatcherType"] == "none"
    assert env["MASKMIX_DASHBOARD_TRACKING_URI"] == "sqlite:///" + str(Path("rel.db").resolve())
    assert command(None, base_env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})[1][
        "MASKMIX_DASHBOARD_TRACKING_URI"] == "http://mlflow:5000"


def test_cli_has_a_dashboard_command():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "infra.cli", "dashboard", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for opt in ("--tracking-uri", "--host", "--port", "127.0.0.1", "8501"):
        assert opt in out.stdout


def test_run_links_point_at_the_mlflow_ui(monkeypatch):
    monkeypatch.delenv("MASKMIX_MLFLOW_UI_URL", raising=False)
    assert data.mlflow_ui_base("https://mlflow.example.org/") == "https://mlflow.example.org"
    assert data.mlflow_ui_base("sqlite:///x.db") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MASKMIX_MLFLOW_UI_URL", "http://ui:5000/")
    assert data.run_url(data.mlflow_ui_base("sqlite:///x.db"), "3", "abc") == "http://ui:5000/#/experiments/3/runs/abc"
