"""An experiment's file, configs/experiments/NAME.yaml, read and validated into a `Spec` (the format is in
the package doc of cluster.tools.experiments)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.config import ConfigError, UserError, load_config

ROOT = Path(__file__).resolve().parents[3]
SPEC_DIR = ROOT / "configs" / "experiments"
RESULTS_DIR = ROOT / "docs" / "results"
ANALYSES = ("compare", "collapse", "ttrl")


@dataclass
class Arm:
    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """A paper's finding stated as a comparison of two arms on one metric (`stats.verdict` judges it)."""
    claim: str    # the finding in words
    paper: str    # the paper's number or sentence
    metric: str   # a column header of the analysis's metric table, e.g. "final eval acc"
    arm: str
    base: str
    expect: str   # higher | lower | equal: arm against base


CLAIM_KEYS = tuple(Claim.__dataclass_fields__)
EXPECT = ("higher", "lower", "equal")
# a collapse experiment's claims compare predictors of the held-out eval accuracy, not arms: the law fitted on
# the early steps and a constant (the mean early accuracy)
PREDICTORS = ("law", "constant")


@dataclass
class Spec:
    name: str
    title: str
    kind: str
    analysis: str
    paper: str
    context: str
    base: dict[str, Any]
    arms: list[Arm]
    seeds: list[int]
    budget: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    discussion: str = ""   # written by a person after reading the results: why a result differs from the paper

    def overrides(self, arm: Arm, seed: int) -> list[str]:
        """`key=value` strings for `load_config` / `forkrl train` (JSON values are valid YAML scalars)."""
        merged = {**self.base, **self.budget, **arm.overrides, "run.seed": seed,
                  "run.name": f"{self.name}-{arm.name}-s{seed}"}
        return [f"{k}={json.dumps(v)}" for k, v in merged.items()]


class ExperimentError(UserError, ValueError):
    """A bad experiment file, naming the file and the field (a UserError: the CLI's one red line, exit 2)."""


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ExperimentError(f"{where} must be a mapping of dotted config keys to values")
    return dict(raw)


def _claims(raw: Any, arms: list[str], path: Path, what: str = "an arm") -> list[Claim]:
    if not isinstance(raw, list):
        raise ExperimentError(f"{path}: claims must be a list of mappings with keys {list(CLAIM_KEYS)}")
    out = []
    for i, c in enumerate(raw):
        where = f"{path}: claims[{i}]"
        if not isinstance(c, dict):
            raise ExperimentError(f"{where} must be a mapping with keys {list(CLAIM_KEYS)}")
        if missing := [k for k in CLAIM_KEYS if k not in c]:
            raise ExperimentError(f"{where}: missing keys {missing}")
        if extra := sorted(set(c) - set(CLAIM_KEYS)):
            raise ExperimentError(f"{where}: unknown keys {extra} (allowed: {list(CLAIM_KEYS)})")
        for k in ("arm", "base"):
            if c[k] not in arms:
                raise ExperimentError(f"{where}.{k}: {c[k]!r} is not {what} of this experiment (allowed: {arms})")
        if c["arm"] == c["base"]:
            raise ExperimentError(f"{where}: arm and base are both {c['arm']!r}")
        if c["expect"] not in EXPECT:
            raise ExperimentError(f"{where}.expect must be one of {EXPECT}, got {c['expect']!r}")
        out.append(Claim(**{k: str(c[k]).strip() for k in CLAIM_KEYS}))
    return out


def load_spec(name: str, smoke: bool = False, spec_dir: Path = SPEC_DIR) -> Spec:
    """Read and validate configs/experiments/NAME.yaml (smoke: its `smoke:` block applied)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ExperimentError(f"experiment name {name!r} must be letters, digits, - or _")
    path = Path(spec_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(spec_dir).glob("*.yaml"))
        raise ExperimentError(f"no experiment {name!r} ({path} does not exist); known: {', '.join(known)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: top level must be a mapping")
    known_keys = {"title", "paper", "context", "kind", "analysis", "base", "arms", "seeds", "budget", "smoke",
                  "params", "claims", "discussion"}
    if extra := set(raw) - known_keys:
        raise ExperimentError(f"{path}: unknown keys {sorted(extra)} (allowed: {sorted(known_keys)})")
    kind = raw.get("kind", "train")
    if kind not in ("train", "entropy-patterns"):
        raise ExperimentError(f"{path}: kind must be train or entropy-patterns, got {kind!r}")
    analysis = raw.get("analysis", "compare")
    if analysis not in ANALYSES:
        raise ExperimentError(f"{path}: analysis must be one of {ANALYSES}, got {analysis!r}")
    arms = []
    for i, a in enumerate(raw.get("arms") or [{"name": "run"}]):
        if not isinstance(a, dict) or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(a.get("name", ""))):
            raise ExperimentError(f"{path}: arms[{i}] needs a name of letters, digits, '.', '-' or '_'")
        arms.append(Arm(str(a["name"]), _mapping(a.get("overrides"), f"{path}: arms[{i}].overrides")))
    if len({a.name for a in arms}) != len(arms):
        raise ExperimentError(f"{path}: arm names must be unique")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ExperimentError(f"{path}: seeds must be a non-empty list of integers")
    spec = Spec(name=name, title=str(raw.get("title", name)), kind=kind, analysis=analysis,
                paper=str(raw.get("paper", "")).strip(), context=str(raw.get("context", "")).strip(),
                discussion=str(raw.get("discussion", "")).strip(),
                base=_mapping(raw.get("base"), f"{path}: base"), arms=arms, seeds=seeds,
                budget=_mapping(raw.get("budget"), f"{path}: budget"),
                params=_mapping(raw.get("params"), f"{path}: params"),
                claims=_claims(raw.get("claims") or [], list(PREDICTORS), path, "a predictor")
                if analysis == "collapse" else _claims(raw.get("claims") or [], [a.name for a in arms], path))
    if not smoke and kind == "train" and len(arms) > 1 and len(seeds) < 3:
        raise ExperimentError(f"{path}: arms are compared, so seeds needs at least 3 entries (got {seeds})")
    if smoke:
        sm = raw.get("smoke")
        if not isinstance(sm, dict):
            raise ExperimentError(f"{path}: a `smoke:` block is required (the test suite runs it)")
        if "seeds" in sm:
            spec.seeds = list(sm["seeds"])
        if "arms" in sm:
            names = {a.name for a in arms}
            if missing := [a for a in sm["arms"] if a not in names]:
                raise ExperimentError(f"{path}: smoke.arms names unknown arms {missing}")
            spec.arms = [a for a in arms if a.name in sm["arms"]]
            # a claim about an arm the smoke run leaves out is not evaluated there
            if analysis != "collapse":
                spec.claims = [c for c in spec.claims if {c.arm, c.base} <= set(sm["arms"])]
        spec.budget = {**spec.budget, **_mapping(sm.get("overrides"), f"{path}: smoke.overrides")}
        spec.params = {**spec.params, **_mapping(sm.get("params"), f"{path}: smoke.params")}
    if kind == "train":  # every run's config must be valid before the first one starts
        for arm in spec.arms:
            try:
                load_config(None, spec.overrides(arm, spec.seeds[0]))
            except ConfigError as e:
                raise ExperimentError(f"{path}: arm {arm.name!r}: {e}") from None
    return spec
