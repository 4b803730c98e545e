"""A generated hostile corpus: every kind of bad input the readers must survive, with good records
interleaved in every file, and the exact verdict a correct pipeline must reach for each record.

``write_hostile_corpus(root)`` writes three inputs under ``root`` and returns a ``Planted``:

    jsonl/   max_doc_bytes = SMALL_LIMIT (1 MiB), domain read from each record
        mixed.jsonl           good records between malformed JSON, invalid UTF-8, NUL bytes (escaped: nul_byte;
                              raw: invalid JSON), a 100k-level nested record, wrong types (text as number /
                              list / null, id as object / list / bool, domain as number), a domain that is a
                              path ("../../etc"), a lone surrogate, a 5000-digit integer, a bare array
        bom.jsonl             a UTF-8 byte-order mark before the first (good) record
        huge.jsonl            a 50 MiB single document between two good ones      -> too_large
        mixed.jsonl.gz        good + bad, gzip;  mixed.jsonl.zst: good + bad, zstd in several frames
        cut.jsonl.gz          good records, then a record the file is cut inside   -> corrupt_file
        cut.jsonl.zst         same for zstd (complete frame of good records, then a cut frame)
        zero.jsonl.gz / zero.jsonl.zst   zero bytes (a compressed file always has a header) -> corrupt_file
        garbage.jsonl.zst     not zstd at all                                      -> corrupt_file
        empty.jsonl           zero bytes, and blank.jsonl only blank lines          -> nothing, no error
    raised/  max_doc_bytes = RAISED_LIMIT (4 MiB)
        near_limit.jsonl      a record whose line is RAISED_LIMIT - 1 bytes (kept) and one of
                              RAISED_LIMIT + 1 bytes (too_large), between good ones
    text/    format text, domain "books": good files, a NUL byte, Latin-1 bytes, a zero-byte file

``include_huge=False`` leaves the 50 MiB line out and ``include_raised=False`` the raised/ input (the
memory test compares runs with and without the big line, without the 4 MiB record whose tokenization
would dominate both). Sources are what the readers report: ``<absolute path>#L<line>`` for JSONL, the path for text.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

SMALL_LIMIT = 1 << 20
RAISED_LIMIT = 4 << 20
HUGE_DOC_BYTES = 50 << 20  # the one big document: 50 MiB, 50x SMALL_LIMIT

# kind -> (line bytes, the reason it must be quarantined with)
BAD_LINES: dict[str, tuple[bytes, str]] = {
    "truncated_object": (b'{"id": "t1", "domain": "web", "text": "cut here', "invalid_json"),
    "not_json": (b"this line is not json at all", "invalid_json"),
    "trailing_garbage": (b'{"id": "t2", "domain": "web", "text": "x"} trailing', "invalid_json"),
    "raw_nul_in_string": (b'{"id": "t3", "domain": "web", "text": "a\x00b"}', "invalid_json"),
    "escaped_nul": (b'{"id": "t4", "domain": "web", "text": "before\\u0000after"}', "nul_byte"),
    "invalid_utf8": (b'{"id": "t5", "domain": "web", "text": "caf\xe9 \xff\xfe"}', "invalid_utf8"),
    "lone_surrogate": (b'{"id": "t6", "domain": "web", "text": "half a pair \\ud800 here"}', "invalid_utf8"),
    "deep_100k": (b'{"id": "t7", "domain": "web", "text": "ok", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                  "too_deep"),
    "deep_bare_100k": (b"{" + b'"a":{' * 100_000 + b"}" * 100_001, "too_deep"),
    "huge_integer": (b'{"id": "t8", "domain": "web", "text": "ok", "n": ' + b"9" * 5000 + b"}", "invalid_json"),
    "text_number": (b'{"id": "t9", "domain": "web", "text": 42}', "text_not_string"),
    "text_list": (b'{"id": "t10", "domain": "web", "text": ["a", "list"]}', "text_not_string"),
    "text_null": (b'{"id": "t11", "domain": "web", "text": null}', "missing_text"),
    "text_absent": (b'{"id": "t12", "domain": "web"}', "missing_text"),
    "text_blank": (b'{"id": "t13", "domain": "web", "text": " \\n\\t "}', "empty_text"),
    "id_object": (b'{"id": {"nested": 1}, "domain": "web", "text": "id is an object"}', "invalid_id"),
    "id_list": (b'{"id": [1, 2], "domain": "web", "text": "id is a list"}', "invalid_id"),
    "id_bool": (b'{"id": true, "domain": "web", "text": "id is a bool"}', "invalid_id"),
    "domain_number": (b'{"id": "t14", "domain": 7, "text": "domain is a number"}', "missing_domain"),
    "domain_path": (b'{"id": "t15", "domain": "../../etc", "text": "domain is a path"}', "invalid_domain"),
    "domain_dotdot": (b'{"id": "t16", "domain": "..", "text": "domain is .."}', "invalid_domain"),
    "bare_array": (b"[1, 2, 3]", "not_an_object"),
    "bare_string": (b'"just a string"', "not_an_object"),
}


@dataclass
class Planted:
    root: Path
    inputs: list[dict]  # pipeline.inputs entries (YAML-able)
    good_ids: set[str] = field(default_factory=set)
    bad: dict[str, str] = field(default_factory=dict)  # source -> reason
    files: int = 0
    bytes_written: int = 0

    def reasons(self) -> Counter:
        return Counter(self.bad.values())

    @property
    def records_tried(self) -> int:
        return len(self.good_ids) + len(self.bad)


class _Builder:
    def __init__(self, planted: Planted, rng: random.Random):
        self.p, self.rng = planted, rng
        self.n = 0

    def good(self, domain: str = "web", text: str | None = None, **extra) -> tuple[bytes, str]:
        self.n += 1
        doc_id = f"g{self.n:05d}"
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(8, 40)))
        rec = {"id": doc_id, "domain": domain, "text": text or f"{words}.", **extra}
        return json.dumps(rec).encode(), doc_id

    def lines(self, path: Path, bad_kinds: list[str], n_good: int) -> list[bytes]:
        """Good and bad lines shuffled together (a good one first and last); records the verdicts."""
        entries: list[tuple[bytes, str | None, str | None]] = []
        for _ in range(n_good):
            line, doc_id = self.good(domain=self.rng.choice(["web", "code"]), meta={"depth": [[1, [2]]]})
            entries.append((line, doc_id, None))
        middle = entries[1:-1] + [(BAD_LINES[k][0], None, BAD_LINES[k][1]) for k in bad_kinds]
        self.rng.shuffle(middle)
        entries = [entries[0], *middle, entries[-1]]
        out = []
        for line_no, (line, doc_id, reason) in enumerate(entries, start=1):
            out.append(line)
            if doc_id is not None:
                self.p.good_ids.add(doc_id)
            else:
                self.p.bad[f"{path}#L{line_no}"] = reason
        return out

    def write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        self.p.files += 1
        self.p.bytes_written += len(data)


WORDS = ("river stone light market garden window letter morning paper signal harbor winter orange "
         "silver engine pocket forest bridge candle mirror").split()


def _zstd_frames(lines: list[bytes], per_frame: int) -> bytes:
    frames = [lines[i:i + per_frame] for i in range(0, len(lines), per_frame)]
    return b"".join(zstandard.ZstdCompressor().compress(b"\n".join(f) + b"\n") for f in frames)


def write_hostile_corpus(root: Path, seed: int = 0, include_huge: bool = True, include_raised: bool = True) -> Planted:
    root = Path(root).resolve()
    rng = random.Random(seed)
    planted = Planted(root=root, inputs=[
        {"path": str(root / "jsonl"), "max_doc_bytes": SMALL_LIMIT},
        {"path": str(root / "raised"), "max_doc_bytes": RAISED_LIMIT},
        {"path": str(root / "text"), "format": "text", "domain": "books", "max_doc_bytes": SMALL_LIMIT},
    ])  # (raised/ holds two small good records only when include_raised is False)
    b = _Builder(planted, rng)
    jsonl, raised, text = root / "jsonl", root / "raised", root / "text"
    for folder in (jsonl, raised, text):
        folder.mkdir(parents=True)
    kinds = list(BAD_LINES)

    # Plain JSONL with one of every bad kind.
    path = jsonl / "mixed.jsonl"
    b.write(path, b"\n".join(b.lines(path, kinds, n_good=40)) + b"\n")

    # A byte-order mark before a good first record.
    path = jsonl / "bom.jsonl"
    lines = b.lines(path, ["text_number"], n_good=3)
    b.write(path, b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")

    # The 50 MiB document (a line 50x the input's max_doc_bytes), between two good ones.
    path = jsonl / "huge.jsonl"
    first, id1 = b.good()
    last, id2 = b.good()
    planted.good_ids |= {id1, id2}
    body = [first]
    if include_huge:
        prefix, suffix = b'{"id": "huge", "domain": "web", "text": "', b'"}'
        word = b"abcdefgh "
        fill = word * ((HUGE_DOC_BYTES - len(prefix) - len(suffix)) // len(word))
        body.append(prefix + fill + suffix)
        planted.bad[f"{path}#L2"] = "too_large"
    body.append(last)
    b.write(path, b"\n".join(body) + b"\n")

    # Compressed: gzip, and zstd written as several frames (a multi-frame file must read whole).
    rng_kinds = rng.sample(kinds, 8)
    path = jsonl / "mixed.jsonl.gz"
    b.write(path, gzip.compress(b"\n".join(b.lines(path, rng_kinds, n_good=30)) + b"\n"))
    path = jsonl / "mixed.jsonl.zst"
    b.write(path, _zstd_frames(b.lines(path, rng.sample(kinds, 8), n_good=30), per_frame=7))

    # Truncated compressed files: the good records before the cut are kept, the cut one is
    # quarantined as corrupt_file at its line. The cut record is one long line of random hex, so the
    # decoder cannot produce it whole from half of its compressed bytes.
    n_before = 25
    cut_record = json.dumps({"id": "cut", "domain": "web",
                             "text": "".join(rng.choice("0123456789abcdef") for _ in range(40_000))}).encode()
    path = jsonl / "cut.jsonl.gz"
    before = b.lines(path, [], n_good=n_before)
    gz = zlib.compressobj(wbits=31)  # gzip container
    head = gz.compress(b"\n".join(before) + b"\n") + gz.flush(zlib.Z_SYNC_FLUSH)  # all of it decodable
    tail = gz.compress(cut_record + b"\n") + gz.flush(zlib.Z_FINISH)
    b.write(path, head + tail[: len(tail) // 2])
    planted.bad[f"{path}#L{n_before + 1}"] = "corrupt_file"

    path = jsonl / "cut.jsonl.zst"
    before = b.lines(path, [], n_good=n_before)
    frame2 = zstandard.ZstdCompressor().compress(cut_record + b"\n")
    b.write(path, _zstd_frames(before, per_frame=n_before) + frame2[: len(frame2) // 2])
    planted.bad[f"{path}#L{n_before + 1}"] = "corrupt_file"

    # Zero-byte and non-compressed "compressed" files, and empty plain files.
    for name in ("zero.jsonl.gz", "zero.jsonl.zst"):
        b.write(jsonl / name, b"")
        planted.bad[f"{jsonl / name}#L1"] = "corrupt_file"
    b.write(jsonl / "garbage.jsonl.zst", b"this is not a zstd frame, just bytes\n" * 10)
    planted.bad[f"{jsonl / 'garbage.jsonl.zst'}#L1"] = "corrupt_file"
    b.write(jsonl / "empty.jsonl", b"")
    b.write(jsonl / "blank.jsonl", b"\n\n   \n\t\n")

    # The raised limit: a line of exactly RAISED_LIMIT - 1 bytes is kept, one of RAISED_LIMIT + 1 is not.
    path = raised / "near_limit.jsonl"
    lines = []
    limits = ((RAISED_LIMIT - 1, True), (RAISED_LIMIT + 1, False)) if include_raised else ()
    for target, keep in limits:
        g, gid = b.good()
        lines.append(g)
        planted.good_ids.add(gid)
        doc_id = "near-limit" if keep else "over-limit"
        prefix, suffix = b'{"id": "%s", "domain": "web", "text": "' % doc_id.encode(), b'"}'
        n = target - len(prefix) - len(suffix)
        words = (b"lorem ipsum dolor sit amet " * (n // 27 + 1))[:n - 1] + b"."
        line = prefix + words + suffix
        assert len(line) == target
        lines.append(line)
        if keep:
            planted.good_ids.add(doc_id)
        else:
            planted.bad[f"{path}#L{len(lines)}"] = "too_large"
    g, gid = b.good()
    lines.append(g)
    planted.good_ids.add(gid)
    b.write(path, b"\n".join(lines) + b"\n")

    # Plain-text files (one file = one document).
    for k in range(4):
        b.write(text / f"ok{k}.txt", f"a good plain text document number {k}\n".encode())
        planted.good_ids.add(f"books/ok{k}.txt")
    for name, data, reason in (("nul.txt", b"binary\x00header", "nul_byte"),
                               ("latin1.txt", "caf\u00e9".encode("latin-1"), "invalid_utf8"),
                               ("zero.txt", b"", "empty_text")):
        b.write(text / name, data)
        planted.bad[str(text / name)] = reason
    return planted
