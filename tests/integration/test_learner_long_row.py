"""A shared-prompt row of a few thousand tokens trained by the real learner (DeepSpeed ZeRO-2, one rank, the
tiny model): learner.attention lays it out without an [L, L] mask, the old-log-prob pass (capped by
learner.logprob_micro_batch_tokens) equals the model run one sequence at a time, and the update is finite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import numpy as np, torch
from cluster.config import Config
from cluster.runtime import setup_env
from cluster.transport.weightsync import free_port
from cluster.types import Response, Rollout, ScoredGroup
from learner.worker import Trainer

setup_env()
spec = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
prompt = rng.integers(3, 250, spec["prompt"]).astype(np.int32)
resps = [rng.integers(3, 250, n).astype(np.int32) for n in spec["responses"]]
# the sampler's log-probs are the model's own, one sequence at a time (transformers' SDPA): the learner's
# logprob_mismatch then measures its packed row against that reference
from transformers import AutoModelForCausalLM
plain = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
logps = []
with torch.no_grad():
    for r in resps:
        ids = torch.from_numpy(np.concatenate([prompt, r]).astype(np.int64))[None]
        lp = torch.log_softmax(plain(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
        logps.append(lp.gather(1, torch.from_numpy(r.astype(np.int64))[:, None])[:, 0].numpy())
ro = Rollout("g0", "p0", prompt, "", [Response(r, lp.astype(np.float32)) for r, lp in zip(resps, logps)], 0)
group = ScoredGroup(ro, np.zeros(len(resps), np.float32), np.array([1.0, -1.0, 0.5, -0.5], np.float32)[:len(resps)],
                    [None] * len(resps))
cfg = Config()
cfg.learner.micro_batch_tokens = spec["budget"]
cfg.learner.logprob_micro_batch_tokens = spec["logprob_budget"]
cfg.learner.epochs, cfg.learner.zero_stage, cfg.learner.lr = 2, 2, 1e-3
cfg.rollout.max_new_tokens = max(spec["responses"])
cfg.run.seed = 0
t = Trainer(cfg, spec["model"], 0, 1, "127.0.0.1", free_port("127.0.0.1"))
t.setup()
before = {k: v.clone() for k, v in t.full_weights().items()}
out = []
for _ in range(2):
    out.append(t.train_on([group]))
moved = max(float((v - before[k]).abs().max()) for k, v in t.full_weights().items())
print("RESULT " + json.dumps({"stats": out, "moved": moved}))
"""


def test_a_row_of_thousands_of_tokens_trains_and_matches_one_sequence_at_a_time(untrained_tiny_model_dir):
    responses = [1100, 900, 1000, 700]
    prompt = 300
    spec = {"model": untrained_tiny_model_dir, "prompt": prompt, "responses": responses,
            "budget": 8192, "logprob_budget": 2048}   # the no-grad pass: one row per response, the update one row
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    first = res["stats"][0]
    assert first["learner/tokens"] == sum(responses) and first["learner/old_logp_pass"] == 1.0
    # old log-probs of the packed 3.997k-token row (4 segments on one 300-token prompt) = one sequence at a time
    assert first["learner/logprob_mismatch_max"] < 1e-4, first["learner/logprob_mismatch_max"]
    for s in res["stats"]:
        assert np.isfinite(s["loss"]) and np.isfinite(s["learner/grad_norm"]) and s["learner/grad_norm"] > 0
    assert res["moved"] > 0
