"""The short chaos soak of `make test` (issue 21, item 7): a seeded run of the tiny model with faults at
random times and a driver kill -9 resumed with --resume, checked through the ledger and against a clean resume
from the same checkpoint (cluster/tools/soak.py; the long soak with every kind is `make soak`, its table in
docs/reliability.md). The short one takes the kinds test_faults.py does not inject (a queue restart that keeps
its AOF, a driver kill) and a stranger's bytes; generator, grader-worker and lost-queue faults are asserted one
by one in test_generator_grader_sync_and_queue_faults."""

from __future__ import annotations

import pytest

from cluster.tools.soak import Soak

pytestmark = pytest.mark.slow

SHORT = ("queue_aof", "stranger", "driver")
STEPS = 14


def test_short_soak(tiny_model_dir, tmp_path):
    fig = Soak(tiny_model_dir, steps=STEPS, seed=1, n_faults=len(SHORT), out=tmp_path, kinds=SHORT).run()
    print(fig)
    assert fig["faults_by_kind"] == {k: 1 for k in sorted(SHORT)}
    assert fig["groups_lost"] == 0 and fig["resumes"] == 1 and fig["dropped_malformed"] >= 1
    assert fig["groups_trained"] >= STEPS * 4 - 4   # a driver kill may lose one step's unpushed generation
    assert fig["resumed_max_abs_diff"] == 0.0, fig   # a clean resume from the same checkpoint: the same weights
