"""The artifacts between stages (DESIGN.md, "Artifacts"): Arrow schemas and versioned JSON files.

documents -> shards + manifest.json -> mixture.json -> checkpoint (+ trainer_state.json)

Every JSON artifact carries ``schema_version``; a loader refuses a version it does not know and
turns any missing or mistyped field into a ``ContractError`` that names the file and the field.
Paths inside a manifest are relative to the manifest's folder, so an output folder can be moved
(local disk -> s3://) without rewriting it.

Changes: Documents may carry the optional ``language``/``language_score`` columns
(DOCUMENT_LANGUAGE_FIELDS, added by normalization); DOCUMENT_SCHEMA itself is unchanged, so no JSON
artifact's schema_version moves. Quarantine reasons gained ``too_large``, ``unreadable_file`` and
``read_error``.

Manifest (still schema_version 1; every older manifest loads as before): manifest.json is now a
function of the pipeline's inputs and config only, so a resumed run writes the same bytes as an
uninterrupted one. ``created_at`` and ``mlflow_run_id`` became optional and the pipeline leaves
them null in the file (the time and the run live in ``<out>/runs/*.json`` and in MLflow, whose run
is tagged ``maskmix.manifest_sha256``); ``config_hash`` leaves ``output_dir`` out; StageStats.extra
no longer carries ``seconds``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Literal, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.errors import ContractError

# --------------------------------------------------------------------------- Arrow schemas

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # uri plus line/row, e.g. "data/a.jsonl#L12"
        pa.field("meta", pa.string(), nullable=True),  # JSON string of any extra fields
    ]
)

# Optional Document columns, added by normalization (pipelines/normalize.py) when language id is on.
# Kept out of DOCUMENT_SCHEMA so that reader output and older Document tables stay valid as they are.
DOCUMENT_LANGUAGE_FIELDS = pa.schema(
    [
        # Set on every row; declared nullable so Ray blocks with and without nulls elsewhere still concatenate.
        pa.field("language", pa.string()),  # ISO 639-1 code, "und" when undetermined
        pa.field("language_score", pa.float32()),  # the identifier's probability, 0 for "und"
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=True),  # truncated to QUARANTINE_RAW_CHARS
    ]
)
QUARANTINE_RAW_CHARS = 2000

# A document a stage removed on purpose (filter rule, duplicate): kept as a record, never silent.
REMOVED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),  # e.g. the id of the kept duplicate
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        # UTF-8 bytes of the source text: bits-per-byte needs it, and tokens cannot give it back.
        pa.field("n_bytes", pa.int64(), nullable=False),
    ]
)

CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("kept_doc_id", pa.string(), nullable=False),
    ]
)


def check_table_schema(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Raise ContractError unless ``table`` has every field of ``schema`` with the same type."""
    for field in schema:
        idx = table.schema.get_field_index(field.name)
        if idx < 0:
            raise ContractError(f"{what}: missing column {field.name!r} (expected {field.type})")
        got = table.schema.field(idx).type
        if got != field.type:
            raise ContractError(f"{what}: column {field.name!r} has type {got}, expected {field.type}")


# --------------------------------------------------------------------------- JSON artifacts


def distribution_problem(weights: dict[str, float]) -> str | None:
    """Why ``weights`` are not a distribution over domains (None when they are): every weight
    finite and >= 0, the sum 1 within 1e-6. Shared by Mixture and the configs that take weights."""
    bad = {d: w for d, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        return f"weights must be finite and >= 0, got {bad}"
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        return f"weights must sum to 1, they sum to {total:.8f}"
    return None


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _contained_path(path: str) -> str:
    """A manifest's file path: relative to the manifest folder and inside it, or an s3:// URI.

    An absolute local path or one climbing out with ``..`` would let a crafted manifest point
    training (and the export, which copies the tokenizer into MLflow) at any file of the machine.
    """
    if path.startswith("s3://"):
        return path
    parts = path.replace("\\", "/").split("/")
    if path.startswith("/") or ".." in parts or not path:
        raise ValueError(f"{path!r} must be relative to the manifest folder and stay inside it (or an s3:// URI)")
    return path


class TokenizerInfo(_Artifact):
    path: str  # relative to the manifest folder (inside it), or an s3:// uri
    sha256: str
    vocab_size: int = Field(gt=0)
    special_ids: dict[str, int]  # at least "pad" and "mask"

    _path_inside = field_validator("path")(classmethod(lambda cls, v: _contained_path(v)))

    @field_validator("special_ids")
    @classmethod
    def _needs_pad_and_mask(cls, v: dict[str, int]) -> dict[str, int]:
        missing = {"pad", "mask"} - set(v)
        if missing:
            raise ValueError(f"special_ids lacks {sorted(missing)}")
        return v


class ShardInfo(_Artifact):
    path: str  # relative to the manifest folder (inside it), or an s3:// uri
    split: Literal["train", "validation"]

    _path_inside = field_validator("path")(classmethod(lambda cls, v: _contained_path(v)))
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)  # size of the parquet file
    text_bytes: int = Field(ge=0)  # UTF-8 bytes of the documents it holds
    sha256: str


class DomainShards(_Artifact):
    shards: list[ShardInfo]

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.split(split))

    def rows(self, split: str = "train") -> int:
        return sum(s.rows for s in self.split(split))


class StageStats(_Artifact):
    # Counters only: timings are not part of the manifest (they differ between identical runs);
    # older manifests may still carry extra["seconds"].
    name: str
    docs_in: int = Field(ge=0)
    docs_out: int = Field(ge=0)
    removed: dict[str, int] = Field(default_factory=dict)  # reason -> count
    extra: dict[str, Any] = Field(default_factory=dict)  # e.g. duplicate clusters


class Manifest(_Artifact):
    # Version rule as for TrainerState. created_at went from "required float, default now" to
    # optional (None): older files, which all have a float, load the same.
    schema_version: Literal[1] = 1
    created_at: float | None = None  # older manifests: when written; the pipeline now leaves it null
    config_hash: str  # the pipeline config without output_dir (older manifests: with it)
    # Older manifests: the run that wrote them. The pipeline now leaves it null in the file (a
    # resumed run spans several MLflow runs); run_pipeline's returned object carries its run's id.
    mlflow_run_id: str | None = None
    tokenizer: TokenizerInfo
    domains: dict[str, DomainShards]
    stages: list[StageStats] = Field(default_factory=list)

    @field_validator("domains")
    @classmethod
    def _non_empty(cls, v: dict[str, DomainShards]) -> dict[str, DomainShards]:
        if not v:
            raise ValueError("a manifest needs at least one domain")
        return v

    def domain_names(self) -> list[str]:
        return sorted(self.domains)


class Mixture(_Artifact):
    schema_version: Literal[1] = 1
    created_at: float = Field(default_factory=time.time)
    weights: dict[str, float]
    method: str
    reference_weights: dict[str, float] | None = None
    manifest_sha256: str
    tokenizer_sha256: str
    mlflow_run_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weights", "reference_weights")
    @classmethod
    def _is_distribution(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("weights must name at least one domain")
        problem = distribution_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _same_domains(self) -> "Mixture":
        if self.reference_weights is not None and set(self.reference_weights) != set(self.weights):
            raise ValueError("reference_weights must name the same domains as weights")
        return self


class TrainerState(_Artifact):
    # Version rule: a field added with a default keeps version 1 (every older file still loads the
    # same); removing, renaming or changing the meaning of a field bumps the version.
    # masked_tokens_seen and nonfinite were added that way.
    schema_version: Literal[1] = 1
    step: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    masked_tokens_seen: int = Field(0, ge=0)  # tokens the loss scored (all ranks)
    sampler: dict[str, Any]  # MixtureSampler.state_dict(): cursors, epochs, RNG
    rng: dict[str, Any]  # python / numpy / torch generator states (JSON-encoded)
    config_hash: str
    manifest_sha256: str
    mixture_sha256: str
    mlflow_run_id: str | None = None
    nonfinite: dict[str, Any] = Field(default_factory=dict)  # training.guard.NonFiniteGuard: skips, LR back-off


# One place that says what each artifact's file is called.
MANIFEST_FILE = "manifest.json"
MIXTURE_FILE = "mixture.json"
TRAINER_STATE_FILE = "trainer_state.json"

A = TypeVar("A", bound=_Artifact)


def _describe_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_artifact(cls: type[A], data: bytes | str | dict, where: str) -> A:
    """Validate ``data`` (JSON text or a dict) as ``cls``; errors name ``where`` and each bad field."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ContractError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ContractError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    expected = cls.model_fields["schema_version"].default
    if version is None:
        raise ContractError(f"{where}: no schema_version (a {cls.__name__} needs schema_version={expected})")
    if version != expected:
        raise ContractError(
            f"{where}: schema_version {version!r} is not supported by this maskmix "
            f"(it reads {cls.__name__} version {expected})"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ContractError(f"{where}: invalid {cls.__name__}: {_describe_errors(e)}") from None


def dump_artifact(obj: _Artifact) -> bytes:
    """Canonical JSON (sorted keys) so the sha256 of an artifact is stable."""
    return (json.dumps(obj.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_sha256(obj: _Artifact) -> str:
    return sha256_bytes(dump_artifact(obj))


# Loaders and writers go through storage so that local paths and s3:// behave the same.


def load_artifact(cls: type[A], uri: str, storage=None) -> A:
    from infra.storage import Storage

    storage = storage or Storage()
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ContractError(f"{uri}: no such {cls.__name__} file") from None
    except IsADirectoryError:
        raise ContractError(f"{uri}: is a directory, not a {cls.__name__} file") from None
    return parse_artifact(cls, raw, uri)


def write_artifact(obj: _Artifact, uri: str, storage=None) -> str:
    """Write atomically and return the sha256 of the bytes written."""
    from infra.storage import Storage

    storage = storage or Storage()
    data = dump_artifact(obj)
    storage.write_bytes(uri, data)
    return sha256_bytes(data)


def load_manifest(uri: str, storage=None) -> Manifest:
    return load_artifact(Manifest, uri, storage)


def load_mixture(uri: str, storage=None) -> Mixture:
    return load_artifact(Mixture, uri, storage)


def load_trainer_state(uri: str, storage=None) -> TrainerState:
    return load_artifact(TrainerState, uri, storage)
