"""The held-out evaluation: `evaluate` is the one evaluator, called by the training loop every `run.eval_every`
steps (System.evaluate) and by `forkrl eval MODEL_OR_RUN` (`eval_model`) for any HF directory or a run's
checkpoint.

Both sample rollout.eval_samples (k) responses per held-out problem at rollout.eval_temperature / eval_top_p on
vLLM generator actors (Generator.evaluate), each problem seeded by `actors.generator.request_seed(seed,
prompt_id)` (run.seed in a run), score them with the evaluation's graders (`eval_graders`: the task's
verifier, 1/0, no shaping; in a run the run's own grader actors) and report `stepstats.eval_stats`:
eval/accuracy_avg (avg@k), eval/accuracy_pass (pass@k), eval/extracted (the share of responses with an extractable final answer), eval/length_mean,
eval/entropy_sampled (the mean -log p of the sampled tokens), eval/problems.
Since the seeds depend on the problem alone, `forkrl eval RUN --step N` samples what the run sampled at step N.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from cluster.config import Config, RewardConfig, UserError, load_config
from cluster.types import Prompt, Rollout

log = logging.getLogger("forkrl")

METRICS = {"eval/accuracy_avg": "avg@{k}", "eval/accuracy_pass": "pass@{k}", "eval/extracted": "answer extracted",
           "eval/length_mean": "mean length",
           "eval/entropy_sampled": "entropy (nats/token)", "eval/problems": "problems"}


def eval_reward(reward: RewardConfig) -> RewardConfig:
    """The evaluation's reward: the task's verifier as a plain 1/0 reward (no TTRL, shaping or noise)."""
    return reward.model_copy(update=dict(
        ttrl=False, dynamic_sampling=False, noise_flip_prob=0.0, correct=1.0, incorrect=0.0, format_reward=0.0,
        overlong_buffer=0, rent_coef=0.0, num_graders=1))


def eval_graders(cfg: Config, pool=None):
    """The evaluation's graders, scoring with `eval_reward`: a run's grader pool `pool`
    (GraderPool.scoring_with: the same actors), else (`forkrl eval`) a pool of its own."""
    from actors.grader import GraderPool

    reward = eval_reward(cfg.reward)
    if pool is not None:
        return pool.scoring_with(reward)
    return GraderPool(reward, adv_estimator=cfg.algorithm.adv_estimator, l_max=cfg.rollout.max_new_tokens,
                      seed=cfg.run.seed, num_cpus=cfg.cluster.grader_cpus)


def evaluate(prompts: list[Prompt], generate: Callable[[list[Prompt]], list[Rollout]], graders,
             groups_out: list | None = None) -> dict[str, float]:
    """eval/* of `prompts`: `generate` samples them (Generator.evaluate on the generators), `graders` (an
    `eval_graders` pool) scores them. `groups_out` gets the scored groups (per-problem results)."""
    from cluster.driver.stepstats import eval_stats

    rollouts = generate(prompts)
    groups, _ = graders.score(rollouts)
    if groups_out is not None:
        groups_out.extend(zip(rollouts, groups))
    return eval_stats(rollouts, groups)


def eval_problems(cfg: Config) -> list:
    """The held-out problems of cfg.data: the run's own (load_problems with run.seed), or the rows of
    data.eval_path alone for a file task given one (`forkrl eval --data FILE`)."""
    from cluster.data.tasks import file_problems, load_problems

    if cfg.data.task == "file" and cfg.data.eval_path:
        return file_problems(cfg.data.eval_path, cfg.data)
    return load_problems(cfg.data, cfg.run.seed)[1]


# ---------------------------------------------------------------------------------------- forkrl eval
def resolve_target(target: str, step: int | None, overrides: list[str]) -> tuple[Config, str | None, int | None]:
    """(config, checkpoint dir or None for an HF directory, step) of `forkrl eval`'s MODEL_OR_RUN."""
    from cluster.driver.export import find_checkpoint

    path = Path(target)
    if (path / "config.yaml").is_file():          # a run directory: its own config, overrides on top
        cfg = load_config(path / "config.yaml", overrides)
        if step == 0:
            return cfg, None, 0                    # the run's base model (its step-0 evaluation)
        ck = find_checkpoint(path, step)
        return cfg, str(ck), int(ck.name.split("-")[1])
    if (path / "config.json").is_file():           # an HF model directory on the embedded defaults
        if step is not None:
            raise UserError(f"--step {step}: {target} is a model directory, not a run directory")
        return load_config(None, [f"model.path={path.resolve()}", *overrides]), None, None
    if not path.exists():
        raise UserError(f"{target}: no such file or directory")
    raise UserError(f"{target}: neither a forkrl run directory (config.yaml) nor a Hugging Face model "
                    f"directory (config.json)")


@contextlib.contextmanager
def model_dir(cfg: Config, ckpt: str | None, run: str | None) -> Iterator[str]:
    """The HF directory to evaluate: the checkpoint's save_hf export, else one exported into a temporary
    directory (deleted afterwards), else the base model."""
    from cluster.data.models import resolve_model
    from cluster.driver.export import HF_DIR, export_checkpoint
    from cluster.driver.rundir import run_state

    base = str(resolve_model(cfg.model.path, cfg.data.task))
    if ckpt is None:
        yield base
        return
    if (Path(ckpt) / HF_DIR / "config.json").is_file():
        yield str(Path(ckpt) / HF_DIR)
        return
    state = run_state(Path(ckpt))
    with tempfile.TemporaryDirectory(prefix="forkrl-eval-") as tmp:
        yield str(export_checkpoint(ckpt, Path(tmp) / "hf", base, cfg.model.dtype,
                                    {"run": run, "step": int(state["step"]), "version": int(state["version"])}))


def eval_model(target: str, overrides: list[str], step: int | None = None, seed: int | None = None,
               batch: int = 0, out=sys.stdout) -> dict:
    """`forkrl eval`: evaluate MODEL_OR_RUN (at checkpoint `step` of a run; 0: its base model) with
    `evaluate` on rollout.num_generators vLLM generator actors; one JSON line per problem and a summary line
    on `out`; returns the summary. `batch` problems per generate call (0: one call per generator, as in a
    run); the seeds make the samples independent of it."""
    cfg, ckpt, step = resolve_target(target, step, overrides)   # a user's mistake fails before the heavy imports
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from actors.generator import generator_actor
    from cluster.data.tasks import render_prompts
    from cluster.driver.placement import start_ray
    from cluster.runtime import setup_env
    from cluster.split import split_even

    seed = cfg.run.seed if seed is None else seed
    setup_env()
    with model_dir(cfg, ckpt, Path(target).name if ckpt else None) as model:
        tok = AutoTokenizer.from_pretrained(model)
        prompts = render_prompts(eval_problems(cfg), tok, cfg.data, "eval")
        k = cfg.rollout.eval_samples
        _, started = start_ray(cfg, log_to_driver=False)
        gens, graders = [], None
        try:
            c = cfg.cluster
            gens = [generator_actor(f"eval-g{i}", model, cfg.rollout, dtype=cfg.model.dtype, seed=cfg.run.seed + i,
                                    max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                                    num_cpus=c.generator_cpus, num_gpus=c.generator_gpus, eval_seed=seed)
                    for i in range(cfg.rollout.num_generators)]
            graders = eval_graders(cfg)
            ray.get([g.info.remote() for g in gens])
            graders.wait_ready()
            bar = tqdm(total=len(prompts), desc="forkrl eval", unit="problem", dynamic_ncols=True, file=sys.stderr)

            def generate(ps: list[Prompt]) -> list[Rollout]:
                parts = ([ps[i:i + batch] for i in range(0, len(ps), batch)] if batch > 0
                         else [p for p in split_even(ps, len(gens)) if p])
                refs = {gens[i % len(gens)].evaluate.remote(p): (i, len(p)) for i, p in enumerate(parts)}
                done: dict[int, list[Rollout]] = {}
                while len(done) < len(parts):
                    ready, _ = ray.wait([r for r in refs if refs[r][0] not in done], num_returns=1)
                    i, n = refs[ready[0]]
                    done[i] = ray.get(ready[0])
                    bar.update(n)
                return [r for i in range(len(parts)) for r in done[i]]

            per: list = []
            stats = evaluate(prompts, generate, graders, groups_out=per)
            bar.close()
        finally:
            if graders is not None:
                graders.close()
            for g in gens:
                ray.kill(g)
            if started:
                ray.shutdown()
    for r, g in per:
        correct = [bool(x > 0.5) for x in g.components["correct"]]
        out.write(json.dumps({"prompt_id": r.prompt_id, "gold": r.gold, "correct": correct,
                              "extracted": [a is not None for a in g.answers],
                              "lengths": [len(x.token_ids) for x in r.responses]}) + "\n")
    summary = {"summary": True, "model": target, "step": step, "seed": seed, "samples": k,
               "task": cfg.data.task, **stats}
    out.write(json.dumps(summary) + "\n")
    out.flush()
    return summary


def markdown(summary: dict) -> str:
    """The summary as a Markdown table (metric | value)."""
    k = summary["samples"]
    where = summary["model"] + (f" step {summary['step']}" if summary.get("step") is not None else "")
    rows = [f"Evaluation of {where} ({summary['task']}, k={k}, seed {summary['seed']})", "",
            "| metric | value |", "|---|---|"]
    for key, name in METRICS.items():
        v = summary[key]
        rows.append(f"| {name.format(k=k)} | {int(v) if key == 'eval/problems' else f'{v:.4f}'} |")
    return "\n".join(rows) + "\n"


def cli_overrides(task: str | None, data: str | None, samples: int | None, problems: int | None,
                  temperature: float | None, top_p: float | None, max_new_tokens: int | None) -> list[str]:
    """forkrl eval's options as config overrides (validated by the config like any other)."""
    out = []
    if data is not None:
        if not Path(data).is_file():
            raise UserError(f"--data {data}: no such file")
        if task not in (None, "file"):
            raise UserError(f"--data is a file task: --task {task} cannot go with it")
        out += ["data.task=file", f"data.train_path={Path(data).resolve()}", f"data.eval_path={Path(data).resolve()}"]
    elif task is not None:
        out.append(f"data.task={task}")
    for key, v in (("rollout.eval_samples", samples), ("data.eval_size", problems),
                   ("rollout.eval_temperature", temperature), ("rollout.eval_top_p", top_p),
                   ("rollout.max_new_tokens", max_new_tokens)):
        if v is not None:
            out.append(f"{key}={v}")
    return out

