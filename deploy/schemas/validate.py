"""Validate rendered Kubernetes manifests against the JSON schemas vendored beside this file.

    helm template forkrl deploy/helm/forkrl | python deploy/schemas/validate.py -

Every object must be of a kind one of the schema files lists under "kinds" (an unknown kind is an
error, not a pass). Needs `jsonschema` and `pyyaml`; no forkrl import.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
SCHEMA_FILES = ("kubernetes-v1.30.0.json", "kuberay-v1.json", "prometheus-operator-v1.json")


@cache
def _registry() -> tuple[Registry, dict[str, str]]:
    registry: Registry = Registry()
    kinds: dict[str, str] = {}
    for name in SCHEMA_FILES:
        doc = json.loads((HERE / name).read_text())
        registry = registry.with_resource(name, Resource.from_contents(doc))
        for kind, target in doc["kinds"].items():
            kinds[kind] = name + target["$ref"]
    return registry.crawl(), kinds


def known_kinds() -> list[str]:
    return sorted(_registry()[1])


def errors(obj: dict) -> list[str]:
    """Schema violations of one manifest, each as 'Kind/name: path: message' (empty = valid)."""
    registry, kinds = _registry()
    key = f"{obj.get('apiVersion')}/{obj.get('kind')}"
    label = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    if key not in kinds:
        return [f"{label}: no vendored schema for {key}"]
    validator = jsonschema.Draft202012Validator({"$ref": kinds[key]}, registry=registry,
                                                format_checker=None)
    out = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "<root>"
        out.append(f"{label}: {path}: {e.message}")
    return out


def main(argv: list[str]) -> int:
    text = sys.stdin.read() if argv in ([], ["-"]) else Path(argv[0]).read_text()
    problems = [msg for doc in yaml.safe_load_all(text) if doc for msg in errors(doc)]
    for msg in problems:
        print(msg, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
