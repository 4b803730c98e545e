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
    shuffle_partitions: int | None = Field(None, gt=0, description="groupby/sort partitions (default: 2 x CPUs embedded)")


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
    format: Literal["auto", "jsonl", "parquet"] = "auto"


class NormalizeConfig(_Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control_chars: bool = True


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


class NearDedupConfig(_Section):
    enabled: bool = True
    ngram: int = Field(5, gt=0)
    bands: int = Field(14, gt=0)
    rows: int = Field(8, gt=0)
    seed: int = 1

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
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    shards: ShardConfig = ShardConfig()


# --------------------------------------------------------------------------- mixing


class MixConfig(_Section):
    manifest: str = Field(description="manifest.json of a pipeline run")
    method: Literal["natural", "uniform"] = "natural"
    output: str = Field(description="where to write mixture.json")


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
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    mask_eps: float = Field(1e-3, gt=0, lt=1, description="p(t) = (1-eps)t + eps")
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    eval: EvalConfig = EvalConfig()


# --------------------------------------------------------------------------- demo


class CorpusConfig(_Section):
    domains: list[Literal["code", "reference", "readme", "license"]] = ["code", "reference", "readme", "license"]
    max_bytes_per_domain: int = Field(1_000_000, gt=0)


class DemoConfig(_Section):
    """The knobs of `maskmix demo`; every stage config it runs is derived from these."""

    output_dir: str = "demo-out"
    corpus: CorpusConfig = CorpusConfig()
    min_words: int = Field(20, ge=0, description="word-count filter threshold for the harvested text")
    vocab_size: int = Field(2048, ge=64)
    mixture: Literal["natural", "uniform"] = Field("natural", description="the mixture the demo trains on")
    model_preset: str = "tiny"
    seq_len: int = Field(128, gt=1)
    train_steps: int = Field(300, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    eval_docs_per_domain: int = Field(32, gt=0)


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


def _apply_env(data: dict) -> None:
    for names, (section, key) in _ENV_OVERRIDES:
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
    for part in path[:-1]:
        if node.get(part) is None:  # absent, or declared empty in YAML (`eval:` is null)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
    node[path[-1]] = yaml.safe_load(raw)  # "100" -> 100, "true" -> True, "[a,b]" -> list


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
