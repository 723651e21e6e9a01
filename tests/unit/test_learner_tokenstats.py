"""learner.tokenstats against a float64 log_softmax reference, through the production (compiled) kernels."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner import tokenstats
from learner.tokenstats import token_stats


def reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """float64, the obvious way: full log_softmax, gather, -sum p log p."""
    ls = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = ls.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -(torch.where(ls.exp() > 0, ls.exp() * ls, 0.0)).sum(-1)
    return logp, entropy


def random_case(seed: int, n: int, v: int, scale: float = 3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    w_logp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return logits, tokens, w_logp, w_ent


def test_production_path_is_compiled():
    # this CPU has a compiler: a silent fallback to eager would make the learner 1.1-1.5x slower
    assert tokenstats.backend() == "compiled"


CASES = [  # (seed, N, V, chunk, temperature)
    (0, 37, 101, 8, 1.0), (1, 64, 1000, 64, 0.6), (2, 5, 7, 2, 1.3), (3, 130, 257, 1024, 1.0),
    (4, 33, 50, 1, 2.0), (5, 1, 11, 4, 1.0), (6, 17, 3000, 16, 0.9),
]


@pytest.mark.parametrize("compiled", [None, False], ids=["production", "eager"])
@pytest.mark.parametrize("seed,n,v,chunk,temperature", CASES)
def test_values_and_gradients_match_float64(compiled, seed, n, v, chunk, temperature):
    logits, tokens, w_logp, w_ent = random_case(seed, n, v)
    x = logits.clone().requires_grad_()
    logp, entropy = token_stats(x, tokens, temperature, chunk=chunk, compiled=compiled)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == (n,)
    grad, = torch.autograd.grad((w_logp * logp + w_ent * entropy).sum(), x)

    xr = logits.double().requires_grad_()
    ref_logp, ref_ent = reference(xr, tokens, temperature)
    ref_grad, = torch.autograd.grad((w_logp.double() * ref_logp + w_ent.double() * ref_ent).sum(), xr)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_ent.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("compiled", [None, False], ids=["production", "eager"])
def test_detached_entropy_gives_the_logp_gradient(compiled):
    logits, tokens, w_logp, _ = random_case(10, 40, 300)
    x = logits.clone().requires_grad_()
    logp, entropy = token_stats(x, tokens, 0.8, chunk=16, compiled=compiled)
    grad_with, = torch.autograd.grad((w_logp * logp).sum() + 0 * entropy.detach().sum(), x)
    logp2, none = token_stats(x, tokens, 0.8, chunk=16, with_entropy=False, compiled=compiled)
    assert none is None
    grad_without, = torch.autograd.grad((w_logp * logp2).sum(), x)
    xr = logits.double().requires_grad_()
    ref_grad, = torch.autograd.grad((w_logp.double() * reference(xr, tokens, 0.8)[0]).sum(), xr)
    torch.testing.assert_close(grad_with.double(), ref_grad, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(grad_without, grad_with, rtol=0, atol=0)
    torch.testing.assert_close(logp2, logp, rtol=1e-6, atol=1e-6)


def test_entropy_only_gradient():
    logits, tokens, _, w_ent = random_case(11, 20, 64)
    x = logits.clone().requires_grad_()
    _, entropy = token_stats(x, tokens, 1.0, chunk=7)
    grad, = torch.autograd.grad((w_ent * entropy).sum(), x)
    xr = logits.double().requires_grad_()
    ref_grad, = torch.autograd.grad((w_ent.double() * reference(xr, tokens, 1.0)[1]).sum(), xr)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-6)


def test_chunking_does_not_change_results():
    logits, tokens, w_logp, w_ent = random_case(12, 50, 200)
    results = []
    for chunk in (1, 3, 7, 49, 50, 4096):
        x = logits.clone().requires_grad_()
        logp, entropy = token_stats(x, tokens, 1.0, chunk=chunk)
        grad, = torch.autograd.grad((w_logp * logp + w_ent * entropy).sum(), x)
        results.append((logp, entropy, grad))
    for logp, entropy, grad in results[1:]:
        torch.testing.assert_close(logp, results[0][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(entropy, results[0][1], rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, results[0][2], rtol=0, atol=1e-7)


def test_bfloat16_logits_are_upcast_per_chunk():
    logits, tokens, w_logp, w_ent = random_case(13, 24, 500, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    logp, entropy = token_stats(x, tokens, 1.0, chunk=8)
    assert logp.dtype == torch.float32
    grad, = torch.autograd.grad((w_logp * logp + w_ent * entropy).sum(), x)
    assert grad.dtype == torch.bfloat16
    xr = logits.double().requires_grad_()    # the exact bf16 values, in float64
    ref_logp, ref_ent = reference(xr, tokens, 1.0)
    ref_grad, = torch.autograd.grad((w_logp.double() * ref_logp + w_ent.double() * ref_ent).sum(), xr)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_ent.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)   # bf16 output rounding


def test_extreme_and_minus_inf_logits():
    logits, tokens, w_logp, w_ent = random_case(14, 12, 40, scale=1.0)
    logits[0] *= 1e4                      # near one-hot rows
    logits[1] += 3e4                      # large offset: the log-normaliser must not lose H
    logits[2:6, 10:20] = -math.inf        # masked vocabulary entries
    tokens[2:6] = 3
    x = logits.clone().requires_grad_()
    logp, entropy = token_stats(x, tokens, 0.7, chunk=5)
    grad, = torch.autograd.grad((w_logp * logp + w_ent * entropy).sum(), x)
    assert torch.isfinite(grad).all()
    # float64 autograd through -inf gives NaN; -1e30 is exactly as masked (p = 0) and differentiable
    xr = logits.double().clamp(min=-1e30).requires_grad_()
    ref_logp, ref_ent = reference(xr, tokens, 0.7)
    ref_grad, = torch.autograd.grad((w_logp.double() * ref_logp + w_ent.double() * ref_ent).sum(), xr)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_ent.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert (grad[2:6, 10:20] == 0).all()


def test_grad_buffer_is_reused_without_copy():
    n, v = 30, 90
    buf = torch.empty(n * v + 17)
    for seed in (20, 21):   # two steps, one buffer
        logits, tokens, w_logp, w_ent = random_case(seed, n, v)
        x = logits.clone().requires_grad_()
        logp, entropy = token_stats(x, tokens, 1.0, chunk=8, grad_buffer=buf)
        grad, = torch.autograd.grad((w_logp * logp + w_ent * entropy).sum(), x)
        assert grad.data_ptr() == buf.data_ptr()
        xr = logits.double().requires_grad_()
        ref_logp, ref_ent = reference(xr, tokens, 1.0)
        ref_grad, = torch.autograd.grad((w_logp.double() * ref_logp + w_ent.double() * ref_ent).sum(), xr)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-6)


def test_gradient_flows_into_the_producing_op():
    # the worker's shape of use: logits = hidden @ W (lm_head), gradient consumed by the matmul backward
    g = torch.Generator().manual_seed(22)
    h, w = torch.randn(16, 8, generator=g), torch.randn(8, 50, generator=g, requires_grad=True)
    tokens = torch.randint(0, 50, (16,), generator=g)
    buf = torch.empty(16 * 50)
    logp, entropy = token_stats(h @ w, tokens, 1.0, chunk=4, grad_buffer=buf)
    (logp.sum() - 0.1 * entropy.sum()).backward()
    wr = w.detach().double().requires_grad_()
    ref_logp, ref_ent = reference(h.double() @ wr, tokens, 1.0)
    (ref_logp.sum() - 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-5)


def test_empty_input():
    x = torch.zeros(0, 10, requires_grad=True)
    logp, entropy = token_stats(x, torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=torch.zeros(3)), "logits must be a floating"),
    (dict(logits=torch.zeros(3, 4, dtype=torch.long)), "logits must be a floating"),
    (dict(tokens=torch.zeros(2, dtype=torch.long)), "tokens must have shape"),
    (dict(tokens=torch.zeros(3)), "integer ids"),
    (dict(tokens=torch.tensor([0, 4, 1])), r"tokens\[1\] = 4 is outside"),
    (dict(tokens=torch.tensor([0, -1, 1])), r"tokens\[1\] = -1 is outside"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(chunk=0), "chunk"),
    (dict(grad_buffer=torch.empty(5)), "grad_buffer"),
    (dict(grad_buffer=torch.empty(12, dtype=torch.float64)), "grad_buffer"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    args = dict(logits=torch.zeros(3, 4), tokens=torch.tensor([0, 1, 2]), temperature=1.0)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("chunk", "grad_buffer") if k in args}
    with pytest.raises(ValueError, match=match):
        token_stats(args["logits"], args["tokens"], args["temperature"], **extra)


def test_nan_logits_row_is_named():
    logits = torch.randn(4, 6)
    logits[2, 1] = float("nan")
    with pytest.raises(ValueError, match="logits row 2"):
        token_stats(logits, torch.tensor([0, 1, 2, 3]))


def test_without_a_compiler_it_warns_and_runs_eagerly(monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(tokenstats, "_compiled", None)
    monkeypatch.setattr(tokenstats, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level("WARNING", logger="learner.tokenstats"):
        assert tokenstats.backend() == "eager"
    assert "no C++ compiler" in caplog.text
    logits, tokens, _, _ = random_case(30, 6, 20)
    logp, entropy = token_stats(logits, tokens)
    ref_logp, ref_ent = reference(logits, tokens, 1.0)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="torch.compile failed"):
        token_stats(logits, tokens, compiled=True)   # forcing the compiled kernels surfaces the failure


# A subprocess per CPU capability, all sharing one FORKRL_CACHE: inductor's own cache does not key the C++ it
# generates by vector ISA, so without one directory per ISA the second process reloads a kernel written for
# another vector width and gets garbage, NaN or heap corruption (tokenstats module doc).
_PROBE = r"""
import json, os, torch
from cluster.runtime import setup_env
setup_env()
from learner import tokenstats
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 101, generator=g) * 3   # chunk views of a larger tensor, rows not a multiple of 16
tok = torch.randint(0, 101, (37,), generator=g)
lp, h = tokenstats.token_stats(x.clone().requires_grad_(), tok, chunk=8, compiled=True)
ls64 = torch.log_softmax(x.double(), -1)
lp64, h64 = ls64.gather(-1, tok[:, None]).squeeze(-1), -(ls64.exp() * ls64).sum(-1)
ls32 = torch.log_softmax(x, -1)  # the float32 noise of the obvious computation bounds the kernel's error
lp32, h32 = ls32.gather(-1, tok[:, None]).squeeze(-1), -(ls32.exp() * ls32).sum(-1)
err = lambda a, b: float((a.double() - b).abs().max())
print(json.dumps({"cap": torch.backends.cpu.get_cpu_capability(), "backend": tokenstats.backend(),
                  "lp": err(lp, lp64), "h": err(h, h64), "lp32": err(lp32, lp64), "h32": err(h32, h64),
                  "cache": os.environ["TORCHINDUCTOR_CACHE_DIR"]}))
"""


def _capabilities() -> list[str]:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    caps = ["default"]
    if "avx2" in flags:
        caps.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        caps.append("avx512")
    return caps


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo (Linux)")
def test_compiled_kernels_are_right_under_every_cpu_capability_sharing_one_cache(tmp_path):
    caps = _capabilities()
    # best first, down to default (each one after the first compiles into a cache another ISA wrote), then the
    # best again: its own kernels reloaded from that cache after every other ISA wrote there. Going back up
    # through each middle capability too (avx2 on an AVX-512 machine) tested that same reload once more, at
    # one process more (~12 s of start-up and cache loading).
    order = caps[::-1] + caps[-1:] * (len(caps) > 1)
    seen = {}
    for cap in order:
        env = {**os.environ, "FORKRL_CACHE": str(tmp_path), "ATEN_CPU_CAPABILITY": cap, "FORKRL_COMPILE": "1"}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=600, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, (cap, proc.stderr[-2000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["cap"].lower() == cap and r["backend"] == "compiled", r
        # 16x the float32 reference's own error: the kernel's summation order differs, its precision does not
        assert r["lp"] <= 16 * r["lp32"] + 1e-7 and r["h"] <= 16 * r["h32"] + 1e-7, r
        seen.setdefault(cap, r["cache"])
        assert seen[cap] == r["cache"]
    assert len(set(seen.values())) == len(caps)   # one compile cache per capability
