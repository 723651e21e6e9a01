"""The short chaos soak of `make test` (issue 21, item 7): a seeded run of the tiny model with one fault of
each in-run kind and a driver kill -9 with --resume, checked through the ledger (cluster/tools/soak.py; the
long soak is `make soak`, its table in docs/reliability.md)."""

from __future__ import annotations

import pytest

from cluster.tools.soak import Soak

pytestmark = pytest.mark.slow

SHORT = ("generator", "grader_worker", "queue_aof", "queue_lost", "stranger", "driver")


def test_short_soak(tiny_model_dir, tmp_path):
    fig = Soak(tiny_model_dir, steps=24, seed=1, n_faults=len(SHORT), out=tmp_path, kinds=SHORT).run()
    print(fig)
    assert fig["faults_by_kind"] == {k: 1 for k in sorted(SHORT)}
    assert fig["groups_lost"] == 0 and fig["resumes"] == 1 and fig["dropped_malformed"] >= 1
    assert fig["groups_trained"] >= 24 * 4 - 4   # a driver kill may lose one step's unpushed generation
    assert fig["resumed_max_abs_diff"] == 0.0, fig   # a clean resume from the same checkpoint: the same weights
    rec = fig["recoveries"]
    assert rec.get("generators_replaced", 0) >= 1 and rec.get("queue_lost", 0) >= 1, rec
