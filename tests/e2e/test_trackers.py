"""metrics.trackers on a real short `forkrl train` run of the tiny model, read back with each library's own
reader: the mlflow client on the run's file store, tensorboard's EventAccumulator, the wandb offline run files
(WANDB_MODE=offline) decoded with wandb's own protobuf records. A resume continues the same tracker runs."""

import json
import math
import os
import struct
from pathlib import Path

import subprocess
import sys

import pytest

from tests.e2e.test_train import ROOT, rows   # the `trackers` extra is part of `make setup`: no skips


def train(*args: str, timeout: float = 900) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "cluster.cli", "train", *args], cwd=ROOT, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert p.returncode == 0, p.stdout[-5000:]
    return p.stdout


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: wandb's LevelDB-style log (32 KiB blocks; 7-byte record headers: crc32,
    length, type FULL/FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
    return out


def test_three_trackers_at_once_and_resume_continues_them(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    base = [f"model.path={tiny_model_dir}", "run.eval_every=2", "data.train_size=16", "data.eval_size=8",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.eval_samples=1"]
    train(f"run.output_dir={out}", *base, "run.steps=2", "metrics.trackers=[wandb,mlflow,tensorboard]")
    (run_dir,) = list(out.iterdir())
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow", "tensorboard"}
    train("--resume", str(run_dir), "run.steps=3")          # the safe override is applied, the trackers go on
    assert json.loads((run_dir / "trackers.json").read_text()) == ids

    recs = rows(run_dir)
    steps = [int(r["step"]) for r in recs if "time/step_s" in r]
    assert steps == [1, 2, 3]
    reward = {int(r["step"]): r["reward/mean"] for r in recs if "time/step_s" in r}
    evals = {int(r["step"]): r["eval/accuracy_avg"] for r in recs if "eval/accuracy_avg" in r}
    assert sorted(evals) == [0, 2, 3]
    last = recs[-1]
    assert "collapse/points" in last

    # mlflow: one run (the resumed start continued it), every series at its step, the config as params, plots
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "reward/mean")} == reward
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/accuracy_avg")} == evals
    assert client.get_metric_history(run.info.run_id, "collapse/points")[-1].value == last["collapse/points"]
    assert run.data.params["model.path"] == tiny_model_dir and run.data.params["run.steps"] == "2"
    assert run.data.params["metrics.trackers"] == '["wandb", "mlflow", "tensorboard"]'
    assert "report/reward.png" in [a.path for a in client.list_artifacts(run.info.run_id, "report")]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "forkrl" and len(client.search_runs([exp.experiment_id])) == 1

    # tensorboard: the event files of both starts in one directory, scalars at their steps, the plots as images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    got = {e.step: e.value for e in ea.Scalars("reward/mean")}
    assert sorted(got) == [1, 2, 3] and all(math.isclose(got[s], reward[s], rel_tol=1e-6) for s in got)
    assert sorted(e.step for e in ea.Scalars("eval/accuracy_avg")) == [0, 2, 3]
    assert "entropy/mean" in ea.Tags()["scalars"] and "collapse/points" in ea.Tags()["scalars"]
    assert {"report/reward", "report/collapse"} <= set(ea.Tags()["images"])
    assert ea.Images("report/reward")[-1].step == 3 and ea.Images("report/reward")[-1].width > 100

    # wandb: two offline run files of one run id (wandb sync joins them), history at every step, config, images
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{ids['wandb']}.wandb"] * 2
    history, config, names = {}, {}, set()
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                item: dict = {}
                for i in r.history.item:   # an image is flattened into nested keys: [name, field]
                    *path, leaf = [i.key] if i.key else list(i.nested_key)
                    node = item
                    for part in path:
                        node = node.setdefault(part, {})
                    node[leaf] = json.loads(i.value_json)
                history.setdefault(int(item["_step"]), {}).update(item)
            elif kind == "run":
                names.add((r.run.run_id, r.run.display_name, r.run.project))
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert names == {(ids["wandb"], run_dir.name, "forkrl")}
    assert {s: h["reward/mean"] for s, h in history.items() if "reward/mean" in h} == reward
    assert {s: h["eval/accuracy_avg"] for s, h in history.items() if "eval/accuracy_avg" in h} == evals
    image = history[3]["report/reward"]
    assert image["_type"] == "image-file" and (files[-1].parent / "files" / image["path"]).stat().st_size > 1000
    assert config["learner"]["lr"] == pytest.approx(3e-4) and config["model"]["path"] == tiny_model_dir


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, caplog):
    """A server that is down (mlflow) and a directory that cannot be made (tensorboard): one warning each, the
    others keep logging."""
    from cluster.config import MetricsConfig
    from cluster.observe.trackers import Trackers

    blocker = tmp_path / "file"
    blocker.write_text("")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = MetricsConfig(trackers=["mlflow", "tensorboard"], mlflow_uri="http://127.0.0.1:9",
                        tensorboard_dir=str(blocker / "tb"))
    caplog.set_level("WARNING", logger="forkrl")
    t = Trackers(cfg, tmp_path, "run-x")
    for step in range(3):
        t.log(step, {"reward/mean": 0.5})
    t.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert any("tracker mlflow failed" in w for w in warnings) and any("tracker tensorboard" in w for w in warnings)
    assert t.on == []
