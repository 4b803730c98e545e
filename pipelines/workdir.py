"""A folder of Parquet/JSON files (local or s3://) shared by the driver and Ray tasks.

The near-dedup phases hand data to each other through files, not through the object store:
a task's output is written atomically (``Storage.write_bytes``), so a file that exists is a
finished piece of work, and a killed run restarts from what is there.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra.config import StorageConfig
from infra.storage import Storage, join


class WorkDir:
    def __init__(self, uri: str, storage_cfg: StorageConfig | None = None):
        self.uri = uri
        self.storage_cfg = storage_cfg  # kept so the object pickles into Ray tasks and rebuilds its filesystem
        self.storage = Storage(storage_cfg)

    def __getstate__(self):
        return {"uri": self.uri, "storage_cfg": self.storage_cfg}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["storage_cfg"])

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def exists(self, *parts: str) -> bool:
        return self.storage.exists(self.path(*parts))

    def write_json(self, obj, *parts: str) -> None:
        self.storage.write_bytes(self.path(*parts), json.dumps(obj, sort_keys=True, indent=1).encode())

    def read_json(self, *parts: str):
        return json.loads(self.storage.read_bytes(self.path(*parts)))

    def write_table(self, table: pa.Table, *parts: str) -> None:
        sink = pa.BufferOutputStream()
        # No dictionary encoding: these columns are hashes and node strings, nearly all distinct,
        # where Parquet's dictionary attempt only costs. Measured on 57k band rows: write 55 ->
        # 13 ms, read 25 -> 4 ms, file 0.85 -> 0.69 MB (zstd either way).
        pq.write_table(table, sink, compression="zstd", use_dictionary=False)
        self.storage.write_bytes(self.path(*parts), sink.getvalue().to_pybytes())

    def read_table(self, *parts: str) -> pa.Table:
        with self.storage.open_input_file(self.path(*parts)) as f:
            return pq.read_table(f)

    def files(self, *parts: str, suffix: str = ".parquet") -> list[str]:
        """Full URIs of the files below a folder (sorted; empty if the folder does not exist)."""
        uri = self.path(*parts)
        return self.storage.list_files(uri, (suffix,)) if self.storage.exists(uri) else []

    def read_files(self, uris: list[str], schema: pa.Schema) -> pa.Table:
        tables = []
        for uri in uris:
            with self.storage.open_input_file(uri) as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()

    def delete(self, *parts: str) -> None:
        self.storage.delete_dir(self.path(*parts))


def split_rows(table: pa.Table, parts: np.ndarray) -> dict[int, pa.Table]:
    """Rows grouped by their partition number (``parts`` holds one per row); input order kept within."""
    if table.num_rows == 0:
        return {}
    order = np.argsort(parts, kind="stable")
    table, parts = table.take(pa.array(order)), parts[order]
    bounds = np.flatnonzero(np.diff(parts)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(parts)]])
    return {int(parts[s]): table.slice(s, e - s) for s, e in zip(starts, ends)}
