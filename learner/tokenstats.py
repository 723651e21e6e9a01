"""Log-prob of the sampled token and full-vocabulary entropy from logits, chunked over tokens.

docs/algorithms.md 1.1: with z = logits / T (T = the rollout temperature),
    logp_t = z_t[y_t] - logsumexp(z_t)        H_t = -sum_j p_tj log p_tj,  p_t = softmax(z_t).

`token_stats` is a custom autograd function (docs/platform.md "Losses over a large vocabulary on CPU"): the
forward walks the [N, V] logits `chunk` rows at a time and keeps only [N] vectors (logp, the
log-normaliser, the entropy); the backward recomputes the softmax of each chunk from the saved logits and
the log-normaliser and writes the logits gradient straight into its output buffer. No second [N, V]
float32 tensor ever exists besides that gradient, which the caller may reuse across steps
(`grad_buffer`): a fresh 1.5 GiB tensor per step is a new mmap whose page faults make timings swing 3x.

The per-chunk math is torch.compile'd (dynamic shapes, so every chunk length shares one kernel): inductor
fuses each chunk's forward into one kernel (a max pass, then one pass for exp, both sums and the gather)
with no [chunk, V] temporary, and the backward into one write per element, which is what makes the
entropy nearly free next to the log-normaliser. If compilation is impossible on this machine
(no C++ compiler) the same functions run eagerly after a logged warning; FORKRL_COMPILE=0 forces eager.
The compiled code is cached per vector ISA (`cluster.runtime.pin_inductor_cache`): inductor's own cache
would hand an AVX-512 kernel to an AVX2 process, which then writes past its buffers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from cluster.runtime import pin_inductor_cache

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Per-chunk math. x [c, V] logits (any float dtype, upcast to float32 inside), tok [c] int64, inv_t = 1/T.
# The log-normaliser is kept in two [c] parts, the row max m of the raw logits and log_s, so that
# log p = (x - m)/T - log_s: shifting before scaling keeps large logit offsets from costing precision.
# Forward outputs are float32 [c]; backward writes d(loss)/dx into out [c, V].

def _fwd_logp(x: torch.Tensor, tok: torch.Tensor, inv_t: float):
    xf = x.float()
    m = xf.amax(-1, keepdim=True)
    d = (xf - m) * inv_t
    log_s = torch.log(torch.exp(d).sum(-1))
    return d.gather(-1, tok[:, None]).squeeze(-1) - log_s, m.squeeze(-1), log_s


def _fwd_entropy(x: torch.Tensor, tok: torch.Tensor, inv_t: float):
    xf = x.float()
    m = xf.amax(-1, keepdim=True)
    d = (xf - m) * inv_t
    e = torch.exp(d)
    s = e.sum(-1)
    log_s = torch.log(s)
    # H = log_s - E_p[d]. A -inf logit (masked vocabulary entry) makes e * d = 0 * -inf = NaN here; such
    # rows are recomputed by _safe_entropy: a where() in this loop costs ~4% of the whole pass.
    entropy = log_s - (e * d).sum(-1) / s
    return d.gather(-1, tok[:, None]).squeeze(-1) - log_s, m.squeeze(-1), log_s, entropy


def _safe_entropy(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Entropy of rows holding -inf logits (p = 0 there contributes 0), eager: they are rare."""
    log_p = torch.log_softmax(x.float() * inv_t, dim=-1)
    return -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1)


def _bwd_logp(x, tok, m, log_s, g_logp, inv_t: float, out):
    # d logp / dz = onehot(y) - p,  z = x / T
    p = torch.exp((x.float() - m[:, None]) * inv_t - log_s[:, None])
    onehot = (torch.arange(x.shape[-1], device=x.device)[None, :] == tok[:, None]).to(p.dtype)
    out.copy_((g_logp * inv_t)[:, None] * (onehot - p))


def _bwd_entropy(x, tok, m, log_s, entropy, g_logp, g_ent, inv_t: float, out):
    # d logp / dz = onehot(y) - p ;  dH / dz = -p (log p + H)
    log_p = (x.float() - m[:, None]) * inv_t - log_s[:, None]
    p = torch.exp(log_p)
    onehot = (torch.arange(x.shape[-1], device=x.device)[None, :] == tok[:, None]).to(p.dtype)
    dh = torch.where(p > 0, p * (log_p + entropy[:, None]), 0.0)   # p = 0 at -inf logits: no 0 * -inf
    out.copy_((g_logp[:, None] * (onehot - p) - g_ent[:, None] * dh) * inv_t)


class _Kernels(NamedTuple):
    fwd_logp: Callable
    fwd_entropy: Callable
    bwd_logp: Callable
    bwd_entropy: Callable


_EAGER = _Kernels(_fwd_logp, _fwd_entropy, _bwd_logp, _bwd_entropy)
_compiled: _Kernels | None = None
_compile_failed = False


@torch.no_grad()   # the kernels always run without grad mode (inside the autograd function)
def _smoke(k: _Kernels) -> None:
    """Run every kernel once on a tiny input so a broken toolchain fails here, not mid-training."""
    x = torch.randn(4, 16)
    tok = torch.tensor([0, 3, 15, 7])
    logp, m, log_s, ent = k.fwd_entropy(x, tok, 1.0)
    k.fwd_logp(x, tok, 1.0)
    out = torch.empty_like(x)
    k.bwd_logp(x, tok, m, log_s, logp.clone(), 1.0, out)
    k.bwd_entropy(x, tok, m, log_s, ent, logp.clone(), ent.clone(), 1.0, out)  # distinct args: no alias guard


def backend() -> str:
    """'compiled' when the torch.compile'd kernels are in use, else 'eager' (see module doc)."""
    return "eager" if _kernels(None) is _EAGER else "compiled"


def _kernels(compiled: bool | None) -> _Kernels:
    """compiled=None: the production choice (compiled unless unavailable or FORKRL_COMPILE=0)."""
    global _compiled, _compile_failed
    if compiled is False or (compiled is None and os.environ.get("FORKRL_COMPILE", "1") == "0"):
        return _EAGER
    if _compiled is None and not _compile_failed:
        try:
            pin_inductor_cache()   # a cache shared across vector ISAs serves kernels of the wrong width
            k = _Kernels(*(torch.compile(f, dynamic=True) for f in _EAGER))
            _smoke(k)
            _compiled = k
        except Exception as e:  # noqa: BLE001 - any toolchain failure means "no compiler here"
            if compiled:
                raise
            _compile_failed = True
            log.warning("torch.compile unavailable (%s: %s); token statistics run eagerly: several times "
                        "slower, with [chunk, vocab] float32 temporaries", type(e).__name__, e)
    if _compiled is None:
        if compiled:
            raise RuntimeError("compiled token-statistics kernels requested but torch.compile failed")
        return _EAGER
    return _compiled


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most `chunk` rows; a 1-row tail joins the previous chunk because
    dynamic shapes specialise size 1, which would cost a recompilation."""
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, inv_t, chunk, with_entropy, kernels, grad_buffer):
        n = logits.shape[0]
        x = logits.detach()  # the compiled kernels are traced for inputs without requires_grad
        f32 = dict(dtype=torch.float32, device=logits.device)
        logp, m, log_s = (torch.empty(n, **f32) for _ in range(3))
        entropy = torch.empty(n, **f32) if with_entropy else None
        for s, e in _chunks(n, chunk):
            if with_entropy:
                logp[s:e], m[s:e], log_s[s:e], entropy[s:e] = kernels.fwd_entropy(x[s:e], tokens[s:e], inv_t)
            else:
                logp[s:e], m[s:e], log_s[s:e] = kernels.fwd_logp(x[s:e], tokens[s:e], inv_t)
        if with_entropy and n:
            rows = torch.isnan(entropy).nonzero().squeeze(1)
            if rows.numel():
                entropy[rows] = _safe_entropy(x[rows], inv_t)
        ctx.save_for_backward(logits, tokens, m, log_s, entropy)
        ctx.inv_t, ctx.chunk, ctx.kernels, ctx.grad_buffer = inv_t, chunk, kernels, grad_buffer
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits, tokens, m, log_s, entropy = ctx.saved_tensors
        x = logits.detach()  # saved outputs/inputs come back requiring grad; the kernels are traced without
        entropy = entropy.detach() if entropy is not None else None
        n, v = x.shape
        if ctx.grad_buffer is not None:
            out = ctx.grad_buffer[: n * v].view(n, v)
        else:
            out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if g_logp is None and g_ent is None:
            return (out.zero_(),) + (None,) * 6
        if g_logp is None:
            g_logp = torch.zeros_like(log_s)
        k, inv_t = ctx.kernels, ctx.inv_t
        for s, e in _chunks(n, ctx.chunk):
            if g_ent is None:      # entropy used only detached (the mask): logp-only backward
                k.bwd_logp(x[s:e], tokens[s:e], m[s:e], log_s[s:e], g_logp[s:e], inv_t, out[s:e])
            else:
                k.bwd_entropy(x[s:e], tokens[s:e], m[s:e], log_s[s:e], entropy[s:e], g_logp[s:e], g_ent[s:e],
                              inv_t, out[s:e])
        return (out,) + (None,) * 6


def token_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *, chunk: int = 1024,
                with_entropy: bool = True, grad_buffer: torch.Tensor | None = None,
                compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, V] (float32 or bfloat16), tokens [N] sampled ids -> (logp [N], entropy [N] or None), float32.

    Both outputs are differentiable with respect to the logits: use `entropy.detach()` for the forking
    mask and the plain `entropy` for an entropy bonus; when no gradient reaches the entropy the backward
    runs the cheaper logp-only kernel. with_entropy=False skips the entropy entirely (the logp-only cost).

    chunk: tokens per chunk (LearnerConfig.logits_chunk). grad_buffer: optional 1-D tensor of at least
    N*V elements of the logits' dtype that the backward writes the logits gradient into and hands to
    autograd WITHOUT a copy: reuse one buffer across micro-batches and steps, and only where the logits
    come out of an op whose backward consumes the gradient at once (the lm_head matmul, or
    torch.autograd.grad); a leaf's `.grad` would alias the buffer and be overwritten by the next step.
    compiled: None = production choice (see `backend()`), True/False force the compiled/eager kernels.
    Double backward is not supported.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [N, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    n, v = logits.shape
    if tokens.shape != (n,):
        raise ValueError(f"tokens must have shape [N]=({n},), got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= v):
        bad = int(((tokens < 0) | (tokens >= v)).nonzero()[0])
        raise ValueError(f"tokens[{bad}] = {int(tokens[bad])} is outside the vocabulary [0, {v})")
    if grad_buffer is not None and (grad_buffer.dim() != 1 or grad_buffer.numel() < n * v
                                    or grad_buffer.dtype != logits.dtype or grad_buffer.device != logits.device):
        raise ValueError(f"grad_buffer must be a 1-D {logits.dtype} tensor on {logits.device} with at least "
                         f"N*V = {n * v} elements, got {tuple(grad_buffer.shape)} {grad_buffer.dtype}")
    tokens = tokens.to(torch.long)
    kernels = _kernels(compiled)
    out = _TokenStats.apply(logits, tokens, 1.0 / float(temperature), chunk, with_entropy, kernels, grad_buffer)
    logp, entropy = out if with_entropy else (out, None)
    if n and not bool(torch.isfinite(logp).all()):
        bad = int((~torch.isfinite(logp)).nonzero()[0])
        raise ValueError(f"logits row {bad} gives a non-finite log-prob ({float(logp[bad])}): NaN/inf logits")
    return logp, entropy
