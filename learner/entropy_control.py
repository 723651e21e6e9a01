"""Skywork-OR1 adaptive entropy control (He et al. 2505.22312 §3.2.5; docs/algorithms.md 3.2).

After each RL step k, with e_k the step's entropy estimate:
    c_{k+1} = clip(c_k + Delta if e_k < H_tgt else c_k - Delta, c_min, c_max)
    alpha_{k+1} = c_{k+1} * 1[e_k < H_tgt]
and alpha_{k+1} is the entropy-bonus coefficient of step k+1 (compute_loss(entropy_coef=...)). Initial
state: c_0 = algorithm.entropy_coef, enabled (the released EntController: value = entropy_coeff, flag 1).
e_k is, per algorithm.entropy_estimator, `sampled` = -mean(old logprob) over the step's valid tokens (what
the released code feeds the controller) or `full` = the full-vocabulary mean entropy; both come out of
`learner.stats.summarize` as entropy/sampled and entropy/mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.config import AlgorithmConfig


@dataclass(frozen=True)
class EntropyControl:
    coef: float          # c_k
    enabled: bool = True  # 1[e_{k-1} < H_tgt]

    @property
    def alpha(self) -> float:
        """The effective entropy-bonus coefficient for the coming step."""
        return self.coef if self.enabled else 0.0


def initial_control(cfg: AlgorithmConfig) -> EntropyControl:
    return EntropyControl(coef=cfg.entropy_coef, enabled=True)


def controller_entropy(summary: dict[str, float], cfg: AlgorithmConfig) -> float:
    """The step's entropy estimate e_k from `stats.summarize` output, per cfg.entropy_estimator."""
    key = "entropy/sampled" if cfg.entropy_estimator == "sampled" else "entropy/mean"
    if key not in summary:
        raise ValueError(f"entropy_estimator={cfg.entropy_estimator!r} needs {key!r} in the step statistics")
    return summary[key]


def update_control(state: EntropyControl, entropy: float, cfg: AlgorithmConfig) -> EntropyControl:
    """One controller step after RL step k (entropy = e_k, nats) -> the state for step k+1."""
    if not math.isfinite(entropy):
        raise ValueError(f"entropy fed to the adaptive entropy controller is not finite: {entropy!r}")
    below = entropy < cfg.entropy_target
    coef = state.coef + cfg.entropy_delta if below else state.coef - cfg.entropy_delta
    coef = min(max(coef, cfg.entropy_coef_min), cfg.entropy_coef_max)
    return EntropyControl(coef=coef, enabled=below)
