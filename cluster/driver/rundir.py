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

from cluster.config import Config, ConfigError, dump_config, load_config, parse_overrides

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


# What `--resume RUN key=value` may change: how long the run goes on and how it is watched, saved and placed,
# never what the checkpoint was trained with (the model, data, algorithm, batch shapes, learner ranks).
SAFE_ON_RESUME = ("run.steps", "run.eval_every", "checkpoint.", "metrics.", "cluster.", "sync.timeout_s",
                  "queue.password", "queue.block_timeout_s", "queue.read_timeout_s", "queue.reconnect_s",
                  "queue.claim_idle_s", "reward.timeout_s", "reward.worker_memory_mb", "rollout.kv_cache_gib",
                  "rollout.max_num_seqs", "rollout.threads", "learner.threads",
                  "learner.setup_timeout_s")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _unsafe(keys: list[str]) -> list[str]:
    return [k for k in keys if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_ON_RESUME)]


def _refuse(unsafe: list[str], run_dir: Path) -> ConfigError:
    return ConfigError(f"--resume {run_dir} cannot change {', '.join(unsafe)} (the checkpoint was trained with "
                       f"the run's own values); it may change {', '.join(SAFE_ON_RESUME)}")


def run_config_path(resume: str | Path) -> Path:
    run_dir = Path(resume).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {resume}: not a forkrl run directory (no config.yaml)")
    return run_dir / "config.yaml"


def resume_config(resume: str | Path, overrides: list[str]) -> Config:
    """The run's own config with the overrides applied: the safe ones (SAFE_ON_RESUME); any other is a
    ConfigError naming it (an override is never silently ignored)."""
    path = run_config_path(resume)
    unsafe = _unsafe(list(_flat(parse_overrides(overrides))))
    if unsafe:
        raise _refuse(unsafe, path.parent)
    return load_config(path, overrides)


def open_run_dir(cfg: Config, resume: str | None) -> tuple[Config, Path]:
    """A new run directory holding cfg, or (on --resume) the existing one, cfg being its config with safe
    changes only (`resume_config`); the run's config.yaml then records them."""
    if resume:
        path = run_config_path(resume)
        saved = _flat(load_config(path).model_dump(mode="json"))
        now = _flat(public_config(cfg).model_dump(mode="json"))
        unsafe = _unsafe([k for k in now if now[k] != saved.get(k)])
        if unsafe:
            raise _refuse(unsafe, path.parent)
        path.write_text(dump_config(public_config(cfg)))
        return cfg, path.parent
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
