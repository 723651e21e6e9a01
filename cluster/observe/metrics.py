"""Prometheus exporter: the canonical StepStats keys, their metrics, and the /metrics endpoint.

The driver hands `MetricsExporter.record(step, stats)` one plain `dict[str, float]` per RL step, keyed by
the canonical names in `STEP_STATS` below (the one place they are defined; docs/metrics.md explains each).
Per-step values become gauges, per-step counts are added to counters, distributions are histogram
observations; every series carries a `run` label so one Prometheus and one dashboard serve many runs.
The exporter owns a `CollapseTracker` (cluster/observe/collapse.py) fed from the same stats, and exports its fit.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from cluster.observe.collapse import CollapseTracker
from cluster.config import MetricsConfig

Kind = Literal["gauge", "counter", "histogram"]

# Staleness is a small integer number of weight versions; async runs use k <= ~8 (AReaL, prime-rl).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
# Step phases span a tiny CPU model (tens of ms) to a 32B GPU recipe (many minutes).
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
PHASES = ("generate", "grade", "queue", "train", "sync")


@dataclass(frozen=True)
class Metric:
    """How one StepStats key is exported: a gauge is set, a counter incremented, a histogram observed."""

    name: str
    kind: Kind
    help: str
    labels: tuple[tuple[str, str], ...] = ()


def _g(name: str, help: str, **labels: str) -> Metric:
    return Metric(name, "gauge", help, tuple(labels.items()))


def _c(name: str, help: str) -> Metric:
    return Metric(name, "counter", help)


_ENTROPY_Q = "Token entropy percentile of the step's response tokens (nats)"
_ACC = ("Accuracy (share of correct responses): avg_at_k is the mean over k samples per prompt, pass_at_k the "
        "share of prompts with at least one correct sample (train: k = group size; eval: k = eval_samples)")
_REWARD = "Mean total reward per response (correctness plus shaping)"
_CLIP = "Share of response tokens whose PPO ratio was clipped on this side (low: A<0, r<1-eps_low; high: A>0)"
_FIT = "Coefficient of the R-H fit R = -a exp(H) + b (Cui et al. 2505.22617)"
_NO_SIGNAL = ("Steps in a row without learning signal (no group whose rewards differ, or almost no extractable "
              "answer), under their likely cause")
_PHASE = "Wall time of one step phase (seconds; phases overlap in the async loop)"

STEP_STATS: dict[str, Metric] = {
    # Weights
    "learner/version": _g("forkrl_weights_version", "Weights version the learner last published"),
    # Entropy (80/20: Wang et al. 2506.01939; Entropy Mechanism: Cui et al. 2505.22617)
    "entropy/policy": _g("forkrl_policy_entropy_nats",
                         "Policy entropy H (Cui et al. Eq. 5): token entropy averaged per response, then over "
                         "the prompts (nats); the H of the collapse fit"),
    "entropy/mean": _g("forkrl_token_entropy_mean_nats", "Mean token entropy of the step's response tokens (nats)"),
    "entropy/p50": _g("forkrl_token_entropy_nats", _ENTROPY_Q, percentile="50"),
    "entropy/p80": _g("forkrl_token_entropy_nats", _ENTROPY_Q, percentile="80"),
    "entropy/p95": _g("forkrl_token_entropy_nats", _ENTROPY_Q, percentile="95"),
    "entropy/p99": _g("forkrl_token_entropy_nats", _ENTROPY_Q, percentile="99"),
    "tau": _g("forkrl_forking_threshold_nats", "Forking-token entropy threshold tau of the top-rho mask"),
    "selected_frac": _g("forkrl_forking_selected_ratio", "Share of response tokens the mask trains on"),
    "entropy/frac_above_0.672": _g("forkrl_token_entropy_above_0672_ratio",
                                   "Share of response tokens with entropy above 0.672 nats (80/20 paper)"),
    "learner/entropy_coef": _g("forkrl_entropy_coef", "Entropy-bonus coefficient alpha of this step"),
    # Covariance of log-prob and advantage per token (Cui et al. Eq. 10)
    "cov/mean": _g("forkrl_covariance_mean", "Mean token covariance of log-prob and advantage"),
    "cov/max": _g("forkrl_covariance_max", "Largest token covariance of log-prob and advantage"),
    "cov/top_0.02pct_mean": _g("forkrl_covariance_top_mean", "Mean covariance of the top 0.02% tokens by covariance"),
    "cov/frac_positive": _g("forkrl_covariance_positive_ratio", "Share of tokens with positive covariance"),
    "cov/seq_group_mean": _g("forkrl_covariance_sequence_group_mean",
                             "Per-prompt covariance of length-normalised sequence log-prob and advantage, "
                             "mean over prompts (Cui et al. Sec. 3.3, Eq. 8/9)"),
    "clip_cov/clipped": _c("forkrl_clip_cov_clipped_tokens_total", "Tokens whose gradient Clip-Cov detached"),
    "kl_cov/penalised": _c("forkrl_kl_cov_penalized_tokens_total", "Tokens KL-Cov penalised"),
    # Policy loss
    "clip/low_frac": _g("forkrl_clip_fraction_ratio", _CLIP, side="low"),
    "clip/high_frac": _g("forkrl_clip_fraction_ratio", _CLIP, side="high"),
    "kl/approx": _g("forkrl_approx_kl_nats", "Approximate KL(pi_old || pi_theta) over response tokens (nats)"),
    "loss": _g("forkrl_loss", "Training loss of the step as the learner reports it"),
    "learner/grad_norm": _g("forkrl_grad_norm", "Global gradient norm before clipping (mean over updates)"),
    # Reward and accuracy
    "reward/mean": _g("forkrl_reward_mean", _REWARD, split="train"),
    "reward/accuracy": _g("forkrl_accuracy_ratio", _ACC, split="train", estimator="avg_at_k"),
    "train/accuracy_pass": _g("forkrl_accuracy_ratio", _ACC, split="train", estimator="pass_at_k"),
    "eval/reward_mean": _g("forkrl_reward_mean", _REWARD, split="eval"),
    "eval/accuracy_avg": _g("forkrl_accuracy_ratio", _ACC, split="eval", estimator="avg_at_k"),
    "eval/accuracy_pass": _g("forkrl_accuracy_ratio", _ACC, split="eval", estimator="pass_at_k"),
    # Responses and sampling
    "response/length_mean": _g("forkrl_response_length_mean_tokens", "Mean response length (tokens)"),
    "response/length_max": _g("forkrl_response_length_max_tokens", "Longest response of the step (tokens)"),
    "response/truncated_share": _g("forkrl_response_truncated_ratio", "Share of responses cut at max_new_tokens"),
    # Forking-aware sampling (rollout.forking_temperature, actors/forking.py)
    "generator/forking_high_share": _g("forkrl_forking_sampling_high_ratio",
                                       "Share of the step's sampled positions drawn at T_high (entropy >= threshold)"),
    "generator/forking_high_entropy": _g("forkrl_forking_sampling_high_entropy_nats",
                                         "Mean entropy at temperature 1 of the positions sampled at T_high (nats)"),
    "reward/extract_rate": _g("forkrl_answer_extracted_ratio",
                              "Share of the step's training responses with an extractable answer"),
    "sampling/drop_share": _g("forkrl_dynamic_sampling_drop_ratio",
                              "Share of graded groups DAPO dynamic sampling dropped (all rewards equal)"),
    "sampling/refill_rounds": _g("forkrl_dynamic_sampling_refill_rounds",
                                 "DAPO refill rounds of the step (generation batches after the first)"),
    # Learning signal (cluster/driver/nosignal.py): the streak under its likely cause, 0 for the others
    **{f"no_signal/{c}": _g("forkrl_no_signal_steps", _NO_SIGNAL, cause=c)
       for c in ("answer_format", "too_hard", "too_easy")},
    # Queue
    "queue/undelivered": _g("forkrl_queue_depth_groups", "Scored groups on the stream not yet delivered"),
    "queue/produced": _c("forkrl_queue_produced_groups_total", "Scored groups added to the stream"),
    "queue/consumed": _c("forkrl_queue_consumed_groups_total", "Groups the learner trained on and acknowledged"),
    "queue/dropped_stale": _c("forkrl_queue_stale_dropped_groups_total",
                              "Groups the learner read and dropped as staler than max_staleness"),
    # Throughput
    "generator/tokens_per_s": _g("forkrl_generator_tokens_per_second", "Generated tokens per second, all generators"),
    "learner/tokens_per_s": _g("forkrl_learner_tokens_per_second", "Trained tokens per second, all learner ranks"),
    # Weight sync
    "sync/duration_s": _g("forkrl_weight_sync_duration_seconds", "Duration of the step's weight sync"),
    "sync/bytes": _g("forkrl_weight_sync_size_bytes", "Bytes broadcast by the step's weight sync"),
    "sync/failures": _c("forkrl_weight_sync_failures_total", "Failed weight-sync attempts"),
    # Recoveries (docs/reliability.md)
    "fault/generators_replaced": _c("forkrl_generator_replacements_total", "Dead or hung generators replaced"),
    "fault/sync_failed": _c("forkrl_weight_sync_recoveries_total", "Failed weight syncs recovered by replacement"),
    "fault/queue_lost": _c("forkrl_queue_server_lost_total", "Queue server restarts that lost the run's data"),
    "fault/queue_restarted": _c("forkrl_queue_server_restarts_total", "Queue server restarts recovered intact"),
    # Step time
    "time/step_s": Metric("forkrl_step_duration_seconds", "histogram", "Wall time of one RL step"),
    **{f"time/{p}_s": Metric("forkrl_step_phase_seconds", "histogram", _PHASE, (("phase", p),)) for p in PHASES},
}

# Read-group counts by staleness: "queue/staleness/<k>" = groups the learner read this step whose rollout was
# k versions behind (trained on or dropped), one histogram observation each.
STALENESS_PREFIX = "queue/staleness/"
STALENESS = Metric("forkrl_rollout_staleness_versions", "histogram",
                   "Staleness of each group the learner read: learner version minus rollout version")

# Outputs of the collapse tracker: computed by the exporter, never accepted as input.
COLLAPSE_STATS: dict[str, Metric] = {
    "collapse/a": _g("forkrl_collapse_fit_coefficient", _FIT, coefficient="a"),
    "collapse/b": _g("forkrl_collapse_fit_coefficient", _FIT, coefficient="b"),
    "collapse/ceiling": _g("forkrl_collapse_ceiling_ratio", "Predicted eval-accuracy ceiling b - a (at H = 0)"),
    "collapse/rmse": _g("forkrl_collapse_fit_rmse_ratio", "Root-mean-square residual of the R-H fit (accuracy)"),
    "collapse/points": _g("forkrl_collapse_fit_points", "(entropy, eval accuracy) pairs in the R-H fit"),
    "collapse/entropy_slope": _g("forkrl_entropy_slope_nats_per_step",
                                 "Least-squares slope of policy entropy over the recent steps (nats per step)"),
    "collapse/floor_step": _g("forkrl_entropy_floor_crossing_step",
                              "Step at which entropy reaches the floor at the current slope (+Inf if not falling)"),
}

# Series the exporter maintains itself.
OWN = {
    "step": _g("forkrl_step", "RL step the run last recorded"),
    "steps": _c("forkrl_steps_total", "RL steps recorded by this exporter (rate() gives steps per second)"),
    "floor": _g("forkrl_entropy_floor_nats", "Entropy floor of the collapse tracker (metrics.entropy_floor)"),
    "no_signal_after": _g("forkrl_no_signal_threshold_steps",
                          "Steps without learning signal in a row before the driver warns (metrics.no_signal_steps)"),
    "syncs": _c("forkrl_weight_syncs_total", "Successful weight syncs"),
    "last_sync": _g("forkrl_weight_sync_last_success_timestamp_seconds",
                    "Unix time of the last successful weight sync (the exporter's start until the first)"),
}
INFO_NAME = "forkrl_info"


def metric_names() -> set[str]:
    """Every metric family name the exporter exposes (histograms without their _bucket/_sum/_count)."""
    specs = [*STEP_STATS.values(), STALENESS, *COLLAPSE_STATS.values(), *OWN.values()]
    return {m.name for m in specs} | {INFO_NAME}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("forkrl")
    except PackageNotFoundError:
        return "unknown"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # a scrape every few seconds would flood the driver's log
        pass


def _serve(host: str, port: int, registry: CollectorRegistry) -> ThreadingWSGIServer:
    """prometheus_client.start_http_server, but shut down within 0.1 s instead of its 0.5 s poll."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server = type("_Server", (ThreadingWSGIServer,), {"address_family": family})
    return make_server(host, port, make_wsgi_app(registry), server, handler_class=_Quiet)


_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class MetricsExporter:
    """Owns a CollectorRegistry and serves it on `cfg.host:cfg.port` (port 0 = a free one, see `.port`).

    `info` adds constant labels to `forkrl_info` (e.g. model, policy_loss); `version` is added always.
    """

    def __init__(self, cfg: MetricsConfig, run: str, info: Mapping[str, str] | None = None) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty string, got {run!r}")
        info = {"version": _package_version(), **dict(info or {})}
        for k in info:
            if not _LABEL.match(k) or k.startswith("__") or k == "run":
                raise ValueError(f"info label {k!r} is not a valid Prometheus label name (or is 'run')")
        self.run = run
        self.registry = CollectorRegistry(auto_describe=True)
        self.tracker = CollapseTracker(cfg.entropy_floor, min_points=cfg.fit_min_points, window=cfg.slope_window)
        self._families: dict[str, Gauge | Counter | Histogram] = {}
        for m in [*STEP_STATS.values(), STALENESS, *COLLAPSE_STATS.values(), *OWN.values()]:
            self._family(m)
        Info(INFO_NAME.removesuffix("_info"), "forkrl build and run information", ["run"],
             registry=self.registry).labels(run).info({k: str(v) for k, v in info.items()})
        # Counters and histograms start at 0 so that increase() and rate() see the first step.
        for m in [*STEP_STATS.values(), STALENESS, OWN["syncs"], OWN["steps"]]:
            if m.kind != "gauge":
                self._child(m)
        self._child(OWN["floor"]).set(cfg.entropy_floor)
        self._child(OWN["no_signal_after"]).set(cfg.no_signal_steps)
        self._child(OWN["last_sync"]).set(time.time())
        try:
            self._server = _serve(cfg.host, cfg.port, self.registry)
        except OSError as e:
            raise OSError(f"cannot serve /metrics on {cfg.host}:{cfg.port} (metrics.host, metrics.port): {e}") from e
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"forkrl-metrics-{run}", daemon=True)
        self._thread.start()
        self.host = cfg.host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def _family(self, m: Metric) -> Gauge | Counter | Histogram:
        fam = self._families.get(m.name)
        if fam is not None:
            return fam
        labels = ["run", *(k for k, _ in m.labels)]
        if m.kind == "gauge":
            fam = Gauge(m.name, m.help, labels, registry=self.registry)
        elif m.kind == "counter":
            # prometheus_client appends _total itself; the spec keeps the exposed name.
            fam = Counter(m.name.removesuffix("_total"), m.help, labels, registry=self.registry)
        else:
            buckets = STALENESS_BUCKETS if m is STALENESS else SECONDS_BUCKETS
            fam = Histogram(m.name, m.help, labels, buckets=buckets, registry=self.registry)
        self._families[m.name] = fam
        return fam

    def _child(self, m: Metric):
        return self._family(m).labels(self.run, *(v for _, v in m.labels))

    def record(self, step: int, stats: Mapping[str, float]) -> dict[str, float]:
        """Export one step's stats; returns them merged with the collapse tracker's `collapse/*` keys.

        Every problem (unknown key, non-number, negative or non-finite count) is reported in one ValueError
        naming the keys, and then nothing at all is recorded.
        """
        staleness = self._validate(step, stats)
        step = int(step)
        # H of the fit: Cui et al. Eq. 5 (entropy/policy); the token mean when a caller has only that
        self.tracker.add(step, stats.get("entropy/policy", stats.get("entropy/mean")), stats.get("eval/accuracy_avg"))
        now = time.time()
        for key, value in stats.items():
            m = STEP_STATS.get(key)
            if m is None:
                continue
            child = self._child(m)
            if m.kind == "gauge":
                child.set(value)
            elif m.kind == "counter":
                child.inc(value)
            else:
                child.observe(value)
        hist = self._child(STALENESS)
        for k, count in staleness:
            for _ in range(count):
                hist.observe(k)
        if "sync/duration_s" in stats:
            self._child(OWN["syncs"]).inc()
            self._child(OWN["last_sync"]).set(now)
        self._child(OWN["step"]).set(step)
        self._child(OWN["steps"]).inc()
        collapse = self.tracker.stats()
        for key, value in collapse.items():
            self._child(COLLAPSE_STATS[key]).set(value)
        return {**stats, **collapse}

    def _validate(self, step: int, stats: Mapping[str, float]) -> list[tuple[int, int]]:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        problems: list[str] = []
        staleness: list[tuple[int, int]] = []
        for key, value in stats.items():
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                problems.append(f"{key}: value {value!r} is not a number")
                continue
            value = float(value)
            if key in COLLAPSE_STATS:
                problems.append(f"{key}: computed by the collapse tracker, not an input")
            elif isinstance(key, str) and key.startswith(STALENESS_PREFIX):
                k = key[len(STALENESS_PREFIX):]
                if not k.isdigit() or not (math.isfinite(value) and value >= 0 and value == int(value)):
                    problems.append(f"{key}: expected queue/staleness/<versions> with a whole count >= 0, "
                                    f"got {value!r}")
                else:
                    staleness.append((int(k), int(value)))
            elif key not in STEP_STATS:
                close = difflib.get_close_matches(str(key), list(STEP_STATS), n=1)
                problems.append(f"{key}: unknown StepStats key" + (f" (did you mean {close[0]}?)" if close else ""))
            elif STEP_STATS[key].kind != "gauge" and not (math.isfinite(value) and value >= 0):
                problems.append(f"{key}: a {STEP_STATS[key].kind} needs a finite value >= 0, got {value!r}")
            elif key in ("entropy/mean", "entropy/policy") and not (math.isfinite(value) and value >= 0):
                problems.append(f"{key}: the collapse fit needs a finite entropy >= 0 nats, got {value!r}")
            elif key == "eval/accuracy_avg" and not 0.0 <= value <= 1.0:
                problems.append(f"{key}: the collapse fit needs an accuracy in [0, 1], got {value!r}")
        if problems:
            raise ValueError("invalid StepStats: " + "; ".join(problems))
        return staleness

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
