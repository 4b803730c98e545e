"""Mixtures: final weights vs natural/uniform, DoReMi trajectories, the mixing law, repetition."""

import sys
from pathlib import Path

try:  # an editable install made before dashboards/ existed does not map it: fall back to the checkout
    import dashboards  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboards import charts, common, data  # noqa: E402

st.title("Mixtures")
sel = common.sidebar()
if sel is not None:
    mix_runs = common.cached(data.mixture_runs, sel.uri, data.runs_of_stage(sel.runs, "mix"))
    if not mix_runs:
        st.info("No mixture runs (`maskmix mix ...`, stage tag \"mix\") in this selection.")
        st.stop()
    common.warn_in_progress(data.runs_of_stage(sel.runs, "mix"))

    st.header("Final weights")
    weights = data.final_weights(mix_runs)
    if weights.empty:
        st.info("The selected mix runs have not written mixture.json yet.")
    else:
        common.chart(charts.weights_bar(weights), weights, "final-weights",
                     "each mixture's mixture.json weights, natural and uniform for comparison")
        table = data.weights_table(weights)
        st.dataframe(table, hide_index=True, key="weights-table", column_config={
            c: st.column_config.NumberColumn(format="%.4f") for c in table.columns if c != "domain"})
    st.markdown("Runs: " + " · ".join(common.run_link(sel, m.run_id, m.label) for m in mix_runs))

    # ------------------------------------------------------------------ DoReMi
    st.header("DoReMi")
    doremi = [m for m in mix_runs if m.method == "doremi"]
    if not doremi:
        st.info("No DoReMi mixture (`maskmix mix doremi`) in this selection.")
    else:
        pick = st.selectbox("DoReMi run", [m.label for m in doremi], key="doremi-run")
        run = next(m for m in doremi if m.label == pick)
        st.markdown(f"MLflow: {common.run_link(sel, run.run_id, run.label)}")
        for warning in data.mixture_details(run.mixture).get("stability_warnings") or []:
            st.warning(warning)
        stability = data.doremi_stability(run.mixture)
        if not stability.empty:
            st.dataframe(stability, hide_index=True, key=f"doremi-stability-{run.run_id[:8]}", column_config={
                "split_half": st.column_config.NumberColumn(
                    format="%.3f", help="max over domains of |mean α over the proxy's first half of steps − "
                                        "mean α over its second half|: above the limit the averaged weights "
                                        "depend on the run's noise")})
        trajectory = common.cached(data.doremi_trajectory, sel.uri, run.run_id)
        if trajectory.empty:
            st.info("No doremi/weight/<domain> steps logged yet for this run.")
        else:
            st.subheader("Weight trajectory")
            common.chart(charts.stacked_area(trajectory), trajectory, f"doremi-trajectory-{run.run_id[:8]}",
                         "α after every Group-DRO proxy step (doremi/weight/<domain>)")
        excess = common.cached(data.doremi_excess, sel.uri, run.run_id)
        if not excess.empty:
            st.subheader("Per-domain excess loss")
            common.chart(charts.lines(excess, "step", "excess", "domain", "excess loss λ (nats/token)",
                                      "proxy step"), excess, f"doremi-excess-{run.run_id[:8]}",
                         "λ_i = proxy − reference NELBO per token on the same mask (doremi/excess/<domain>)")

    # ------------------------------------------------------------------ mixing laws
    st.header("Mixing law")
    laws = [m for m in mix_runs if m.method == "laws"]
    if not laws:
        st.info("No mixing-law mixture (`maskmix mix laws`) in this selection.")
    else:
        pick = st.selectbox("Mixing-law run", [m.label for m in laws], key="laws-run")
        run = next(m for m in laws if m.label == pick)
        st.markdown(f"MLflow: {common.run_link(sel, run.run_id, run.label)}")
        params = common.cached(data.law_params, sel.uri, run.run_id)
        if params is None:
            st.info("The law has not been fitted yet (no laws_params.json in a laws_fit run).")
        else:
            matrix = data.interaction_matrix(params)
            st.subheader("Interaction matrix t_ij")
            common.chart(charts.heatmap(matrix), matrix, f"laws-interaction-{run.run_id[:8]}",
                         "L_i(r) = c_i + k_i exp(Σ_j t_ij r_j), t centered per row; blue (t<0): domain j helps "
                         "domain i, red (t>0): it hurts")
            helpful, harmful = data.named_pairs(matrix)
            left, right = st.columns(2)
            left.markdown("**Helpful pairs** (more of *source* lowers *target*'s loss)")
            left.dataframe(helpful, hide_index=True, key="helpful-pairs")
            right.markdown("**Harmful pairs** (more of *source* raises *target*'s loss)")
            right.dataframe(harmful, hide_index=True, key="harmful-pairs")
            predictions = common.cached(data.law_predictions, sel.uri, run.run_id, params)
            st.subheader("Predicted vs observed, sampled mixtures")
            if predictions.empty:
                st.info("No finished sweep runs with per-domain evaluations yet.")
            else:
                common.chart(charts.predicted_vs_observed(predictions), predictions,
                             f"laws-predicted-observed-{run.run_id[:8]}",
                             "each point: one sweep_run's validation loss on one domain; dashed: perfect fit")

    # ------------------------------------------------------------------ repetition
    st.header("Repetition")
    with_rep = [m for m in mix_runs if not data.repetition_table(m.mixture).empty]
    if not with_rep:
        st.info("No mixture in this selection records a repetition cap (mix.laws.max_epochs / mix.doremi.max_epochs).")
    else:
        pick = st.selectbox("Mixture", [m.label for m in with_rep], key="repetition-run")
        run = next(m for m in with_rep if m.label == pick)
        rep = data.repetition_table(run.mixture)
        common.chart(charts.epochs_vs_cap(rep), rep, f"repetition-{run.run_id[:8]}",
                     "epochs_i = r_i · D / U_i at the mixture's token budget; dashed: the max_epochs cap")
        st.dataframe(rep, hide_index=True, key="repetition-table")
