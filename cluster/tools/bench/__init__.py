"""`forkrl bench NAME`: each benchmark module yields rows
{"metric", "value", "baseline", "ratio", "unit", "case", "target"}, the baseline measured in the same run
on the same machine. Benchmarks time things; tests never do."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

BENCHES = {
    "loss": "cluster.tools.bench.loss",
    "grade": "cluster.tools.bench.grade",
    "queue": "cluster.tools.bench.queue",
    "generate": "cluster.tools.bench.generate",
    "weight-sync": "cluster.tools.bench.weight_sync",
    "e2e": "cluster.tools.bench.e2e",
    "learner-memory": "cluster.tools.bench.learner_memory",
    "scaling": "cluster.tools.bench.scaling",
}


def row(metric: str, value: float | None, baseline: float | None, unit: str, case: str, target: str,
        **extra) -> dict:
    """One benchmark row. ratio = value / baseline: null where a side has no figure (None: skipped or failed,
    the reason in extra), NaN for a zero baseline."""
    if value is None or baseline is None:
        ratio = None
    else:
        ratio = value / baseline if baseline else float("nan")
    return {"metric": metric, "value": value, "baseline": baseline, "ratio": ratio, "unit": unit,
            "case": case, "target": target, **extra}


def run_bench(name: str, case: str | None = None) -> Iterator[dict]:
    from cluster.runtime import setup_env

    setup_env()
    names = list(BENCHES) if name == "all" else [name]
    for n in names:
        if n not in BENCHES:
            raise KeyError(f"unknown benchmark {n!r}; choose from {', '.join(BENCHES)} or all")
        yield from importlib.import_module(BENCHES[n]).run(case=case)
