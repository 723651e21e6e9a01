"""`forkrl bench e2e`'s smollm2-bf16 case (cluster/tools/bench/e2e.py): it runs only where the CPU has bf16
instructions, and elsewhere prints one row that says why, with no figure. Nothing here is timed."""

import json

import pytest

from cluster.runtime import cpu_flags
from cluster.tools.bench import e2e


def test_the_gate_reads_the_bf16_flags():
    assert e2e.bf16_missing({"avx2", "avx512f", "avx512_bf16"}) is None
    assert e2e.bf16_missing({"avx2", "amx_bf16", "amx_tile"}) is None
    why = e2e.bf16_missing({"avx2", "fma", "avx512f", "avx512bw"})
    assert why.startswith("skipped:") and "avx512_bf16" in why and "amx_bf16" in why
    assert e2e.bf16_missing(set()) is not None


def test_cpu_flags_agree_with_the_vector_isa_torch_detected():
    import torch

    flags = cpu_flags()
    assert flags, "no flags read from /proc/cpuinfo"
    # ATen's own CPUID probe (or ATEN_CPU_CAPABILITY, which only lowers it), not /proc/cpuinfo
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        assert {"avx512f", "avx512bw", "avx2", "fma"} <= flags, cap
    elif cap == "AVX2":
        assert {"avx2", "fma"} <= flags, cap


def test_without_bf16_the_case_prints_one_skipped_row_and_runs_nothing(monkeypatch):
    monkeypatch.setattr("cluster.runtime.cpu_flags", lambda: {"avx2", "fma"})

    def must_not_run(*a, **k):
        raise AssertionError("the bf16 case ran on a CPU without bf16")

    monkeypatch.setattr(e2e, "train_run", must_not_run)
    monkeypatch.setattr(e2e, "_trl", must_not_run)
    rows = list(e2e.run(case=e2e.BF16_CASE))
    assert len(rows) == 1
    r = rows[0]
    assert r["metric"] == "e2e.vs_trl_bf16" and r["case"] == "smollm2-bf16"
    assert r["value"] is None and r["baseline"] is None and r["ratio"] is None
    assert r["skipped"] == e2e.bf16_missing({"avx2", "fma"})
    assert {"metric", "value", "baseline", "ratio", "unit", "case", "target"} <= r.keys()
    assert json.loads(json.dumps(r)) == r   # what `forkrl bench` prints


@pytest.mark.skipif(e2e.bf16_missing(cpu_flags()) is None, reason="this CPU has bf16: the case runs here")
def test_this_cpu_lacks_bf16_and_the_real_gate_says_so(monkeypatch):
    monkeypatch.setattr(e2e, "train_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    (r,) = e2e.run(case=e2e.BF16_CASE)
    assert r["skipped"].startswith("skipped:")
