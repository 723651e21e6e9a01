"""Learner statistics: entropy percentiles, covariance, clip fractions, KL and ratio.

`learner.losses.micro_batch_loss` returns one mergeable part per micro-batch: counts and sums (added),
min/max, and the detached per-token entropy and covariance of its valid tokens, its scalars left on the
device; `parts_to_host` moves a step's parts to the host in one copy (`compute_loss` does it for one).
`summarize(parts)` merges any set of host parts (one micro-batch, a rank's step, or every rank's parts
after gathering) into final floats, so percentiles and top-share means are exact over the whole set
rather than averages of per-micro-batch values.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FORKING_ENTROPY = 0.672
"""80th percentile of Qwen3-8B token entropy: only ~20% of tokens exceed it (docs/algorithms.md 1.7)."""
COV_TOP_SHARE = 2e-4
"""Share of highest-covariance tokens whose mean Cui et al. Table 1 reports (top 0.02%: 5.654)."""
PERCENTILES = (50, 80, 95, 99)


def percentiles(x: torch.Tensor, qs=PERCENTILES) -> list[float]:
    """Percentiles (0-100) of a 1-D tensor with linear interpolation between order statistics (numpy's
    default); NaN for an empty tensor. Unlike torch.quantile it has no input-size limit."""
    if x.numel() == 0:
        return [math.nan] * len(qs)
    s = torch.sort(x.detach().double().flatten()).values
    out = []
    for q in qs:
        pos = (s.numel() - 1) * q / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, s.numel() - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


def entropy_stats(entropy: torch.Tensor) -> dict[str, float]:
    """entropy [n] of valid tokens -> mean, p50/p80/p95/p99 and the share above FORKING_ENTROPY."""
    h = entropy.detach().double()
    n = h.numel()
    out = {"entropy/mean": float(h.mean()) if n else math.nan}
    out.update({f"entropy/p{q}": v for q, v in zip(PERCENTILES, percentiles(h))})
    out["entropy/frac_above_0.672"] = float((h > FORKING_ENTROPY).double().mean()) if n else math.nan
    return out


def covariance_stats(cov: torch.Tensor) -> dict[str, float]:
    """cov [n] per-token covariances (Cui et al. Eq. 10) -> mean, max, mean of the top 0.02%
    (max(int(0.0002 n), 1) tokens, the Clip-Cov/KL-Cov pick count) and the share that is positive."""
    c = cov.detach().double()
    n = c.numel()
    if n == 0:
        return {k: math.nan for k in ("cov/mean", "cov/max", "cov/top_0.02pct_mean", "cov/frac_positive")}
    k = max(int(round(COV_TOP_SHARE * n, 9)), 1)
    return {"cov/mean": float(c.mean()), "cov/max": float(c.max()),
            "cov/top_0.02pct_mean": float(torch.topk(c, k).values.mean()),
            "cov/frac_positive": float((c > 0).double().mean())}


def group_sequence_stats(token_entropy: torch.Tensor, token_logp: torch.Tensor, lengths: torch.Tensor,
                         advantages: torch.Tensor, groups: torch.Tensor) -> tuple[float, float, float, float]:
    """The two sequence-level statistics of Cui et al. 2505.22617 over one rank's responses, as sums and
    counts (the step adds them over ranks; a group lies whole on one rank):

    - policy entropy, Eq. 5: H = -(1/|D|) sum_x (1/|y|) sum_t E[log pi(y_t)], the full-vocabulary token
      entropy averaged over each response's tokens, then over the responses of a prompt, then over the
      prompts (every prompt weighs the same, however long its responses): (sum over prompts, prompts);
    - the per-group covariance of Sec. 3.3 (Eq. 8/9's bandit view: prompt = state, response = action):
      Cov_i( mean_t log pi(y_i,t), A_i ) over the responses i of a prompt, the population covariance of the
      length-normalised sequence log-probability and the advantage, then averaged over the prompts with at
      least two responses: (sum over those prompts, their number).

    token_entropy, token_logp [T] in response order; lengths [S] (>= 1) the responses' token counts;
    advantages [S]; groups [S] int64 the prompt of each response. Float64 throughout."""
    if lengths.numel() == 0:
        return 0.0, 0.0, 0.0, 0.0
    dev = token_entropy.device
    lengths, groups = lengths.to(dev), groups.to(dev)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths)
    n = lengths.double()
    h_seq = torch.zeros(len(n), dtype=torch.float64, device=dev).index_add(0, seq, token_entropy.double()) / n
    l_seq = torch.zeros(len(n), dtype=torch.float64, device=dev).index_add(0, seq, token_logp.double()) / n
    _, g = torch.unique(groups, return_inverse=True)
    n_g = torch.zeros(int(g.max()) + 1, dtype=torch.float64, device=dev).index_add(0, g, torch.ones_like(n))

    def group_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(n_g), dtype=torch.float64, device=dev).index_add(0, g, x) / n_g

    a = advantages.double().to(dev)
    cov = group_mean((l_seq - group_mean(l_seq)[g]) * (a - group_mean(a)[g]))
    two = n_g >= 2
    return float(group_mean(h_seq).sum()), float(len(n_g)), float(cov[two].sum()), float(two.sum())


def parts_to_host(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`micro_batch_loss` parts with their 0-d tensors as python floats, in ONE device-to-host copy for
    all of them (the training step calls it once per step); the tokens/ vectors stay tensors."""
    where = [(i, k) for i, p in enumerate(parts) for k, v in p.items()
             if torch.is_tensor(v) and not k.startswith("tokens/")]
    out = [dict(p) for p in parts]
    if where:
        values = torch.stack([parts[i][k].detach().double() for i, k in where]).tolist()
        for (i, k), v in zip(where, values):
            out[i][k] = v
    return out


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge host parts (`parts_to_host`) by key kind: loss*/sum/count added, min/max kept, tokens/ concatenated,
    tau averaged over the parts that have one, anything else taken from the last part."""
    out: dict[str, Any] = {}
    taus = []
    for p in parts:
        for key, v in p.items():
            if key == "tau":
                if v is not None and not math.isnan(v):
                    taus.append(v)
            elif key.startswith("tokens/"):
                if v is not None:
                    out[key] = torch.cat([out[key], v]) if key in out else v
            elif key.startswith(("loss", "sum/", "count/")):
                out[key] = out.get(key, 0.0) + v
            elif key.startswith("min/"):
                out[key] = min(out.get(key, math.inf), v)
            elif key.startswith("max/"):
                out[key] = max(out.get(key, -math.inf), v)
            else:
                out[key] = v
    out["tau"] = sum(taus) / len(taus) if taus else math.nan
    return out


def summarize(parts: list[dict[str, Any]]) -> dict[str, float]:
    """Parts of micro-batches (any set) -> final statistics, every one over the valid tokens only.

    loss, loss/pg, loss/kl, loss/entropy_bonus: sums (the mini-batch loss when the parts are one mini-batch);
    tokens, selected, selected_frac; entropy/{mean,p50,p80,p95,p99,frac_above_0.672};
    entropy/sampled = -mean(old logprob) (the Skywork controller's estimator); tau (mean of the parts'
    thresholds); cov/{mean,max,top_0.02pct_mean,frac_positive}; clip/{low,high,dual}_frac over the tokens
    in the policy loss; clip_cov/clipped and kl_cov/penalised counts; kl/approx (k1) and kl/approx_k3 of
    KL(pi_old || pi_theta); kl/ref (mean per-token KL to the reference); ratio/{mean,std,min,max};
    adv/entropy_shaping (the mean entropy term min(alpha H, |A|/kappa) added to the advantages, when on).
    """
    m = merge(parts)
    n = m.get("count/tokens", 0.0)
    sel = m.get("count/selected", 0.0)

    def per(key: str, d: float) -> float:
        return m.get(key, 0.0) / d if d else math.nan

    out = {k: m[k] for k in ("loss", "loss/pg", "loss/kl", "loss/entropy_bonus") if k in m}
    if "count/tokens" not in m:
        return out
    ratio_mean = per("sum/ratio", n)
    ratio_var = per("sum/ratio_sq", n) - ratio_mean ** 2 if n else math.nan
    out.update({
        "tokens": n, "selected": sel, "selected_frac": per("count/selected", n),
        "tau": m["tau"],
        "entropy/sampled": per("sum/neg_old_logp", n),
        "clip/low_frac": per("count/clip_low", sel), "clip/high_frac": per("count/clip_high", sel),
        "clip/dual_frac": per("count/dual_clip", sel),
        "clip_cov/clipped": m["count/clip_cov"], "kl_cov/penalised": m["count/kl_cov"],
        "kl/approx": per("sum/approx_kl", n), "kl/approx_k3": per("sum/approx_kl_k3", n),
        "kl/ref": per("sum/ref_kl", n),
        "ratio/mean": ratio_mean, "ratio/std": math.sqrt(max(ratio_var, 0.0)) if n else math.nan,
        "ratio/min": m["min/ratio"] if n else math.nan, "ratio/max": m["max/ratio"] if n else math.nan,
        "entropy_coef": m.get("entropy_coef", math.nan),
    })
    if "sum/adv_entropy_shaping" in m:   # Cheng et al. 2506.14758: mean psi over the valid tokens
        out["adv/entropy_shaping"] = per("sum/adv_entropy_shaping", n)
    if "tokens/entropy" in m:
        out.update(entropy_stats(m["tokens/entropy"]))
    if "tokens/cov" in m:
        out.update(covariance_stats(m["tokens/cov"]))
    return out
