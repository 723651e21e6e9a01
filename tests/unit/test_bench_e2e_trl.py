"""bench e2e's TRL side: the error line a failed TRL child is reported with (a real traceback's shape, vLLM's
`[rank0]: ` prefix), and vs_trl's rows when TRL's vLLM mode fails (the row shows the error, the HF row
stands) or its HF mode fails (no rows: that is the target's baseline)."""

from __future__ import annotations

import pytest

from cluster.tools.bench import e2e

LOG = """{'loss': '0', 'step_time': '150.6'}
[rank0]: Traceback (most recent call last):
[rank0]:   File "trl/trainer/grpo_trainer.py", line 1771, in _generate_single_turn
[rank0]:     param.weight_loader(param, loaded_weight, shard_id)
[rank0]:     ^^^^^^^^^^^^^^^^^^^
[rank0]: AttributeError: 'Parameter' object has no attribute 'weight_loader'
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
subprocess.CalledProcessError: Command '['python', '-m', 'x']' returned non-zero exit status 1.
"""


def test_error_line_is_the_last_exception_line():
    assert e2e.error_line(LOG) == ("subprocess.CalledProcessError: Command '['python', '-m', 'x']' returned "
                                   "non-zero exit status 1.")
    assert e2e.error_line(LOG.rsplit("Traceback", 1)[0]) == ("AttributeError: 'Parameter' object has no "
                                                               "attribute 'weight_loader'")
    assert e2e.error_line("killed\n\n") == "killed"
    assert e2e.error_line("") == "(no output)"
    assert e2e.error_line("ValueError has no colon\n") == "ValueError has no colon"


@pytest.fixture
def sides(monkeypatch):
    monkeypatch.setattr(e2e, "_forkrl_side", lambda case, model, extra: (90.0, {"forkrl_step_s": 60.0}))
    failing = set()

    def trl(model, steps, generation, dtype="float32"):
        if generation in failing:
            raise e2e.TrlFailed(f"TRL ({generation} generation) exited 1: AttributeError: boom")
        return {"step_s": [9.0, 100.0, 100.0], "mean_length": [1.0, 30.0, 30.0]}

    monkeypatch.setattr(e2e, "_trl", trl)
    return failing


def test_a_failed_vllm_baseline_gives_a_row_with_its_error(sides):
    sides.add("vllm")
    hf, vllm = list(e2e.vs_trl("smollm2", "m"))
    assert hf["metric"] == "e2e.vs_trl" and hf["baseline"] == pytest.approx(30 * 16 * 8 / 100)
    assert hf["ratio"] == pytest.approx(90.0 / hf["baseline"]) and "failed" not in hf
    assert vllm["metric"] == "e2e.vs_trl_vllm" and vllm["value"] == 90.0
    assert vllm["baseline"] is None and vllm["ratio"] is None and vllm["target"] == "report"
    assert vllm["failed"] == "TRL (vllm generation) exited 1: AttributeError: boom"
    assert vllm["forkrl_step_s"] == 60.0


def test_a_failed_hf_baseline_fails_the_bench(sides):
    sides.add("hf")
    with pytest.raises(e2e.TrlFailed, match="hf generation"):
        list(e2e.vs_trl("smollm2", "m"))
