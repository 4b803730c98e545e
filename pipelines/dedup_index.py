"""A persistent LSH band index: the band table of finished runs, to dedup later data against.

Layout under the index URI (local or s3://):

    index.json                          format version, LSH parameters, partitions, runs
    bands/part-<p>/<run tag>.parquet    band, key, node (+ signature when built with verify)

A run's files count only once its tag is listed in ``index.json`` (rewritten last, in one
write), so a run killed while appending leaves the index as it was. A later run must use the
same signature and banding parameters, or its keys would never meet the stored ones: a
mismatch is refused, naming each differing field.
"""

from __future__ import annotations

from infra.config import NearDedupConfig, StorageConfig
from infra.errors import MaskmixError
from pipelines.workdir import WorkDir

FORMAT_VERSION = 1
META_FILE = "index.json"
# What makes two runs' bucket keys comparable (and whether stored rows carry signatures).
_PARAMS = ("num_perm", "bands", "rows", "seed", "ngram", "hash_mode", "scope", "with_signatures")


class DedupIndexError(MaskmixError):
    """The index cannot be used with this run (missing, other parameters, unknown version)."""


def index_params(cfg: NearDedupConfig) -> dict:
    return {"num_perm": cfg.num_perm, "bands": cfg.bands, "rows": cfg.rows, "seed": cfg.seed,
            "ngram": cfg.ngram, "hash_mode": getattr(cfg, "hash_mode", "fast"), "scope": cfg.scope,
            "with_signatures": cfg.verify}


class BandIndex:
    def __init__(self, uri: str, storage_cfg: StorageConfig | None = None):
        self.uri = uri
        self.files = WorkDir(uri, storage_cfg)

    def exists(self) -> bool:
        return self.files.exists(META_FILE)

    def meta(self) -> dict:
        if not self.exists():
            raise DedupIndexError(f"no dedup index at {self.uri} ({META_FILE} missing); "
                              "set near_dedup.update_index: true to create one")
        meta = self.files.read_json(META_FILE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise DedupIndexError(f"dedup index {self.uri} has format version {meta.get('format_version')}, "
                              f"this maskmix reads version {FORMAT_VERSION}")
        return meta

    def checked_meta(self, cfg: NearDedupConfig) -> dict:
        """The index's metadata, if its parameters are those of ``cfg``."""
        meta, wanted = self.meta(), index_params(cfg)
        diffs = [f"{k}: index {meta['params'].get(k)!r}, run {wanted[k]!r}"
                 for k in _PARAMS if meta["params"].get(k) != wanted[k]]
        if diffs:
            raise DedupIndexError(f"dedup index {self.uri} was built with other parameters ({'; '.join(diffs)}); "
                              "use a new index_uri or the index's parameters")
        return meta

    def partition_files(self, meta: dict, p: int, exclude_tag: str | None = None) -> list[str]:
        return [self.files.path("bands", f"part-{p:05d}", f"{run['tag']}.parquet")
                for run in meta["runs"] if run["tag"] != exclude_tag and p in run["partitions"]]

    def commit(self, meta: dict | None, cfg: NearDedupConfig, partitions: int, run: dict) -> dict:
        """List a run whose files are written (creating the index metadata on first use)."""
        meta = meta or {"format_version": FORMAT_VERSION, "params": index_params(cfg),
                        "partitions": partitions, "runs": []}
        meta = {**meta, "runs": [r for r in meta["runs"] if r["tag"] != run["tag"]] + [run]}
        self.files.write_json(meta, META_FILE)
        return meta


def index_info(uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """What ``maskmix dedup index-info`` prints: parameters, partitions, runs and total documents."""
    meta = BandIndex(uri, storage_cfg).meta()
    return {"uri": uri, "format_version": meta["format_version"], "params": meta["params"],
            "partitions": meta["partitions"], "runs": len(meta["runs"]),
            "documents": sum(r["documents"] for r in meta["runs"]),
            "band_rows": sum(r["rows"] for r in meta["runs"]),
            "run_tags": [r["tag"] for r in meta["runs"]]}
