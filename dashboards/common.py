"""What every page shares: the tracking store, the run selection in the sidebar, CSV downloads,
links to MLflow, and messages instead of stack traces.

Loads go through ``cached`` (st.cache_data, 30 s) keyed by the tracking URI and the arguments,
so switching pages does not re-read MLflow, and a run in progress shows new points within 30 s.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from dashboards import data

CACHE_TTL_S = 30


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _cached_call(name: str, uri: str, args: tuple, kwargs: tuple):
    fn = getattr(data, name)
    return fn(data.client_for(uri), *args, **dict(kwargs))


def cached(fn, uri: str, *args, **kwargs):
    """``fn(MlflowClient(uri), *args, **kwargs)`` for a function of dashboards.data, cached."""
    return _cached_call(fn.__name__, uri, args, tuple(sorted(kwargs.items())))


@dataclass
class Selection:
    uri: str
    ui_base: str
    experiments: pd.DataFrame  # the chosen experiments
    runs: pd.DataFrame  # every run of them matching the tag/date filter

    def link(self, run_id: str) -> str:
        row = self.runs[self.runs["run_id"] == run_id]
        exp = row["experiment_id"].iloc[0] if len(row) else self.experiments["experiment_id"].iloc[0]
        return data.run_url(self.ui_base, exp, run_id)


def sidebar() -> Selection | None:
    """The run selection (tracking URI, experiments, tags, dates); None (with a message) when empty."""
    st.sidebar.header("Runs")
    uri = st.sidebar.text_input("Tracking URI", value=data.tracking_uri_default(), key="tracking_uri",
                                help="sqlite:///path/mlflow.db, a folder, or http(s)://mlflow-server")
    try:
        experiments = cached(data.list_experiments, uri)
    except Exception as e:  # noqa: BLE001 - a wrong URI is the user's to fix, not a stack trace
        st.error(f"Cannot read the tracking store {uri!r}: {type(e).__name__}: {e}")
        return None
    if experiments.empty:
        st.info(f"No experiments in {uri}. Run a maskmix stage (e.g. `maskmix demo`) against this store.")
        return None
    names = experiments["name"].tolist()
    # maskmix's own experiment first (tracking.experiment's default), else the first one a user made.
    default = [n for n in names if n == "maskmix"] or [n for n in names if n != "Default"][:1] or names[:1]
    chosen = st.sidebar.multiselect("Experiments", names, default=default, key="experiments")
    tag_text = st.sidebar.text_input("Tags (key=value, comma separated)", key="tags",
                                     help="e.g. maskmix.mix_method=doremi")
    use_dates = st.sidebar.checkbox("Filter by start date", key="use_dates")
    since = until = None
    if use_dates:
        today = dt.date.today()
        picked = st.sidebar.date_input("Started between", value=(today - dt.timedelta(days=30), today),
                                       key="dates")
        if isinstance(picked, (tuple, list)) and len(picked) == 2:
            since, until = picked
    ui_base = st.sidebar.text_input("MLflow UI", value=data.mlflow_ui_base(uri), key="ui_base",
                                    help="where run links point (MASKMIX_MLFLOW_UI_URL; `mlflow ui` for a local store)")
    if not chosen:
        st.info("Choose at least one experiment in the sidebar.")
        return None
    try:
        tags = data.parse_tag_filter(tag_text)
    except ValueError as e:
        st.warning(str(e))
        return None
    exps = experiments[experiments["name"].isin(chosen)]
    runs = cached(data.search_runs, uri, tuple(exps["experiment_id"]), tags=tuple(sorted(tags.items())) or None,
                  since=since, until=until)
    if runs.empty:
        st.info(f"No runs in {', '.join(chosen)}" + (" matching the filter." if tags or since else ".")
                + " Runs appear here once a maskmix stage has logged to this store.")
        return None
    return Selection(uri=uri, ui_base=ui_base, experiments=exps, runs=runs)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "chart"


def chart(chart_obj, frame: pd.DataFrame, name: str, caption: str | None = None) -> None:
    """An Altair chart (its "..." menu saves PNG/SVG) plus a CSV download of exactly its data."""
    st.altair_chart(chart_obj, width="stretch")
    download(frame, name, caption)


def download(frame: pd.DataFrame, name: str, caption: str | None = None) -> None:
    cols = st.columns([1, 4])
    cols[0].download_button("Download CSV", frame.to_csv(index=False).encode(), file_name=f"{slug(name)}.csv",
                            mime="text/csv", key=f"csv-{slug(name)}")
    if caption:
        cols[1].caption(caption)


def run_link(sel: Selection, run_id: str, text: str | None = None) -> str:
    return f"[{text or run_id[:8]}]({sel.link(run_id)})"


def runs_table(sel: Selection, runs: pd.DataFrame, key: str) -> None:
    """Runs with a link to each one's MLflow page."""
    table = runs[["label", "stage", "status", "start_time", "run_id"]].copy()
    table["mlflow"] = [sel.link(r) for r in table["run_id"]]
    st.dataframe(table, hide_index=True, key=key, column_config={
        "mlflow": st.column_config.LinkColumn("MLflow", display_text="open run")})


def warn_in_progress(runs: pd.DataFrame) -> None:
    running = data.in_progress(runs)
    if running:
        st.info(f"{len(running)} run(s) still in progress ({', '.join(r[:8] for r in running)}): "
                "showing what they have logged so far; artifacts appear when they finish.")
