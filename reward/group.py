"""The group stage: verify, vote, shape, advantages per prompt group, dynamic sampling (docs/architecture.md).

`score_groups` is pure given its `verify_fn` (a batch of JSON jobs -> results, reward.verifiers.run_job
semantics): the grader actor passes its isolated worker pool, tests and the benchmark baseline pass
`reward.verifiers.run_inline`. A job that timed out, crashed or raised comes back as {"error": ...}; it
scores `RewardConfig.incorrect` and is counted, it never raises.

Reward of response i (all terms float64, stored as float32 components):
    correct  = cfg.correct if right else cfg.incorrect    right = matches gold, or (TTRL) the majority label;
                                                          a whole group is flipped with prob. noise_flip_prob
    format   = cfg.format_reward if an answer was extracted
    overlong = DAPO soft overlong penalty x overlong_factor
    rent     = rent_coef x (-mean token entropy, or -7 without an answer)
    reward   = correct + format + overlong + rent
With TTRL all N_vote responses vote and only the first N_train are kept; the gold answer is only compared
for the logged label accuracy and never enters the reward. Dynamic sampling (DAPO) drops groups whose
kept rewards are all equal: their advantages are zero. reward/groups_with_signal counts the groups whose
rewards differ, whether or not dynamic sampling is on (cluster/driver/nosignal.py warns when none do).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cluster.config import RewardConfig
from cluster.types import Rollout, ScoredGroup
from learner.advantages import compute_advantages
from reward.shaping import flip, overlong_penalty, rent_reward
from reward.verifiers import resolve_verifier, same_batch_via
from reward.vote import cluster_answers, majority

log = logging.getLogger(__name__)

VerifyFn = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

# Additive counters; the ratios of RATIOS are recomputed from them, so stats from several graders merge.
RATIOS = {
    "reward/mean": ("reward/reward_sum", "reward/train_responses"),
    "reward/accuracy": ("reward/gold_correct", "reward/gold_responses"),
    "reward/extract_rate": ("reward/extracted", "reward/responses"),
    "reward/kept_frac": ("reward/groups_kept", "reward/groups"),
    "ttrl/label_accuracy": ("ttrl/label_correct", "ttrl/label_gold_groups"),
    "ttrl/reward_accuracy": ("ttrl/reward_agree", "ttrl/reward_gold_responses"),
    "ttrl/majority_ratio": ("ttrl/majority_votes", "ttrl/votes"),
}


def merge_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Sum the counters of several score_groups calls and recompute the ratios."""
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if k not in RATIOS:
                total[k] = total.get(k, 0.0) + float(v)
    for name, (num, den) in RATIOS.items():
        if total.get(den):
            total[name] = total.get(num, 0.0) / total[den]
    return total


def _job_meta(rollout: Rollout, verifier: str) -> dict[str, Any]:
    # Only what the verifier needs crosses into the worker (meta may hold token entropies).
    if verifier == "countdown":
        return {k: rollout.meta.get(k) for k in ("numbers", "target")}
    return {}


def _entropies(rollout: Rollout) -> list[np.ndarray]:
    """Per-token entropies for RENT: the generator's full-vocabulary entropies in meta["token_entropies"]
    when it provides them, else -log p of the sampled tokens, an unbiased estimate of the same mean
    (E[-log p(y_t)] = H_t; Skywork-OR1 feeds its controller the same estimate)."""
    given = rollout.meta.get("token_entropies")
    if isinstance(given, list) and len(given) == len(rollout.responses):
        return [np.asarray(h, dtype=np.float64) for h in given]
    return [-np.asarray(r.logprobs, dtype=np.float64) for r in rollout.responses]


def score_groups(rollouts: Sequence[Rollout], cfg: RewardConfig, adv_estimator: str,
                 rng: np.random.Generator, verify_fn: VerifyFn, *, l_max: int | None = None
                 ) -> tuple[list[ScoredGroup], dict[str, float]]:
    """Score prompt groups -> (kept ScoredGroups in input order, stats: counters and ratios of RATIOS).

    l_max: DAPO L_max in tokens when cfg.overlong_max is unset (the rollout's max_new_tokens)."""
    l_max = cfg.overlong_max or l_max
    if cfg.overlong_buffer and l_max is None:
        raise ValueError("reward.overlong_buffer is set but neither reward.overlong_max nor l_max "
                         "(rollout.max_new_tokens) is given")
    c: dict[str, float] = {k: 0.0 for k in ("reward/groups", "reward/groups_kept", "reward/dropped_zero_var",
                                             "reward/invalid_groups", "reward/responses", "reward/extracted",
                                             "reward/timeouts", "reward/crashes", "reward/errors",
                                             "reward/gold_responses", "reward/gold_correct",
                                             "reward/train_responses", "reward/reward_sum",
                                             "reward/flipped_groups", "reward/overlong_responses",
                                             "reward/groups_with_signal")}
    c["reward/groups"] = float(len(rollouts))
    groups = []
    for r in rollouts:
        if r.responses:
            groups.append(r)
        else:
            c["reward/invalid_groups"] += 1
            log.warning("rollout %s has no responses: skipped", r.group_id)
    verifiers = [resolve_verifier(cfg.verifier, r.meta.get("task")) for r in groups]

    # 1. verify every response against its gold answer (or the countdown task)
    jobs = [{"op": "score", "verifier": v, "text": resp.text, "gold": r.gold, "meta": _job_meta(r, v)}
            for r, v in zip(groups, verifiers) for resp in r.responses]
    results = iter(_checked(verify_fn, jobs, c))
    scored = [[next(results) for _ in r.responses] for r in groups]

    # 2. TTRL: cluster the extracted answers of all groups, batching the equivalence checks
    clusters: list[list[int | None]] = []
    if cfg.ttrl:
        same_batch = same_batch_via(lambda jobs: _checked(verify_fn, jobs, c), lambda g: verifiers[g])
        clusters = cluster_answers([[s.get("key") for s in sc] for sc in scored], same_batch)
        for k in ("ttrl/groups", "ttrl/label_gold_groups", "ttrl/label_correct", "ttrl/reward_agree",
                  "ttrl/reward_gold_responses", "ttrl/majority_votes", "ttrl/votes"):
            c[k] = 0.0

    kept = []
    for gi, (r, sc) in enumerate(zip(groups, scored)):
        g = len(sc)
        answers = [s.get("answer") for s in sc]
        extracted = np.array([a is not None for a in answers])
        gold_ok = [s.get("correct") for s in sc]  # True/False against gold or the task, None: nothing to check
        c["reward/responses"] += g
        c["reward/extracted"] += extracted.sum()
        c["reward/gold_responses"] += sum(ok is not None for ok in gold_ok)
        c["reward/gold_correct"] += sum(ok is True for ok in gold_ok)

        if cfg.ttrl:
            winner, right = majority(clusters[gi])
            c["ttrl/groups"] += 1
            c["ttrl/votes"] += g
            c["ttrl/majority_votes"] += right.sum()
            label_ok = gold_ok[clusters[gi].index(winner)] if winner is not None else False
            if any(ok is not None for ok in gold_ok):
                c["ttrl/label_gold_groups"] += 1
                c["ttrl/label_correct"] += label_ok is True
        else:
            right = np.array([ok is True for ok in gold_ok])
        term = np.where(right, cfg.correct, cfg.incorrect).astype(np.float64)
        if cfg.noise_flip_prob > 0 and rng.random() < cfg.noise_flip_prob:
            term = flip(term, cfg.correct, cfg.incorrect)
            c["reward/flipped_groups"] += 1
        comps = {"correct": term}
        if cfg.format_reward:
            comps["format"] = np.where(extracted, cfg.format_reward, 0.0)
        if cfg.overlong_buffer:
            lengths = np.array([len(resp.token_ids) for resp in r.responses])
            comps["overlong"] = overlong_penalty(lengths, l_max, cfg.overlong_buffer, cfg.overlong_factor)
            c["reward/overlong_responses"] += (comps["overlong"] < 0).sum()
        if cfg.rent_coef:
            comps["rent"] = cfg.rent_coef * rent_reward(_entropies(r), extracted)
        total = np.sum(list(comps.values()), axis=0)
        if cfg.ttrl:
            comps["vote_agree"] = right.astype(np.float64)

        n = min(cfg.ttrl_train, g) if cfg.ttrl else g
        if cfg.ttrl:  # does the vote reward of the kept responses agree with the gold answer?
            checked = [i for i in range(n) if gold_ok[i] is not None]
            c["ttrl/reward_gold_responses"] += len(checked)
            c["ttrl/reward_agree"] += sum(bool(right[i]) == gold_ok[i] for i in checked)
        total = total[:n]
        c["reward/train_responses"] += n
        c["reward/reward_sum"] += total.sum()
        c["reward/groups_with_signal"] += np.ptp(total) > 0   # rewards differ: some advantage is not zero
        if cfg.dynamic_sampling and np.ptp(total) == 0:
            c["reward/dropped_zero_var"] += 1
            continue
        adv = compute_advantages(torch.from_numpy(total), adv_estimator).numpy()
        rollout = dataclasses.replace(r, responses=r.responses[:n]) if n < g else r
        kept.append(ScoredGroup(rollout=rollout, rewards=total.astype(np.float32),
                                advantages=adv.astype(np.float32), answers=answers[:n],
                                components={k: v[:n].astype(np.float32) for k, v in comps.items()}))
    c["reward/groups_kept"] = float(len(kept))
    return kept, merge_stats([c])


def _checked(verify_fn: VerifyFn, jobs: list[dict[str, Any]], c: dict[str, float]) -> list[dict[str, Any]]:
    """Run jobs; count timeouts, crashes and errors; a failed job is an empty result (scores incorrect)."""
    if not jobs:
        return []
    results = verify_fn(jobs)
    if len(results) != len(jobs):
        raise RuntimeError(f"verify_fn returned {len(results)} results for {len(jobs)} jobs")
    out = []
    for res in results:
        err = res.get("error") if isinstance(res, dict) else "protocol"
        if err is None:
            out.append(res)
            continue
        kind = {"timeout": "reward/timeouts", "crash": "reward/crashes"}.get(err, "reward/errors")
        if kind == "reward/errors" and not c[kind]:
            log.warning("verification error (scored as incorrect): %s", err)
        c[kind] += 1
        out.append({})
    return out
