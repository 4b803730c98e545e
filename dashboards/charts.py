"""Altair (Vega-Lite) charts of the frames in dashboards/data.py.

Colors never run out: up to 10 categories use Tableau 10, up to 20 Tableau 20, beyond that
evenly spaced hues at alternating lightness (30 domains get 30 distinct colors). Legends list
every category (Vega-Lite's default cuts a legend at 30 symbols) in columns when long. Every
chart has Vega-Embed's action menu ("..." -> Save as PNG / SVG) in the app; CSV downloads are
buttons under each chart (dashboards/common.py).
"""

from __future__ import annotations

import colorsys

import altair as alt
import pandas as pd

TABLEAU10 = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
             "#9c755f", "#bab0ac"]
TABLEAU20 = ["#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d", "#f1ce63", "#499894",
             "#86bcb6", "#e15759", "#ff9d9a", "#79706e", "#bab0ac", "#d37295", "#fabfd2", "#b07aa1", "#d4a6c8",
             "#9d7660", "#d7b5a6"]


def palette(n: int) -> list[str]:
    """``n`` distinct colors (hex)."""
    if n <= 10:
        return TABLEAU10[:max(n, 0)]
    if n <= 20:
        return TABLEAU20[:n]
    colors = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps: neighbours in the legend differ most
        light = (0.42, 0.58, 0.72)[i % 3]
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.65)
        colors.append("#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255)))
    return colors


def color_scale(categories: list[str]) -> alt.Scale:
    categories = list(dict.fromkeys(categories))
    return alt.Scale(domain=categories, range=palette(len(categories)))


def legend(categories: list[str], title: str | None = None) -> alt.Legend:
    n = len(set(categories))
    return alt.Legend(title=title, symbolLimit=0, labelLimit=220, columns=2 if n > 15 else 1,
                      orient="right")


def _color(field: str, categories: list[str], title: str | None = None) -> alt.Color:
    return alt.Color(f"{field}:N", scale=color_scale(categories), legend=legend(categories, title),
                     sort=list(dict.fromkeys(categories)))


STEP_AXIS = alt.Axis(format="d", tickMinStep=1)
LABELS = alt.Axis(labelLimit=320)


def _height(n_rows: int, per_row: int = 18, minimum: int = 220) -> int:
    return max(minimum, per_row * n_rows)


def weights_bar(weights: pd.DataFrame) -> alt.Chart:
    """Horizontal grouped bars: one group per domain, one bar per mixture / natural / uniform."""
    series = list(dict.fromkeys(weights["series"]))
    domains = sorted(weights["domain"].unique())
    n_bars = len(domains) * len(series)
    return alt.Chart(weights).mark_bar().encode(
        y=alt.Y("domain:N", sort=domains, title="domain", axis=LABELS),
        yOffset=alt.YOffset("series:N", sort=series),
        x=alt.X("weight:Q", title="weight", axis=alt.Axis(format=".0%")),
        color=_color("series", series, "mixture"),
        tooltip=["series", "domain", alt.Tooltip("weight:Q", format=".4f")],
    ).properties(height=_height(n_bars, per_row=12), width="container")


def stacked_area(frame: pd.DataFrame, value: str = "weight", title: str = "weight") -> alt.Chart:
    """The DoReMi weight trajectory: α per domain over proxy steps, stacked to 1."""
    domains = sorted(frame["domain"].unique())
    return alt.Chart(frame).mark_area().encode(
        x=alt.X("step:Q", title="proxy step", axis=STEP_AXIS),
        y=alt.Y(f"{value}:Q", stack="normalize", title=title, axis=alt.Axis(format=".0%")),
        color=_color("domain", domains),
        order=alt.Order("domain:N"),
        tooltip=["round", "step", "domain", alt.Tooltip(f"{value}:Q", format=".4f")],
    ).properties(height=320, width="container")


def lines(frame: pd.DataFrame, x: str, y: str, color: str, title: str, x_title: str | None = None,
          dash: str | None = None, log_y: bool = False, zero_y: bool = True) -> alt.Chart:
    categories = sorted(frame[color].astype(str).unique())
    enc = dict(
        x=alt.X(f"{x}:Q", title=x_title or x, axis=STEP_AXIS if x == "step" else alt.Undefined),
        y=alt.Y(f"{y}:Q", title=title, scale=alt.Scale(type="log") if log_y else alt.Scale(zero=zero_y)),
        color=_color(color, categories),
        tooltip=[c for c in frame.columns if c not in ("timestamp",)],
    )
    if dash:
        enc["strokeDash"] = alt.StrokeDash(f"{dash}:N")
    return alt.Chart(frame).mark_line(point=len(frame) < 200).encode(**enc).properties(height=300, width="container")


def heatmap(matrix: pd.DataFrame) -> alt.Chart:
    """t_ij heatmap: row = validation domain i, column = training domain j, diverging around 0."""
    targets = list(dict.fromkeys(matrix["target"]))
    sources = list(dict.fromkeys(matrix["source"]))
    bound = float(matrix["t"].abs().max() or 1.0)
    n = max(len(targets), len(sources))
    base = alt.Chart(matrix).encode(
        x=alt.X("source:N", sort=sources, title="training domain j (more of it in the mixture)"),
        y=alt.Y("target:N", sort=targets, title="validation domain i (its loss)"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("t:Q", scale=alt.Scale(scheme="redblue", domain=[-bound, bound], reverse=True),
                        title="t_ij (centered)"),
        tooltip=["target", "source", alt.Tooltip("t:Q", format=".4f"), alt.Tooltip("raw_t:Q", format=".4f")],
    )
    chart = cells
    if n <= 12:  # values in the cells while they are readable
        chart = cells + base.mark_text(fontSize=10).encode(text=alt.Text("t:Q", format=".2f"))
    side = max(260, min(900, 24 * n))
    return chart.properties(width=side, height=side)


def predicted_vs_observed(frame: pd.DataFrame) -> alt.Chart:
    domains = sorted(frame["domain"].unique())
    lo = float(min(frame["observed"].min(), frame["predicted"].min()))
    hi = float(max(frame["observed"].max(), frame["predicted"].max()))
    diagonal = alt.Chart(pd.DataFrame({"observed": [lo, hi], "predicted": [lo, hi]})).mark_line(
        color="#888", strokeDash=[4, 4]).encode(x="observed:Q", y="predicted:Q")
    points = alt.Chart(frame).mark_point(filled=True, size=60).encode(
        x=alt.X("observed:Q", title="observed validation loss (nats/token)", scale=alt.Scale(zero=False)),
        y=alt.Y("predicted:Q", title="law's prediction (nats/token)", scale=alt.Scale(zero=False)),
        color=_color("domain", domains),
        tooltip=["sweep_run", "domain", alt.Tooltip("observed:Q", format=".4f"),
                 alt.Tooltip("predicted:Q", format=".4f")],
    )
    return (diagonal + points).properties(height=340, width="container")


def epochs_vs_cap(frame: pd.DataFrame) -> alt.Chart:
    domains = sorted(frame["domain"].unique())
    bars = alt.Chart(frame).mark_bar().encode(
        y=alt.Y("domain:N", sort=domains, axis=LABELS),
        x=alt.X("epochs:Q", title="epochs over the domain's unique tokens"),
        color=alt.Color("exceeds_cap:N", scale=alt.Scale(domain=[False, True], range=["#4e79a7", "#e15759"]),
                        title="exceeds cap"),
        tooltip=["domain", alt.Tooltip("epochs:Q", format=".3f"), "max_epochs",
                 alt.Tooltip("proportion:Q", format=".4f"), "exceeds_cap"],
    )
    chart = bars
    if frame["max_epochs"].notna().any():
        cap = alt.Chart(frame.dropna(subset=["max_epochs"]).head(1)).mark_rule(color="#e15759", strokeDash=[6, 3]) \
            .encode(x="max_epochs:Q", tooltip=["max_epochs"])
        chart = bars + cap
    return chart.properties(height=_height(len(domains)), width="container")


def funnel(frame: pd.DataFrame) -> alt.Chart:
    """Documents out of each stage, one line per domain (stages in run order)."""
    stages = [str(s) for s in frame["stage"].cat.categories] if hasattr(frame["stage"], "cat") else \
        list(dict.fromkeys(frame["stage"]))
    data = frame.assign(stage=frame["stage"].astype(str))
    domains = sorted(data["domain"].unique())
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("stage:N", sort=stages, title="pipeline stage (documents out)"),
        y=alt.Y("docs_out:Q", title="documents"),
        color=_color("domain", domains),
        tooltip=["stage", "domain", "docs_in", "docs_out", "removed"],
    ).properties(height=320, width="container")


def stacked_bars(frame: pd.DataFrame, category: str, value: str, color: str, title: str) -> alt.Chart:
    categories = sorted(frame[color].astype(str).unique())
    cats = list(dict.fromkeys(frame[category]))
    return alt.Chart(frame).mark_bar().encode(
        y=alt.Y(f"{category}:N", sort=cats, title=category, axis=LABELS),
        x=alt.X(f"sum({value}):Q", title=title),
        color=_color(color, categories),
        tooltip=list(frame.columns),
    ).properties(height=_height(len(cats)), width="container")


def histogram(frame: pd.DataFrame, x: str, y: str, x_title: str, y_title: str) -> alt.Chart:
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X(f"{x}:O", title=x_title),
        y=alt.Y(f"{y}:Q", title=y_title),
        tooltip=list(frame.columns),
    ).properties(height=260, width="container")


def grouped_bars(frame: pd.DataFrame, category: str, value: str, series: str, title: str) -> alt.Chart:
    """Horizontal bars, one group per ``category``, one bar per ``series``."""
    cats = sorted(frame[category].astype(str).unique())
    groups = list(dict.fromkeys(frame[series]))
    return alt.Chart(frame).mark_bar().encode(
        y=alt.Y(f"{category}:N", sort=cats, axis=LABELS),
        yOffset=alt.YOffset(f"{series}:N", sort=groups),
        x=alt.X(f"{value}:Q", title=title),
        color=_color(series, groups),
        tooltip=list(frame.columns),
    ).properties(height=_height(len(cats) * len(groups), per_row=9), width="container")
