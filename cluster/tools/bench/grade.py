"""`forkrl bench grade`: responses per second of one grader actor on realistic responses.

value    responses/s of one GraderPool actor (Ray call, isolated worker processes with the hard timeout,
         JSON over pipes, voting/shaping/advantages) scoring a batch of prompt groups.
baseline responses/s of the same group stage and verifiers called in-process without isolation
         (reward.verifiers.run_inline), on the same batch, measured in the same run.
So the ratio is the cost of isolation (and of the Ray hop). Rounds alternate (actor, in-process, ...) and
each side reports its median round. Both sides see the same rounds, so math-verify's parse cache (answers
repeat within a group and across steps, as in training) is equally warm on both.

Cases: math (math-verify, LaTeX answers in \\boxed{}), numeric (the arith task's "Answer: n" solutions),
math-w2 (math with two worker processes in the one actor).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import numpy as np

from cluster.tools.bench import row

# name -> (kind of responses, worker processes in the one actor, target). math-verify costs milliseconds per
# response, so isolation should cost at most half. The numeric verifier costs tens of microseconds
# in-process, so the fixed pipe + Ray cost per response dominates its ratio; there the target is an
# absolute rate per actor (more throughput comes from reward.num_graders / workers_per_grader).
CASES = {"math": ("math", 1, "ratio >= 0.5"), "numeric": ("numeric", 1, "value >= 1000 responses/s"),
         "math-w2": ("math", 2, "ratio >= 1 (two worker processes)")}
GROUPS, G = 32, 8       # one RL step of prompts_per_step x group_size
ROUNDS = 3

# (gold, equivalent spellings, wrong answers) of typical MATH-style final answers
_MATH = [("\\frac{1}{2}", ["0.5", "\\frac{2}{4}", "1/2", "\\dfrac{1}{2}"], ["\\frac{1}{3}", "0.25"]),
         ("3\\sqrt{2}", ["\\sqrt{18}", "3\\sqrt{2}"], ["2\\sqrt{3}", "4.24"]),
         ("(1,3]", ["(1, 3]", "(1,3]"], ["[1,3]", "(1,3)"]),
         ("\\{1,2\\}", ["\\{2,1\\}", "\\{1, 2\\}"], ["\\{1\\}", "\\{1,2,3\\}"]),
         ("12", ["12", "12.0", "12.00"], ["13", "-12"]),
         ("25\\%", ["0.25", "\\frac{1}{4}", "25\\%"], ["0.2", "20\\%"]),
         ("2x+1", ["1+2x", "2x+1"], ["2x-1", "x+1"]),
         ("\\frac{\\pi}{4}", ["\\frac{\\pi}{4}", "0.25\\pi"], ["\\frac{\\pi}{2}", "\\pi"])]
_WORDS = "we have so then note that let compute the value of x and y gives by substituting hence".split()


def _reasoning(rng: np.random.Generator, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        parts.append(str(rng.integers(1, 999)) if rng.random() < 0.2 else _WORDS[rng.integers(len(_WORDS))])
        if rng.random() < 0.05:
            parts.append(f"$\\frac{{{rng.integers(1, 99)}}}{{{rng.integers(1, 99)}}}$")
    return " ".join(parts)


def make_rollouts(kind: str, seed: int):
    from cluster.data.tasks import synthetic_problems
    from cluster.types import Response, Rollout

    rng = np.random.default_rng(seed)
    out = []
    problems = synthetic_problems("arith", GROUPS, "train", seed=seed, difficulty=4) if kind == "numeric" else None
    for i in range(GROUPS):
        texts = []
        if kind == "numeric":
            p = problems[i]
            gold, task = p.gold, "arith"
            for _ in range(G):
                wrong = str(int(p.gold) + int(rng.integers(-9, 10)))
                texts.append(p.solution if rng.random() < 0.5 else p.solution.replace(f"Answer: {p.gold}",
                                                                                     f"Answer: {wrong}"))
        else:
            gold, right, wrong = _MATH[i % len(_MATH)]
            task = "math"
            for _ in range(G):
                ans = (right if rng.random() < 0.5 else wrong)[rng.integers(2)]
                texts.append(f"{_reasoning(rng, int(rng.integers(80, 300)))}. Therefore the answer is "
                             f"$\\boxed{{{ans}}}$.")
        responses = [Response(np.zeros(len(t) // 4, dtype=np.int32), np.zeros(len(t) // 4, dtype=np.float32), t)
                     for t in texts]
        out.append(Rollout(f"r{seed}-{i}", f"p{i}", np.zeros(64, dtype=np.int32), "Q", responses, version=0,
                           gold=gold, meta={"task": task}))
    return out


def run(case: str | None = None) -> Iterator[dict]:
    import ray

    from actors.grader import GraderPool
    from cluster.config import RewardConfig
    from reward.group import score_groups
    from reward.verifiers import run_inline

    if case is not None and case not in CASES:
        raise KeyError(f"unknown grade case {case!r}; choose from {', '.join(CASES)}")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for name, (kind, workers, target) in CASES.items():
            if case not in (None, name):
                continue
            cfg = RewardConfig(num_graders=1, workers_per_grader=workers)
            pool = GraderPool(cfg)
            try:
                pool.wait_ready()
                n = GROUPS * G
                actor_t, inline_t = [], []
                for r in range(ROUNDS + 1):             # round 0 warms up both paths and is not counted
                    rolls = make_rollouts(kind, seed=100 * r + 1)
                    t0 = time.perf_counter()
                    _, stats = pool.score(rolls)
                    dt = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    score_groups(rolls, cfg, "grpo", np.random.default_rng(0), run_inline)
                    dt_inline = time.perf_counter() - t0
                    if r:
                        actor_t.append(dt)
                        inline_t.append(dt_inline)
                t, t_inline = statistics.median(actor_t), statistics.median(inline_t)
                yield row("grade.throughput", n / t, n / t_inline, "responses/s", name, target,
                          workers=workers, responses=n,
                          accuracy=stats.get("reward/accuracy"), timeouts=stats["reward/timeouts"])
            finally:
                pool.close()
    finally:
        if started:
            ray.shutdown()
