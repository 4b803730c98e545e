"""`maskmix demo`: every stage for real, on a corpus harvested from this machine's Python install.

harvest -> pipeline (Ray Data) -> mixtures (natural, uniform) -> train (DeepSpeed ZeRO-2) -> eval,
all under one MLflow parent run with a child run per stage. Stage configs are derived from the
`demo:` section, so the demo is also a worked example of each stage's config.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable

from infra import tracking
from infra.config import (
    DemoConfig, EvalConfig, InputSpec, MaskmixConfig, MixConfig, ModelConfig, PipelineConfig, ShardConfig, TokenizerConfig,
    TrainConfig,
    WordCountFilterConfig,
)
from infra.stages import run_eval_stage, run_mix_stage, run_pipeline_stage, run_train_stage


def demo_stage_configs(cfg: MaskmixConfig) -> MaskmixConfig:
    """The full stage configuration the demo runs, derived from ``cfg.demo``."""
    demo = cfg.demo
    out = os.path.abspath(demo.output_dir)
    data = os.path.join(out, "data")
    manifest = os.path.join(data, "manifest.json")
    mixture = os.path.join(out, "mixtures", f"{demo.mixture}.json")
    eval_cfg = EvalConfig(max_docs_per_domain=demo.eval_docs_per_domain, mc_samples=4)
    return cfg.model_copy(update={
        "pipeline": PipelineConfig(
            inputs=[InputSpec(path=os.path.join(out, "corpus"))],
            output_dir=data,
            word_count_filter=WordCountFilterConfig(min_words=demo.min_words),
            # The published filters, mostly annotating (see DEMO_FILTERS in infra/config.py).
            filters=demo.filters,
            tokenizer=TokenizerConfig(vocab_size=demo.vocab_size),
            # A few hundred documents per domain: hold out enough of each to evaluate on.
            shards=ShardConfig(validation_fraction=0.1, min_validation_docs=4),
        ),
        "mix": MixConfig(manifest=manifest, method=demo.mixture, output=mixture),
        "train": TrainConfig(
            manifest=manifest, mixture=mixture, output_dir=os.path.join(out, "train"),
            model=ModelConfig(preset=demo.model_preset), seq_len=demo.seq_len,
            micro_batch_size=demo.micro_batch_size, steps=demo.train_steps,
            warmup_steps=max(1, demo.train_steps // 10), log_every=max(1, demo.train_steps // 15),
            zero_stage=2, eval=eval_cfg,
        ),
        "eval": eval_cfg.model_copy(update={"checkpoint": os.path.join(out, "train"), "manifest": manifest}),
    })


def format_filter_report(manifest) -> list[str]:
    """One line per published filter: documents it removed / would remove (annotate mode) per domain."""
    stage = next((s for s in manifest.stages if s.name == "quality_filter"), None)
    report = stage.extra.get("filter_report") if stage is not None else None
    if not report:
        return []
    docs = report.get("docs", {})
    lines = []
    for name in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"):
        parts = []
        for key, label in (("removed", "removed"), ("would_remove", "would remove")):
            per: Counter = Counter()
            for rule, by_domain in report.get(key, {}).items():
                if rule.split(".", 1)[0] == name:
                    per.update(by_domain)
            if per:
                parts.append(f"{label} " + ", ".join(f"{d} {per[d]}/{docs.get(d, 0)}" for d in sorted(per)))
        lines.append(f"{name:<18} {'; '.join(parts) or 'nothing'}")
    return lines


def format_eval_table(results: dict) -> str:
    header = f"{'domain':<14}{'docs':>6}{'tokens':>9}{'nats/token':>13}{'± 95%':>8}{'ppl bound':>11}{'bits/byte':>11}"
    lines = [header, "-" * len(header)]
    for name, r in sorted(results.items()):
        lines.append(f"{name:<14}{r.docs:>6}{r.tokens:>9}{r.nats_per_token:>13.3f}{r.ci95:>8.3f}"
                     f"{r.perplexity_bound:>11.1f}{r.bits_per_byte:>11.3f}")
    return "\n".join(lines)


def run_demo(cfg: MaskmixConfig, progress: Callable[[str], None] = print) -> dict:
    from pipelines.demo_corpus import harvest

    if cfg.demo is None:
        cfg = cfg.model_copy(update={"demo": DemoConfig()})
    cfg = demo_stage_configs(cfg)
    demo = cfg.demo
    out = os.path.abspath(demo.output_dir)
    started = time.perf_counter()

    def step(msg: str) -> None:
        progress(f"[demo {time.perf_counter() - started:6.1f}s] {msg}")

    with tracking.stage_run("demo", params={"demo": demo.model_dump(mode="json")}) as parent:
        step(f"harvesting a corpus from this Python install into {out}/corpus")
        stats = harvest(os.path.join(out, "corpus"), domains=demo.corpus.domains,
                        max_bytes_per_domain=demo.corpus.max_bytes_per_domain)
        for name, s in stats.items():
            step(f"  {name:<10} {s['docs']:>5} docs {s['bytes'] / 1e6:6.2f} MB")
        tracking.log_json(stats, "corpus_stats.json")

        step("pipeline: read -> normalize -> filter -> exact dedup -> near dedup -> tokenize -> shard (Ray Data)")
        manifest, manifest_uri = run_pipeline_stage(cfg, progress=lambda m: step(m))
        report_lines = format_filter_report(manifest)
        if report_lines:
            step(f"  quality filters (scores: {os.path.join(cfg.pipeline.output_dir, 'filters', 'scores.parquet')})")
            for line in report_lines:
                step(f"    {line}")

        step("mixtures: natural and uniform baselines")
        mixtures = {}
        for method in ("natural", "uniform"):
            mix_cfg = cfg.model_copy(update={"mix": cfg.mix.model_copy(update={
                "method": method, "output": os.path.join(out, "mixtures", f"{method}.json")})})
            mixtures[method] = run_mix_stage(mix_cfg)
            weights = ", ".join(f"{d}={w:.3f}" for d, w in sorted(mixtures[method].weights.items()))
            step(f"  {method:<8} {weights}")

        step(f"train: {demo.model_preset} model, {demo.train_steps} steps, DeepSpeed ZeRO-2 on "
             f"{demo.mixture} weights")
        result = run_train_stage(cfg, progress=lambda m: step(m))

        step("eval: per-domain NELBO on the validation split")
        results = run_eval_stage(cfg)
        tracking.log_metrics({f"eval/{d}/nats_per_token": r.nats_per_token for d, r in results.items()})
        parent_id = parent.info.run_id

    elapsed = time.perf_counter() - started
    print()
    print(format_eval_table(results))
    print()
    print(f"demo finished in {elapsed:.0f}s; everything is under {out}/")
    print(f"  manifest:   {manifest_uri}")
    print(f"  mixtures:   {out}/mixtures/{{natural,uniform}}.json")
    print(f"  checkpoint: {result.checkpoint_dir}")
    print(f"  MLflow parent run {parent_id} in {cfg.tracking.uri} (experiment {cfg.tracking.experiment!r})")
    ui_uri = cfg.tracking.uri
    if ui_uri.startswith("sqlite:///./"):
        ui_uri = "sqlite:///" + os.path.abspath(ui_uri[len("sqlite:///"):])
    print(f"  open the UI: .venv/bin/mlflow ui --backend-store-uri {ui_uri} --host 127.0.0.1 --port 5000")
    return {"manifest": manifest, "mixtures": mixtures, "train": result, "eval": results, "parent_run_id": parent_id}
