"""DoReMi (Xie et al. 2023) with masked-diffusion proxies.

One round, as in DESIGN.md ("The science, stated once"):

1. train a reference model on the reference weights α_ref (natural proportions by default);
2. train a same-size proxy with Group DRO on batches sampled uniformly over the domains (the
   paper's Algorithm 1 and code; ``proxy_sampling="reference"`` samples with α_ref). Every step, for every
   domain i, the excess loss

       λ_i = (1 / #valid tokens of domain i in the batch) · Σ_{j in domain i} clip(ℓ̃_θ,j − ℓ̃_ref,j)

   where ℓ̃_j = 1[j masked] · CE_j(z_t) / p(t) is the per-token NELBO term
   (training.diffusion.token_terms) and BOTH models are scored on the SAME NoiseDraw (same t,
   same mask: common random numbers, so the difference has far less variance than either term).
   Dividing by the domain's valid tokens (not its masked tokens) keeps λ_i an unbiased estimate
   of the per-token NELBO gap, exactly as the training loss divides by L. Clipping at 0 is per
   token (``clip="token"``, the paper's code) or on the domain aggregate (``clip="domain"``,
   recommended for diffusion in research/anchors_mixing.md §12.2: a per-token clip of a random
   one-sample estimate is biased upwards most in the noisiest domains).
   Domains absent from a batch keep their previous λ; before a domain is first seen its λ is
   log|V| (the paper's code initialises the scores that way, so unseen domains start high).
3. α ← normalize(α · exp(η λ)); α ← (1 − c) α + c/k (``doremi_update``), starting from uniform α
   (paper, maintainer in sangmichaelxie/doremi#7);
4. the proxy's loss is the DRO objective Σ_i α_i · (domain-i loss), computed as the paper's code
   does (doremi/trainer.py): every token's term is weighted by α_d / p_d (p = the sampling
   weights, so the weight undoes the sampling and applies α) and the sum is normalised by the sum
   of those weights over all valid tokens of the batch. In expectation that is Σ_i α_i L_i.
5. the output is the average of α over the steps, with the initial α counted once (as the code).
6. repetition cap (optional, ``max_epochs``): α is kept inside {Σα = 1, 0 ≤ α_i ≤ cap_i} with
   cap_i = min(1, max_epochs · U_i / D) (mixing.repetition.max_proportions), U_i the manifest's
   training tokens of domain i and D = ``token_budget`` (default: what one proxy run reads,
   proxy.steps × batch_size × seq_len, the rule mix.laws uses). The cap is applied INSIDE the
   Group-DRO loop, after every update (and to the uniform start), by the KL projection
   (mixing.sampling.kl_project_capped: capped domains sit at their cap, the rest are rescaled in
   proportion): the exponentiated-gradient step is mirror descent in KL geometry, so this is
   Group DRO over the capped set, and the step average stays inside it. Without a cap DoReMi
   happily puts most of the weight on a tiny domain the reference barely saw (large excess loss),
   which a real run can only serve by repeating it many times. Projecting only the final average
   (Euclidean, as an earlier version did) shared the capped domain's surplus EQUALLY among the
   others — lifting a domain the loop had all but dropped (near-random text) as much as the
   learnable ones — and the loop never got to reweigh the others against each other.

Iterated DoReMi: the next round's reference weights are this round's averaged α, until
‖ᾱ − α_ref‖∞ < tol or ``rounds`` rounds.

Stability (``split_half_distance``): every round reports ‖mean α over the first half of its steps −
mean α over the second half‖∞. α after T steps is ∝ α_0 · exp(η Σ_t λ_t), so per-step noise of sd σ
in λ moves log α by a random walk of sd η·σ·√T. With a small proxy batch (a few hundred tokens per
domain, diffusion terms weighted by 1/t) σ is 0.1–0.5 nats and at η = 1 the weights swing from one
near-one-hot state to another (DoReMi issue #5): the "averaged" weights are then mostly noise, and a
second seed gives other weights. Measured on the known-optimum bench's junk corpus (seed 0, 300
steps of batch 16 × 64 tokens, uniform reference), four runs with other seeds for the reference and
the proxy: at η = 1 the split-half distances were 0.06, 0.13, 0.22 and 0.47, and the four runs'
weights spanned up to 0.31 per domain (markov 0.33–0.63, noise 0.08–0.28); at η = 0.1 they were
0.01–0.06, and the weights spanned 0.17 (markov 0.42–0.59), the other domains 0.08 or less. Over
the bench's ten junk corpora at η = 0.1 the distances were still 0.03–0.39: with a small η the
weights are still drifting after 300 steps. Noise is not the only cause: the proxy starts from
scratch against a trained reference, so for its first ~100 steps every excess is 0.3–1.5 nats, and
at η = 1 their differences drive α near one-hot, a state that the later excesses, ~0.05 nats,
take long to undo. Halving the noise (4× the batch, five junk corpora) left the distances at
0.12–0.49. The distance is a one-run hint, not a proof: one of the η = 1 runs was steady by it. A
round above ``UNSTABLE_SPLIT_HALF`` gets a warning in the mixture's details and on the console.

Every step logs doremi/weight/<d>, doremi/excess/<d>, doremi/proxy_loss/<d>, doremi/ref_loss/<d>
to the round's MLflow child run (stage "doremi_round"); the reference and proxy trainings are
child runs of the round.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from infra import tracking
from infra.config import DoReMiConfig, ProxyConfig
from infra.contracts import Manifest, Mixture, artifact_sha256
from infra.storage import Storage
from mixing.baselines import natural_weights, uniform_weights
from mixing.repetition import max_proportions, repetition_report
from mixing.sampling import kl_project_capped
from mixing.proxy import (MetricBuffer, build_proxy_model, evaluate_proxy, make_optimizer, noise_generator,
                          optimizer_step, set_lr, train_proxy)
from training.data import MixtureSampler
from training.diffusion import draw_noise, token_terms
from training.evaluate import DomainEval

CLIP_MODES = ("token", "domain", "none")
# Above this split-half distance a round's averaged weights are called unstable (see the module doc).
UNSTABLE_SPLIT_HALF = 0.1


# --------------------------------------------------------------------------- the two pure pieces


def doremi_update(alpha: torch.Tensor, excess: torch.Tensor, eta: float, smoothing: float) -> torch.Tensor:
    """One exponentiated-gradient step on the simplex, then smoothing towards uniform.

    α' = softmax(log α + η λ)  (= normalize(α · exp(η λ)), computed in log space so a large η λ
    cannot overflow);  α_new = (1 − c) α' + c / k. With c > 0 every weight stays ≥ c/k.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    excess = torch.as_tensor(excess, dtype=torch.float64)
    k = alpha.numel()
    log_alpha = torch.log(alpha.clamp_min(1e-300)) + eta * excess
    new = torch.softmax(log_alpha, dim=0)
    return (1.0 - smoothing) * new + smoothing / k


def update_excess(last: torch.Tensor, seen: torch.Tensor, lam: torch.Tensor, present: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(excess, seen) after one batch: absent domains keep their value; a domain's first sighting
    replaces the log|V| start; later ones move the average: β·old + (1 − β)·λ (β = 0: the batch's λ)."""
    moved = torch.where(seen, beta * last + (1.0 - beta) * lam, lam)
    return torch.where(present, moved, last), seen | present


def excess_loss(proxy_terms: torch.Tensor, ref_terms: torch.Tensor, masked: torch.Tensor,
                domain_index: torch.Tensor, n_domains: int, clip: str = "token",
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ [n_domains] float64, present [n_domains] bool) for one batch.

    proxy_terms, ref_terms [B, L]: per-token NELBO terms of the two models on the SAME draw
    (0 off the mask); masked [B, L]: that draw's mask; domain_index [B]: each row's domain;
    valid [B, L]: real tokens (None: every position counts, as for fully packed rows).
    λ_i = Σ over masked tokens of domain i of the (clipped) difference, divided by domain i's
    valid tokens. ``clip``: "token" clips each token's difference at 0 before the sum, "domain"
    clips the aggregate, "none" does not clip. Absent domains get λ = 0 and present = False.
    """
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    if valid is None:
        valid = torch.ones_like(masked, dtype=torch.bool)
    diff = torch.where(masked, proxy_terms.double() - ref_terms.double(), torch.zeros((), dtype=torch.float64))
    if clip == "token":
        diff = diff.clamp_min(0.0)
    domain_index = domain_index.long()
    sums = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, domain_index, diff.sum(dim=1))
    counts = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, domain_index, valid.sum(dim=1).double())
    present = counts > 0
    lam = torch.where(present, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
    if clip == "domain":
        lam = lam.clamp_min(0.0)
    return lam, present


def per_domain_mean(terms: torch.Tensor, valid: torch.Tensor, domain_index: torch.Tensor,
                    n_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-domain nats/token [n_domains], present [n_domains]) of one batch's terms."""
    sums = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, domain_index.long(),
                                                                  (terms.double() * valid).sum(dim=1))
    counts = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, domain_index.long(), valid.sum(dim=1).double())
    present = counts > 0
    return torch.where(present, sums / counts.clamp_min(1.0), torch.zeros_like(sums)), present


def dro_loss(terms: torch.Tensor, valid: torch.Tensor, domain_index: torch.Tensor, alpha: torch.Tensor,
             sampling: torch.Tensor) -> torch.Tensor:
    """The proxy's Group-DRO loss as in DoReMi's code: token weights α_d / p_d, normalised over the batch."""
    token_weight = (alpha / sampling.clamp_min(1e-12)).to(terms.dtype)[domain_index.long()][:, None] * valid
    return (terms * token_weight).sum() / token_weight.sum().clamp_min(1e-12)


def split_half_distance(trajectory: list[dict[str, float]]) -> float:
    """‖mean α over the first half of the steps − mean α over the second half‖∞ (0 for < 2 steps).

    The output weights are the average over all steps; if the two halves disagree, the average
    depends on where the run stopped and on its noise (another seed would give other weights).
    With an odd number of steps the middle one goes to the second half.
    """
    if len(trajectory) < 2:
        return 0.0
    half = len(trajectory) // 2
    first, second = trajectory[:half], trajectory[half:]
    return max(abs(sum(a[d] for a in first) / len(first) - sum(a[d] for a in second) / len(second))
               for d in trajectory[0])


# --------------------------------------------------------------------------- results


@dataclass
class RoundResult:
    reference_weights: dict[str, float]
    weights: dict[str, float]  # step-averaged α of the round
    trajectory: list[dict[str, float]] = field(default_factory=list)  # α after every step
    excess: list[dict[str, float]] = field(default_factory=list)  # λ used at every step
    reference_eval: dict[str, DomainEval] = field(default_factory=dict)
    proxy_eval: dict[str, DomainEval] = field(default_factory=dict)
    steps: int = 0
    wall_s: float = 0.0

    @property
    def distance(self) -> float:
        """‖ᾱ − α_ref‖∞."""
        return max(abs(self.weights[d] - self.reference_weights.get(d, 0.0)) for d in self.weights)

    @property
    def split_half(self) -> float:
        return split_half_distance(self.trajectory)


@dataclass
class DoReMiResult:
    weights: dict[str, float]  # the last round's averaged α
    rounds: list[RoundResult]
    config: DoReMiConfig
    converged: bool
    mlflow_run_id: str | None = None
    wall_s: float = 0.0

    def stability_warnings(self) -> list[str]:
        """One line per round whose averaged weights are unstable (split-half distance above the limit)."""
        out = []
        for i, r in enumerate(self.rounds):
            distance = r.split_half  # computed from the trajectory: once per round
            if distance > UNSTABLE_SPLIT_HALF:
                out.append(f"doremi round {i + 1}: unstable weights: their averages over the first and second "
                           f"half of the proxy's {r.steps} steps differ by up to {distance:.2f} "
                           f"(> {UNSTABLE_SPLIT_HALF}); the excess loss is too noisy for eta={self.config.eta:g}: "
                           f"lower mix.doremi.eta (e.g. {self.config.eta / 10:g}) or raise the proxy's batch_size "
                           "or steps")
        return out

    def to_mixture(self, manifest: Manifest) -> Mixture:
        weights = _normalized(self.weights)
        return Mixture(
            weights=weights, method="doremi", reference_weights=_normalized(self.rounds[0].reference_weights),
            manifest_sha256=artifact_sha256(manifest), tokenizer_sha256=manifest.tokenizer.sha256,
            mlflow_run_id=self.mlflow_run_id,
            details={
                "eta": self.config.eta, "smoothing": self.config.smoothing, "clip": self.config.clip,
                "rounds": len(self.rounds), "converged": self.converged, "tol": self.config.tol,
                "steps": self.config.proxy.steps, "proxy": self.config.proxy.model_dump(),
                "round_weights": [r.weights for r in self.rounds],
                "round_distance": [r.distance for r in self.rounds],
                "round_split_half": [r.split_half for r in self.rounds],
                "split_half_limit": UNSTABLE_SPLIT_HALF,
                "stability_warnings": self.stability_warnings(),
                "loss_weighting": "nelbo (CE / p(t))",
                **self._repetition_details(manifest),
            },
        )

    def _repetition_details(self, manifest: Manifest) -> dict:
        if self.config.max_epochs is None:
            return {}
        caps, budget, unique, domains = repetition_caps(manifest, self.config)
        weights = _normalized(self.weights)
        report = repetition_report([weights[d] for d in domains], unique, budget, self.config.max_epochs,
                                   domains=domains).to_dict()
        return {"max_epochs": self.config.max_epochs, "budget_tokens": budget,
                "budget_rule": ("doremi.token_budget" if self.config.token_budget is not None
                                else "proxy.steps * proxy.batch_size * proxy.seq_len"),
                "caps": {d: float(c) for d, c in zip(domains, caps)},
                "repetition": report}

    def to_doremi_json(self) -> dict:
        """DoReMi's config shape (sangmichaelxie/doremi configs/*.json). eval weights: the round-1 reference."""
        return {"train_domain_weights": _normalized(self.weights),
                "eval_domain_weights": _normalized(self.rounds[0].reference_weights)}


def _normalized(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    out = {d: w / total for d, w in weights.items()}
    last = sorted(out)[-1]  # absorb round-off so the Mixture validator's |sum - 1| <= 1e-6 holds exactly
    out[last] = 1.0 - sum(w for d, w in out.items() if d != last)
    return out


# --------------------------------------------------------------------------- the runs


def repetition_caps(manifest: Manifest, cfg: DoReMiConfig):
    """(caps [k], budget D, unique tokens U [k], domains) for ``cfg.max_epochs``; caps = min(1, max_epochs·U/D)."""
    if cfg.max_epochs is None:
        raise ValueError("repetition_caps needs cfg.max_epochs")
    domains = manifest.domain_names()
    unique = [float(manifest.domains[d].tokens("train")) for d in domains]
    if min(unique) <= 0:
        raise ValueError(f"domains without training tokens: {[d for d, u in zip(domains, unique) if u <= 0]}")
    p = cfg.proxy
    budget = cfg.token_budget if cfg.token_budget is not None else p.steps * p.batch_size * p.seq_len
    return max_proportions(unique, budget, cfg.max_epochs), int(budget), unique, domains


def resolve_reference_weights(manifest: Manifest, spec) -> dict[str, float]:
    if spec == "natural":
        return natural_weights(manifest)
    if spec == "uniform":
        return uniform_weights(manifest)
    unknown = set(spec) - set(manifest.domain_names())
    if unknown:
        raise ValueError(f"reference_weights name domains not in the manifest: {sorted(unknown)}")
    weights = {d: float(spec.get(d, 0.0)) for d in manifest.domain_names()}
    if sum(weights.values()) <= 0:
        raise ValueError("reference_weights sum to 0")
    return _normalized(weights)


def train_dro_proxy(manifest: Manifest, manifest_dir: str, reference: torch.nn.Module,
                    reference_weights: dict[str, float], cfg: DoReMiConfig, proxy_cfg: ProxyConfig,
                    storage: Storage | None = None, scorer=token_terms) -> RoundResult:
    """The Group-DRO proxy run of one round (the reference model is already trained).

    ``scorer`` is ``token_terms`` (a parameter only so tests can observe the draws it is given).
    """
    domains = manifest.domain_names()
    k = len(domains)
    mask_id = manifest.tokenizer.special_ids["mask"]
    # Uniform batches (the paper's Algorithm 1 and its code): a domain the reference weights make
    # rare would otherwise be absent from most batches and keep a stale excess for many steps
    # (measured on the known-optimum bench: a 0.4% domain's stale excess pumped it to its cap).
    # dro_loss reweights by α/p either way, so the objective is Σ α_i L_i regardless.
    sampling_weights = (uniform_weights(manifest) if cfg.proxy_sampling == "uniform" else dict(reference_weights))
    sampling = torch.tensor([sampling_weights.get(d, 0.0) for d in domains], dtype=torch.float64)
    sampling = sampling / sampling.sum()
    model = build_proxy_model(manifest, proxy_cfg, seed=proxy_cfg.seed + 1)
    model.train()
    reference.eval()
    optimizer = make_optimizer(model, proxy_cfg)
    # A different data seed than the reference's: the proxy mostly sees examples the reference did
    # not train on (the paper's code reverses the shard order for the same reason).
    sampler = MixtureSampler(manifest, manifest_dir, sampling_weights, proxy_cfg.seq_len, proxy_cfg.batch_size,
                             proxy_cfg.seed + 1, storage=storage)
    generator = noise_generator(proxy_cfg.seed + 1)

    caps = None
    if cfg.max_epochs is not None:
        caps = repetition_caps(manifest, cfg)[0]

    def within_caps(a: torch.Tensor) -> torch.Tensor:
        return a if caps is None else torch.from_numpy(kl_project_capped(a.numpy(), caps))

    alpha = within_caps(torch.full((k,), 1.0 / k, dtype=torch.float64))
    alpha_sum = alpha.clone()  # the initial α counts once in the average (DoReMi's code)
    last_excess = torch.full((k,), math.log(manifest.tokenizer.vocab_size), dtype=torch.float64)
    seen = torch.zeros(k, dtype=torch.bool)
    trajectory, excess_log = [], []
    buffer = MetricBuffer()
    for step in range(proxy_cfg.steps):
        set_lr(optimizer, proxy_cfg, step)
        batch = sampler.next_batch()
        valid, dom = batch["valid"], batch["domain_index"]
        draw = draw_noise(valid, generator)  # ONE draw: proxy and reference are scored on it
        proxy_terms = scorer(model, batch["input_ids"], batch["segment_ids"], draw, valid, mask_id)
        with torch.no_grad():
            ref_terms = scorer(reference, batch["input_ids"], batch["segment_ids"], draw, valid, mask_id)
        # Domain clipping happens AFTER the moving average: clipping a noisy zero-mean estimate at 0
        # is biased upwards by ~σ/√(2π), most in the noisiest (least learnable) domain.
        lam, present = excess_loss(proxy_terms.detach(), ref_terms, draw.masked, dom, k,
                                   "none" if cfg.clip == "domain" else cfg.clip, valid)
        last_excess, seen = update_excess(last_excess, seen, lam, present, cfg.excess_ema)
        excess = last_excess.clamp_min(0.0) if cfg.clip == "domain" else last_excess
        alpha = within_caps(doremi_update(alpha, excess, cfg.eta, cfg.smoothing))
        alpha_sum += alpha
        loss = dro_loss(proxy_terms, valid, dom, alpha, sampling)
        optimizer_step(model, optimizer, loss, proxy_cfg)

        proxy_dom, _ = per_domain_mean(proxy_terms.detach(), valid, dom, k)
        ref_dom, _ = per_domain_mean(ref_terms, valid, dom, k)
        trajectory.append({d: float(alpha[i]) for i, d in enumerate(domains)})
        excess_log.append({d: float(excess[i]) for i, d in enumerate(domains)})
        metrics = {"doremi/dro_loss": float(loss.detach())}
        for i, d in enumerate(domains):
            metrics[f"doremi/weight/{d}"] = float(alpha[i])
            metrics[f"doremi/excess/{d}"] = float(excess[i])
            if present[i]:
                metrics[f"doremi/proxy_loss/{d}"] = float(proxy_dom[i])
                metrics[f"doremi/ref_loss/{d}"] = float(ref_dom[i])
        buffer.log(metrics, step=step)
    buffer.flush()

    average = alpha_sum / (proxy_cfg.steps + 1)
    average = average / average.sum()
    weights = {d: float(average[i]) for i, d in enumerate(domains)}
    return RoundResult(reference_weights=dict(reference_weights), weights=weights,
                       trajectory=trajectory, excess=excess_log,
                       proxy_eval=evaluate_proxy(model, manifest, manifest_dir, proxy_cfg, storage),
                       steps=proxy_cfg.steps)


def run_doremi(manifest: Manifest, manifest_dir: str, cfg: DoReMiConfig | None = None,
               storage: Storage | None = None) -> DoReMiResult:
    """Iterated DoReMi: rounds of (reference run, DRO proxy run) until ‖ᾱ − α_ref‖∞ < tol.

    Opens a "doremi" MLflow run (nested if one is active) with one "doremi_round" child per round;
    each round has "doremi_reference" and "doremi_proxy" children.
    """
    cfg = cfg or DoReMiConfig()
    storage = storage or Storage()
    start = time.perf_counter()
    reference_weights = resolve_reference_weights(manifest, cfg.reference_weights)
    if cfg.max_epochs is not None:
        repetition_caps(manifest, cfg)  # an infeasible cap fails here, before any training
    rounds: list[RoundResult] = []
    converged = False
    with tracking.stage_run("doremi", params={"doremi": cfg.model_dump()}):
        run_id = tracking.active_run_id()
        for r in range(cfg.rounds):
            round_start = time.perf_counter()
            # Each round its own seeds, so iterated rounds are not the same draws again.
            proxy_cfg = cfg.proxy.model_copy(update={"seed": cfg.proxy.seed + 1000 * r + cfg.seed})
            with tracking.stage_run("doremi_round", params={"round": r, "reference_weights": reference_weights}):
                with tracking.stage_run("doremi_reference", params={"weights": reference_weights}):
                    ref = train_proxy(manifest, manifest_dir, reference_weights, proxy_cfg, storage)
                with tracking.stage_run("doremi_proxy"):
                    result = train_dro_proxy(manifest, manifest_dir, ref.model, reference_weights, cfg, proxy_cfg,
                                             storage)
                result.reference_eval = ref.eval
                result.wall_s = time.perf_counter() - round_start
                tracking.log_metrics({f"doremi/avg_weight/{d}": w for d, w in result.weights.items()}
                                     | {"doremi/distance_to_reference": result.distance,
                                        "doremi/split_half_distance": result.split_half})
                tracking.log_json({"weights": result.weights, "reference_weights": reference_weights,
                                   "trajectory": result.trajectory}, "doremi_round.json")
            rounds.append(result)
            if result.distance < cfg.tol:
                converged = True
                break
            reference_weights = result.weights
        out = DoReMiResult(weights=rounds[-1].weights, rounds=rounds, config=cfg, converged=converged,
                           mlflow_run_id=run_id, wall_s=time.perf_counter() - start)
        tracking.log_metrics({f"doremi/final_weight/{d}": w for d, w in out.weights.items()})
        tracking.log_json(out.to_doremi_json(), "doremi_weights.json")
    return out
