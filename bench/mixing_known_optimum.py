#!/usr/bin/env python
"""Mixture optimizers on data with a known answer: regret of uniform, natural, DoReMi and the mixing law.

Four training domains (five in ``junk``), each a synthetic HMM (pipelines.synthetic), written
DIRECTLY as token-id shards (the symbols first, then pad and mask; one document per sequence, as
tests/test_training_hmm.py) into a temporary manifest:

* ``markov``   - a sharp (learnable) HMM, plenty of documents;
* ``noise``    - a near-uniform HMM (high Dirichlet concentration): almost nothing to learn;
* ``small``    - another sharp HMM with few documents, so any real weight on it repeats them;
* ``transfer`` - a close perturbation of the TARGET HMM (its rows mixed with a little noise);
* ``junk``     - (``junk`` scenario only) a second near-uniform HMM, like ``noise``.

Three scenarios (``--scenario``, make_domains):

* ``banded``: each domain emits its own 16 symbols (transfer and the target share one
  band), so a document's domain shows in any of its tokens, as real domains show in their
  vocabulary and style. Near-random text is then cheap to learn (a near-uniform guess over its
  band), which is what DoReMi's excess loss assumes of a high-entropy domain.
* ``junk`` (default): banded plus a fifth domain, a second near-random HMM in its own band (as
  many documents as ``noise``), so uniform spends 40% of the tokens on text with nothing to learn:
  the one scenario here where uniform is not within noise of the best average loss, hence the
  default (in ``banded`` uniform is near-optimal, so "beats uniform" cannot tell methods apart).
* ``shared``: every domain emits the same 24 symbols, so the domain of a document is only a
  statistical guess. The model's guess for near-random documents drifts towards the sharp domains'
  statistics whenever it sees them less, so Group DRO keeps giving them weight (measured: about
  the reference's share), and the domains interfere, which makes the target's optimum (pure
  ``transfer``) far from uniform.

The target is the validation loss (NELBO, nats/token, training.evaluate) on documents of the
target HMM, which no training domain holds; average and worst-domain loss are over the
learnable domains' own validation splits (markov, small, transfer).

The "true optimum" is found by brute force: every mixture of a simplex grid (resolution
``--grid``; 1/grid steps) is trained with mixing.proxy.train_proxy at one budget and seed, and the
best target loss wins. Each method then picks a mixture, that mixture is trained with the SAME
config and seed as the grid, and regret = its target loss - the optimum's. Budget = proxy steps
spent choosing the mixture: baselines 0; DoReMi reference + DRO proxy steps per round; the
mixing law the sum of its sweep's steps (its own double-diminishing mixtures, then
MixingLaw.optimize). Two law rows share one sweep (budget counted for each): ``mixing_law`` is
fitted on the target loss, ``mixing_law_avg`` on the per-domain losses of the learnable domains
with equal target weights (what the average/worst-domain columns judge). The grid is NOT counted
in anyone's budget (it is the answer key). A method can come out slightly below the grid optimum
(negative regret): the grid is discrete and the runs are noisy.

DoReMi runs twice, with its default reference (natural proportions: row ``doremi``) and with a
uniform reference (``doremi_uniform_ref``; the paper's choice for GLaM, whose domains differ in
size as these do). ``--states`` sets the hidden states of every HMM (default 8: with 4, a learnable
domain's own loss hardly improves beyond a quarter of the tokens, so no mixture can beat another
on it; with 8 its loss falls 1.67 -> 1.56 -> 1.50 -> 1.42 nats/token at 0.1/0.25/0.5/1 of the
tokens, banded scenario, seed 0).

Repetition cap (``--max-epochs``, default 32; 0 turns it off): DoReMi's Group-DRO weights stay
inside the capped simplex (KL projection every step, DoReMiConfig.max_epochs) and the law's sweep
mixtures and optimizer use the same caps, min(1, max_epochs·U_i/D) with D = steps × batch ×
seq_len, the tokens of the very run each chosen mixture is scored with. The grid and the
baselines are not capped. Why 32 and not the autoregressive ~4: masked-diffusion models gain from
far more repetition (R_D* ≈ 500 vs ≈ 15 for AR, Prabhudesai et al. 2025), and here too: the
``small`` domain's own loss is 0.56 nats/token at 4 epochs and 0.47 at 25 (uniform's share; shared
scenario, 4 states), so a 4-epoch cap forbade the methods the very mixtures that win on average
loss. The law's sweep always holds the pure single-domain runs the caps allow (LawsConfig.include_vertices).

    python bench/mixing_known_optimum.py            # junk: grid 1/4 (70 runs), 300 steps
    python bench/mixing_known_optimum.py --quick    # grid 1/2 (15 runs), 80 steps
    python bench/mixing_known_optimum.py --quick --tiny   # seconds: a smoke test only
    python bench/mixing_known_optimum.py --seeds 3        # three seeds, methods minus uniform paired by seed
    python bench/mixing_known_optimum.py --scenario banded --seeds 3 --eta 0.1 --doremi-batch-scale 4
Ends with one JSON line (with --seeds N > 1: scenario, seeds, mean regret, mean gap, budget,
versus_uniform {method: {target_loss|average_loss|worst_loss: mean, sd, below_uniform, per_seed}}
and runs, each one seed's line as below). One seed: bench, scenario, regret, gap_uniform_to_optimum,
budget, optimum_weights, weights, target_loss, average_loss, worst_loss (learnable domains),
average_loss_all_domains, worst_loss_all_domains (every training domain, the DoReMi paper's view;
per method), wall_s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N_SYMBOLS, N_STATES = 24, 8  # the shared scenario's alphabet; hidden states of every HMM
BAND = 16  # symbols per domain in the banded scenario
SCENARIOS = ("banded", "shared", "junk")
JUNK_SEED_OFFSET = 777  # the junk HMM's own stream, so the other four domains draw as in banded
LEARNABLE = ("markov", "small", "transfer")


# --------------------------------------------------------------------------- the corpus


def make_domains(seed: int, n_states: int = N_STATES, scenario: str = "banded") -> tuple[dict, dict, int]:
    """(HMM per domain, token-id offset per domain, symbols in all) for a scenario.

    ``shared``: every HMM emits the same N_SYMBOLS ids, so a document's domain is only a guess
    from its statistics. ``banded``: each domain emits its own BAND ids (transfer and target share
    one band), so a domain is recognisable from any of its tokens, as real domains are from their
    vocabulary and style; its HMMs are drawn as in ``shared`` (same seed, same sharpness), over BAND symbols.
    ``junk``: banded (the same four HMMs) plus a fifth domain, a second near-random HMM in its own
    band, so uniform spends 40% of the tokens on text with nothing to learn.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    symbols = N_SYMBOLS if scenario == "shared" else BAND
    hmms = make_hmms(seed, n_states, symbols)
    if scenario == "shared":
        return hmms, {name: 0 for name in hmms}, N_SYMBOLS
    training = ["markov", "noise", "small", "transfer"]
    if scenario == "junk":
        from pipelines.synthetic import HMM

        junk_rng = np.random.default_rng(seed + JUNK_SEED_OFFSET)
        hmms["junk"] = HMM.random(n_states, BAND, junk_rng, concentration=50.0)
        training.insert(2, "junk")
    band = {name: i for i, name in enumerate(training)} | {"target": training.index("transfer")}
    return hmms, {name: BAND * band[name] for name in hmms}, BAND * len(training)


def make_hmms(seed: int, n_states: int = N_STATES, n_symbols: int = N_SYMBOLS) -> dict:
    from pipelines.synthetic import HMM

    rng = np.random.default_rng(seed)
    target = HMM.random(n_states, n_symbols, rng, concentration=0.05)
    other = HMM.random(n_states, n_symbols, rng, concentration=0.5)

    def perturb(h, eps):  # rows stay distributions: (1-eps)·row + eps·(random row)
        return HMM(initial=(1 - eps) * h.initial + eps * other.initial,
                   transition=(1 - eps) * h.transition + eps * other.transition,
                   emission=(1 - eps) * h.emission + eps * other.emission)

    return {"markov": HMM.random(n_states, n_symbols, rng, concentration=0.05),
            "noise": HMM.random(n_states, n_symbols, rng, concentration=50.0),
            "small": HMM.random(n_states, n_symbols, rng, concentration=0.05),
            "transfer": perturb(target, 0.15),
            "target": target}


def write_corpus(root: str, domains: tuple[dict, dict, int], seq_len: int, train_docs: dict[str, int],
                 eval_docs: int, seed: int):
    """Shards + manifests under ``root``: the training manifest (every domain but the target) and the target's
    (validation only).

    ``domains``: make_domains' (HMMs, offsets, symbols); ids 0..symbols-1 are the symbols, then pad, mask."""
    hmms, offsets, n_symbols = domains
    from infra.contracts import DomainShards, Manifest, TokenizerInfo, write_artifact
    from tests.training_fixtures import write_shard

    rng = np.random.default_rng(seed + 1)
    tokenizer = TokenizerInfo(path="tokenizer.json", sha256="0" * 64, vocab_size=n_symbols + 2,
                              special_ids={"pad": n_symbols, "mask": n_symbols + 1})
    shards: dict[str, list] = {}
    for name, hmm in hmms.items():
        layout = [("validation", "validation-00000", eval_docs)]
        if name != "target":
            layout.insert(0, ("train", "part-00000", train_docs[name]))
        for split, stem, n in layout:
            docs = np.stack([hmm.sample(seq_len, rng) for _ in range(n)]) + offsets[name]
            rel = f"shards/{name}/{stem}.parquet"
            info = write_shard(os.path.join(root, rel), docs.tolist(), [f"{name}-{split}-{i}" for i in range(n)],
                               bytes_per_token=1)
            shards.setdefault(name, []).append(info.model_copy(update={"path": rel, "split": split}))
    paths = {}
    training = tuple(name for name in hmms if name != "target")
    for key, names in (("train", training), ("target", ("target",))):
        manifest = Manifest(config_hash=f"bench-{key}", tokenizer=tokenizer,
                            domains={d: DomainShards(shards=shards[d]) for d in names})
        paths[key] = os.path.join(root, f"manifest_{key}.json")
        write_artifact(manifest, paths[key])
    return paths


# --------------------------------------------------------------------------- one proxy run (a worker)


def _store_uri(root: str) -> str:
    # DoReMi opens MLflow runs; keep them in the temp dir (a file store: no sqlite start-up cost).
    return "file://" + os.path.join(root, "mlruns")


def _make_store(root: str) -> None:
    """Create the store once, before the workers: two of them creating it at once race on its
    default experiment ("Yaml file .../mlruns/0/meta.yaml exists")."""
    import mlflow

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.MlflowClient(_store_uri(root)).get_experiment("0")


def _setup_worker(root: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ["MLFLOW_TRACKING_URI"] = _store_uri(root)
    # An experiment chosen in the caller's environment belongs to the caller's store, not to this
    # fresh one (MLflow would refuse the id: "does not exist in the tracking server").
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)


def _cache_path(cache: str | None, corpus_key: dict, weights: dict[str, float], cfg_dict: dict) -> str | None:
    if not cache:
        return None
    import hashlib

    key = json.dumps({"corpus": corpus_key, "cfg": cfg_dict,
                      "weights": {d: round(float(w), 9) for d, w in sorted(weights.items())}}, sort_keys=True)
    return os.path.join(cache, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def train_and_score(root: str, paths: dict, weights: dict[str, float], cfg_dict: dict,
                    cache: str | None = None, corpus_key: dict | None = None) -> dict:
    """Train a proxy on ``weights``; its per-domain validation loss and the target loss (nats/token)."""
    cached = _cache_path(cache, corpus_key or {}, weights, cfg_dict)
    if cached and os.path.exists(cached):
        with open(cached) as f:
            out = json.load(f)
        out.setdefault("average_all", float(np.mean(list(out["domains"].values()))))  # caches from before these keys
        out.setdefault("worst_all", float(max(out["domains"].values())))
        return out
    from infra.config import ProxyConfig
    from infra.contracts import load_manifest
    from mixing.proxy import evaluate_proxy, train_proxy

    cfg = ProxyConfig(**cfg_dict)
    manifest = load_manifest(paths["train"])
    result = train_proxy(manifest, root, {d: float(w) for d, w in weights.items()}, cfg)
    target = evaluate_proxy(result.model, load_manifest(paths["target"]), root, cfg)["target"]
    losses = {d: r.nats_per_token for d, r in result.eval.items()}
    out = {"weights": weights, "target": target.nats_per_token, "target_ci95": target.ci95, "domains": losses,
           "average": float(np.mean([losses[d] for d in LEARNABLE])),
           "worst": float(max(losses[d] for d in LEARNABLE)),
           "average_all": float(np.mean(list(losses.values()))), "worst_all": float(max(losses.values())),
           "wall_s": result.wall_s}
    if cached:
        os.makedirs(cache, exist_ok=True)
        with open(cached + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(cached + ".tmp", cached)
    return out


def run_doremi_worker(root: str, paths: dict, cfg_dict: dict, eta: float, smoothing: float,
                      max_epochs: float | None = None, reference: str = "natural", excess_ema: float = 0.0,
                      batch_scale: int = 1, rounds: int = 1, steps: int | None = None) -> dict:
    """DoReMi on the training manifest. ``batch_scale``: its reference and proxy read batches that
    many times the scored runs' (the caps stay those of the scored run's tokens), and its budget is
    counted in scored-run steps (steps × batch_scale). ``steps``: its reference's and proxy's steps
    (default: the scored runs')."""
    import mlflow

    from infra.config import DoReMiConfig, ProxyConfig
    from infra.contracts import load_manifest
    from mixing.doremi import run_doremi

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    scored_tokens = cfg_dict["steps"] * cfg_dict["batch_size"] * cfg_dict["seq_len"]
    steps = steps or cfg_dict["steps"]
    proxy = ProxyConfig(**{**cfg_dict, "batch_size": cfg_dict["batch_size"] * batch_scale, "steps": steps,
                           "warmup_steps": warmup_steps(steps)})
    cfg = DoReMiConfig(proxy=proxy, eta=eta, smoothing=smoothing, clip="domain", excess_ema=excess_ema,
                       max_epochs=max_epochs, token_budget=scored_tokens, reference_weights=reference, rounds=rounds)
    res = run_doremi(load_manifest(paths["train"]), root, cfg)
    return {"weights": res.weights, "split_half": [r.split_half for r in res.rounds],
            "steps": batch_scale * sum(2 * r.steps for r in res.rounds), "wall_s": res.wall_s}


def warmup_steps(steps: int) -> int:
    """The proxies' warmup: a tenth of the steps (every run of the bench, DoReMi's included)."""
    return max(1, steps // 10)


def simplex_grid(m: int, resolution: int) -> np.ndarray:
    points = [c for c in itertools.product(range(resolution + 1), repeat=m) if sum(c) == resolution]
    return np.array(points, dtype=float) / resolution


# --------------------------------------------------------------------------- the benchmark


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="coarse grid and short runs")
    parser.add_argument("--tiny", action="store_true", help="shrink everything to seconds (smoke test)")
    parser.add_argument("--grid", type=int, help="grid resolution (points at multiples of 1/grid)")
    parser.add_argument("--steps", type=int, help="proxy steps per run (grid, methods, sweeps, DoReMi)")
    parser.add_argument("--law-runs", type=int, help="mixtures in the mixing-law sweep")
    parser.add_argument("--seq-len", type=int,
                        help="tokens per document and sequence (default 64): a fully masked sequence, about "
                             "1/(seq_len+1) of the NELBO's weight, can only be scored by the model's prior over "
                             "domains, which is its training mixture")
    parser.add_argument("--max-epochs", type=float, default=32.0,
                        help="repetition cap for DoReMi and the law (0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat the whole bench for seeds --seed .. --seed+N-1 (new HMMs, data and runs each) "
                             "and report every method minus uniform, paired by seed: one run's differences are "
                             "within its noise (target ci95 ~±0.02)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="junk",
                        help="banded: each domain its own symbols; shared: one alphabet for all; junk: banded plus "
                             "a second near-random domain (see make_domains)")
    parser.add_argument("--states", type=int, default=N_STATES, help="hidden states of every domain's HMM")
    parser.add_argument("--eta", type=float, default=1.0, help="DoReMi's step size η (paper: 1)")
    parser.add_argument("--excess-ema", type=float, default=0.0,
                        help="DoReMi's β for a moving average of each domain's excess loss (0: the paper's, none)")
    parser.add_argument("--doremi-rounds", type=int, default=1,
                        help="rounds of iterated DoReMi (each round's reference weights are the last round's "
                             "output; stops early once they agree within 1e-3)")
    parser.add_argument("--doremi-steps", type=int,
                        help="steps of DoReMi's reference and of its proxy (default: --steps; 2400 spends the "
                             "mixing law's budget at the default size)")
    parser.add_argument("--doremi-batch-scale", type=int, default=1,
                        help="DoReMi's reference and proxy batches are this many times the scored runs' "
                             "(less noise in its excess loss; its budget grows by the same factor)")
    parser.add_argument("--cache", help="folder of finished proxy runs (JSON per run, keyed by corpus, config "
                                        "and weights): a re-run of the bench reuses them instead of retraining")
    parser.add_argument("--dump", help="write every run (grid, law sweep, chosen mixtures) to this JSON file")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.doremi_rounds < 1:
        parser.error("--doremi-rounds must be at least 1")
    if args.doremi_batch_scale < 1:
        parser.error("--doremi-batch-scale must be at least 1")
    if args.seeds == 1:
        out = run_bench(args)
    else:
        out = across_seeds([run_bench(argparse.Namespace(**{**vars(args), "seed": args.seed + i,
                                                             "dump": args.dump and f"{args.dump}.seed{args.seed + i}"}))
                            for i in range(args.seeds)])
    print(json.dumps(out))
    return out


def across_seeds(runs: list[dict]) -> dict:
    """The runs' figures side by side: mean regret, and each method minus uniform paired by seed."""
    methods = list(runs[0]["regret"])
    versus = {}
    for m in methods:
        versus[m] = {}
        for key in ("target_loss", "average_loss", "worst_loss"):
            diff = np.array([r[key][m] - r[key]["uniform"] for r in runs])
            versus[m][key] = {"mean": float(diff.mean()), "sd": float(diff.std(ddof=1)),
                              "below_uniform": int((diff < 0).sum()), "per_seed": diff.tolist()}
    print(f"\n{len(runs)} seeds {[r['seed'] for r in runs]}: method minus uniform, paired by seed "
          f"(mean ± sd; below uniform in how many seeds)")
    print(f"{'method':<18} " + " ".join(f"{k:>26}" for k in ("target", "average", "worst")))
    for m in methods:
        cells = [f"{v['mean']:+.4f} ± {v['sd']:.4f} ({v['below_uniform']}/{len(runs)})" for v in versus[m].values()]
        print(f"{m:<18} " + " ".join(f"{c:>26}" for c in cells))
    from mixing.doremi import UNSTABLE_SPLIT_HALF

    # DoReMi's last round per seed (one-seed summaries written before it was recorded have none).
    split_half = {m: [r["doremi_split_half"][m][-1] for r in runs if "doremi_split_half" in r]
                  for m in ("doremi", "doremi_uniform_ref")}
    for m, values in split_half.items():
        if values:
            print(f"{m} split-half distance: mean {np.mean(values):.3f}, max {max(values):.3f}, "
                  f"above {UNSTABLE_SPLIT_HALF} in {sum(v > UNSTABLE_SPLIT_HALF for v in values)}/{len(values)} seeds")
    return {"bench": "mixing_known_optimum", "scenario": runs[0]["scenario"], "seeds": [r["seed"] for r in runs],
            "doremi_split_half": split_half,
            "regret": {m: float(np.mean([r["regret"][m] for r in runs])) for m in methods},
            "gap_uniform_to_optimum": float(np.mean([r["gap_uniform_to_optimum"] for r in runs])),
            "budget": runs[0]["budget"], "versus_uniform": versus, "runs": runs,
            "wall_s": float(sum(r["wall_s"] for r in runs))}


def run_bench(args: argparse.Namespace) -> dict:
    """One seed of the bench: prints its table and returns its summary (the JSON of a one-seed run)."""
    if args.tiny:
        grid, steps, law_runs, seq_len, batch, eval_docs, mc = 1, 6, 5, 32, 8, 8, 1
        train_docs = {"markov": 64, "noise": 64, "small": 4, "transfer": 64}
    elif args.quick:
        grid, steps, law_runs, seq_len, batch, eval_docs, mc = 2, 80, 8, 64, 16, 32, 2
        train_docs = {"markov": 2000, "noise": 2000, "small": 24, "transfer": 2000}
    else:
        grid, steps, law_runs, seq_len, batch, eval_docs, mc = 4, 300, 16, 64, 16, 96, 4
        train_docs = {"markov": 4000, "noise": 4000, "small": 48, "transfer": 4000}
    if args.scenario == "junk":  # as much junk as noise: uniform gives 2/5 of the tokens to the two
        train_docs["junk"] = train_docs["noise"]
    grid = args.grid or grid
    seq_len = args.seq_len or seq_len
    steps = args.steps or steps
    law_runs = args.law_runs or max(law_runs, len(train_docs) + 2)  # the law has M + 1 parameters per loss
    cfg = dict(preset="test", seq_len=seq_len, batch_size=batch, steps=steps, lr=3e-3,
               warmup_steps=warmup_steps(steps), weight_decay=0.0, seed=args.seed,
               eval_docs_per_domain=eval_docs, mc_samples=mc)

    corpus_key = {"seed": args.seed, "states": args.states, "train_docs": train_docs, "eval_docs": eval_docs, "seq_len": seq_len}
    if args.scenario != "shared":  # caches written before scenarios existed hold shared runs
        corpus_key["scenario"] = args.scenario
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="mixing_known_optimum_")
    _setup_worker(root)
    from infra.contracts import load_manifest
    from mixing.baselines import natural_weights, uniform_weights
    from mixing.doremi import UNSTABLE_SPLIT_HALF
    from mixing.laws import MixingLaw
    from mixing.repetition import max_proportions
    from mixing.sampling import double_diminishing

    paths = write_corpus(root, make_domains(args.seed, args.states, args.scenario), seq_len, train_docs, eval_docs, args.seed)
    manifest = load_manifest(paths["train"])
    names = manifest.domain_names()
    as_dict = lambda r: {d: float(r[i]) for i, d in enumerate(names)}  # noqa: E731

    mixtures = simplex_grid(len(names), grid)
    max_epochs = args.max_epochs or None
    unique = np.array([manifest.domains[d].tokens("train") for d in names], dtype=float)
    caps = max_proportions(unique, steps * batch * seq_len, max_epochs) if max_epochs else None
    law_mix = double_diminishing(len(names), law_runs, caps=caps, levels=2, seed=args.seed, include_vertices=True)

    _make_store(root)
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_setup_worker, initargs=(root,)) as pool:
        # DoReMi first (its two runs are sequential, so it overlaps with the grid).
        doremi_futures = {ref: pool.submit(run_doremi_worker, root, paths, cfg, args.eta, 1e-3, max_epochs, ref,
                                          args.excess_ema, args.doremi_batch_scale, args.doremi_rounds,
                                          args.doremi_steps)
                          for ref in ("natural", "uniform")}
        run = lambda w: pool.submit(train_and_score, root, paths, w, cfg, args.cache, corpus_key)  # noqa: E731
        grid_futures = [run(as_dict(r)) for r in mixtures]
        law_futures = [run(as_dict(r)) for r in law_mix]
        grid_runs = [f.result() for f in grid_futures]
        law_sweep = [f.result() for f in law_futures]

        holdout = 0.2 if len(law_mix) >= 10 else 0.0
        law = MixingLaw(domains=names).fit(law_mix, np.array([r["target"] for r in law_sweep]),
                                           holdout_fraction=holdout, seed=args.seed)
        law_weights = law.optimize(caps=caps, seed=args.seed).weights_dict()
        law_avg = MixingLaw(domains=names, val_domains=list(LEARNABLE)).fit(
            law_mix, np.array([[r["domains"][d] for d in LEARNABLE] for r in law_sweep]),
            holdout_fraction=holdout, seed=args.seed)
        law_avg_weights = law_avg.optimize(caps=caps, seed=args.seed).weights_dict()
        doremi = {ref: f.result() for ref, f in doremi_futures.items()}

        chosen = {"uniform": uniform_weights(manifest), "natural": natural_weights(manifest),
                  "doremi": doremi["natural"]["weights"], "doremi_uniform_ref": doremi["uniform"]["weights"],
                  "mixing_law": law_weights, "mixing_law_avg": law_avg_weights}
        budget = {"optimum": 0, "uniform": 0, "natural": 0, "doremi": doremi["natural"]["steps"],
                  "doremi_uniform_ref": doremi["uniform"]["steps"],
                  "mixing_law": steps * len(law_mix), "mixing_law_avg": steps * len(law_mix)}
        # A mixture already trained (a grid or sweep point, or another method's pick) is not retrained:
        # same config and seed give the same run.
        done = {tuple(np.round([r["weights"][d] for d in names], 9)): r for r in grid_runs + law_sweep}
        futures = {}
        for m, w in chosen.items():
            key = tuple(np.round([w[d] for d in names], 9))
            if key not in done and key not in futures:
                futures[key] = run(w)
        trained = {k: f.result() for k, f in futures.items()} | done
        results = {m: {**trained[tuple(np.round([w[d] for d in names], 9))], "weights": w}
                   for m, w in chosen.items()}

    shutil.rmtree(root, ignore_errors=True)  # shards, manifests and DoReMi's MLflow file store
    best = min(range(len(grid_runs)), key=lambda i: grid_runs[i]["target"])
    results = {"optimum": grid_runs[best], **results}
    optimum_loss = results["optimum"]["target"]
    regret = {m: r["target"] - optimum_loss for m, r in results.items()}

    print(f"{args.scenario} scenario, seed {args.seed}: "
          f"{len(grid_runs)} grid runs at 1/{grid}, {steps} steps each; law sweep {len(law_mix)} runs; "
          f"target = validation NELBO on the target HMM (nats/token)")
    print(f"{'method':<18} {'target':>7} {'regret':>8} {'average':>8} {'worst':>7} {'avg_all':>8} {'worst_all':>9} "
          f"{'budget':>7}  weights " + "/".join(names))
    for m, r in results.items():
        w = "/".join(f"{r['weights'][d]:.2f}" for d in names)
        print(f"{m:<18} {r['target']:7.4f} {regret[m]:+8.4f} {r['average']:8.4f} {r['worst']:7.4f} "
              f"{r['average_all']:8.4f} {r['worst_all']:9.4f} {budget[m]:7d}  {w}")
    print("average / worst: over the learnable domains (" + ", ".join(LEARNABLE) + "); avg_all / worst_all: over "
          "every training domain, as the DoReMi paper reports them")
    grid_targets = sorted(r["target"] for r in grid_runs)
    print(f"grid target losses: best {grid_targets[0]:.4f}, median {np.median(grid_targets):.4f}, "
          f"worst {grid_targets[-1]:.4f}; target ci95 of one run ±{results['optimum']['target_ci95']:.4f}")
    for label, fitted in (("mixing law (target)", law), ("mixing law (avg of learnable)", law_avg)):
        if fitted.report is not None:
            print(f"{label} fit on {fitted.report.n_train} runs: {fitted.report.in_sample}; "
                  f"held out: {fitted.report.held_out}")
    print("doremi's split-half distance (its weights averaged over the proxy's first vs second half; "
          f"> {UNSTABLE_SPLIT_HALF}: unstable): natural ref. {doremi['natural']['split_half'][-1]:.3f}, "
          f"uniform ref. {doremi['uniform']['split_half'][-1]:.3f}")
    if caps is not None:
        print(f"repetition caps at {max_epochs:g} epochs ({steps * batch * seq_len} tokens/run): "
              + "/".join(f"{c:.3f}" for c in caps))

    out = {"bench": "mixing_known_optimum", "regret": regret,
           "gap_uniform_to_optimum": regret["uniform"], "budget": budget,
           "optimum_weights": results["optimum"]["weights"],
           "weights": {m: r["weights"] for m, r in results.items()},
           "target_loss": {m: r["target"] for m, r in results.items()},
           "average_loss": {m: r["average"] for m, r in results.items()},
           "worst_loss": {m: r["worst"] for m, r in results.items()},
           "average_loss_all_domains": {m: r["average_all"] for m, r in results.items()},
           "worst_loss_all_domains": {m: r["worst_all"] for m, r in results.items()},
           "scenario": args.scenario, "grid_runs": len(grid_runs), "grid_resolution": grid, "steps": steps,
           "seed": args.seed,
           "max_epochs": max_epochs, "caps": None if caps is None else as_dict(caps), "doremi_eta": args.eta,
           "doremi_excess_ema": args.excess_ema, "doremi_batch_scale": args.doremi_batch_scale,
           "doremi_rounds": args.doremi_rounds, "doremi_steps": args.doremi_steps or steps,
           "doremi_split_half": {"doremi": doremi["natural"]["split_half"],
                                 "doremi_uniform_ref": doremi["uniform"]["split_half"]},
           "wall_s": time.perf_counter() - started}
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"grid": grid_runs, "law_sweep": law_sweep, "results": results, "summary": out}, f)
    return out


if __name__ == "__main__":
    main()
