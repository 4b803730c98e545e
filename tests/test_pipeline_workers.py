"""What the pipeline ships to Ray workers: functions from modules that do not load the driver's
MLflow tracking (a worker imports the module of every function it runs)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys

import pipelines.run as pipeline_run

SHIPPING_METHODS = {"map_batches", "map_groups", "flat_map"}  # (.filter here is pyarrow's, on the driver)


def _shipped_functions() -> list[str]:
    """Names passed as the first argument of a Ray Data transform anywhere in pipelines/run.py."""
    tree = ast.parse(inspect.getsource(pipeline_run))
    names = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SHIPPING_METHODS and node.args):
            first = node.args[0]
            assert isinstance(first, ast.Name), f"line {node.lineno}: a transform given {ast.dump(first)[:80]}, " \
                                                "not a module-level function"
            names.append(first.id)
    return names


def test_every_shipped_function_lives_outside_the_driver_module():
    names = _shipped_functions()
    # the transforms of every stage: read, filter, dedup, near dedup, tokenize/shard, checkpoints
    assert {"checkpoint_block", "cast_parsed", "parse_file", "normalize_batch", "mark_ids", "tokenize_batch",
            "write_domain_shards", "mark_duplicate_ids", "kept_rows", "good_documents"} <= set(names)
    modules = set()
    for name in names:
        obj = getattr(pipeline_run, name, None)
        if obj is None:  # a local: the filter chain (pipelines.filters.build_chain), checked below
            continue
        assert obj.__module__ != "pipelines.run", f"{name} is defined in pipelines.run"
        modules.add(obj.__module__)
    assert "pipelines.batches" in modules
    # Those modules load neither MLflow nor the driver module (checked in a fresh interpreter).
    code = ("import sys\n" + "".join(f"import {m}\n" for m in sorted(modules | {"pipelines.filters"}))
            + "print(sorted(m for m in ('mlflow', 'pipelines.run', 'infra.tracking') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
