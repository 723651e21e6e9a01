"""User mistakes through the real `forkrl` CLI (a subprocess): one red line naming the field, path or choice, exit
code 2, no traceback, no run directory left behind; `--debug` / FORKRL_DEBUG=1 still shows the traceback."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_config
from cluster.driver.rundir import open_run_dir, resume_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FORKRL_DEBUG")}


def forkrl(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, "COLUMNS": "200", **(env or {})})


def one_red_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def checked_config(tmp_path_factory) -> tuple[Path, str]:
    """(output dir, `forkrl check run.output_dir=DIR run.steps=4`'s output): one CLI call for the module."""
    runs = tmp_path_factory.mktemp("cli") / "runs"
    r = forkrl("check", f"run.output_dir={runs}", "run.steps=4")
    assert r.returncode == 0, r.stderr
    return runs, r.stdout


_run_ids = itertools.count()


@pytest.fixture()
def run_dir(checked_config) -> Path:
    """A fresh run directory as `forkrl train` writes it (config.yaml), from `forkrl check`'s own output; each
    test gets its own directory, under the run.output_dir that config names."""
    runs, text = checked_config
    d = runs / f"demo-20260101-{next(_run_ids):06d}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(text)
    return d


def test_resume_of_a_directory_that_is_no_run(tmp_path):
    one_red_line(forkrl("train", "--resume", str(tmp_path)), str(tmp_path), "not a forkrl run directory")


def test_missing_model_fails_before_a_run_directory_exists(tmp_path):
    out = tmp_path / "runs"
    one_red_line(forkrl("train", f"run.output_dir={out}", "model.path=/nonexistent"), "model.path", "/nonexistent")
    assert not out.exists() or not any(out.iterdir())
    one_red_line(forkrl("check", "model.path=/nonexistent"), "model.path", "/nonexistent")
    not_hf = tmp_path / "empty-model"
    not_hf.mkdir()
    one_red_line(forkrl("check", f"model.path={not_hf}"), "model.path", "no config.json")


def test_check_looks_for_data_paths_unless_remote(tmp_path):
    one_red_line(forkrl("check", "data.task=file", f"data.train_path={tmp_path}/train.jsonl"),
                 "data.train_path", "train.jsonl")
    r = forkrl("check", "--remote", "model.path=/models/X", "data.task=file", "data.train_path=/data/t.parquet")
    assert r.returncode == 0, r.stderr
    assert "model.path '/models/X': not checked" in r.stderr and "data.train_path" in r.stderr
    assert yaml.safe_load(r.stdout)["model"]["path"] == "/models/X"


def test_a_failed_start_removes_its_run_directory(tmp_path, untrained_tiny_model_dir):
    """The data file exists (so the pre-start check passes) but its row is malformed: the start fails inside
    the run (reading the data), after the run directory was made; the directory goes with it."""
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "1+1?"}\n' * 4)
    out = tmp_path / "runs"
    r = forkrl("train", f"run.output_dir={out}", f"model.path={untrained_tiny_model_dir}", "data.task=file",
               f"data.train_path={bad}", "data.eval_size=1")
    one_red_line(r, str(bad), "row 0", "answer")
    assert out.is_dir() and list(out.iterdir()) == []


def test_actors_that_cannot_fit_on_this_machine_fail_at_once(tmp_path):
    out = tmp_path / "runs"
    r = forkrl("train", f"run.output_dir={out}", "cluster.num_cpus=2", "learner.num_ranks=2")
    one_red_line(r, "learner.num_ranks=2", "cluster.num_cpus", "3 CPUs")
    r = forkrl("train", f"run.output_dir={out}", "learner.num_ranks=4096")   # the machine's own CPU count
    one_red_line(r, "learner.num_ranks=4096", "the machine")
    assert not out.exists() or not any(out.iterdir())


def test_resume_refuses_unsafe_overrides_and_a_config_file(run_dir):
    one_red_line(forkrl("train", "--resume", str(run_dir), "model.path=/other", "algorithm.clip_high=0.3"),
                 "cannot change model.path, algorithm.clip_high", "run.steps")
    one_red_line(forkrl("train", "configs/demo.yaml", "--resume", str(run_dir)), "overrides only", "configs/demo.yaml")


def test_resume_applies_safe_overrides(run_dir):
    cfg = resume_config(run_dir, ["run.steps=9", "checkpoint.every=3", "metrics.port=0"])
    assert (cfg.run.steps, cfg.checkpoint.every) == (9, 3)
    got, d = open_run_dir(cfg, str(run_dir))
    assert d == run_dir and load_config(run_dir / "config.yaml").run.steps == 9   # recorded for the next resume
    # a config that differs from the run's in what the checkpoint was trained with is refused, not ignored
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": "/other"})})
    with pytest.raises(ConfigError, match="model.path"):
        open_run_dir(other, str(run_dir))


def test_unknown_experiment_and_bad_field(tmp_path):
    one_red_line(forkrl("experiment", "bogus"), "bogus", "known:")
    one_red_line(forkrl("train", "learner.lrr=1"), "learner.lrr", "did you mean learner.lr")


def test_debug_shows_the_traceback():
    for r in (forkrl("--debug", "check", "model.path=/nonexistent"),
              forkrl("check", "model.path=/nonexistent", env={"FORKRL_DEBUG": "1"})):
        assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_help_has_no_type_metavars_and_names_outputs():
    helps = {}
    for cmd in (("--help",), ("train", "--help"), ("check", "--help"), ("grade", "--help"), ("bench", "--help"),
                ("experiment", "--help"), ("models", "build-tiny", "--help"), ("dashboards", "export", "--help")):
        out = helps[cmd] = forkrl(*cmd).stdout
        assert "<bool>" not in out and "<list[str]>" not in out and "<str>" not in out.split("Arguments:")[-1].split("Options:")[0], (cmd, out)
    train = helps["train", "--help"]   # the same commands' output again, not two more processes
    for word in ("metrics.jsonl", "checkpoints/", "report.md", "trackers", "--resume"):
        assert word in train
    assert "docs/results/NAME.md" in helps["experiment", "--help"]


def test_export_mistakes(tmp_path, run_dir):
    one_red_line(forkrl("export", str(tmp_path), str(tmp_path / "out")), "not a forkrl run directory")
    one_red_line(forkrl("export", str(run_dir), str(tmp_path / "out")), "no checkpoint yet")
    ck = run_dir / "checkpoints" / "step-000002"
    ck.mkdir(parents=True)
    (ck / "run_state.json").write_text('{"step": 2, "version": 2}')
    one_red_line(forkrl("export", str(run_dir), "--step", "7", str(tmp_path / "out")), "--step 7", "[2]")
