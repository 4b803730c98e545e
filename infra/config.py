"""YAML -> pydantic v2 models. Unknown keys are errors that name the key and the file.

One file may configure every stage (the demo does); each CLI verb needs only its own section.
Precedence, lowest first: defaults < YAML file < environment (addresses and secrets only)
< ``--set a.b=c`` overrides on the command line.

Environment variables read:
  RAY_ADDRESS                      ray.address (a cluster instead of embedded Ray)
  MLFLOW_TRACKING_URI              tracking.uri
  MASKMIX_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL   storage.endpoint_url
  AWS_DEFAULT_REGION / AWS_REGION  storage.region
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN      storage credentials
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from infra.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- platform sections


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; None starts Ray in-process")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for embedded Ray (default: all)")
    object_store_memory: int | None = Field(512 * 1024**2, gt=0, description="bytes, embedded Ray only")
    shuffle_partitions: int | None = Field(
        None, gt=0, description="groupby/sort partitions (default: 2 x CPUs, on a cluster of up to 64 CPUs too)")
    shuffle: Literal["auto", "sort", "hash"] = Field(
        "auto", description="Ray Data shuffle: sort (tasks only) or hash (aggregator actors, Ray's default); auto: "
        "sort embedded and on clusters of up to 64 CPUs, where jobs sharing the cluster would otherwise each hold "
        "aggregator actors and starve the others' tasks, hash above")


class TrackingConfig(_Section):
    uri: str = Field("sqlite:///./mlflow.db", description="MLflow tracking URI (sqlite file or server)")
    experiment: str = "maskmix"


class StorageConfig(_Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None


# --------------------------------------------------------------------------- pipeline


class InputSpec(_Section):
    path: str = Field(description="file or folder, local or s3://")
    domain: str | None = Field(None, description="domain of every record; else read from domain_field")
    domain_field: str = "domain"
    text_field: str = "text"
    id_field: str = Field("id", description="record field holding a stable id; else derived from source")
    # auto: JSONL(.gz/.zst) and Parquet files, or an HF `save_to_disk` folder (has state.json or
    # dataset_dict.json); text: one file = one document (id "<domain>/<relative path>").
    format: Literal["auto", "jsonl", "parquet", "text", "hf"] = "auto"
    suffixes: list[str] = Field(
        default_factory=list, description="read only files ending so (default: by format; text: every non-hidden file)")
    max_doc_bytes: int = Field(
        16 * 1024**2, gt=0, description="a record or text file over this many UTF-8 bytes is quarantined (too_large)")

    @model_validator(mode="after")
    def _text_needs_domain(self) -> "InputSpec":
        if self.format == "text" and not self.domain:
            raise ValueError("format 'text' needs `domain`: a plain-text file has no field to read it from")
        return self


class NormalizeConfig(_Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control_chars: bool = Field(True, description="drop C0/C1 control characters except tab and newline")
    normalize_whitespace: bool = Field(
        True, description="Unicode spaces -> ' ', line/paragraph separators -> newline, zero-width spaces and BOMs "
                          "dropped, trailing spaces cut, blank-line runs capped at max_blank_lines")
    max_blank_lines: int = Field(2, ge=0, description="longest run of empty lines kept (2 keeps PEP 8 code intact)")
    # py3langid: langid.py's naive Bayes model, shipped inside the wheel (nothing is downloaded).
    language_id: bool = Field(True, description="add `language` (ISO 639-1, 'und' if unsure) and `language_score`")
    language_min_chars: int = Field(20, ge=0, description="shorter texts get language 'und', score 0")
    language_max_chars: int = Field(2000, gt=0, description="classify the first N characters (cost is linear)")


class WordCountFilterConfig(_Section):
    """Gopher quality rule: keep documents with min_words <= words <= max_words."""

    enabled: bool = True
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, gt=0)
    skip_domains: list[str] = Field(default_factory=list, description="domains the rule does not apply to")

    @model_validator(mode="after")
    def _ordered(self) -> "WordCountFilterConfig":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words})")
        return self


class QualityFilterConfig(_Section):
    """What every quality filter shares (pipelines/filters): on/off, mode, and per-domain settings.

    mode "filter" removes failing documents (first failing filter of the chain names the reason);
    "annotate" removes nothing and writes the filter's scores per document to
    ``<output_dir>/filters/scores.parquet`` so thresholds can be studied before they are applied.
    ``domains`` overrides any field for one domain, e.g. ``domains: {code: {enabled: false},
    readme: {min_doc_words: 20}}``; ``skip_domains: [code]`` is shorthand for the first.
    """

    enabled: bool = False
    mode: Literal["filter", "annotate"] = "filter"
    skip_domains: list[str] = Field(default_factory=list, description="domains the filter does not apply to")
    domains: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-domain field overrides")

    @model_validator(mode="after")
    def _valid_domain_overrides(self) -> "QualityFilterConfig":
        for domain, override in self.domains.items():
            if not isinstance(override, dict) or {"domains", "skip_domains"} & set(override):
                raise ValueError(f"domains.{domain}: a mapping of this filter's fields (not domains/skip_domains)")
            try:
                self.for_domain(domain)
            except ValidationError as e:
                raise ValueError(f"domains.{domain}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
        return self

    def for_domain(self, domain: str) -> "QualityFilterConfig | None":
        """The settings in force for ``domain``; None where the filter does not run on it."""
        cfg = self
        if domain in self.domains:
            base = self.model_dump(exclude={"domains", "skip_domains"})
            cfg = type(self).model_validate({**base, **self.domains[domain]})
        return cfg if cfg.enabled and domain not in self.skip_domains else None


class GopherQualityConfig(QualityFilterConfig):
    """Gopher quality rules (Rae et al. 2021, arXiv:2112.11446 §A.1.1); defaults = datatrove 0.10.1."""

    min_doc_words: int | None = Field(50, ge=0, description="non-symbol words (None: off)")
    max_doc_words: int | None = Field(100_000, gt=0)
    min_avg_word_length: float | None = Field(3, ge=0, description="mean length of non-symbol words")
    max_avg_word_length: float | None = Field(10, gt=0)
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="'#' per word, and '...'/'…' per word")
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, le=1, description="lines starting with • or -")
    max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0, le=1, description="lines ending with ... or …")
    min_alpha_words_ratio: float | None = Field(0.8, ge=0, le=1, description="words with an alphabetic character")
    min_stop_words: int | None = Field(2, ge=0, description="distinct stop words present")
    stop_words: list[str] = ["the", "be", "to", "of", "and", "that", "have", "with"]


class GopherRepetitionConfig(QualityFilterConfig):
    """Gopher repetition rules (arXiv:2112.11446 Table A1); defaults = datatrove 0.10.1."""

    dup_line_frac: float | None = Field(0.3, ge=0, le=1, description="duplicate lines / lines")
    dup_para_frac: float | None = Field(0.3, ge=0, le=1, description="duplicate paragraphs / paragraphs")
    dup_line_char_frac: float | None = Field(0.2, ge=0, le=1, description="chars in duplicate lines / chars")
    dup_para_char_frac: float | None = Field(0.2, ge=0, le=1, description="chars in duplicate paragraphs / chars")
    top_n_grams: dict[int, float] = Field({2: 0.2, 3: 0.18, 4: 0.16},
                                          description="n: max chars of the most frequent n-gram / chars")
    dup_n_grams: dict[int, float] = Field({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
                                          description="n: max chars in repeated n-grams / chars")


class C4QualityConfig(QualityFilterConfig):
    """C4 line and document rules (Raffel et al. 2020 §2.2 and tfds c4_utils); defaults = datatrove 0.10.1.

    Line rules remove lines (the document's text is rewritten); document rules remove documents.
    """

    remove_citations: bool = Field(True, description="strip [1], [edit], [citation needed]")
    filter_no_terminal_punct: bool = Field(True, description="drop lines not ending in . ? ! \" ' (or in ...)")
    min_words_per_line: int = Field(3, ge=-1, description="drop lines with fewer words (-1: off)")
    max_word_length: int = Field(1000, ge=-1, description="drop lines with a longer word (-1: off)")
    filter_javascript: bool = Field(True, description="drop lines mentioning javascript")
    filter_policy: bool = Field(True, description="drop lines with terms-of-use / cookie-policy phrases")
    filter_lorem_ipsum: bool = Field(True, description="drop documents containing lorem ipsum")
    filter_curly_bracket: bool = Field(True, description="drop documents with a { in a kept line")
    min_num_sentences: int = Field(5, ge=-1, description="drop documents with fewer sentences left (-1: off)")


class FineWebQualityConfig(QualityFilterConfig):
    """FineWeb rules (Penedo et al. 2024, arXiv:2406.17557 §3.3.3); defaults = datatrove 0.10.1.

    char_duplicates_ratio is datatrove's 0.01; the FineWeb paper's text states 0.1.
    """

    line_punct_thr: float = Field(0.12, ge=0, le=1, description="min fraction of lines ending in punctuation")
    line_punct_exclude_zero: bool = Field(False, description="do not apply line_punct_thr when no line ends so")
    short_line_thr: float = Field(0.67, ge=0, le=1, description="max fraction of lines <= short_line_length chars")
    short_line_length: int = Field(30, ge=0)
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1, description="max chars in duplicate lines / chars")
    new_line_ratio: float = Field(0.3, ge=0, description="max newlines per word")


class FiltersConfig(_Section):
    """The quality filter chain, run in this order after word_count_filter (datatrove's FineWeb order).

    All are off by default: turn each on (mode filter or annotate) for prose, and skip them on
    code (``skip_domains: [code]``), where Gopher/C4/FineWeb heuristics reject nearly everything.
    """

    word_tokenizer: Literal["fast", "spacy"] = Field(
        "fast", description="fast: pure-Python re-implementation of spaCy's English tokenizer (datatrove's); "
                            "spacy: spaCy itself (must be installed)")
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4_quality: C4QualityConfig = C4QualityConfig()
    fineweb_quality: FineWebQualityConfig = FineWebQualityConfig()
    examples_per_rule: int = Field(5, ge=0, description="document ids kept per rule in the filter report")


class NearDedupConfig(_Section):
    enabled: bool = True
    ngram: int = Field(5, gt=0)
    bands: int = Field(14, gt=0)
    rows: int = Field(8, gt=0)
    seed: int = 1
    # Signatures and banding (pipelines/minhash.py, pipelines/lsh_params.py).
    hash_mode: Literal["fast", "datasketch"] = Field(
        "fast", description="fast: numba MinHash mod 2^61-1; datasketch: bit-exact datasketch affine32 values")
    preset: Literal["default", "strict"] | None = Field(
        None, description="sets bands x rows: default 14 x 8 (~0.72), strict 11 x 10 (~0.79)")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="derive bands x rows (<= 112 permutations) for this Jaccard similarity")
    min_recall: float | None = Field(
        None, gt=0, lt=1, description="with threshold: minimum detection probability at it (default 0.9)")
    # Distributed LSH and the persistent index (pipelines/lsh.py, components.py, dedup_index.py).
    scope: Literal["global", "per_domain"] = Field(
        "global", description="per_domain: documents of different domains are never duplicates of each other")
    partitions: int = Field(16, gt=0, description="band-table partitions, one Ray task each (an index fixes its own)")
    max_bucket_size: int = Field(
        10_000, ge=2, description="an LSH bucket larger than this links only its first members and is reported")
    verify: bool = Field(False, description="drop candidate pairs whose signature Jaccard is below the threshold")
    index_uri: str | None = Field(None, description="persistent band index (local or s3://) to dedup against")
    update_index: bool = Field(False, description="append this run's survivors to index_uri (creating it)")
    precision_sample: int = Field(200, ge=0, description="removed pairs checked by exact shingle Jaccard")
    # Where it runs (pipelines/near_dedup_local.py). Both engines make identical decisions and write
    # the same outputs (clusters, index, report); only speed and memory differ.
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="auto: in-process (no Ray tasks; an Arrow table input starts no Ray) when the input "
        "holds at most local_max_docs documents and local_max_bytes of text, else distributed on Ray; "
        "local / ray: always that one")
    local_max_docs: int = Field(
        100_000, ge=0, description="engine auto: most documents run in-process (0: always Ray)")
    local_max_bytes: int = Field(
        256 * 2**20, ge=0, description="engine auto: most bytes of UTF-8 text run in-process (0: always Ray)")

    @model_validator(mode="before")
    @classmethod
    def _derive_bands_rows(cls, data: Any) -> Any:
        # Before validation, so bands/rows are plain fields afterwards (num_perm stays bands * rows)
        # and explicit bands/rows that contradict a preset or threshold are caught, not overridden.
        if not isinstance(data, dict):
            return data
        from pipelines.lsh_params import PRESETS, choose_bands_rows

        preset, threshold, min_recall = data.get("preset"), data.get("threshold"), data.get("min_recall")
        if min_recall is not None and threshold is None:
            raise ValueError("min_recall needs threshold")
        if preset is not None and threshold is not None:
            raise ValueError("give either preset or threshold, not both")
        if threshold is not None:
            derived = choose_bands_rows(112, float(threshold), 0.9 if min_recall is None else float(min_recall))
        elif preset in PRESETS:
            derived = PRESETS[preset]
        else:
            return data
        given = (data.get("bands", derived[0]), data.get("rows", derived[1]))
        if tuple(map(int, given)) != derived:
            raise ValueError(f"bands x rows {given[0]} x {given[1]} contradict the derived {derived[0]} x {derived[1]}; "
                             "drop bands/rows or preset/threshold")
        return {**data, "bands": derived[0], "rows": derived[1]}

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


class TokenizerConfig(_Section):
    path: str | None = Field(None, description="an existing tokenizer.json; None trains a BPE tokenizer")
    vocab_size: int = Field(4096, ge=64)
    train_docs: int = Field(20_000, gt=0, description="documents sampled to train the tokenizer")
    min_frequency: int = Field(2, ge=1)


class ShardConfig(_Section):
    max_rows: int = Field(50_000, gt=0, description="documents per shard file")
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    min_validation_docs: int = Field(2, ge=0)


class PipelineConfig(_Section):
    inputs: list[InputSpec] = Field(min_length=1)
    output_dir: str
    normalize: NormalizeConfig = NormalizeConfig()
    word_count_filter: WordCountFilterConfig = WordCountFilterConfig()
    filters: FiltersConfig = FiltersConfig()
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    shards: ShardConfig = ShardConfig()


# --------------------------------------------------------------------------- mixing


class SweepConfig(_Section):
    """Many small proxy runs on Ray, one MLflow child run each; finished runs are never repeated."""

    output_dir: str = Field("sweep", description="folder of runs/<run_id>.json (the resume state)")
    max_parallel: int | None = Field(None, gt=0, description="runs in flight at once (default: as Ray schedules)")
    cpus_per_run: float = Field(1, gt=0, description="CPUs reserved per run (Ray task num_cpus)")


class ProxyConfig(_Section):
    """A small proxy diffusion model trained in plain torch (mixing.proxy.train_proxy)."""

    preset: str = Field("test", description="a name from training.model.PRESETS")
    d_model: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    d_ff: int | None = Field(None, gt=0)
    seq_len: int = Field(64, gt=1)
    batch_size: int = Field(16, gt=0)
    steps: int = Field(200, gt=0)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    eval_docs_per_domain: int = Field(32, gt=0)
    mc_samples: int = Field(4, gt=0)
    eval_every: int = Field(0, ge=0, description="evaluate every k steps for loss curves (0: only at the end)")


class DoReMiConfig(_Section):
    """DoReMi (Xie et al. 2023) with masked-diffusion proxies (mixing.doremi)."""

    proxy: ProxyConfig = ProxyConfig()
    reference_weights: Literal["natural", "uniform"] | dict[str, float] = "natural"
    proxy_sampling: Literal["uniform", "reference"] = Field(
        "uniform", description="the DRO proxy's batches: uniform over domains (paper Alg. 1 and its code: every "
        "domain in every batch, so each excess is fresh) or drawn with the reference weights")
    eta: float = Field(1.0, gt=0, description="step size of the exponentiated-gradient update")
    smoothing: float = Field(1e-3, ge=0, le=1, description="c: alpha <- (1-c) alpha + c/k")
    excess_ema: float = Field(
        0.0, ge=0, lt=1, description="β of an exponential moving average of each domain's excess over the steps it "
        "appears in (0: the paper's one-batch estimate). Diffusion NELBO terms are weighted by 1/p(t) and a small "
        "proxy batch gives a noisy per-domain excess; averaging keeps η·λ noise from random-walking the weights")
    clip: Literal["token", "domain"] = Field(
        "token", description="clip the excess at 0 per token (paper) or on the domain aggregate")
    rounds: int = Field(1, gt=0, description="max rounds of iterated DoReMi")
    tol: float = Field(1e-3, gt=0, description="stop when ||avg alpha - alpha_ref||_inf < tol")
    seed: int = 0
    max_epochs: float | None = Field(
        None, gt=0, description="per-domain repetition cap (epochs): the Group-DRO weights stay (KL projection, "
        "every step) inside the simplex capped at min(1, max_epochs * U_i / token_budget); None: no cap")
    token_budget: int | None = Field(
        None, gt=0, description="tokens of the planned run the caps are for; None: proxy.steps * "
        "proxy.batch_size * proxy.seq_len (what one proxy run reads, as mix.laws does)")


class LawsConfig(_Section):
    """Data mixing laws (mixing/laws.py): fit, nested step/size laws, capped optimizer.

    `maskmix mix laws` trains one proxy (`proxy:`) per sampled mixture in a sweep (`mix.sweep`),
    fits the law on their per-domain losses and optimizes under repetition caps. The caps assume
    a token budget of proxy.steps × proxy.batch_size × proxy.seq_len (what one proxy run reads).
    """

    proxy: ProxyConfig = ProxyConfig()

    restarts: int = Field(8, ge=0, description="random restarts per validation domain (plus log-linear starts)")
    huber_delta: float = Field(0.01, gt=0, description="Huber f_scale in nats")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="runs held out to report prediction error")
    bootstrap_samples: int = Field(100, ge=0, description="bootstrap refits for intervals (0: none)")
    target_weights: dict[str, float] | None = Field(None, description="validation domain -> weight; None: equal")
    max_epochs: float | None = Field(4.0, gt=0, description="per-domain repetition cap (epochs) for the optimizer")
    r_star: float = Field(15.4, gt=0, description="R* of D'=U+U·R*(1-e^(-R/R*)); 15.4 is the AR fit, diffusion tolerates more")
    n_mixtures: int = Field(20, gt=0, description="mixtures sampled for the small runs")
    sampling: Literal["double_diminishing", "dirichlet"] = "double_diminishing"
    include_vertices: bool = Field(
        True, description="double_diminishing: always run the pure single-domain mixtures the caps allow "
        "(the vertices of a simplex design); a law's optimum for one target is often a vertex")
    dirichlet_concentration: float = Field(1.0, gt=0, description="α = concentration·M·base")
    seed: int = 0


class MixConfig(_Section):
    manifest: str = Field(description="manifest.json of a pipeline run")
    method: Literal["natural", "uniform", "temperature"] = Field(
        "natural", description="baseline method (`maskmix mix baseline`); doremi and laws are their own verbs")
    temperature: float = Field(1.0, gt=0, description="temperature: w_i ∝ n_i^(1/τ); 1 natural, large → uniform")
    output: str = Field(description="where to write mixture.json")
    sweep: SweepConfig = SweepConfig()
    doremi: DoReMiConfig = DoReMiConfig()
    laws: LawsConfig = LawsConfig()


# --------------------------------------------------------------------------- training


class ModelConfig(_Section):
    preset: str = Field("tiny", description="a name from training.model.PRESETS")
    d_model: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    d_ff: int | None = Field(None, gt=0)
    tie_embeddings: bool | None = None
    dropout: float | None = Field(None, ge=0, lt=1)


class EvalConfig(_Section):
    checkpoint: str | None = Field(None, description="checkpoint folder (for `maskmix eval`)")
    manifest: str | None = None
    split: Literal["train", "validation"] = "validation"
    mc_samples: int = Field(8, gt=0, description="Monte Carlo masks per sequence")
    max_docs_per_domain: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    seed: int = 1234


class MaskingConfig(_Section):
    """Which tokens are masked, and how the mask ratio t is drawn (training.diffusion.Masking).

    Only strategy=independent with t_distribution=uniform trains on the exact NELBO; the other
    combinations are experiments whose train/loss is a heuristic objective (the run is tagged
    maskmix.nelbo_exact=false). Evaluation always reports the exact bound.
    """

    strategy: Literal["independent", "whole_word", "span"] = Field(
        "independent", description="independent tokens | whole words (needs the manifest's tokenizer.json) | spans")
    mean_span_length: float = Field(3.0, ge=1, description="span: mean of the geometric span lengths (tokens)")
    t_distribution: Literal["uniform", "beta", "truncated"] = Field(
        "uniform", description="distribution of t: uniform (the NELBO's), beta(beta_a, beta_b), truncated [t_min, t_max]")
    beta_a: float | None = Field(None, gt=0, description="beta: first shape parameter")
    beta_b: float | None = Field(None, gt=0, description="beta: second shape parameter")
    t_min: float | None = Field(None, ge=0, lt=1, description="truncated: lower end of t")
    t_max: float | None = Field(None, gt=0, le=1, description="truncated: upper end of t")

    @model_validator(mode="after")
    def _parameters_match_distribution(self) -> "MaskingConfig":
        beta = {"beta_a": self.beta_a, "beta_b": self.beta_b}
        bounds = {"t_min": self.t_min, "t_max": self.t_max}
        if self.t_distribution == "beta" and None in beta.values():
            raise ValueError("t_distribution 'beta' needs beta_a and beta_b")
        if self.t_distribution == "truncated":
            if None in bounds.values():
                raise ValueError("t_distribution 'truncated' needs t_min and t_max")
            if self.t_min >= self.t_max:
                raise ValueError(f"t_min ({self.t_min}) must be < t_max ({self.t_max})")
        unused = [k for k, v in ({} if self.t_distribution == "beta" else beta).items() if v is not None]
        unused += [k for k, v in ({} if self.t_distribution == "truncated" else bounds).items() if v is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} set but t_distribution is {self.t_distribution!r}")
        return self


class LaunchConfig(_Section):
    """How `maskmix train` runs the training function (training.launch).

    local: in this process (one rank). torchrun: num_workers ranks on this machine.
    ray: num_workers Ray Train workers (embedded Ray, or the cluster of ray.address / RAY_ADDRESS).
    """

    mode: Literal["local", "torchrun", "ray"] = "local"
    num_workers: int = Field(1, ge=1, description="ranks (one per GPU with use_gpu)")
    use_gpu: bool = Field(False, description="one GPU per rank (NCCL); else CPU ranks over gloo")
    cpus_per_worker: float = Field(1, gt=0, description="ray: CPUs reserved per worker; torchrun: OMP threads per rank")
    storage_path: str | None = Field(
        None, description="ray: where Ray Train keeps its run state, local or s3:// (default <output_dir>/ray)")

    @model_validator(mode="after")
    def _local_is_one_rank(self) -> "LaunchConfig":
        if self.mode == "local" and self.num_workers != 1:
            raise ValueError(f"mode 'local' runs one rank; num_workers={self.num_workers} needs mode torchrun or ray")
        return self


class TrainConfig(_Section):
    manifest: str
    mixture: str | None = Field(None, description="mixture.json; None uses natural proportions")
    output_dir: str
    model: ModelConfig = ModelConfig()
    seq_len: int = Field(128, gt=1)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    steps: int = Field(200, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="after warmup: cosine decay to min_lr_ratio, or warmup-stable-decay (constant, "
                              "then linear decay to min_lr_ratio over the last decay_fraction of the steps)")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of the steps spent decaying")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    mask_eps: float = Field(1e-3, gt=0, lt=1, description="p(t) = (1-eps)t + eps")
    masking: MaskingConfig = MaskingConfig()
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_last: int | None = Field(None, gt=0, description="keep only the newest N complete local checkpoints "
                                                          "(the one 'latest' names is never deleted); None: keep all")
    checkpoint_uri: str | None = Field(None, description="remote mirror of the checkpoints, e.g. s3://bucket/run: "
                                                         "each complete checkpoint is uploaded, and a run with no "
                                                         "local checkpoint resumes from the mirror's latest")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights with this decay "
                                                                  "(e.g. 0.999); it is what eval_every evaluates "
                                                                  "and what is exported. None: off")
    nonfinite_lr_backoff: float = Field(0.5, gt=0, le=1, description="after a step skipped for a non-finite loss "
                                                                      "or gradient, multiply the LR by this for the "
                                                                      "rest of the run")
    max_nonfinite_skips: int = Field(10, gt=0, description="fail the run after this many consecutive skipped steps")
    eval_every: int = Field(0, ge=0, description="steps between per-domain evaluations on eval.split during "
                                                 "training (and one at the end); 0: off")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of ONE device, for train/mfu = 6 N "
                                                             "tokens/s / (peak_flops x world size); H100 SXM bf16 "
                                                             "dense: 989e12. None: no MFU")
    export: bool = Field(True, description="at the end of the run write <output_dir>/export/ (safetensors, "
                                           "tokenizer, model card) and log it to MLflow")
    register_model: str | None = Field(None, min_length=1, description="also register the export under this name "
                                                                       "in the MLflow model registry")
    eval: EvalConfig = EvalConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _export_and_mirror(self) -> "TrainConfig":
        if self.register_model and not self.export:
            raise ValueError("register_model needs export: true (the registry version points at the export)")
        if self.checkpoint_uri is not None:
            uri = self.checkpoint_uri.rstrip("/")
            if not uri or uri == "s3:/" or uri == "s3:":
                raise ValueError(f"checkpoint_uri {self.checkpoint_uri!r} names no folder")
            if not uri.startswith("s3://") and os.path.abspath(uri).startswith(
                    os.path.abspath(os.path.join(self.output_dir, "checkpoints"))):
                raise ValueError("checkpoint_uri must not be inside output_dir/checkpoints (it mirrors that folder)")
        return self


# --------------------------------------------------------------------------- demo


class CorpusConfig(_Section):
    domains: list[Literal["code", "reference", "readme", "license"]] = ["code", "reference", "readme", "license"]
    max_bytes_per_domain: int = Field(1_000_000, gt=0)


# The demo's quality filters. On its corpus (code, pydoc reference, READMEs, licenses) the published
# prose heuristics would remove most documents (Gopher quality counts markup punctuation as words:
# ~all READMEs and reference topics fail its 80% alphabetic-words rule; FineWeb's 1% duplicate-line
# rule removes 3/4 of READMEs), so they annotate: scores per document in filters/scores.parquet and
# what each rule would remove in the filter report, nothing removed. Code is skipped. One rule
# filters: Gopher repetition on license, where it removes concatenated multi-license files (the PSF
# history, matplotlib/pillow/numba bundles) and tiny NOTICE/AUTHORS lists, ~7% of license files.
DEMO_FILTERS: dict[str, Any] = {
    name: {"enabled": True, "mode": "annotate", "skip_domains": ["code"]}
    for name in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
}
DEMO_FILTERS["gopher_repetition"]["domains"] = {"license": {"mode": "filter"}}


def _merged(base: dict, given: dict) -> dict:
    out = dict(base)
    for key, value in given.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


class DemoConfig(_Section):
    """The knobs of `maskmix demo`; every stage config it runs is derived from these."""

    output_dir: str = "demo-out"
    corpus: CorpusConfig = CorpusConfig()
    min_words: int = Field(20, ge=0, description="word-count filter threshold for the harvested text")
    filters: FiltersConfig = Field(
        default_factory=lambda: FiltersConfig.model_validate(DEMO_FILTERS),
        description="pipeline.filters of the demo; keys given here are merged onto the demo's defaults "
                    "(DEMO_FILTERS: annotate mode, code skipped, Gopher repetition filtering license files)")
    vocab_size: int = Field(2048, ge=64)
    mixture: Literal["natural", "uniform"] = Field("natural", description="the mixture the demo trains on")
    model_preset: str = "tiny"
    seq_len: int = Field(128, gt=1)
    train_steps: int = Field(300, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    eval_docs_per_domain: int = Field(32, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _merge_demo_filters(cls, data: Any) -> Any:
        # `--set demo.filters.c4_quality.mode=filter` changes one key, not the whole demo setup.
        if isinstance(data, dict) and isinstance(data.get("filters"), dict):
            data = {**data, "filters": _merged(DEMO_FILTERS, data["filters"])}
        return data


# --------------------------------------------------------------------------- whole file


class MaskmixConfig(_Section):
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    pipeline: PipelineConfig | None = None
    mix: MixConfig | None = None
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    demo: DemoConfig | None = None

    def require(self, section: str, source: str = "config") -> Any:
        value = getattr(self, section)
        if value is None:
            raise ConfigError(f"{source}: this command needs a '{section}:' section")
        return value


_ENV_OVERRIDES: list[tuple[tuple[str, ...], tuple[str, str]]] = [
    (("RAY_ADDRESS",), ("ray", "address")),
    (("MLFLOW_TRACKING_URI",), ("tracking", "uri")),
    (("MASKMIX_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), ("storage", "endpoint_url")),
    (("AWS_DEFAULT_REGION", "AWS_REGION"), ("storage", "region")),
    (("AWS_ACCESS_KEY_ID",), ("storage", "access_key_id")),
    (("AWS_SECRET_ACCESS_KEY",), ("storage", "secret_access_key")),
    (("AWS_SESSION_TOKEN",), ("storage", "session_token")),
]


# Set by `maskmix submit` in a job's environment: its config was resolved on the submitting machine
# (environment and --set already applied), so the cluster's environment may only add what was kept
# out of it on purpose, the credentials. Otherwise a variable of the head's (MLFLOW_TRACKING_URI,
# RAY_ADDRESS, an S3 endpoint) would silently override what the user submitted.
RESOLVED_ENV = "MASKMIX_CONFIG_RESOLVED"
_CREDENTIAL_KEYS = {"access_key_id", "secret_access_key", "session_token"}


def _apply_env(data: dict) -> None:
    resolved = os.environ.get(RESOLVED_ENV) == "1"
    for names, (section, key) in _ENV_OVERRIDES:
        if resolved and key not in _CREDENTIAL_KEYS:
            continue
        for name in names:
            value = os.environ.get(name)
            if value:
                data.setdefault(section, {})
                if not isinstance(data[section], dict):
                    break  # the section is malformed; validation reports it
                data[section][key] = value
                break


def _apply_set(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, raw = assignment.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    node = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):  # pipeline.inputs.0.path: a list entry by its index
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {assignment!r}: {'.'.join(path[:i])} has {len(node)} entries, "
                                  f"no index {part!r}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {path[i - 1]} is not a section")
        if last:
            node[part] = yaml.safe_load(raw)  # "100" -> 100, "true" -> True, "[a,b]" -> list
        else:
            if isinstance(node, dict) and node.get(part) is None:  # absent, or declared empty (`eval:` is null)
                node[part] = {}
            node = node[part]


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see `maskmix config schema`)")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict | None, source: str = "<config>", overrides: list[str] | None = None,
                 use_env: bool = True) -> MaskmixConfig:
    data = copy.deepcopy(data or {})  # env and --set write into nested sections: never the caller's dict
    if use_env:
        _apply_env(data)
    for assignment in overrides or []:
        _apply_set(data, assignment)
    try:
        return MaskmixConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, use_env: bool = True) -> MaskmixConfig:
    """Read a YAML config (None: all defaults) and apply environment and ``--set`` overrides."""
    if path is None:
        return parse_config({}, "<defaults>", overrides, use_env)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return parse_config(data, str(path), overrides, use_env)


def config_hash(section: BaseModel) -> str:
    """Stable hash of a section's values (secrets appear masked, so they never change the hash)."""
    canonical = json.dumps(section.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
