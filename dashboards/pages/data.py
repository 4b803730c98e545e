"""Data: the pipeline funnel per domain and stage, removals by filter rule, duplicate clusters, quarantine."""

import sys
from pathlib import Path

try:  # an editable install made before dashboards/ existed does not map it: fall back to the checkout
    import dashboards  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboards import charts, common, data  # noqa: E402

st.title("Data")
sel = common.sidebar()
if sel is not None:
    pipelines = data.runs_of_stage(sel.runs, "pipeline")
    if pipelines.empty:
        st.info("No pipeline runs (`maskmix pipeline run`, stage tag \"pipeline\") in this selection.")
        st.stop()
    common.warn_in_progress(pipelines)
    labels = {f"{r.run_name} · {r.run_id[:8]} · {r.start_time:%Y-%m-%d %H:%M}": r.run_id for r in pipelines.itertuples()}
    run_id = labels[st.selectbox("Pipeline run", list(labels), key="pipeline-run")]
    st.markdown(f"MLflow: {common.run_link(sel, run_id)}")

    st.header("Funnel")
    funnel = common.cached(data.pipeline_funnel, sel.uri, run_id)
    if funnel.empty:
        st.info("This pipeline run has not finished a stage yet.")
    else:
        common.chart(charts.funnel(funnel), funnel, f"funnel-{run_id[:8]}",
                     "documents per domain in and out of each stage (<stage>/docs_in|docs_out/<domain>)")
        st.dataframe(funnel.assign(stage=funnel["stage"].astype(str)), hide_index=True, key="funnel-table")
        totals = common.cached(data.stage_totals, sel.uri, run_id)
        st.dataframe(totals, hide_index=True, key="stage-totals")
    tokens = common.cached(data.pipeline_tokens, sel.uri, run_id)
    st.subheader("Tokens per domain (after tokenize_shard)")
    if tokens.empty:
        st.info("No tokens yet: tokens exist once the tokenize_shard stage has written the shards.")
    else:
        common.chart(charts.stacked_bars(tokens, "domain", "tokens", "split", "tokens"), tokens,
                     f"tokens-{run_id[:8]}", "train tokens: tokens/<domain>; validation: manifest.json")

    st.header("Removals by filter rule")
    removals = common.cached(data.filter_removals, sel.uri, run_id)
    if removals.empty:
        st.info("No filter report (filters/report.json) for this run: no filter removed or flagged anything, "
                "or the run has not reached the filter stage.")
    else:
        modes = sorted(removals["mode"].unique())
        mode = st.radio("Show", modes, horizontal=True, key="removal-mode")
        shown = removals[removals["mode"] == mode]
        common.chart(charts.stacked_bars(shown, "rule", "docs", "domain", "documents"), shown,
                     f"filter-{mode.replace(' ', '-')}-{run_id[:8]}",
                     "annotate-mode filters only report what they would remove" if mode != "removed" else None)
        examples = common.cached(data.filter_examples, sel.uri, run_id)
        if not examples.empty:
            st.subheader("Example removed documents")
            texts = data.example_texts(common.cached(data.pipeline_output_dir, sel.uri, run_id),
                                       examples["doc_id"].tolist())
            st.dataframe(examples.assign(text=[texts.get(i, "") for i in examples["doc_id"]]), hide_index=True,
                         key="filter-examples")

    st.header("Near-duplicate clusters")
    clusters = common.cached(data.cluster_sizes, sel.uri, run_id)
    if clusters.empty:
        st.info("No near-dedup report (near_dedup/report.json): near dedup found no clusters, was off, or has not run.")
    else:
        common.chart(charts.histogram(clusters, "size", "clusters", "cluster size (documents)", "clusters"),
                     clusters, f"cluster-sizes-{run_id[:8]}", "one document of each cluster is kept")

    st.header("Quarantine")
    quarantine = common.cached(data.quarantine_counts, sel.uri, run_id)
    if quarantine.empty:
        st.success("No quarantined records in this run.")
    else:
        common.chart(charts.histogram(quarantine, "reason", "records", "reason", "records"), quarantine,
                     f"quarantine-{run_id[:8]}", "records the readers could not parse (read/removed/<reason>)")
        st.dataframe(quarantine, hide_index=True, key="quarantine-table")
