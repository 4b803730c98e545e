"""Regenerate the vendored Kubernetes JSON schema used by tests/test_deploy_manifests.py.

Source: the ``kubernetes-validate`` package on PyPI (1.37.0), which ships the JSON schemas
generated from the Kubernetes OpenAPI documents. We take the "local-strict" flavour
(``additionalProperties: false`` everywhere, so a misspelt field is an error, as with
``kubectl apply --validate=strict``) for one Kubernetes version, keep only the definitions
our manifests and the KubeRay CRD schemas reach (the transitive ``$ref`` closure), drop the
prose ``description`` strings (they do not validate anything), and write one JSON file.

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    unzip -q /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl -d /tmp/kv
    python infra/deploy/schemas/vendor_kubernetes.py \
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict

Nothing here runs at test time; the tests read the JSON file this writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

K8S_VERSION = "v1.33.0"
SOURCE = "kubernetes-validate 1.37.0 (PyPI), kubernetes-json-schema/v1.33.0-local-strict"
BASE_ID = "https://kubernetes.io/api/_definitions.json"

# kind (apiVersion, kind) -> definition name, for every kind the manifests use
KINDS = {
    "v1/Namespace": "io.k8s.api.core.v1.Namespace",
    "v1/Secret": "io.k8s.api.core.v1.Secret",
    "v1/ConfigMap": "io.k8s.api.core.v1.ConfigMap",
    "v1/Service": "io.k8s.api.core.v1.Service",
    "v1/ServiceAccount": "io.k8s.api.core.v1.ServiceAccount",
    "apps/v1/Deployment": "io.k8s.api.apps.v1.Deployment",
    "apps/v1/StatefulSet": "io.k8s.api.apps.v1.StatefulSet",
    "networking.k8s.io/v1/NetworkPolicy": "io.k8s.api.networking.v1.NetworkPolicy",
}
# core types the KubeRay CRD schemas (schemas/kuberay/) refer to instead of inlining them
EXTRA = [
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
]
OUT = Path(__file__).parent / "kubernetes" / f"kubernetes-{K8S_VERSION}-strict.json"


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _strip(node):
    if isinstance(node, dict):
        return {
            k: _strip(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(src: str) -> None:
    defs = json.loads((Path(src) / "_definitions.json").read_text())["$defs"]
    keep: set[str] = set()
    todo = list(KINDS.values()) + EXTRA
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        found: set[str] = set()
        _refs(defs[name], found)
        todo.extend(found - keep)
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": BASE_ID,
        "x-source": SOURCE,
        "x-kinds": KINDS,
        "$defs": {name: _strip(defs[name]) for name in sorted(keep)},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(keep)} definitions, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
