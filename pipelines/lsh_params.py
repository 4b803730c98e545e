"""MinHash LSH banding: detection probability, bands x rows from a threshold and a recall target.

With b bands of r rows, two documents of Jaccard similarity s share at least one band bucket with
probability ``P(s) = 1 - (1 - s^r)^b`` (the S-curve); ``(1/b)^(1/r)`` approximates its steepest
point (14 x 8: 0.72, the FineWeb/datatrove default).

``choose_bands_rows`` turns (threshold t, minimum recall R) into (b, r), with b * r <= max_perm:

    minimise   FP(b, r) = integral_0^t P(s) ds      (candidate pairs below the threshold)
    subject to P(t) >= R                            (recall at the threshold itself)

ties broken by fewer permutations (cheaper signatures and fewer band rows). datasketch's
``_optimal_param`` minimises a weighted sum of the false-positive and false-negative areas
instead, which can put the curve's midpoint at t and so miss about half the pairs at exactly
t; here the recall at t is a hard guarantee and the rest of the budget buys steepness.

Presets (``PRESETS``):
  default  14 x 8 = 112 (datatrove/FineWeb): P(0.7) = 0.56, P(0.75) = 0.77, P(0.8) = 0.92,
           P(0.85) = 0.99. It is also exactly ``choose_bands_rows(112, 0.8, 0.92)``.
  strict   11 x 10 = 110 = ``choose_bands_rows(112, 0.85, 0.9)``: a stricter notion of
           "duplicate", for corpora where fairly similar documents are legitimately different
           (versions, forms, templated pages). Midpoint (1/b)^(1/r) = 0.79, like NeMo Curator's
           20 x 13; P(0.6) = 0.06, P(0.7) = 0.27 (default: 0.21, 0.56), P(0.8) = 0.71,
           P(0.85) = 0.91, P(0.9) = 0.99, at the same signature cost (<= 112 permutations).
"""

from __future__ import annotations

import numpy as np

PRESETS: dict[str, tuple[int, int]] = {"default": (14, 8), "strict": (11, 10)}
_GRID = 2001  # points per unit of similarity for the areas (error ~1e-7, far below any tie that matters)


def detection_probability(s, bands: int, rows: int):
    """P(two documents of Jaccard similarity s share a bucket) = 1 - (1 - s^rows)^bands."""
    # -expm1(b * log1p(-s^r)): the same value, accurate where s^r is tiny (no 1 - 1e-17 == 1 loss)
    with np.errstate(divide="ignore"):  # s = 1: log1p(-1) = -inf, and -expm1(-inf) = 1 exactly
        return -np.expm1(bands * np.log1p(-np.asarray(s, dtype=np.float64) ** rows))


def approx_threshold(bands: int, rows: int) -> float:
    """(1/bands)^(1/rows): about where the S-curve is steepest."""
    return (1.0 / bands) ** (1.0 / rows)


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """integral_0^threshold P(s) ds."""
    s = np.linspace(0.0, threshold, _GRID)
    return float(np.trapezoid(detection_probability(s, bands, rows), s))


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """integral_threshold^1 (1 - P(s)) ds."""
    s = np.linspace(threshold, 1.0, _GRID)
    return float(np.trapezoid(1.0 - detection_probability(s, bands, rows), s))


def choose_bands_rows(max_perm: int, threshold: float, min_recall: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= max_perm and P(threshold) >= min_recall that minimise the
    false-positive area below the threshold (see the module doc); ValueError if none qualifies."""
    if not 0.0 < threshold < 1.0 or not 0.0 < min_recall < 1.0:
        raise ValueError("threshold and min_recall must lie strictly between 0 and 1")
    best, best_key = None, None
    for rows in range(1, max_perm + 1):
        # P(t) grows with bands: the fewest bands that meet the recall; more would only add FP.
        bands = max(1, int(np.ceil(np.log1p(-min_recall) / np.log1p(-threshold ** rows))))
        if bands * rows > max_perm:
            continue
        if detection_probability(threshold, bands, rows) < min_recall:  # the float ceil fell short
            bands += 1
            if bands * rows > max_perm:
                continue
        key = (round(false_positive_area(threshold, bands, rows), 9), bands * rows)
        if best_key is None or key < best_key:
            best, best_key = (bands, rows), key
    if best is None:
        raise ValueError(f"no bands x rows <= {max_perm} reaches recall {min_recall} at similarity {threshold}; "
                         "allow more permutations or lower min_recall")
    return best


def s_curve(bands: int, rows: int, points=None) -> list[tuple[float, float]]:
    """(similarity, detection probability) rows; default similarities 0.1 .. 1.0 in steps of 0.05."""
    points = np.round(np.arange(0.1, 1.0001, 0.05), 2) if points is None else points
    return [(float(s), float(detection_probability(s, bands, rows))) for s in points]


def format_s_curve(bands: int, rows: int, points=None) -> str:
    lines = [f"bands {bands} x rows {rows} = {bands * rows} permutations; "
             f"threshold ~ (1/b)^(1/r) = {approx_threshold(bands, rows):.3f}",
             f"{'similarity':>10}  {'P(candidate)':>12}"]
    lines += [f"{s:>10.2f}  {p:>12.4f}  {'#' * round(40 * p)}" for s, p in s_curve(bands, rows, points)]
    return "\n".join(lines)
