"""Connected components of the duplicate graph: min-label propagation over Ray tasks and files.

Nodes are split into P partitions by a hash of the node string. The edges phase writes each
partition's adjacency to ``graph/to-<q>/from-<p>.parquet`` (both directions of every edge). A
round runs one task per partition: it takes the smallest of its nodes' labels and the labels
sent to them, and sends every label that changed to the neighbours' partitions
(``r<k>/to-<d>/from-<q>.parquet``). Labels start as the nodes themselves, so they converge to
the smallest node of each component, which by construction of the node strings is the survivor.

Small graphs (``LOCAL_MAX_ROWS``, the common dedup case) skip the rounds: one task finds the
components with a compiled union-find and writes ``local/labels.parquet``.

Scaling: a task holds one partition's adjacency and labels (edges / P); a round costs P tasks and
one pass over the edges; the number of rounds is the graph's diameter (star edges make dedup
graphs shallow; a chain of pairwise-similar documents is the slow case). The driver holds only
round counters. ``state.json`` records the last finished round, so a killed run resumes from it;
inside a round a task whose ``done`` file exists is not run again.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.workdir import WorkDir, split_rows

EDGE_SCHEMA = pa.schema([("node", pa.string()), ("nbr", pa.string())])
LABEL_SCHEMA = pa.schema([("node", pa.string()), ("label", pa.string())])


def node_partitions(nodes: list[str], partitions: int) -> np.ndarray:
    return np.array([zlib.crc32(n.encode()) % partitions for n in nodes], dtype=np.int64)


def _split(table: pa.Table, partitions: int) -> dict[int, pa.Table]:
    """Rows grouped by the partition of their first column."""
    return split_rows(table, node_partitions(table.column(0).to_pylist(), partitions))


def write_graph(work: WorkDir, edges: list[tuple[str, str]], source: int, partitions: int) -> None:
    """Scatter one edges-phase task's edges (both directions) to the node partitions."""
    if not edges:
        return
    a, b = zip(*edges)
    write_graph_arrays(work, pa.array(a, pa.string()), pa.array(b, pa.string()), source, partitions)


def write_graph_arrays(work: WorkDir, a: pa.Array, b: pa.Array, source: int, partitions: int) -> None:
    """``write_graph`` of the edges (a[i], b[i]) given as two Arrow string arrays."""
    if len(a) == 0:
        return
    both = pa.table({"node": pa.concat_arrays([a, b]), "nbr": pa.concat_arrays([b, a])})
    for q, part in _split(both, partitions).items():
        work.write_table(part, "graph", f"to-{q:05d}", f"from-{source:05d}.parquet")


def _min_label(table: pa.Table) -> pa.Table:
    return table.group_by("node").aggregate([("label", "min")]).rename_columns(["node", "label"])


@ray.remote
def _round_task(work: WorkDir, k: int, q: int, partitions: int) -> int:
    adjacency = work.read_files(work.files("graph", f"to-{q:05d}"), EDGE_SCHEMA)
    if k == 0:
        nodes = pc.unique(adjacency.column("node"))
        old = pa.table({"node": nodes, "label": nodes})
        offers = adjacency.rename_columns(["node", "label"])
    else:
        old = work.read_table(f"r{k - 1:03d}", f"labels-{q:05d}.parquet")
        offers = work.read_files(work.files(f"r{k - 1:03d}", f"to-{q:05d}"), LABEL_SCHEMA)
    new = _min_label(pa.concat_tables([old, offers.cast(LABEL_SCHEMA)])).sort_by("node")
    # `old` and `new` are both keyed by node; a label only ever decreases.
    merged = new.join(old.rename_columns(["node", "old"]), "node")
    changed = merged.filter(pc.less(merged.column("label"), merged.column("old"))).select(["node", "label"])
    messages = adjacency.join(changed, "node").select(["nbr", "label"]).rename_columns(["node", "label"])
    for d, part in _split(messages, partitions).items():
        work.write_table(part.sort_by([("node", "ascending"), ("label", "ascending")]),
                         f"r{k:03d}", f"to-{d:05d}", f"from-{q:05d}.parquet")
    work.write_table(new, f"r{k:03d}", f"labels-{q:05d}.parquet")
    work.write_json({"changed": changed.num_rows}, f"r{k:03d}", f"done-{q:05d}.json")
    return changed.num_rows


def run_round(work: WorkDir, k: int, partitions: int) -> dict:
    """Round ``k``: the partitions' tasks not done yet, then ``state.json`` (the resume point)."""
    pending = [q for q in range(partitions) if not work.exists(f"r{k:03d}", f"done-{q:05d}.json")]
    ray.get([_round_task.remote(work, k, q, partitions) for q in pending])
    changed = sum(work.read_json(f"r{k:03d}", f"done-{q:05d}.json")["changed"] for q in range(partitions))
    state = {"round": k, "changed": changed}
    work.write_json(state, "state.json")
    if k > 0:
        work.delete(f"r{k - 1:03d}")  # only the last finished round is needed to go on
    return state


# Below this many graph rows (both directions of every reduced edge), the components are found
# by ONE task with a compiled union-find (pipelines.lsh.min_components) instead of propagation
# rounds of P tasks each: ~1M edges of node strings is ~100 MB in that task, and a round of P
# tasks costs seconds of scheduling and file round trips (measured, bench/near_dedup.py default
# size, base vs this, interleaved on a loaded 2-core machine: components phase 3.7 / 8.8 / 26.7 s
# (3-4 rounds) -> 0.26 / 1.3 / 1.1 s (one task)). Larger graphs keep the distributed path, whose
# memory per task is edges / P.
LOCAL_MAX_ROWS = 4_000_000


@ray.remote
def _local_task(work: WorkDir, partitions: int) -> int:
    adjacency = work.read_files([f for q in range(partitions) for f in work.files("graph", f"to-{q:05d}")],
                                EDGE_SCHEMA)
    from pipelines.lsh import min_components
    nodes, roots = min_components(adjacency.column("node").combine_chunks(), adjacency.column("nbr").combine_chunks())
    work.write_table(pa.table({"node": nodes, "label": roots}, schema=LABEL_SCHEMA), "local", "labels.parquet")
    return len(nodes)


def connected_components(work: WorkDir, partitions: int, rows: int | None = None,
                         local_max_rows: int = LOCAL_MAX_ROWS) -> tuple[pa.Table, int]:
    """(node, label) for every node of the graph; and the number of rounds it took.

    ``rows``: how many graph rows the edges phase wrote (None: unknown, use the rounds). At most
    ``local_max_rows``: one task, one "round" (see LOCAL_MAX_ROWS)."""
    state = work.read_json("state.json") if work.exists("state.json") else {"round": -1, "changed": None}
    if state.get("local") or (state["round"] == -1 and rows is not None and rows <= local_max_rows):
        if not state.get("local"):
            ray.get(_local_task.remote(work, partitions))
            work.write_json({"round": 0, "changed": 0, "local": True}, "state.json")
        return work.read_table("local", "labels.parquet").cast(LABEL_SCHEMA), 1
    while state["changed"] != 0:
        state = run_round(work, state["round"] + 1, partitions)
    k = state["round"]
    files = [f for f in work.files(f"r{k:03d}") if f.rsplit("/", 1)[-1].startswith("labels-")]
    return work.read_files(files, LABEL_SCHEMA), k + 1
