"""Grafana dashboards built in code (grafana-foundation-sdk), exported as JSON to dashboards/.

Three dashboards over the series of cluster/observe/metrics.py: an overview, entropy and covariance (with the
collapse fit), and throughput and queue. Every query is filtered by the `$run` template variable (values
from `forkrl_info`) and reads the `$datasource` Prometheus. Export is deterministic (sorted keys, fixed
panel ids, no timestamps), so tests can require the checked-in JSON to equal a fresh export.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, DynamicConfigValue, VariableRefresh, VariableSort
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TAGS = ["forkrl", "rl"]


def sel(**labels: str) -> str:
    """Label selector with the run filter first: sel(split="eval") -> {run=~"$run", split="eval"}."""
    return "{" + ", ".join(['run=~"$run"', *(f'{k}="{v}"' for k, v in labels.items())]) + "}"


R = sel()


def q(expr: str, legend: str = "{{run}}") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def ts(title: str, desc: str, unit: str, *targets: prometheus.Dataquery, span: int = 12) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(desc).datasource(DS).unit(unit).span(span).height(8)
         .legend(cb.VizLegendOptions().show_legend(True).display_mode("list").placement("bottom")))
    for i, t in enumerate(targets):
        p.with_target(t.ref_id(chr(ord("A") + i)))
    return p


def single(title: str, desc: str, unit: str, expr: str, decimals: int = 3) -> stat.Panel:
    return (stat.Panel().title(title).description(desc).datasource(DS).unit(unit).decimals(decimals).span(4)
            .height(4).reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
            .with_target(q(expr).ref_id("A")))


def _base(uid: str, title: str, desc: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).description(desc).tags(TAGS).refresh("30s").time("now-6h", "now")
            .timezone("browser").editable()
            .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
            .with_variable(db.QueryVariable("run").label("Run").datasource(DS)
                           .query("label_values(forkrl_info, run)").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                           .sort(VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True)))


# Shared panels: the same question asked from two dashboards gets the same query.
def _entropy_vs_floor() -> timeseries.Panel:
    return ts("Policy entropy and floor",
              "Policy entropy H (Cui et al. Eq. 5) against metrics.entropy_floor. Collapse is the fall of this "
              "curve toward zero; most of it happens early in a run.", "short",
              q(f"forkrl_policy_entropy_nats{R}", "{{run}} H"),
              q(f"forkrl_entropy_floor_nats{R}", "{{run}} floor"))


def _ceiling() -> timeseries.Panel:
    return ts("Eval accuracy vs predicted ceiling",
              "avg@k eval accuracy and the ceiling b - a of the fit R = -a exp(H) + b: the accuracy the run is "
              "predicted to reach when its entropy is spent. The gap is what is left to gain.", "percentunit",
              q(f"forkrl_accuracy_ratio{sel(split='eval', estimator='avg_at_k')}", "{{run}} eval avg@k"),
              q(f"forkrl_collapse_ceiling_ratio{R}", "{{run}} predicted ceiling"))


def _phase_mean() -> timeseries.Panel:
    return ts("Step time by phase (mean)", "Mean seconds per phase over the rate window; phases overlap in "
              "the async loop.", "s",
              q(f"sum by (run, phase) (rate(forkrl_step_phase_seconds_sum{R}[{RATE}])) / "
                f"sum by (run, phase) (rate(forkrl_step_phase_seconds_count{R}[{RATE}]))", "{{run}} {{phase}}"))


def _tokens_per_second() -> timeseries.Panel:
    return ts("Tokens per second", "Generated tokens/s (all generators) and trained tokens/s (all learner ranks).",
              "short",
              q(f"forkrl_generator_tokens_per_second{R}", "{{run}} generate"),
              q(f"forkrl_learner_tokens_per_second{R}", "{{run}} train"))


def _queue_depth() -> timeseries.Panel:
    return ts("Queue depth", "Scored groups on the stream not yet delivered to the learner.", "short",
              q(f"forkrl_queue_depth_groups{R}"))


def overview() -> db.Dashboard:
    return (_base("forkrl-overview", "forkrl / Overview",
                  "One screen per run: where entropy is, where accuracy is heading, and whether the pipeline flows.")
            .with_row(db.Row("Run"))
            .with_panel(single("Step", "Last recorded RL step.", "none", f"forkrl_step{R}", 0))
            .with_panel(single("Weights version", "Version the learner last published.", "none",
                               f"forkrl_weights_version{R}", 0))
            .with_panel(single("Policy entropy", "Current policy entropy (nats).", "short",
                               f"forkrl_policy_entropy_nats{R}"))
            .with_panel(single("Eval accuracy (avg@k)", "Last eval accuracy.", "percentunit",
                               f"forkrl_accuracy_ratio{sel(split='eval', estimator='avg_at_k')}"))
            .with_panel(single("Remaining gain", "Predicted ceiling b - a minus the last eval accuracy: what the "
                               "run can still gain by spending its entropy.", "percentunit",
                               f"forkrl_collapse_ceiling_ratio{R} - ignoring(split, estimator) "
                               f"forkrl_accuracy_ratio{sel(split='eval', estimator='avg_at_k')}"))
            .with_panel(single("Steps to entropy floor",
                               "Steps until entropy reaches the floor at the current slope (Infinity: not "
                               "falling; negative: already below).", "none",
                               f"forkrl_entropy_floor_crossing_step{R} - forkrl_step{R}", 0))
            .with_row(db.Row("Entropy collapse"))
            .with_panel(_entropy_vs_floor())
            .with_panel(_ceiling())
            .with_row(db.Row("Learning"))
            .with_panel(ts("Reward", "Mean total reward per response.", "short",
                           q(f"forkrl_reward_mean{R}", "{{run}} {{split}}")))
            .with_panel(ts("Accuracy", "avg@k and pass@k, train (k = group size) and eval (k = eval_samples).",
                           "percentunit", q(f"forkrl_accuracy_ratio{R}", "{{run}} {{split}} {{estimator}}")))
            .with_panel(ts("Answers extracted", "Share of training responses with an answer the verifier can "
                           "extract; near 0 means the model does not follow the answer format.", "percentunit",
                           q(f"forkrl_answer_extracted_ratio{R}")))
            .with_panel(ts("Steps without learning signal", "Steps in a row where no group's rewards differed or "
                           "almost no answer was extracted, by likely cause; the driver warns (and "
                           "ForkrlNoLearningSignal fires) at the threshold metrics.no_signal_steps.", "none",
                           q(f"forkrl_no_signal_steps{R}", "{{run}} {{cause}}"),
                           q(f"forkrl_no_signal_threshold_steps{R}", "{{run}} threshold")))
            .with_row(db.Row("Pipeline"))
            .with_panel(_tokens_per_second())
            .with_panel(_queue_depth())
            .with_panel(_phase_mean())
            .with_panel(ts("Steps per minute", "RL steps completed per minute.", "short",
                           q(f"rate(forkrl_steps_total{R}[{RATE}]) * 60"))))


def entropy() -> db.Dashboard:
    per_step = f"rate(forkrl_steps_total{R}[{RATE}])"
    return (_base("forkrl-entropy", "forkrl / Entropy and covariance",
                  "Token entropy, the forking-token mask, the entropy-collapse fit and the covariance statistics "
                  "that drive entropy change (Wang et al. 2506.01939; Cui et al. 2505.22617).")
            .with_row(db.Row("Entropy"))
            .with_panel(ts("Policy entropy and token percentiles",
                           "Policy entropy H (Cui et al. Eq. 5: per response, then over prompts), the token mean "
                           "and the p50/p80/p95/p99 token entropies of each training batch. The upper "
                           "percentiles are the forking tokens.", "short",
                           q(f"forkrl_policy_entropy_nats{R}", "{{run}} H"),
                           q(f"forkrl_token_entropy_mean_nats{R}", "{{run}} token mean"),
                           q(f"forkrl_token_entropy_nats{R}", "{{run}} p{{percentile}}")))
            .with_panel(_entropy_vs_floor())
            .with_panel(ts("Forking threshold tau", "Entropy threshold of the top-rho mask (nats).", "short",
                           q(f"forkrl_forking_threshold_nats{R}"), span=8))
            .with_panel(ts("Token shares", "Share of tokens the mask trains on, and share with entropy above "
                           "0.672 nats (the 80th percentile of Qwen3 in the 80/20 paper).", "percentunit",
                           q(f"forkrl_forking_selected_ratio{R}", "{{run}} selected"),
                           q(f"forkrl_token_entropy_above_0672_ratio{R}", "{{run}} H > 0.672"), span=8))
            .with_panel(ts("Entropy coefficient", "Entropy-bonus coefficient alpha (Skywork-OR1 adaptive control).",
                           "short", q(f"forkrl_entropy_coef{R}"), span=8))
            .with_row(db.Row("Collapse fit R = -a exp(H) + b"))
            .with_panel(_ceiling())
            .with_panel(ts("Fit coefficients", "a is the exchange rate of entropy for accuracy; the fit uses "
                           "every (entropy, eval accuracy) pair of the run.", "short",
                           q(f"forkrl_collapse_fit_coefficient{R}", "{{run}} {{coefficient}}")))
            .with_panel(ts("Fit RMSE and points", "Residual of the fit (accuracy units, left) and the number of "
                           "(entropy, eval accuracy) pairs behind it (right). An RMSE close to the remaining gain "
                           "means the ceiling is not yet trustworthy.", "percentunit",
                           q(f"forkrl_collapse_fit_rmse_ratio{R}", "{{run}} rmse"),
                           q(f"forkrl_collapse_fit_points{R}", "{{run}} points"), span=8)
                        .override_by_query("B", [DynamicConfigValue("unit", "none"),
                                                 DynamicConfigValue("custom.axisPlacement", "right")]))
            .with_panel(ts("Entropy slope", "Least-squares slope of entropy over the recent steps (nats/step).",
                           "short", q(f"forkrl_entropy_slope_nats_per_step{R}"), span=8))
            .with_panel(ts("Predicted floor-crossing step", "Step at which entropy reaches the floor at the "
                           "current slope, next to the current step.", "none",
                           q(f"forkrl_entropy_floor_crossing_step{R}", "{{run}} floor at"),
                           q(f"forkrl_step{R}", "{{run}} now"), span=8))
            .with_row(db.Row("Covariance"))
            .with_panel(ts("Token covariance", "Covariance of log-prob and advantage per token (Cui et al. Eq. 10): "
                           "positive covariance lowers entropy.", "short",
                           q(f"forkrl_covariance_mean{R}", "{{run}} mean"),
                           q(f"forkrl_covariance_max{R}", "{{run}} max"),
                           q(f"forkrl_covariance_top_mean{R}", "{{run}} top 0.02% mean"), span=8))
            .with_panel(ts("Sequence covariance per prompt", "Per prompt, the covariance over its responses of "
                           "the length-normalised sequence log-prob and the advantage, mean over prompts (Cui et "
                           "al. Sec. 3.3, Eq. 8/9): what the entropy change tracks in the bandit view.", "short",
                           q(f"forkrl_covariance_sequence_group_mean{R}"), span=8))
            .with_panel(ts("Positive covariance share", "Share of tokens with positive covariance.", "percentunit",
                           q(f"forkrl_covariance_positive_ratio{R}"), span=8))
            .with_panel(ts("Clip-Cov / KL-Cov tokens per step", "Tokens whose gradient Clip-Cov detached or "
                           "KL-Cov penalised, per RL step.", "short",
                           q(f"rate(forkrl_clip_cov_clipped_tokens_total{R}[{RATE}]) / {per_step}",
                             "{{run}} Clip-Cov"),
                           q(f"rate(forkrl_kl_cov_penalized_tokens_total{R}[{RATE}]) / {per_step}",
                             "{{run}} KL-Cov"), span=8))
            .with_row(db.Row("Policy update"))
            .with_panel(ts("Clip fraction", "Share of tokens whose PPO ratio was clipped, by side.", "percentunit",
                           q(f"forkrl_clip_fraction_ratio{R}", "{{run}} {{side}}"), span=6))
            .with_panel(ts("Approximate KL", "KL(pi_old || pi_theta) over response tokens (nats).", "short",
                           q(f"forkrl_approx_kl_nats{R}"), span=6))
            .with_panel(ts("Loss", "Training loss of the step.", "short", q(f"forkrl_loss{R}"), span=6))
            .with_panel(ts("Gradient norm", "Global gradient norm before clipping.", "short",
                           q(f"forkrl_grad_norm{R}"), span=6)))


def throughput() -> db.Dashboard:
    bucket = f"forkrl_rollout_staleness_versions_bucket{R}"
    return (_base("forkrl-throughput", "forkrl / Throughput and queue",
                  "Generation and training speed, the trajectory queue, staleness, sampling and weight sync.")
            .with_row(db.Row("Throughput"))
            .with_panel(_tokens_per_second())
            .with_panel(ts("Step duration", "Mean wall time of an RL step over the rate window.", "s",
                           q(f"rate(forkrl_step_duration_seconds_sum{R}[{RATE}]) / "
                             f"rate(forkrl_step_duration_seconds_count{R}[{RATE}])")))
            .with_panel(_phase_mean())
            .with_panel(ts("Step time by phase (p90)", "90th percentile of each phase's seconds.", "s",
                           q(f"histogram_quantile(0.9, sum by (run, phase, le) "
                             f"(rate(forkrl_step_phase_seconds_bucket{R}[{RATE}])))", "{{run}} {{phase}}")))
            .with_row(db.Row("Queue"))
            .with_panel(_queue_depth())
            .with_panel(ts("Groups per second", "Scored groups added to the stream, trained on, and dropped as "
                           "too stale.", "short",
                           q(f"rate(forkrl_queue_produced_groups_total{R}[{RATE}])", "{{run}} produced"),
                           q(f"rate(forkrl_queue_consumed_groups_total{R}[{RATE}])", "{{run}} consumed"),
                           q(f"rate(forkrl_queue_stale_dropped_groups_total{R}[{RATE}])", "{{run}} stale dropped")))
            .with_panel(ts("Staleness quantiles", "Versions between the learner and the rollouts it reads.",
                           "short",
                           q(f"histogram_quantile(0.5, sum by (run, le) (rate({bucket}[{RATE}])))", "{{run}} p50"),
                           q(f"histogram_quantile(0.9, sum by (run, le) (rate({bucket}[{RATE}])))", "{{run}} p90")))
            .with_panel(heatmap.Panel().title("Staleness distribution")
                        .description("Groups read per second by staleness (versions).").datasource(DS)
                        .span(12).height(8).calculate(False)
                        .with_target(q(f"sum by (le) (rate({bucket}[{RATE}]))", "{{le}}")
                                     .format(PromQueryFormat.HEATMAP).ref_id("A")))
            .with_row(db.Row("Sampling"))
            .with_panel(ts("Dynamic-sampling drop share", "Share of graded groups dropped because all their "
                           "rewards were equal (DAPO).", "percentunit",
                           q(f"forkrl_dynamic_sampling_drop_ratio{R}"), span=8))
            .with_panel(ts("Dynamic-sampling refill rounds", "Generation batches after the first that DAPO's "
                           "refill sampled to fill the step with groups with signal (reward.max_gen_batches).",
                           "none", q(f"forkrl_dynamic_sampling_refill_rounds{R}"), span=8))
            .with_panel(ts("Response length", "Mean and longest response (tokens).", "short",
                           q(f"forkrl_response_length_mean_tokens{R}", "{{run}} mean"),
                           q(f"forkrl_response_length_max_tokens{R}", "{{run}} max"), span=8))
            .with_panel(ts("Truncated responses", "Share of responses cut at max_new_tokens.", "percentunit",
                           q(f"forkrl_response_truncated_ratio{R}"), span=8))
            .with_panel(ts("Forking-aware sampling: share at T_high", "Share of sampled training positions "
                           "whose entropy reached rollout.forking_temperature.threshold (sampled at T_high).",
                           "percentunit", q(f"forkrl_forking_sampling_high_ratio{R}"), span=8))
            .with_panel(ts("Forking-aware sampling: entropy at T_high", "Mean entropy (temperature 1) of the "
                           "positions sampled at T_high (nats).", "short",
                           q(f"forkrl_forking_sampling_high_entropy_nats{R}"), span=8))
            .with_row(db.Row("Weight sync"))
            .with_panel(ts("Sync duration", "Seconds per weight sync.", "s",
                           q(f"forkrl_weight_sync_duration_seconds{R}"), span=6))
            .with_panel(ts("Sync size", "Bytes broadcast per weight sync.", "bytes",
                           q(f"forkrl_weight_sync_size_bytes{R}"), span=6))
            .with_panel(ts("Syncs and failures per minute", "Successful and failed weight syncs.", "short",
                           q(f"rate(forkrl_weight_syncs_total{R}[{RATE}]) * 60", "{{run}} ok"),
                           q(f"rate(forkrl_weight_sync_failures_total{R}[{RATE}]) * 60", "{{run}} failed"), span=6))
            .with_panel(ts("Time since last sync", "Seconds since the last successful weight sync.", "s",
                           q(f"time() - forkrl_weight_sync_last_success_timestamp_seconds{R}"), span=6))
            .with_panel(ts("Recoveries", "Faults the run recovered from (docs/reliability.md): generators "
                           "replaced, failed syncs, queue-server restarts with and without loss.", "short",
                           q(f"increase(forkrl_generator_replacements_total{R}[{RATE}])", "{{run}} generators replaced"),
                           q(f"increase(forkrl_weight_sync_recoveries_total{R}[{RATE}])", "{{run}} syncs recovered"),
                           q(f"increase(forkrl_queue_server_restarts_total{R}[{RATE}])", "{{run}} queue restarts"),
                           q(f"increase(forkrl_queue_server_lost_total{R}[{RATE}])", "{{run}} queue lost"),
                           span=12)))


DASHBOARDS = {"overview": overview, "entropy-covariance": entropy, "throughput-queue": throughput}


def render(name: str) -> dict:
    """The dashboard as a JSON-ready dict, panel ids numbered in layout order (Grafana needs them unique)."""
    model = json.loads(json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder))
    for i, panel in enumerate(model["panels"], start=1):
        panel["id"] = i
    return model


def to_json(model: dict) -> str:
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(out_dir: str | Path) -> list[Path]:
    """Write dashboards/<name>.json for every dashboard; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DASHBOARDS:
        path = out / f"{name}.json"
        path.write_text(to_json(render(name)), encoding="utf-8")
        paths.append(path)
    return paths


def upload_payload(model: dict, folder_uid: str) -> dict:
    """Body of Grafana's POST /api/dashboards/db: overwrite by uid, into the folder."""
    return {"dashboard": {**model, "id": None}, "folderUid": folder_uid, "overwrite": True,
            "message": "forkrl dashboards push"}


def push(url: str, token: str, folder: str = "forkrl") -> list[str]:
    """Create `folder` if missing and upload every dashboard (overwriting by uid); returns their uids."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    api = GrafanaApi.from_url(url, credential=token)
    try:
        folders = {f["title"]: f["uid"] for f in api.folder.get_all_folders()}
        folder_uid = folders.get(folder) or api.folder.create_folder(folder)["uid"]
        uids = []
        for name in DASHBOARDS:
            uids.append(api.dashboard.update_dashboard(upload_payload(render(name), folder_uid))["uid"])
    except (GrafanaException, OSError) as e:  # OSError covers niquests' connection errors
        raise RuntimeError(f"cannot push dashboards to Grafana at {url}: {e}") from e
    return uids
