"""DAPO dynamic sampling with refill (Yu et al. 2503.14476, Algorithm 1 and Sec. 3.2: "we over-sample and
filter out prompts with the accuracy equal to 1 and 0 ... keep sampling until the batch is fully filled
with samples whose accuracy is neither 0 nor 1"; verl algorithm.filter_groups, max_num_gen_batches).

The graders already drop a group whose rewards are all equal (reward.dynamic_sampling); `refill` samples
new prompts until the step holds rollout.prompts_per_step groups with signal, at most
reward.max_gen_batches generation batches per step, the first included. Each refill round samples as many
new prompts as groups are still missing: verl samples a whole batch each round and cuts the surplus, but
here a kept group is on the stream as soon as it is graded, so a step that fills trains on exactly
prompts_per_step groups and never leaves a surplus behind to go stale.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("forkrl")


def refill(kept: int, target: int, max_gen_batches: int, sample: Callable[[int], int]) -> tuple[int, int]:
    """kept: groups with signal after the step's first generation batch; sample(n): generate and grade n new
    prompts, returning how many of their groups were kept. Returns (groups kept, refill rounds). Stops
    at the bound with one warning naming the shortfall and the field."""
    rounds = 0
    while kept < target and rounds + 1 < max_gen_batches:
        rounds += 1
        kept += sample(target - kept)
    if kept < target and max_gen_batches > 1:
        log.warning("dynamic sampling: %d of %d groups have rewards that differ after %d generation batches "
                    "(reward.max_gen_batches); this step trains on those: the data has too few prompts the "
                    "policy sometimes solves and sometimes not", kept, target, rounds + 1)
    return kept, rounds
