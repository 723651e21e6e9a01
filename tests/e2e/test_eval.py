"""`forkrl eval` on a real short run of the tiny model: the checkpoint at a step, evaluated on its own with the
run's eval settings and seed, gives the eval/* numbers the run's in-run evaluation wrote to metrics.jsonl at
that step (the same evaluator, per-problem sampling seeds); bad input is one line and exit code 2."""

import json
import subprocess
import sys

import pytest

from tests.e2e.test_train import ROOT, rows

KEYS = ("eval/accuracy_avg", "eval/accuracy_pass", "eval/length_mean", "eval/problems")


def forkrl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_eval_of_a_checkpoint_is_the_runs_evaluation(tmp_path, tiny_model_dir, short_run):
    run_dir = short_run(2)   # seed 3, an evaluation at steps 0, 1, 2 (8 problems x 3 samples), no save_hf
    in_run = {int(r["step"]): r for r in rows(run_dir) if "eval/accuracy_avg" in r}
    assert sorted(in_run) == [0, 1, 2]

    # step 1's checkpoint (no save_hf: exported into a temporary directory), in batches of 3 problems where
    # the run sampled all 8 in one call: the per-problem seeds make the samples the same
    table = tmp_path / "eval.md"
    p = forkrl("eval", str(run_dir), "--step", "1", "--batch", "3", "--out", str(table))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    summary = lines[-1]
    assert summary["summary"] and (summary["step"], summary["seed"], summary["samples"]) == (1, 3, 3)
    assert len(lines) == 9 and all(len(x["correct"]) == 3 for x in lines[:-1])
    for k in KEYS:
        assert summary[k] == in_run[1][k], (k, summary[k], in_run[1][k])
    assert summary["eval/entropy_sampled"] == pytest.approx(in_run[1]["eval/entropy_sampled"], rel=1e-6, abs=1e-7)
    md = table.read_text()
    assert "| avg@3 |" in md and "| pass@3 |" in md and f"{in_run[1]['eval/accuracy_avg']:.4f}" in md
    assert "forkrl eval" in p.stderr   # the progress bar

    # user mistakes: one line on stderr, exit code 2
    for args, says in ((["eval", str(tmp_path / "nope")], "no such file or directory"),
                       (["eval", str(run_dir), "--task", "bogus"], "data.task"),
                       (["eval", str(run_dir), "--step", "7"], "no checkpoint at that step"),
                       (["eval", tiny_model_dir, "--step", "1"], "not a run directory")):
        p = forkrl(*args, timeout=120)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, (args, p.stderr)
