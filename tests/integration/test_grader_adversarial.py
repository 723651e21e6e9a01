"""Adversarial model output through a real grader actor: every case scores 0 within the configured timeout
(a hung verification is killed), the honest response beside it still scores 1, and the actor keeps serving."""

import numpy as np
import pytest

from cluster.config import RewardConfig
from cluster.types import Response, Rollout

ray = pytest.importorskip("ray")

TIMEOUT_S = 3.0
MB = 1 << 20
_FILLER = "Let me think about \\frac{x}{2} and 3.14 step by step; {nested} $x$ wait. "

# (id, verifier task, adversarial response, expected failure counter or None)
CASES = [
    ("1MB-no-answer", "math", (_FILLER * (MB // len(_FILLER) + 1))[:MB], None),
    ("1MB-then-wrong-box", "math", (_FILLER * (MB // len(_FILLER) + 1))[:MB] + "\\boxed{2}", None),
    ("1MB-answer-line", "math", "Answer: " + "9" * MB, None),
    ("10k-nested-braces-boxed", "math", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", None),
    ("10k-nested-braces", "math", "{" * 10_000 + "1" + "}" * 10_000, None),
    ("10k-open-fracs", "math", "\\boxed{" + "\\frac{" * 10_000, None),
    ("unclosed-box", "math", "so the answer is \\boxed{1", None),
    ("power-tower", "math", "\\boxed{10^{10^{10^{10}}}}", "reward/timeouts"),
    ("huge-factorial", "math", "\\boxed{(10^{6})!}", "reward/timeouts"),
    ("factorial-100000", "math", "\\boxed{100000!}", None),
    ("nul-bytes", "math", "\x00" * 10_000 + "\\boxed{2\x00}" + "\x00" * 100, None),
    ("broken-unicode", "math", "\ud800\udfff\ufffd\udc80 r\u00e9sultat \\boxed{\ud83d 2}\ud800", None),
    ("10k-empty-boxes", "math", "\\boxed{}" * 10_000, None),
    ("10k-wrong-boxes", "math", "\\boxed{2}" * 10_000, None),
    ("numeric-1MB-digits", "arith", "Answer: " + "9" * MB, None),
    ("numeric-10k-boxes", "arith", "\\boxed{" * 10_000, None),
    ("countdown-deep-parens", "countdown", "Answer: " + "(" * 10_000 + "8*3" + ")" * 10_000, None),
    ("countdown-code", "countdown", "Answer: __import__('os').system('echo pwned')", None),
    ("countdown-huge-numbers", "countdown", "Answer: " + "9" * 5000 + "*" + "9" * 5000, None),
    # reward hacks that were paid against the gold "1" before docs/rewards.md (a few of its red-team table)
    ("hedged-boxes", "math", "\\boxed{2} or maybe \\boxed{1}", None),
    ("adjacent-numbers", "math", "\\boxed{1 0}", None),              # latex2sympy reads 1 + 0
    ("equation-of-numbers", "math", "\\boxed{0 = 1}", None),         # math-verify paid the right-hand side
    ("numeric-expression", "arith", "Answer: 2-1", None),             # the last number was the answer
    ("numeric-phantom", "arith", "\\boxed{\\phantom{1}}", None),
]
HONEST = {"math": "\\boxed{1}", "arith": "Answer: 1", "countdown": "Answer: 8*3"}


@pytest.fixture(scope="module")
def grader():
    from actors.grader import GraderPool

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    pool = GraderPool(RewardConfig(num_graders=1, workers_per_grader=1, timeout_s=TIMEOUT_S,
                                   dynamic_sampling=False))
    pid = pool.wait_ready()[0]
    yield pool
    assert pool.wait_ready()[0] == pid      # the actor process itself never died
    pool.close()
    if started:
        ray.shutdown()


def group(task, texts):
    meta = {"numbers": [3, 8], "target": 24} if task == "countdown" else {}
    return Rollout(group_id=task, prompt_id=task, prompt_ids=np.zeros(1, dtype=np.int32), prompt="Q",
                   responses=[Response(np.zeros(3, dtype=np.int32), np.zeros(3, dtype=np.float32), t) for t in texts],
                   version=0, gold=None if task == "countdown" else "1", meta={"task": task, **meta})


@pytest.mark.timeout(120)  # a hang guard; the grader's own hard timeout is TIMEOUT_S per verification
@pytest.mark.parametrize("task,text,counter", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_adversarial_output_scores_zero_and_the_actor_keeps_serving(grader, task, text, counter):
    (sg,), stats = grader.score([group(task, [text, HONEST[task]])])
    assert sg.rewards.tolist() == [0.0, 1.0]
    assert sg.components["correct"].tolist() == [0.0, 1.0]
    failures = {k: stats[k] for k in ("reward/timeouts", "reward/crashes", "reward/errors")}
    if counter:
        assert failures[counter] == 1 and stats["reward/worker_restarts"] == 1
    else:
        assert failures == dict.fromkeys(failures, 0)
    # and the next call is served normally
    (after,), _ = grader.score([group(task, [HONEST[task], "Answer: 7"])])
    assert after.rewards.tolist() == [1.0, 0.0]
