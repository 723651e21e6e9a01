"""Experiment trackers: the run's series in wandb, mlflow or tensorboard (`metrics.trackers`), each through its
own library (the `trackers` extra: wandb, mlflow-skinny, tensorboard).

What each receives: the resolved config as run parameters (at the start), every metrics.jsonl line (every
StepStats series, the evaluations and the collapse fit `collapse/*`) at its step, the final values as the run's
summary, and the report's plots as images at the end. Each tracker's run id is kept in `<run_dir>/trackers.json`
so a resumed run (`forkrl train --resume`) continues the same tracker run.

A tracker that fails (server down, bad key, missing library) logs one warning naming it and is off for the
rest of the run: it never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from cluster.config import MetricsConfig

log = logging.getLogger("forkrl")

IDS = "trackers.json"   # in the run directory: {tracker name: its run id}


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config dict as dotted run parameters (`learner.lr` -> '0.0003')."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


class Tracker:
    """One experiment tracker. `run_id` is None for a new run, else the id a previous start of this run kept."""

    name = ""

    def __init__(self, cfg: MetricsConfig, run_dir: Path, run_name: str, run_id: str | None):
        self.cfg, self.run_dir, self.run_name = cfg, run_dir, run_name
        self.run_id = run_id or secrets.token_hex(8)

    def params(self, config: dict[str, Any]) -> None:
        """The resolved config (nested dict), once per start."""

    def log(self, step: int, values: dict[str, float]) -> None:
        """One metrics.jsonl line at its step."""

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        """The report's plots (name -> PNG file) at the last step."""

    def close(self) -> None:
        """Flush and end the run (a resumed start continues it)."""


class Wandb(Tracker):
    """Weights & Biases (verl trainer.logger=wandb, OpenRLHF --use_wandb, TRL report_to=wandb); WANDB_MODE=offline
    writes `<run_dir>/wandb/offline-run-*/run-<id>.wandb` for `wandb sync`."""

    name = "wandb"

    def __init__(self, *a: Any):
        super().__init__(*a)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=self.cfg.project, name=self.run_name, id=self.run_id, resume="allow",
                              dir=str(self.run_dir), reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      save_code=False))

    def params(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        self.run.log({f"report/{k}": self._wandb.Image(str(p)) for k, p in pngs.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow(Tracker):
    """MLflow (verl trainer.logger=mlflow, TRL report_to=mlflow) through MlflowClient: metrics.mlflow_uri, or
    MLFLOW_TRACKING_URI, or the file store `<run_dir>/mlruns` (mlflow-skinny has no SQL store; a sqlite:// uri
    needs the full mlflow)."""

    name = "mlflow"

    def __init__(self, cfg: MetricsConfig, run_dir: Path, run_name: str, run_id: str | None):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local store needs no server
        self.client = MlflowClient(tracking_uri=uri)
        super().__init__(cfg, run_dir, run_name, run_id)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(cfg.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.project)
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"forkrl.run_dir": str(run_dir)}
                                                 ).info.run_id
        self._params_logged = bool(run_id)

    def params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self._params_logged:  # mlflow params are immutable; a resume may only change the safe ones
            return
        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self._params_logged = True

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        from cluster.observe.metrics import STEP_STATS

        # mlflow's file store keeps one file per metric under its key's folders: a key that is also a group
        # ('loss' beside 'loss/pg') is logged as '<key>/total' (in every store, so the names never differ)
        groups = {k[:i] for k in (*STEP_STATS, *values) for i in range(len(k)) if k[i] == "/"}
        now = int(time.time() * 1000)
        metrics = [Metric(f"{k}/total" if k in groups else k, float(v), now, step)
                   for k, v in values.items() if k != "step" and math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        for p in pngs.values():
            self.client.log_artifact(self.run_id, str(p), artifact_path="report")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tensorboard(Tracker):
    """TensorBoard event files (verl trainer.logger=tensorboard, OpenRLHF --use_tensorboard, TRL
    report_to=tensorboard) in metrics.tensorboard_dir or `<run_dir>/tensorboard`; a resumed run appends to the
    same directory."""

    name = "tensorboard"

    def __init__(self, *a: Any):
        super().__init__(*a)
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(self.cfg.tensorboard_dir or self.run_dir / "tensorboard")
        self.writer = SummaryWriter(str(self.dir))

    def params(self, config: dict[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in flat_params(config).items())
        self.writer.add_text("config", text, 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for k, p in pngs.items():
            self.writer.add_image(f"report/{k}", np.asarray(Image.open(p).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


KINDS: dict[str, type[Tracker]] = {t.name: t for t in (Wandb, Mlflow, Tensorboard)}


class Trackers:
    """The run's trackers as one: each call goes to every tracker still on; a failure warns once and turns it
    off."""

    def __init__(self, cfg: MetricsConfig, run_dir: Path, run_name: str):
        self.run_dir = Path(run_dir)
        ids = self._ids()
        self.on: list[Tracker] = []
        for name in cfg.trackers:
            t = self._call(name, lambda n=name: KINDS[n](cfg, self.run_dir, run_name, ids.get(n)))
            if t is not None:
                self.on.append(t)
                ids[name] = t.run_id
        if self.on:
            (self.run_dir / IDS).write_text(json.dumps(ids))

    def _ids(self) -> dict[str, str]:
        try:
            return json.loads((self.run_dir / IDS).read_text())
        except (OSError, ValueError):
            return {}

    def _call(self, name: str, fn) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("tracker %s failed (%s: %s); it is off for the rest of the run", name, type(e).__name__,
                        msg[:300])
            self.on = [t for t in self.on if t.name != name]
            return None

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.on):
            self._call(t.name, lambda t=t: getattr(t, method)(*args))

    def params(self, config: dict[str, Any]) -> None:
        self._each("params", config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._each("log", int(step), {k: float(v) for k, v in values.items() if isinstance(v, (int, float))})

    def images(self, step: int, report_dir: Path) -> None:
        pngs = {p.stem: p for p in sorted(Path(report_dir).glob("*.png"))}
        if pngs:
            self._each("images", int(step), pngs)

    def close(self) -> None:
        self._each("close")
        self.on = []
