"""Training: loss and per-domain ELBO curves, tokens/s and MFU, and the mixture each run used."""

import sys
from pathlib import Path

try:  # an editable install made before dashboards/ existed does not map it: fall back to the checkout
    import dashboards  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboards import charts, common, data  # noqa: E402

st.title("Training")
sel = common.sidebar()
if sel is not None:
    train = data.runs_of_stage(sel.runs, "train")
    if train.empty:
        st.info("No training runs (`maskmix train`, stage tag \"train\") in this selection.")
        st.stop()
    labels = {f"{r.run_name} · {r.run_id[:8]} · {r.start_time:%Y-%m-%d %H:%M}": r.run_id for r in train.itertuples()}
    picked = st.multiselect("Training runs", list(labels), default=list(labels)[:1], key="train-runs")
    if not picked:
        st.info("Choose at least one training run.")
        st.stop()
    run_ids = tuple(labels[p] for p in picked)
    short = {labels[p]: p.split(" · ")[1] for p in picked}
    common.warn_in_progress(train[train["run_id"].isin(run_ids)])

    st.header("Mixture used")
    linked = common.cached(data.linked_mixtures, sel.uri, train[train["run_id"].isin(run_ids)], sel.runs)
    for row in linked.itertuples():
        mix = common.run_link(sel, row.mix_run_id, f"mix run {row.mix_run_id[:8]}") if row.mix_run_id else \
            "(no mix run in this selection wrote it)"
        st.markdown(f"- {common.run_link(sel, row.run_id)}: `{row.mixture}` {mix}")
    st.dataframe(linked, hide_index=True, key="linked-mixtures")

    st.header("Loss")
    curves = common.cached(data.training_curves, sel.uri, run_ids, short)
    if curves.empty:
        st.info("No train/loss steps logged yet.")
    else:
        overall = curves[curves["domain"] == "all"]
        common.chart(charts.lines(overall, "step", "value", "run", "train/loss (NELBO, nats/token)", "step",
                                  zero_y=False),
                     overall, "train-loss")
        per_domain = curves[curves["domain"] != "all"]
        if not per_domain.empty:
            st.subheader("Per-domain training NELBO")
            common.chart(charts.lines(per_domain, "step", "value", "domain", "train/loss/<domain>", "step",
                                      dash="run" if len(run_ids) > 1 else None, zero_y=False),
                         per_domain, "train-loss-per-domain")
    evals = common.cached(data.linked_eval_runs, sel.uri, train[train["run_id"].isin(run_ids)], sel.runs)
    eval_labels = {e: f"{short[t]} eval {e[:8]}" for t, ids in evals.items() for e in ids}
    last_step = curves.groupby("run_id")["step"].max().to_dict() if not curves.empty else {}
    eval_steps = {e: last_step[t] for t, ids in evals.items() for e in ids if t in last_step}
    nelbo = common.cached(data.eval_nelbo, sel.uri, run_ids + tuple(eval_labels), {**short, **eval_labels},
                          eval_steps)
    st.subheader("Per-domain ELBO on validation")
    if nelbo.empty:
        st.info("No eval/<domain>/nats_per_token for these runs yet (set train.eval_every for curves during "
                "training; `maskmix eval` logs a separate eval run).")
    elif nelbo.groupby(["run", "domain"]).size().max() == 1:
        common.chart(charts.grouped_bars(nelbo, "domain", "value", "run", "nats/token (upper bound)"), nelbo,
                     "eval-nelbo", "eval/<domain>/nats_per_token of the runs and their eval runs")
    else:
        common.chart(charts.lines(nelbo, "step", "value", "domain", "nats/token (upper bound)", "step",
                                  dash="run" if nelbo["run"].nunique() > 1 else None, zero_y=False),
                     nelbo, "eval-nelbo",
                     "eval/<domain>/nats_per_token of the runs and their eval runs")

    st.header("Throughput")
    speed = common.cached(data.throughput, sel.uri, run_ids, short)
    if speed.empty:
        st.info("No train/tokens_per_s logged yet.")
    else:
        tps = speed[speed["metric"] == "train/tokens_per_s"]
        common.chart(charts.lines(tps, "step", "value", "run", "tokens/s", "step"), tps, "tokens-per-s")
        mfu = speed[speed["metric"] == "train/mfu"]
        if mfu.empty:
            st.info("No train/mfu: set train.peak_flops (one device's peak FLOP/s) to log MFU.")
        else:
            common.chart(charts.lines(mfu, "step", "value", "run", "MFU", "step"), mfu, "mfu")
