"""The pure parts of `forkrl bench e2e`'s learner.actor_overhead row (cluster/tools/bench/e2e.py): the batch
every side trains on, the environment it compares, the medians it reports. Nothing here is timed."""

import numpy as np
import pytest

from cluster.tools.bench.e2e import GROUP, NEW_TOKENS, PROMPTS, env_diff, overhead_batch, round_medians, side_env
from cluster.transport.codec import decode, encode


def arrays(groups):
    """Every array of the groups, in order: what the learner trains on."""
    out = []
    for g in groups:
        out += [g.rollout.prompt_ids, g.advantages, g.rewards]
        for r in g.rollout.responses:
            out += [r.token_ids, r.logprobs]
    return out


def test_batch_has_vs_trls_shape():
    groups = overhead_batch(prompt_len=40)
    assert len(groups) == PROMPTS
    assert {len(g.rollout.responses) for g in groups} == {GROUP}
    assert {len(g.rollout.prompt_ids) for g in groups} == {40}
    lengths = [len(r.token_ids) for g in groups for r in g.rollout.responses]
    assert 1 <= min(lengths) and max(lengths) <= NEW_TOKENS
    assert len({g.group_id for g in groups}) == PROMPTS


def test_the_same_seed_gives_the_same_batch_and_the_codec_carries_it_unchanged():
    a, b = overhead_batch(40, seed=3), overhead_batch(40, seed=3)
    read = [decode(encode(g)) for g in a]   # what each side reads from the batch file
    for x, y, z in zip(arrays(a), arrays(b), arrays(read)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert [g.group_id for g in read] == [g.group_id for g in a]
    other = overhead_batch(40, seed=4)
    assert any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(arrays(a), arrays(other)))


def test_side_env_keeps_openmp_and_allocator_variables_only():
    env = {"OMP_NUM_THREADS": "2", "OMP_PROC_BIND": "close", "MALLOC_ARENA_MAX": "2", "LD_PRELOAD": "libjemalloc.so",
           "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0", "LD_LIBRARY_PATH": "/x", "PATH": "/bin", "MKL_NUM_THREADS": "1",
           "XOMP_Y": "1", "HOME": "/root"}
    want = {k: v for k, v in env.items()
            if k.split("_")[0] in ("OMP", "MALLOC") or k in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    assert side_env(env) == want
    assert list(side_env(env)) == sorted(want)
    assert side_env({}) == {}


@pytest.mark.parametrize("seed", range(10))
def test_env_diff_matches_a_reference(seed):
    rng = np.random.default_rng(seed)
    keys = [f"K{i}" for i in range(8)]
    a = {k: str(rng.integers(3)) for k in keys if rng.random() < 0.7}
    b = {k: str(rng.integers(3)) for k in keys if rng.random() < 0.7}
    want = {}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            want[k] = [a.get(k), b.get(k)]
    assert env_diff(a, b) == want
    assert env_diff(a, a) == {}


def test_env_diff_compares_lists_such_as_the_cpu_affinity():
    assert env_diff({"affinity": [0, 1]}, {"affinity": [0, 1]}) == {}
    assert env_diff({"affinity": [1]}, {"affinity": [0, 1]}) == {"affinity": [[1], [0, 1]]}


@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_round_medians_match_numpy(n):
    rng = np.random.default_rng(n)
    rounds = [{"actor": float(rng.uniform(1, 2)), "plain": float(rng.uniform(1, 2)),
               "plain_nice15": float(rng.uniform(1, 2))} for _ in range(n)]
    got = round_medians(rounds)
    for side in ("actor", "plain", "plain_nice15"):
        assert got[side] == pytest.approx(np.median([r[side] for r in rounds]), rel=1e-12)
    assert got["paired_ratio"] == pytest.approx(np.median([r["actor"] / r["plain"] for r in rounds]), rel=1e-12)
