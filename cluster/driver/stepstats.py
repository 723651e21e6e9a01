"""Step statistics on the driver: what a step measured (`StepRecord`), the learner ranks' statistics merged
into one dict, the rollouts' and the evaluation's statistics, and the derived keys of a metrics.jsonl line.
Pure functions of their inputs; the keys are those of docs/metrics.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cluster.types import Rollout, ScoredGroup

# learner statistics summed over ranks (the rest are token-weighted means over ranks)
SUMMED = ("tokens", "selected", "clip_cov/clipped", "kl_cov/penalised", "learner/groups", "learner/responses",
          "learner/tokens")
CUMULATIVE = ("queue/produced", "queue/consumed", "queue/dropped_stale")   # per consumer, since it started


@dataclass
class StepRecord:
    """What one step measured: seconds per phase, and the statistics the phases reported."""

    phases: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def count(self, key: str, by: float = 1.0) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + by


def merge_rank_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Learner statistics of all ranks -> one dict: counts summed, times maxed, the rest token-weighted."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    weights = np.array([max(r.get("tokens", 0.0), 0.0) for r in per_rank])
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(per_rank), 1 / len(per_rank))
    out: dict[str, float] = {}
    for k in set().union(*per_rank):
        vals = [r[k] for r in per_rank if k in r]
        if k in SUMMED or k.startswith("queue/"):
            out[k] = float(sum(vals))
        elif k.startswith("time/"):
            out[k] = float(max(vals))
        else:
            ws = [w for r, w in zip(per_rank, weights) if k in r]
            finite = [(v, w) for v, w in zip(vals, ws) if math.isfinite(v)]
            tot = sum(w for _, w in finite)
            out[k] = float(sum(v * w for v, w in finite) / tot) if tot > 0 else float("nan")
    return out


def rollout_stats(rollouts: list[Rollout], version: int) -> dict[str, float]:
    """response/* and generator/staleness_at_sample of one step's rollouts (learner weights at `version`);
    with forking-aware sampling also generator/forking_high_share (positions sampled at T_high / positions)
    and generator/forking_high_entropy (mean entropy at T = 1 of those positions, nats)."""
    lengths = [len(x.token_ids) for r in rollouts for x in r.responses]
    st = {
        "response/length_mean": float(np.mean(lengths)) if lengths else 0.0,
        "response/length_max": float(max(lengths, default=0)),
        "response/truncated_share": float(np.mean([x.finish_reason == "length" for r in rollouts
                                                   for x in r.responses])) if lengths else 0.0,
        "generator/staleness_at_sample": float(version - min((r.version for r in rollouts), default=0)),
    }
    if any("forking_positions" in r.timing for r in rollouts):   # rollout.forking_temperature (actors/forking.py)
        def total(key: str) -> float:
            return float(sum(r.timing.get(key, 0.0) for r in rollouts))

        positions, high = total("forking_positions"), total("forking_high")
        st["generator/forking_high_share"] = high / positions if positions else math.nan
        st["generator/forking_high_entropy"] = total("forking_high_entropy_sum") / high if high else math.nan
    return st


def eval_stats(rollouts: list[Rollout], groups: list[ScoredGroup]) -> dict[str, float]:
    """eval/* of the held-out problems' rollouts and their scored groups."""
    correct = [np.asarray(g.components["correct"]) > 0.5 for g in groups]
    lengths = [len(x.token_ids) for r in rollouts for x in r.responses]
    neg_logp = np.concatenate([-np.asarray(x.logprobs, dtype=np.float64) for r in rollouts for x in r.responses]) \
        if lengths else np.zeros(0)
    return {"eval/accuracy_avg": float(np.mean(np.concatenate(correct))) if correct else 0.0,
            "eval/accuracy_pass": float(np.mean([c.any() for c in correct])) if correct else 0.0,
            "eval/extracted": float(np.mean([a is not None for g in groups for a in g.answers])) if groups else 0.0,
            "eval/length_mean": float(np.mean(lengths)) if lengths else 0.0,
            "eval/entropy_sampled": float(neg_logp.mean()) if neg_logp.size else 0.0,
            "eval/problems": float(len(groups))}


def step_stats(rec: StepRecord, version: int) -> dict[str, float]:
    """The step's statistics with time/* per phase, the throughputs and the learner's weights version."""
    st = dict(rec.stats)
    for k, v in rec.phases.items():
        st[f"time/{k}_s"] = v
    st["time/step_s"] = sum(rec.phases.values())
    if st.get("generator/seconds"):
        st["generator/tokens_per_s"] = st["generator/tokens"] / st["generator/seconds"]
    if rec.phases.get("train") and st.get("learner/tokens"):
        st["learner/tokens_per_s"] = st["learner/tokens"] / rec.phases["train"]
    st["learner/version"] = float(version)
    return st


def metrics_line(st: dict[str, object], step: int, queue_prev: dict[str, float]) -> dict[str, float]:
    """A metrics.jsonl line: the numeric statistics, `step`, the dynamic-sampling drop share, and the queue
    counters as this step's increments (`queue_prev`, the last cumulative values, is updated)."""
    out = {k: float(v) for k, v in st.items() if isinstance(v, (int, float))}
    out["step"] = float(step)
    if "reward/kept_frac" in out:
        out["sampling/drop_share"] = 1.0 - out["reward/kept_frac"]
    for k in CUMULATIVE:
        if k in out:
            cur = out[k]
            out[k] = max(cur - queue_prev.get(k, 0.0), 0.0)
            queue_prev[k] = cur
    return out
