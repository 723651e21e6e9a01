"""`ray job submit --working-dir . -- forkrl train configs/demo.yaml` against a local `ray start --head`.

The way users start runs on GPU clusters (README, docs/gpu-cluster.md), here on one CPU node: the working
directory is zipped and uploaded (docs/platform.md "Ray job submit uploads the working directory": .gitignore and .rayignore keep .venv, caches and runs
out of the zip), the job's driver joins the running cluster through RAY_ADDRESS and places its actors there.
"""

import json
import os
import secrets
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` with its own temp dir, ports and auth token, stopped afterwards. Ray >= 2.59
    turns token authentication on for local clusters: the token reaches the CLI and the job through the
    environment (RAY_AUTH_TOKEN), as on a real cluster (docs/gpu-cluster.md)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-job-{os.getpid()}"  # Unix socket paths must stay short
    # --block keeps `ray start` in the foreground as the parent of this head's processes: stopping it stops
    # exactly them (`ray stop` would kill every Ray on the machine, e.g. other tests' sessions)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
           "--disable-usage-stats", "--include-dashboard=true"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:  # the job API answers once the dashboard is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answered (401 without the token)
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.time() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(1)
        yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops the head's processes and exits
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_on_a_started_cluster(ray_head, tmp_path, tiny_model_dir):
    env, dashboard, gcs = ray_head
    out_dir = tmp_path / "runs"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
           "forkrl", "train", "configs/demo.yaml", f"model.path={tiny_model_dir}", "run.steps=2",
           "run.eval_every=0", "rollout.prompts_per_step=4", f"run.output_dir={out_dir}"]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after its dashboard
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        log = job.stdout + job.stderr
        if job.returncode == 0 or "No available agent" not in log or time.time() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-3000:]
    # the working dir went up without the virtualenv or caches (a few MB, not GBs)
    size = [line for line in log.splitlines() if "Uploading package" in line or "working_dir" in line]
    assert not any("GiB" in line for line in size), size
    # the driver joined the started cluster instead of starting its own, and trained two steps there
    assert "joined the Ray cluster" in log, log[-3000:]
    assert env["RAY_AUTH_TOKEN"] not in log
    (run,) = [p for p in out_dir.iterdir() if p.is_dir()]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [int(r["step"]) for r in steps if "time/step_s" in r] == [1, 2]
    assert (run / "report" / "report.md").is_file()
