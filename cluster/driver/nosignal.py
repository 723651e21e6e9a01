"""Say when nothing can be learned (issue 22, item 5).

A step has no learning signal when no group's rewards differ (every advantage is zero: GRPO learns nothing
and dynamic sampling keeps no group) or when almost no response carries an extractable answer (under
`LOW_EXTRACT`). After `metrics.no_signal_steps` such steps in a row the driver logs one warning, and the
progress bar shows it until a step has signal again, which re-arms it. The warning gives the extract rate
and the likely cause, from the counters of the whole streak:
- answer format: few answers extracted: the model does not write the answer the verifier reads;
- task too hard: answers extracted, (almost) all wrong: every group's rewards are 0;
- task too easy: answers extracted, (almost) all right: every group's rewards are 1.
`stats()` is the streak as `no_signal/<cause>` StepStats (forkrl_no_signal_steps{cause}); the alert
ForkrlNoLearningSignal fires on the same threshold (deploy/prometheus/forkrl-alerts.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LOW_EXTRACT = 0.1   # "almost no answers": under 10% of the step's responses carry an extractable answer
CAUSES = ("answer_format", "too_hard", "too_easy")
_HINT = {
    "answer_format": "likely the answer format: the model rarely writes an answer the verifier can extract "
                     "(check the prompt template and instruction, add few-shot examples, reward.format_reward "
                     "or a short SFT on the answer format)",
    "too_hard": "likely the task is too hard: answers are extracted but (almost) all are wrong, so every "
                "group's rewards are 0 (easier problems, a stronger model or a larger rollout.group_size)",
    "too_easy": "likely the task is too easy: (almost) every answer is right, so every group's rewards are 1 "
                "(harder problems)",
}
# counters summed over the streak (reward/group.py); TTRL's reward is agreement with the majority vote
_COUNTERS = ("reward/responses", "reward/extracted", "reward/groups", "reward/groups_with_signal",
             "reward/gold_responses", "reward/gold_correct", "ttrl/votes", "ttrl/majority_votes")


def likely_cause(extract_rate: float, right_rate: float) -> str:
    """The likely cause of a streak without signal: its share of extracted answers and of rewarded ones."""
    if extract_rate < LOW_EXTRACT:
        return "answer_format"
    return "too_hard" if right_rate <= 0.5 else "too_easy"


def has_signal(st: Mapping[str, float]) -> bool:
    """Some group's rewards differ, and answers are extracted from at least LOW_EXTRACT of the responses."""
    return st.get("reward/groups_with_signal", 0.0) > 0 and st.get("reward/extract_rate", 0.0) >= LOW_EXTRACT


@dataclass
class NoSignal:
    """Counts steps in a row without learning signal; `update` returns the warning once per streak."""

    after: int                          # metrics.no_signal_steps
    streak: int = 0
    warned: bool = False
    sums: dict[str, float] = field(default_factory=dict)

    def update(self, st: Mapping[str, float]) -> str | None:
        """One step's stats (reward/* of its grading) -> the warning when the streak reaches `after`, else None.
        A step that graded nothing changes nothing."""
        if not st.get("reward/responses"):
            return None
        if has_signal(st):
            self.streak, self.warned, self.sums = 0, False, {}
            return None
        self.streak += 1
        for k in _COUNTERS:
            self.sums[k] = self.sums.get(k, 0.0) + float(st.get(k, 0.0))
        if self.streak < self.after or self.warned:
            return None
        self.warned = True
        return self.message()

    def _rate(self, num: str, den: str) -> float:
        return self.sums.get(num, 0.0) / self.sums[den] if self.sums.get(den) else 0.0

    @property
    def extract_rate(self) -> float:
        return self._rate("reward/extracted", "reward/responses")

    @property
    def right_rate(self) -> float:
        if self.sums.get("ttrl/votes"):
            return self._rate("ttrl/majority_votes", "ttrl/votes")
        return self._rate("reward/gold_correct", "reward/gold_responses")

    @property
    def cause(self) -> str | None:
        return likely_cause(self.extract_rate, self.right_rate) if self.streak else None

    def message(self) -> str:
        s = self.sums
        return (f"no learning signal for {self.streak} steps in a row: "
                f"{s.get('reward/groups_with_signal', 0.0):.0f} of {s.get('reward/groups', 0.0):.0f} groups had "
                f"rewards that differ, {self.extract_rate:.0%} of responses had an extractable answer "
                f"(extract rate), {self.right_rate:.0%} were right; {_HINT[self.cause]}")

    def postfix(self) -> str | None:
        """The progress bar's short form while the warning stands."""
        if not self.warned:
            return None
        return f"{self.cause.replace('_', ' ')} (extract {self.extract_rate:.0%})"

    def stats(self) -> dict[str, float]:
        """no_signal/<cause>: the streak under its likely cause, 0 for the others."""
        cause = self.cause
        return {f"no_signal/{c}": float(self.streak if c == cause else 0) for c in CAUSES}
