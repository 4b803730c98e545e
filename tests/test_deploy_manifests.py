"""infra/deploy: the Kubernetes manifests validate against the vendored schemas and are linted.

No cluster and no network: the Kubernetes JSON schema (kubernetes-validate's v1.33 "strict"
flavour, trimmed) and the KubeRay CRD schemas are vendored under infra/deploy/schemas/ (see the
README there for sources and versions). Strict means an unknown field is an error, as with
`kubectl apply --validate=strict`. Beyond the schemas, the tests check what a schema cannot:
every Secret/ConfigMap a pod refers to exists, the Secrets hold placeholders only, pods run
as non-root with resource requests and limits, nothing is exposed outside the cluster, and the
RayJobs' maskmix configs parse with maskmix's own config schema.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "infra" / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S_SCHEMA = SCHEMAS / "kubernetes" / "kubernetes-v1.33.0-strict.json"
CRDS = {
    "RayCluster": SCHEMAS / "kuberay" / "ray.io_rayclusters.yaml",
    "RayJob": SCHEMAS / "kuberay" / "ray.io_rayjobs.yaml",
}
K8S_ID = "https://kubernetes.io/api/_definitions.json"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def load_docs() -> list[tuple[str, dict]]:
    out = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


DOCS = load_docs()


def docs_of(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d.get("kind") == kind]


def _strict_crd_schema(node):
    """A CRD openAPIV3Schema as a JSON schema, the way the API server reads it with strict
    field validation: objects that list properties reject unknown ones (unless they preserve
    unknown fields), and the simple CEL rules `self in [...]` become enums (other CEL rules,
    e.g. immutability, need the old object and are not checked here)."""
    if isinstance(node, list):
        return [_strict_crd_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_crd_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    for rule in out.get("x-kubernetes-validations", []):
        m = re.fullmatch(r"self in \[(.*)\]", rule["rule"].strip())
        if m:
            out["enum"] = [s.strip().strip("'") for s in m.group(1).split(",")]
    return out


def _registry() -> Registry:
    k8s = json.loads(K8S_SCHEMA.read_text())
    resources = [(K8S_ID, Resource.from_contents(k8s, default_specification=DRAFT202012))]
    for path in CRDS.values():
        crd = _strict_crd_schema(yaml.safe_load(path.read_text()))
        resources.append((path.name, DRAFT202012.create_resource(crd)))
    return Registry().with_resources(resources)


REGISTRY = _registry()
K8S_KINDS: dict[str, str] = json.loads(K8S_SCHEMA.read_text())["x-kinds"]


def validator_for(doc: dict) -> Draft202012Validator:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if f"{api}/{kind}" in K8S_KINDS:
        schema = {"$ref": f"{K8S_ID}#/$defs/{K8S_KINDS[f'{api}/{kind}']}"}
    elif api == "ray.io/v1" and kind in CRDS:
        crd_name = CRDS[kind].name
        schema = {"allOf": [
            {"$ref": f"{crd_name}#/spec/versions/0/schema/openAPIV3Schema"},
            # a custom resource's metadata is a regular ObjectMeta
            {"properties": {"metadata": {"$ref": f"{K8S_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}},
             "required": ["apiVersion", "kind", "metadata", "spec"]},
        ]}
    else:
        raise AssertionError(f"no vendored schema for {api} {kind}: vendor it (schemas/README.md)")
    return Draft202012Validator(schema, registry=REGISTRY)


def schema_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator_for(doc).iter_errors(doc)]


# --------------------------------------------------------------------------- the vendored schemas


def test_vendored_schemas_are_the_documented_ones():
    k8s = json.loads(K8S_SCHEMA.read_text())
    assert "kubernetes-validate 1.37.0" in k8s["x-source"] and "v1.33.0" in k8s["x-source"]
    readme = (SCHEMAS / "README.md").read_text()
    for needle in ("kubernetes-validate", "1.37.0", "v1.33.0", "ray-project/kuberay"):
        assert needle in readme
    for kind, path in CRDS.items():
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        assert crd["spec"]["versions"][0]["name"] == "v1"


def test_every_kind_in_the_manifests_has_a_schema():
    assert len(DOCS) >= 15
    for name, doc in DOCS:
        validator_for(doc)  # raises for an unknown kind
        assert doc["metadata"].get("namespace", "maskmix") == "maskmix" or doc["kind"] == "Namespace", name


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name,doc", DOCS, ids=[n for n, _ in DOCS])
def test_manifest_validates_against_schema(name, doc):
    assert schema_errors(doc) == []


def _first(kind: str, name: str | None = None) -> dict:
    for doc in docs_of(kind):
        if name is None or doc["metadata"]["name"] == name:
            return copy.deepcopy(doc)
    raise AssertionError(f"no {kind} {name}")


def _break_deployment_replicas(d):
    d["spec"]["replicas"] = "two"


def _break_container_field_typo(d):
    d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"


def _break_service_port_type(d):
    d["spec"]["ports"][0]["port"] = "5000"


def _break_worker_min_replicas(d):
    d["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"


def _break_worker_group_unknown_field(d):
    d["spec"]["workerGroupSpecs"][0]["replica"] = 3


def _break_head_template_missing(d):
    del d["spec"]["headGroupSpec"]["template"]


def _break_head_container_resources(d):
    d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = ["cpu", "2"]


def _break_auth_mode(d):
    d["spec"]["authOptions"]["mode"] = "tokens"


def _break_rayjob_shutdown_type(d):
    d["spec"]["shutdownAfterJobFinishes"] = "yes"


def _break_rayjob_deletion_policy(d):
    d["spec"]["deletionPolicy"] = "DeleteEverything"


def _break_rayjob_nested_pod(d):
    d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = {"A": "b"}


def _break_rayjob_submitter(d):
    d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = "ray"


def _break_secret_value_type(d):
    d["stringData"]["auth_token"] = 12345


BROKEN = [
    ("Deployment", _break_deployment_replicas),
    ("Deployment", _break_container_field_typo),
    ("Service", _break_service_port_type),
    ("RayCluster", _break_worker_min_replicas),
    ("RayCluster", _break_worker_group_unknown_field),
    ("RayCluster", _break_head_template_missing),
    ("RayCluster", _break_head_container_resources),
    ("RayCluster", _break_auth_mode),
    ("RayJob", _break_rayjob_shutdown_type),
    ("RayJob", _break_rayjob_deletion_policy),
    ("RayJob", _break_rayjob_nested_pod),
    ("RayJob", _break_rayjob_submitter),
    ("Secret", _break_secret_value_type),
]


@pytest.mark.parametrize("kind,breaker", BROKEN, ids=[b.__name__[7:] for _, b in BROKEN])
def test_broken_manifest_is_rejected(kind, breaker):
    doc = _first(kind)
    assert schema_errors(doc) == []
    breaker(doc)
    assert schema_errors(doc), f"{breaker.__name__} was not caught by the schema"


# --------------------------------------------------------------------------- lint


def _yamllint(text: str, path: str = "x.yaml") -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    return [f"{p.line}:{p.column} {p.level} {p.desc} ({p.rule})" for p in linter.run(text, conf, path)]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_lints_clean(path):
    assert _yamllint(path.read_text(), str(path)) == []


def test_yamllint_cli_passes_on_the_folder():
    out = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint"),
                          "-f", "parsable", str(DEPLOY)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_yamllint_flags_a_bad_manifest():
    bad = ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  name: y\n"
           "data:\n    key:   value   \n")
    problems = _yamllint(bad)
    assert any("duplicate" in p for p in problems), problems
    assert any("trailing" in p for p in problems), problems


# --------------------------------------------------------------------------- cross-file checks


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec in the manifests, with a label saying where it is."""
    out = []
    for name, doc in DOCS:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet"):
            out.append((name, spec["template"]["spec"]))
        elif kind in ("RayCluster", "RayJob"):
            cluster = spec if kind == "RayCluster" else spec["rayClusterSpec"]
            out.append((f"{name} head", cluster["headGroupSpec"]["template"]["spec"]))
            for g in cluster.get("workerGroupSpecs", []):
                out.append((f"{name} {g['groupName']}", g["template"]["spec"]))
            if kind == "RayJob":
                out.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
    return out


def test_every_pod_runs_non_root_with_requests_and_limits():
    pods = pod_specs()
    assert len(pods) >= 11
    for where, pod in pods:
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, where
        assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}/{c['name']}: {part}"
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not csc.get("privileged"), f"{where}/{c['name']}"
            assert csc.get("runAsUser", 1) != 0, f"{where}/{c['name']}"
            assert all("hostPort" not in p for p in c.get("ports", [])), f"{where}/{c['name']}"
            assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1], c["image"]


def test_nothing_is_exposed_outside_the_cluster():
    for svc in docs_of("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    for doc in docs_of("RayCluster") + docs_of("RayJob"):
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress")
        ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {6379, 8265}, "head: GCS and dashboard/Jobs API only (no Ray Client, no metrics)"
    # Postgres only from MLflow
    pols = {p["metadata"]["name"]: p for p in docs_of("NetworkPolicy")}
    pg = pols["postgres-from-mlflow"]["spec"]
    assert pg["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "postgres"}
    assert pg["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]


def test_secrets_are_placeholders_only():
    secrets = docs_of("Secret")
    assert {s["metadata"]["name"] for s in secrets} >= {
        "maskmix-ray-auth", "maskmix-postgres", "maskmix-mlflow-auth", "maskmix-mlflow-client", "maskmix-s3"}
    for s in secrets:
        assert "data" not in s, "use stringData placeholders, never encoded values"
        for key, value in s["stringData"].items():
            assert isinstance(value, str) and value.startswith("CHANGE_ME"), f"{s['metadata']['name']}.{key}"
    # and no file outside secrets.example.yaml defines a Secret
    for path in manifest_files():
        if path.name != "secrets.example.yaml":
            assert all(d["kind"] != "Secret" for d in yaml.safe_load_all(path.read_text()) if d), path.name


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_every_referenced_secret_and_configmap_exists():
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in docs_of("Secret")}
    configmaps = {c["metadata"]["name"]: set(c["data"]) for c in docs_of("ConfigMap")}
    seen = 0
    for name, doc in DOCS:
        for node in _walk(doc):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["key"] in secrets.get(ref["name"], set()), f"{name}: {ref}"
                seen += 1
            if "configMapKeyRef" in node:
                ref = node["configMapKeyRef"]
                assert ref["key"] in configmaps.get(ref["name"], set()), f"{name}: {ref}"
                seen += 1
            if "secretRef" in node and "name" in node["secretRef"]:
                assert node["secretRef"]["name"] in secrets, f"{name}: {node}"
                seen += 1
            if "configMapRef" in node:
                assert node["configMapRef"]["name"] in configmaps, f"{name}: {node}"
                seen += 1
            if "configMap" in node and isinstance(node["configMap"], dict) and "name" in node["configMap"]:
                assert node["configMap"]["name"] in configmaps, f"{name}: {node}"
                seen += 1
            if node.get("authOptions"):
                assert "auth_token" in secrets.get(node["authOptions"]["secretName"], set()), name
                seen += 1
    assert seen >= 30


# --------------------------------------------------------------------------- Ray specifics


def _ray_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    return pin.split("==")[1]


def test_ray_clusters_match_the_project_and_use_token_auth():
    version = PYPROJECT["project"]["version"]
    for doc in docs_of("RayCluster") + docs_of("RayJob"):
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == _ray_pin()
        assert cluster["authOptions"] == {"mode": "token", "secretName": "maskmix-ray-auth"}
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for group, g in groups:
            for c in g["template"]["spec"]["containers"]:
                assert re.fullmatch(r"[\w.-]+(/[\w.-]+)*/maskmix-(cpu|gpu):" + re.escape(version), c["image"]), c
                gpus = c["resources"]["limits"].get("nvidia.com/gpu")
                if group.startswith("gpu"):
                    assert gpus == 1 and c["resources"]["requests"].get("nvidia.com/gpu") == 1
                    assert c["image"].split("/")[-1].startswith("maskmix-gpu:")
                else:
                    assert gpus is None, f"{group} must not take GPUs"
    shared = _first("RayCluster", "maskmix")["spec"]
    assert {g["groupName"] for g in shared["workerGroupSpecs"]} == {"cpu-workers", "gpu-workers"}
    assert shared["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("job_name,stage", [("maskmix-pipeline-001", "pipeline"), ("maskmix-pretrain-001", "train")])
def test_rayjob_template(job_name, stage):
    from infra.config import parse_config

    job = _first("RayJob", job_name)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode" and spec["metadata"]["stage"] == stage
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] == 0

    # the submitter (`ray job submit`) carries the same token; it can reach the dashboard
    sub = spec["submitterPodTemplate"]
    assert sub["metadata"]["labels"]["maskmix.io/ray-client"] == "true"
    assert sub["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e for e in sub["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "maskmix-ray-auth", "key": "auth_token"}

    # entrypoint: a maskmix command on a config file mounted from the job's ConfigMap on the head
    argv = spec["entrypoint"].split()
    assert argv[0] == "maskmix" and argv[1] == stage
    config_path = Path(argv[-1])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume = mounts[str(config_path.parent)]
    (cm_name,) = [v["configMap"]["name"] for v in head["volumes"] if v["name"] == volume]
    cm = _first("ConfigMap", cm_name)
    cfg = parse_config(yaml.safe_load(cm["data"][config_path.name]), f"{cm_name}/{config_path.name}",
                       use_env=False)
    assert cfg.tracking.uri == _first("ConfigMap", "maskmix-storage")["data"]["MLFLOW_TRACKING_URI"]
    if stage == "pipeline":
        assert cfg.pipeline.output_dir.startswith("s3://")
        assert all(i.path.startswith("s3://") for i in cfg.pipeline.inputs)
    else:
        launch = cfg.train.launch
        assert launch.mode == "ray" and launch.use_gpu and launch.storage_path.startswith("s3://")
        assert cfg.train.checkpoint_uri.startswith("s3://")
        (gpu_group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert launch.num_workers <= gpu_group["replicas"] * gpu_group["template"]["spec"]["containers"][0][
            "resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_config_check_can_fail():
    from infra.config import parse_config
    from infra.errors import ConfigError

    cm = _first("ConfigMap", "maskmix-pretrain-job")
    data = yaml.safe_load(cm["data"]["config.yaml"])
    data["train"]["launch"]["use_gpus"] = True  # misspelt key
    with pytest.raises(ConfigError):
        parse_config(data, "broken", use_env=False)


# --------------------------------------------------------------------------- MLflow


def _mlflow_container() -> dict:
    return _first("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_start_script_runs_and_configures_auth(tmp_path):
    """Run the Deployment's start script with /bin/sh, the container's environment (Secret and
    ConfigMap values resolved from the manifests) and a stand-in `mlflow` on PATH that parses
    the arguments with mlflow 3.17's real `server` command and reads the auth config file with
    mlflow's real reader."""
    import mlflow

    c = _mlflow_container()
    assert c["command"] == ["/bin/sh", "-c"]
    secrets = {s["metadata"]["name"]: s["stringData"] for s in docs_of("Secret")}
    cms = {m["metadata"]["name"]: m["data"] for m in docs_of("ConfigMap")}
    env = {"PATH": f"{tmp_path}/bin:/usr/bin:/bin"}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = cms[ref["name"]][ref["key"]]
    # the container's /tmp is an emptyDir; here, a temporary folder
    script = c["args"][0].replace("/tmp/", f"{tmp_path}/")
    env["MLFLOW_AUTH_CONFIG_PATH"] = env["MLFLOW_AUTH_CONFIG_PATH"].replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "mlflow"
    fake.write_text(f"""#!{sys.executable}
import json, sys
from mlflow.cli import server
from mlflow.server.auth.config import read_auth_config
ctx = server.make_context("server", sys.argv[2:])
print(json.dumps({{"argv": sys.argv[1:], "params": {{k: v for k, v in ctx.params.items()
                  if isinstance(v, (str, int, bool, type(None)))}},
                  "auth": read_auth_config()._asdict()}}))
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["argv"][0] == "server"
    p = got["params"]
    user, pw = secrets["maskmix-postgres"]["username"], secrets["maskmix-postgres"]["password"]
    db = f"postgresql://{user}:{pw}@postgres.maskmix.svc.cluster.local:5432"
    assert p["backend_store_uri"] == f"{db}/mlflow"
    assert p["artifacts_destination"] == cms["maskmix-storage"]["MLFLOW_ARTIFACTS_DESTINATION"]
    assert p["serve_artifacts"] is True and p["app_name"] == "basic-auth"
    assert p["host"] == "0.0.0.0" and str(p["port"]) == "5000"
    auth = got["auth"]
    assert auth["database_uri"] == f"{db}/mlflow_auth"
    assert auth["admin_username"] == secrets["maskmix-mlflow-auth"]["admin-username"]
    assert auth["admin_password"] == secrets["maskmix-mlflow-auth"]["admin-password"]
    ini = (tmp_path / "mlflow" / "basic_auth.ini")
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert pw in ini.read_text() and auth["admin_password"] not in ini.read_text()
    assert mlflow.__version__ == "3.17.2"


def test_mlflow_allows_its_service_host_names():
    from mlflow.server.security_utils import is_allowed_host_header

    env = {e["name"]: e.get("value") for e in _mlflow_container()["env"]}
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    for host in ("mlflow.maskmix.svc.cluster.local:5000", "mlflow:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")
    # the in-cluster tracking URI of the jobs is one of them
    uri = _first("ConfigMap", "maskmix-storage")["data"]["MLFLOW_TRACKING_URI"]
    assert is_allowed_host_header(allowed, uri.split("//", 1)[1])


def test_readme_commands_cover_every_manifest():
    readme = (DEPLOY / "README.md").read_text()
    for path in manifest_files():
        if path.name != "secrets.example.yaml":
            assert f"infra/deploy/{path.name}" in readme, path.name
    for secret in docs_of("Secret"):
        assert f"kubectl -n maskmix create secret generic {secret['metadata']['name']}" in readme
    assert "cannot be built here" in readme or "no Docker engine" in readme
    assert os.path.exists(ROOT / "docker" / "README.md")
