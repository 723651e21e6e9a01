"""The policy-loss registry (every AlgorithmConfig.policy_loss value, one signature) and the training step's
hot path without host synchronisation (docs/algorithms.md 2.5, 2.6, 3.1)."""

import contextlib
import inspect
import typing

import numpy as np
import pytest
import torch

import learner.losses as losses
import learner.step as step_module
import learner.tokenstats as tokenstats
from cluster.config import AlgorithmConfig, Config
from cluster.types import Response, Rollout, ScoredGroup
from learner.losses import BatchCounts, micro_batch_loss
from learner.policy_losses import PolicyLossInputs, PolicyLossOutputs, get_policy_loss, policy_loss_names
from learner.stats import parts_to_host

CONFIG_NAMES = typing.get_args(AlgorithmConfig.model_fields["policy_loss"].annotation)


def test_every_config_value_is_registered_and_nothing_else():
    assert CONFIG_NAMES and set(policy_loss_names()) == set(CONFIG_NAMES)
    with pytest.raises(ValueError, match="unknown policy_loss 'nope'.*clip_cov, kl_cov, ppo"):
        get_policy_loss("nope")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_policy_loss_has_the_one_signature(name):
    fn = get_policy_loss(name)
    assert list(inspect.signature(fn).parameters) == ["inputs", "cfg"]
    assert typing.get_type_hints(fn) == {"inputs": PolicyLossInputs, "cfg": AlgorithmConfig,
                                         "return": PolicyLossOutputs}
    g = torch.Generator().manual_seed(0)
    n = 40
    logp = (torch.randn(n, generator=g) - 2).requires_grad_()
    inputs = PolicyLossInputs(logp, logp.detach() + torch.randn(n, generator=g) * 0.5, torch.randn(n, generator=g),
                              torch.ones(n, dtype=torch.bool), n, torch.Generator().manual_seed(1))
    out = fn(inputs, AlgorithmConfig(policy_loss=name, clip_cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0))
    assert isinstance(out, PolicyLossOutputs)
    assert out.loss.shape == (n,) and out.loss.requires_grad and out.ratio.shape == (n,) and not out.ratio.requires_grad
    flags = [out.clipped_low, out.clipped_high, out.dual_clipped, out.cov_clipped, out.kl_penalised]
    assert all(f is None or (f.shape == (n,) and f.dtype == torch.bool) for f in flags)


# ------------------------------------------------------------------------------------------------------
# Host synchronisation: count every call that moves a tensor's value to the host.

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def count_syncs(monkeypatch):
    """Yields a list whose length is the number of host reads outside `token_stats` (learner/tokenstats.py,
    which checks its own inputs)."""
    calls: list[str] = []
    paused = [0]

    def counting(name, orig):
        def f(self, *a, **kw):
            if not paused[0]:
                calls.append(name)
            return orig(self, *a, **kw)
        return f

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    orig_token_stats = tokenstats.token_stats

    def token_stats(*a, **kw):
        paused[0] += 1
        try:
            return orig_token_stats(*a, **kw)
        finally:
            paused[0] -= 1

    monkeypatch.setattr(losses, "token_stats", token_stats)
    monkeypatch.setattr(tokenstats, "token_stats", token_stats)
    yield calls
    monkeypatch.undo()


def _micro_batch(seed=0, lengths=(7, 1, 12, 5, 9), v=30):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (torch.randn(n, v, generator=g), torch.randint(0, v, (n,), generator=g),
            torch.randn(n, generator=g) - 2, torch.randn(len(lengths), generator=g)[seq_ids], seq_ids,
            torch.randn(n, generator=g) - 2)


@pytest.mark.parametrize("policy", CONFIG_NAMES)
@pytest.mark.parametrize("variant,scope", [("top", "micro"), ("bottom", "micro"), ("random", "micro"),
                                           ("top", "global"), ("top", "none")])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("window,alpha", [(1, 0.0), (3, 0.4)])
def test_the_step_s_micro_batch_loss_reads_nothing_back(monkeypatch, policy, variant, scope, agg, window, alpha):
    """The call the training step makes per micro-batch (check=False, num_seqs known, valid=None) leaves
    every statistic on the device: no host read, except Clip-Cov's draw (one: the candidate count); also with
    the window-entropy mask and the entropy-shaped advantages."""
    logits, tokens, old_logp, adv, seq_ids, ref = _micro_batch()
    n = logits.shape[0]
    cfg = AlgorithmConfig(policy_loss=policy, loss_agg=agg, top_entropy_ratio=1.0 if scope == "none" else 0.3,
                          mask_variant=variant, entropy_scope="micro" if scope == "none" else scope, kl_coef=0.05,
                          entropy_coef=1e-3, clip_cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0,
                          entropy_window=window, entropy_adv_alpha=alpha)
    mask = (torch.arange(n) % 3 == 0, 0.5) if scope == "global" else None
    x = logits.clone().requires_grad_()
    with count_syncs(monkeypatch) as calls:
        loss, part = micro_batch_loss(x, tokens, old_logp, adv, seq_ids, BatchCounts(n, n // 3, 5, 16), cfg,
                                      ref_logp=ref, mask=mask, entropy_coef=1e-3,
                                      generator=torch.Generator().manual_seed(0), token_weight=torch.rand(n),
                                      num_seqs=5, check=False)
        loss.backward()
    assert calls == (["nonzero"] if policy == "clip_cov" else []), calls
    host = parts_to_host([part])[0]
    assert all(isinstance(v, float) for k, v in host.items() if not k.startswith("tokens/")), host


def test_a_step_reads_back_the_same_whatever_its_number_of_micro_batches(monkeypatch):
    """TrainStep.run on one rank with a small torch model in place of DeepSpeed: the host reads of a whole
    step do not grow with its micro-batches (they are per step: the counts, the summary)."""
    groups = []
    rng = np.random.default_rng(0)
    for k in range(4):
        responses = [Response(rng.integers(1, 30, int(rng.integers(2, 9))).astype(np.int32),
                              (-rng.random(8) - 1).astype(np.float32)) for _ in range(3)]
        for r in responses:
            r.logprobs = r.logprobs[: len(r.token_ids)]
        ro = Rollout(f"g{k}", f"p{k}", rng.integers(1, 30, 4).astype(np.int32), "", responses, 0)
        groups.append(ScoredGroup(ro, np.zeros(3, np.float32), rng.normal(size=3).astype(np.float32), [None] * 3))

    def reads(budget: int, cfg_changes: dict) -> tuple[int, int]:
        cfg = Config().model_copy(deep=True)
        cfg.learner.micro_batch_tokens = budget
        for key, value in cfg_changes.items():
            setattr(cfg.algorithm, key, value)
        torch.manual_seed(0)
        eng = _TinyEngine()
        ts = step_module.TrainStep(cfg, eng, 0, 1, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
        monkeypatch.setattr(ts, "reduce", lambda values, op="sum": [float(v) for v in values])
        with count_syncs(monkeypatch) as calls:
            ts.run(groups, 1)
            n = len(calls)
        return n, eng.backwards

    for changes in ({"entropy_scope": "micro"}, {"top_entropy_ratio": 0.2, "entropy_scope": "micro"},
                    {"top_entropy_ratio": 0.2, "entropy_scope": "mini"},
                    {"top_entropy_ratio": 0.2, "entropy_scope": "mini", "entropy_window": 3, "entropy_adv_alpha": 0.4},
                    {"top_entropy_ratio": 0.2, "entropy_scope": "micro", "entropy_window": 3},
                    {"policy_loss": "kl_cov", "loss_agg": "seq-mean-token-mean", "entropy_scope": "micro"}):
        one, few = reads(10_000, changes), reads(24, changes)
        assert one[1] == 1 and few[1] > 3, (one, few)
        assert few[0] == one[0], (changes, one, few)


class _TinyEngine:
    """What TrainStep uses of learner.engine.Engine, around an embedding and a linear head."""

    device, pad_id, vocab_size, ref = torch.device("cpu"), 0, 30, None

    def __init__(self):
        self.model = torch.nn.Sequential(torch.nn.Embedding(30, 16), torch.nn.Linear(16, 30))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.engine = self
        self.backwards = 0

    def logits(self, mb):
        if mb is None:
            return self.model(torch.zeros(1, 2, dtype=torch.long)).reshape(-1, 30)[:1]
        return self.model(mb.input_ids).reshape(-1, 30).index_select(0, mb.gather)

    def backward(self, loss, scale_wrt_gas=True):
        self.backwards += 1
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()

    def get_lr(self):
        return [0.1]

    def get_global_grad_norm(self):
        return None
