"""The run directory: its layout, the resolved config, the ledger, metrics.jsonl and the checkpoints.

    <run.output_dir>/<run.name>-<stamp>/
        config.yaml          the resolved config without the queue password (`public_config`)
        ledger.jsonl         what happened to every group id (generated, pushed, trained) and every fault
        metrics.jsonl        one line of statistics per step (and the step-0 evaluation)
        metrics_url          the Prometheus exporter's address
        pids.json            the run's processes (operators, fault tests)
        queue/               the queue server's append-only file (queue.aof)
        checkpoints/step-NNNNNN/{ds/, rank<r>.json, run_state.json}
        report/              written at the end (cluster.observe.report)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from cluster.config import Config, dump_config, load_config

log = logging.getLogger("forkrl")

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
LEDGER = "ledger.jsonl"   # what happened to every group id: generated, pushed, trained; and every fault
PIDS = "pids.json"        # the run's processes (operators, fault tests)
METRICS = "metrics.jsonl"


def new_run_dir(cfg: Config) -> Path:
    base = Path(cfg.run.output_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{cfg.run.name}-{stamp}"
    k = 1
    while d.exists():
        d, k = base / f"{cfg.run.name}-{stamp}-{k}", k + 1
    (d / CHECKPOINTS).mkdir(parents=True)
    return d


def public_config(cfg: Config) -> Config:
    """The config as written to the run directory: no queue password, in the field or in the URL (on --resume
    it comes from FORKRL_REDIS_PASSWORD)."""
    from urllib.parse import urlparse

    q, url = cfg.queue, cfg.queue.url
    if url and "@" in urlparse(url).netloc:
        userinfo, _, host = urlparse(url).netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        url = urlparse(url)._replace(netloc=f"{user}@{host}" if user else host).geturl()
    return cfg.model_copy(update={"queue": q.model_copy(update={"password": None, "url": url})})


def open_run_dir(cfg: Config, resume: str | None) -> tuple[Config, Path]:
    """A new run directory holding cfg, or (on --resume) the existing one and the config it holds."""
    if resume:
        run_dir = Path(resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a forkrl run directory (no config.yaml)")
        return load_config(run_dir / "config.yaml"), run_dir
    run_dir = new_run_dir(cfg)
    (run_dir / "config.yaml").write_text(dump_config(public_config(cfg)))
    return cfg, run_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / RUN_STATE).is_file())
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, step: int, keep_last: int, save_learner: Callable[[str], Any],
                    state: dict[str, Any]) -> Path:
    """checkpoints/step-NNNNNN: the learner's part (`save_learner(dir)`) and the driver's `state`, written into
    a temporary directory renamed when complete; only the last `keep_last` checkpoints are kept."""
    ckdir = run_dir / CHECKPOINTS
    tmp, final = ckdir / f".tmp-step-{step:06d}", ckdir / f"step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_learner(str(tmp))
    (tmp / RUN_STATE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic: a checkpoint dir either has everything or does not exist
    for old in sorted(ckdir.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def run_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / RUN_STATE).read_text())


class RunLog:
    """The two append-only files of a run, each line flushed at once: it must survive a crash of the driver."""

    def __init__(self, run_dir: Path):
        self.metrics = open(run_dir / METRICS, "a")
        self.ledger = open(run_dir / LEDGER, "a")

    def event(self, event: str, step: int, **fields: Any) -> None:
        """One ledger line: `step` is the step under way (1-based)."""
        self.ledger.write(json.dumps({"event": event, "step": step, **fields}) + "\n")
        self.ledger.flush()

    def stats(self, st: dict[str, float]) -> None:
        self.metrics.write(json.dumps(st) + "\n")
        self.metrics.flush()

    def close(self) -> None:
        self.metrics.close()
        self.ledger.close()


def write_pids(run_dir: Path, pids: dict[str, Any]) -> None:
    (run_dir / PIDS).write_text(json.dumps(pids))
