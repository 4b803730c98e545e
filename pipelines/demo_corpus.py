"""A real demo corpus harvested from the installed Python environment (nothing is downloaded).

Four domains of text that nobody on this project wrote:

- ``code``: standard-library modules (.py files under sysconfig's stdlib, without tests),
- ``reference``: the language reference topics pydoc ships (``pydoc_data.topics``),
- ``readme``: installed distributions' long descriptions (the body of their METADATA),
- ``license``: installed distributions' license files, full of near-duplicates (many MIT,
  BSD and Apache texts that differ only in a copyright line), which near-dedup should find.

Each domain becomes ``<output_dir>/<domain>.jsonl`` of Document records, in a deterministic
order, stopping once the domain holds ``max_bytes_per_domain`` bytes of text.

    python -m pipelines.demo_corpus OUTPUT_DIR [--max-bytes N] [--domains code,license]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

DOMAINS = ("code", "reference", "readme", "license")

# Directory names under the stdlib that hold tests, test data or third-party packages.
EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Generated at build time (install paths and compiler flags), not code anyone wrote.
EXCLUDED_STDLIB_PREFIXES = ("_sysconfigdata",)

# Bodies shorter than this are placeholders ("UNKNOWN", a one-line summary), not READMEs.
MIN_README_CHARS = 200

# This project's own distribution: its texts are ours, and the demo corpus must be someone else's.
OWN_DISTRIBUTIONS = frozenset({"maskmix"})

LICENSE_NAME = re.compile(r"^(LICEN[CS]E|COPYING)", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """A document not yet read: harvesting reads it only if its domain still has room."""

    key: str  # identity that does not depend on where Python is installed; hashed into the id
    source: str  # the file path, or pydoc_data.topics#<key>
    read_text: Callable[[], str]
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- candidates per domain


def code_candidates(stdlib_dir: str | Path | None = None) -> Iterator[Candidate]:
    """Standard-library .py files sorted by path relative to the stdlib, test directories excluded."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for relative in sorted(_stdlib_sources(root)):
        path = root / relative
        yield Candidate(
            key=f"stdlib/{relative}",
            source=str(path),
            read_text=lambda path=path: _read_utf8(path),
            meta={"relpath": relative},
        )


def _stdlib_sources(root: Path) -> Iterator[str]:
    for directory, subdirectories, files in os.walk(root):
        # Pruning in place keeps os.walk out of test trees and site-packages entirely.
        subdirectories[:] = [d for d in subdirectories if d not in EXCLUDED_STDLIB_DIRS]
        for name in files:
            if name.endswith(".py") and not name.startswith(EXCLUDED_STDLIB_PREFIXES):
                yield PurePosixPath(Path(directory, name).relative_to(root)).as_posix()


def reference_candidates() -> Iterator[Candidate]:
    """One document per topic of the Python reference that ``help()`` shows, sorted by topic key."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Candidate(
            key=f"topic/{key}",
            source=f"pydoc_data.topics#{key}",
            read_text=lambda key=key: topics[key],
            meta={"topic": key},
        )


def readme_candidates() -> Iterator[Candidate]:
    """The long description (METADATA body) of each installed distribution, sorted by name."""
    for name, dist in installed_distributions():
        yield Candidate(
            key=f"dist/{name}/METADATA",
            source=_metadata_path(dist) or f"importlib.metadata:{name}",
            read_text=lambda dist=dist: _long_description(dist),
            meta={"distribution": name, "version": dist.version},
        )


def license_candidates() -> Iterator[Candidate]:
    """Every license file of each installed distribution, sorted by name then path; none deduplicated."""
    for name, dist in installed_distributions():
        for relative in sorted(str(f) for f in dist.files or () if is_license_file(f)):
            path = Path(dist.locate_file(relative))
            yield Candidate(
                key=f"dist/{name}/{relative}",
                source=str(path),
                read_text=lambda path=path: _read_utf8(path),
                meta={"distribution": name, "version": dist.version, "file": relative},
            )


CANDIDATES: dict[str, Callable[[], Iterable[Candidate]]] = {
    "code": code_candidates,
    "reference": reference_candidates,
    "readme": readme_candidates,
    "license": license_candidates,
}


def installed_distributions() -> list[tuple[str, metadata.Distribution]]:
    """(normalized name, distribution) for each installed distribution but ours, sorted by name.

    A name found twice on sys.path keeps its first copy, the one ``import`` would use.
    """
    by_name: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except UnicodeError:  # a METADATA file that is not UTF-8 names no distribution we can use
            continue
        if name:
            by_name.setdefault(normalize_name(name), dist)
    return sorted((n, d) for n, d in by_name.items() if n not in OWN_DISTRIBUTIONS)


def normalize_name(name: str) -> str:
    """PEP 503 normalization: "Foo_Bar.baz" and "foo-bar-baz" are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_license_file(relative: PurePosixPath | str) -> bool:
    """LICENSE*/LICENCE*/COPYING* in a .dist-info folder, or any file under its licenses/ folder.

    Vendored .dist-info folders inside a package count too: their licenses are installed text.
    """
    parts = PurePosixPath(str(relative)).parts
    for i, part in enumerate(parts[:-1]):
        if part.endswith(".dist-info"):
            inside = parts[i + 1 :]
            return inside[0] == "licenses" or (len(inside) == 1 and bool(LICENSE_NAME.match(inside[0])))
    return False


def _metadata_path(dist: metadata.Distribution) -> str | None:
    # The distribution's own METADATA sits at <name>.dist-info/METADATA; vendored copies are deeper.
    for f in dist.files or ():
        if f.name == "METADATA" and len(f.parts) == 2 and f.parts[0].endswith(".dist-info"):
            return str(Path(dist.locate_file(f)))
    return None


def _long_description(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    # Metadata 2.1+ keeps the description in the body; older files put it in a header.
    return meta.get_payload() or meta.get("Description") or ""


def _read_utf8(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # strict: undecodable files are skipped, not mangled


# --------------------------------------------------------------------------- harvesting


def document_id(domain: str, key: str) -> str:
    return f"{domain}/{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def harvest(
    output_dir: str | Path,
    domains: Sequence[str] = DOMAINS,
    max_bytes_per_domain: int | None = 1_000_000,
) -> dict[str, dict]:
    """Write ``<output_dir>/<domain>.jsonl`` for each domain; return {domain: stats}.

    stats: ``path``, ``docs``, ``bytes`` (UTF-8 bytes of text written) and ``skipped``
    ({reason: count} for unreadable, undecodable, empty or too short sources).
    """
    unknown = sorted(set(domains) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {list(CANDIDATES)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        domain: harvest_domain(domain, CANDIDATES[domain](), output_dir / f"{domain}.jsonl", max_bytes_per_domain)
        for domain in domains
    }


def harvest_domain(
    domain: str, candidates: Iterable[Candidate], path: Path, max_bytes: int | None = None
) -> dict:
    """Write the candidates that read cleanly as Documents until ``max_bytes`` of text is reached.

    The cap is checked before each document, so a domain ends at most one document past it.
    """
    docs, text_bytes, skipped = 0, 0, Counter()
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for candidate in candidates:
            if max_bytes is not None and text_bytes >= max_bytes:
                break
            text, reason = _read_candidate(domain, candidate)
            if reason:
                skipped[reason] += 1
                continue
            out.write(json.dumps(_document(domain, candidate, text), ensure_ascii=False) + "\n")
            docs += 1
            text_bytes += len(text.encode("utf-8"))
    return {"path": str(path), "docs": docs, "bytes": text_bytes, "skipped": dict(sorted(skipped.items()))}


def _read_candidate(domain: str, candidate: Candidate) -> tuple[str, str | None]:
    """(text, None) for a usable document, or ("", reason) for one to skip."""
    try:
        text = candidate.read_text()
        text.encode("utf-8")  # lone surrogates would make the JSONL line unwritable
    except OSError:
        return "", "unreadable"
    except UnicodeError:
        return "", "undecodable"
    if not text.strip():
        return "", "empty"
    if domain == "readme" and len(text.strip()) < MIN_README_CHARS:
        return "", "too_short"
    return text, None


def _document(domain: str, candidate: Candidate, text: str) -> dict[str, str]:
    return {
        "id": document_id(domain, candidate.key),
        "domain": domain,
        "text": text,
        "source": candidate.source,
        "meta": json.dumps(candidate.meta, sort_keys=True),
    }


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo_corpus",
        description="Harvest a demo corpus (Document JSONL per domain) from the installed Python environment.",
    )
    parser.add_argument("output_dir", help="folder for <domain>.jsonl")
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="text bytes per domain (default 1e6)")
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated (default {','.join(DOMAINS)})")
    args = parser.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    try:
        stats = harvest(args.output_dir, domains, args.max_bytes)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
