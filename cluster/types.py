"""The small typed objects that cross component boundaries (docs/architecture.md).

Arrays are numpy with fixed dtypes (int32 token ids, float32 logprobs/rewards) so that the queue codec can
write them as raw little-endian bytes; everything else is a plain msgpack-able value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Meta = dict[str, Any]  # msgpack-able: str, int, float, bool, None, lists and dicts of those


@dataclass
class Prompt:
    """One problem ready to sample: rendered prompt text and ids plus what the verifier needs."""

    prompt_id: str                 # stable id of the problem within its split ("train-17")
    text: str                      # rendered prompt (chat template applied)
    token_ids: np.ndarray          # [P] int32
    gold: str | None = None        # reference answer (None for label-free data)
    meta: Meta = field(default_factory=dict)   # task kind and data: {"task": "countdown", "numbers": [...], "target": 24}
    draw: int = -1                 # position in the training prompt stream (epoch x size + index); -1 outside it


@dataclass
class Response:
    token_ids: np.ndarray          # [L] int32, the sampled tokens (EOS included when generated)
    logprobs: np.ndarray           # [L] float32, sampler log-probs of those tokens
    text: str = ""
    finish_reason: str = "stop"    # "stop" | "length"


@dataclass
class Rollout:
    """One prompt group: G responses to one prompt, sampled with one weights version."""

    group_id: str                  # unique within the run: "<generator>-<counter>"
    prompt_id: str                 # Prompt.prompt_id it answers
    prompt_ids: np.ndarray         # [P] int32
    prompt: str                    # rendered prompt text (after the chat template)
    responses: list[Response]
    version: int                   # weights version the responses were sampled with
    generator_id: str = ""
    gold: str | None = None        # reference answer when known; never reaches a TTRL reward
    meta: Meta = field(default_factory=dict)   # task data the verifier needs (countdown numbers, ...)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoredGroup:
    """A rollout plus rewards and advantages: what travels on the stream."""

    rollout: Rollout
    rewards: np.ndarray            # [G] float32, total reward per response
    advantages: np.ndarray         # [G] float32, broadcast over each response's tokens by the learner
    answers: list[str | None]      # extracted answers (None = unextractable)
    components: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [G] float32

    @property
    def group_id(self) -> str:
        return self.rollout.group_id

    @property
    def version(self) -> int:
        return self.rollout.version


StepStats = dict[str, float]
