"""`forkrl experiment NAME`: the papers' findings reproduced at small scale, one command each.

An experiment is a YAML file in configs/experiments/NAME.yaml:

    title, paper (the published figure, markdown), context (what differs from the paper)
    discussion                                   optional: a person's reading of the results (why they differ)
    kind: train | entropy-patterns
    analysis: compare | collapse | ttrl          (train experiments)
    base: {dotted.key: value}                    overrides shared by every arm
    arms: [{name, overrides: {dotted.key: value}}]
    seeds: [0, 1, 2]                             every arm runs every seed with the same budget
    budget: {run.steps: 24, run.eval_every: 6}
    smoke: {seeds: [0], arms: [names], overrides: {...}}   the test suite's few-step version
    claims: [{claim, paper, metric, arm, base, expect}]   the paper's findings to test: `metric` is a column
                                                 header of the analysis's table, expect higher | lower | equal

Train experiments run every (arm, seed) with `cluster.driver.loops.train` in this process, all sharing one Ray
session (start-up per run is the actors only), then aggregate each run's metrics.jsonl into tables (the seed
mean [its 95% confidence interval]) and PNG curves (seed mean with its 95% CI as a band), compare arms with the
paired (same seeds) or Welch t-test, judge each claim (`stats.verdict`), and write NAME.md and
NAME.claims.json into the output directory (docs/results by default; a temporary directory in smoke mode so
tests never touch the tree) and regenerate the index results.md there. A run that fails is recorded with its
error in the results file; the others still count.

Modules: `spec` (the file), `runs` (training every run), `stats` (confidence intervals, t-tests, effect size,
verdicts), `tables` (numbers, tables, curves, readings), `analyses` (compare, collapse, ttrl, claims),
`entropy_patterns`; the documents are written here.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from pathlib import Path

from cluster.tools.experiments.analyses import ANALYSE, cell, check_claims, measurement
from cluster.tools.experiments.entropy_patterns import entropy_patterns
from cluster.tools.experiments.runs import existing_runs, train_all
from cluster.tools.experiments.spec import RESULTS_DIR, ROOT, SPEC_DIR, Spec, load_spec
from cluster.tools.experiments.tables import fmt_p, runs_table


def run_experiment(name: str, smoke: bool = False, out_dir: str | Path | None = None,
                   runs_dir: str | Path | None = None, spec_dir: str | Path = SPEC_DIR,
                   reuse_runs: bool = False) -> str:
    """Run experiment NAME and write NAME.md (+ PNGs) and results.md into out_dir.

    out_dir: docs/results by default; in smoke mode a fresh temporary directory unless given.
    runs_dir: where the training runs go (default: out_dir/runs in smoke mode, else runs/experiments/NAME).
    spec_dir: where NAME.yaml is read from (configs/experiments).
    reuse_runs: do not train; analyse the newest finished run of each (arm, seed) in runs_dir (after a
    change to the analysis only).
    Returns a short text naming the results file and its summary line.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = load_spec(name, smoke=smoke, spec_dir=Path(spec_dir))
    check_claims(spec)
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix=f"forkrl-{name}-")) if smoke else RESULTS_DIR
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(runs_dir) if runs_dir else (out / "runs" if smoke else ROOT / "runs" / "experiments" / name)
    t0 = time.time()
    if spec.kind == "entropy-patterns":
        body, summary = entropy_patterns(spec, out)
    else:
        results = existing_runs(spec, runs) if reuse_runs else train_all(spec, runs)
        if reuse_runs:  # the training's wall time, not this analysis's
            t0 = time.time() - sum(r.seconds for r in results)
        body, summary = ANALYSE[spec.analysis](spec, results, out)
        body = runs_table(results) + body
    wall = time.time() - t0
    path = out / f"{name}.md"
    path.write_text(_document(spec, smoke, wall, body, summary, reused=reuse_runs))
    write_index(out)
    return f"{path}\n{summary}"


def _document(spec: Spec, smoke: bool, wall: float, body: str, summary: str, reused: bool = False) -> str:
    cmd = f"forkrl experiment {spec.name}" + (" --smoke" if smoke else "")
    arms = "\n".join(f"| {a.name} | `{' '.join(f'{k}={json.dumps(v)}' for k, v in a.overrides.items()) or '-'}` |"
                     for a in spec.arms) if spec.kind == "train" else ""
    lines = [f"# {spec.title}", "", f"**Summary:** {summary}", "",
             f"Command: `{cmd}` (configs/experiments/{spec.name}.yaml). Wall time: {wall / 60:.1f} min on this "
             f"machine ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
             + (", summed over the stored runs this analysis was regenerated from." if reused else "."), ""]
    if smoke:
        lines += ["**SMOKE RUN**: a few steps only, to keep the code path alive; the numbers mean nothing.", ""]
    lines += ["## Setup", ""]
    if spec.kind == "train":
        lines += [f"Seeds: {spec.seeds} (every arm runs every seed with the same budget).", "",
                  "Shared overrides: `"
                  + " ".join(f"{k}={json.dumps(v)}" for k, v in {**spec.base, **spec.budget}.items())
                  + "`", "", "| arm | overrides |", "|---|---|", arms, ""]
    else:
        lines += ["Parameters: `" + json.dumps(spec.params) + "`", ""]
    if spec.context:
        lines += [spec.context, ""]
    if spec.paper:
        lines += ["## The paper's figure", "", spec.paper, ""]
    discussion = ["## Discussion (written after reading the results)", "", spec.discussion, ""] \
        if spec.discussion and not smoke else []
    return "\n".join(lines) + "\n" + body + ("\n" + "\n".join(discussion) if discussion else "")


def write_index(out: Path) -> Path:
    """results.md: one table of every claim judged in `out` (its NAME.claims.json files), then one line per
    experiment document in `out`, from its **Summary:** line."""
    lines = ["# Reproduction results", "",
             "Small-scale reproductions of the papers' findings on this CPU box; each line links to the full "
             "results (setup, tables, plots, the paper's figure, a reading). Regenerate one with "
             "`forkrl experiment NAME`.", ""]
    in_docs = out.resolve() == RESULTS_DIR.resolve()
    index = out.parent / "results.md" if in_docs else out / "results.md"
    claims = []
    for path in sorted(out.glob("*.claims.json")):
        judged = json.loads(path.read_text())
        claims += [(judged["experiment"], judged["document"], c) for c in judged["claims"]]
    if claims:
        lines += ["## The papers' claims, tested", "",
                  "forkrl: the difference of seed means (arm minus base) [95% CI] and the two-sided p of the paired "
                  "(same seeds) or Welch t-test; the verdict rule is in each experiment's Claims section.", "",
                  "| claim | paper | forkrl | verdict | experiment |", "|---|---|---|---|---|"]
        for name, doc, c in claims:
            link = f"{out.name}/{doc}" if in_docs else doc
            lines.append(f"| {cell(c['claim'])} | {cell(c['paper'])} | {c['metric']}, {measurement(c)}, "
                         f"{c['test']} {fmt_p(c['p'])} | {c['verdict']} | [{name}]({link}#claims) |")
        lines += [""]
    lines += ["## Experiments", ""]
    for doc in sorted(out.glob("*.md")):
        if doc.resolve() == index.resolve():
            continue
        m = re.search(r"^\*\*Summary:\*\* (.*)$", doc.read_text(), re.M)
        link = f"{out.name}/{doc.name}" if in_docs else doc.name
        lines.append(f"- [{doc.stem}]({link}): {m.group(1) if m else '(no summary)'}")
    index.write_text("\n".join(lines) + "\n")
    return index
