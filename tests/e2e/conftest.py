"""Short real runs shared by the e2e tests that only read them (test_export, test_eval): one `forkrl train` per
ZeRO stage for the whole session, not one per test."""

from __future__ import annotations

import pytest

from tests.e2e.test_train import run_train


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, tiny_model_dir):
    """short_run(stage) -> run directory of a 2-step run of the tiny model with ZeRO `stage`, a checkpoint and an
    evaluation at every step (seed 3, 8 eval problems x 3 samples); stage 3 also writes the HF directory beside
    each checkpoint (checkpoint.save_hf), stage 2 does not (`forkrl eval` then exports on the fly)."""
    runs: dict[int, object] = {}

    def get(stage: int):
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"zero{stage}") / "runs"
            runs[stage], _, _ = run_train(
                out, f"model.path={tiny_model_dir}", "run.steps=2", "run.eval_every=1", "run.seed=3",
                f"learner.zero_stage={stage}", "learner.stage3_param_persistence_threshold=0", "checkpoint.every=1",
                f"checkpoint.save_hf={'true' if stage == 3 else 'false'}", "rollout.prompts_per_step=4",
                "rollout.group_size=4", "rollout.eval_samples=3", "data.train_size=16", "data.eval_size=8")
        return runs[stage]

    return get
