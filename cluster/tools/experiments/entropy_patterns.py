"""The entropy-patterns experiment (kind: entropy-patterns, the 80/20 paper's token-entropy statistics): sample
chains of thought with transformers and read the entropy of every sampled position."""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cluster.observe.report import save_figure
from cluster.tools.experiments.spec import Spec

log = logging.getLogger("forkrl")

# 80/20 paper (docs/algorithms.md 1.7): Qwen3-8B chains of thought on AIME.
PAPER_LOW_SHARE, PAPER_P80 = 0.5064, 0.672
FORKING_WORDS = ("wait", "however", "thus", "suppose", "assume", "since", "given", "maybe", "perhaps")


def _sample_entropies(model_path: Path, problems, data_cfg, n_samples: int, temperature: float,
                      max_new_tokens: int, batch: int, seed: int):
    """Sample chains of thought with transformers and return per response (token ids [L], entropies [L]):
    full-vocabulary entropies of the HF model's logits at the sampling temperature (learner.tokenstats)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.data.sampling import cut_at_eos, hf_sample
    from cluster.data.tasks import render_text
    from learner.tokenstats import token_stats

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    texts = [render_text(p, tok, data_cfg) for p in problems for _ in range(n_samples)]
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = hf_sample(model, enc, temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id, logits=True)
            seqs = gen.tokens
            logits = torch.stack(gen.logits, 1)            # [B, L, V] raw logits of each sampled position
            log.info("entropy-patterns: %s: sampled %d/%d responses", model_path.name, i + len(seqs), len(texts))
            for b in range(seqs.shape[0]):
                ids, _ = cut_at_eos(seqs[b].tolist(), (eos,))
                n = len(ids)
                _, ent = token_stats(logits[b, :n], seqs[b, :n], temperature, compiled=False)
                out.append((ids, ent.double().numpy()))
    return tok, out


def entropy_patterns(spec: Spec, out: Path) -> tuple[str, str]:
    import torch

    p = spec.params
    threads = torch.get_num_threads()
    # decoding is memory-bound and the box is shared: more threads than free cores only spin
    torch.set_num_threads(int(p.get("threads", 1)))
    try:
        return _entropy_patterns(spec, out, p)
    finally:
        torch.set_num_threads(threads)


def _entropy_patterns(spec: Spec, out: Path, p: dict[str, Any]) -> tuple[str, str]:
    from cluster.config import DataConfig
    from cluster.data.models import resolve_model
    from cluster.data.tasks import load_problems

    # (model, task) pairs: every model on every task unless `pairs` lists them (the tiny model exists
    # warm-started for arith only until someone builds its countdown variant, a long SFT on this box)
    pairs = p.get("pairs") or [[m, t] for m in p.get("models", ["builtin:tiny"]) for t in p.get("tasks", ["arith"])]
    summary_parts, sections, readings = [], [], []
    tables = ["| model | task | responses | tokens | share H < 0.01 | p50 | p80 | mean H | share H > 0.672 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|",
              f"| paper: Qwen3-8B | AIME'24/'25 | - | > 10^6 | {PAPER_LOW_SHARE:.3f} | - | {PAPER_P80:.3f} | - "
              "| 0.200 |"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    errors = []
    for model, task in pairs:
        label = f"{model} / {task}"
        try:
            data_cfg = DataConfig(task=task, eval_size=int(p.get("prompts", 32)),
                                  difficulty=int(p.get("difficulty", 2)),
                                  **({"train_path": p["train_path"]} if task == "file" else {}))
            _, held = load_problems(data_cfg, int(p.get("seed", 0)))
            path = resolve_model(model, task)
            tok, resp = _sample_entropies(path, held, data_cfg, int(p.get("samples", 2)),
                                          float(p.get("temperature", 1.0)), int(p.get("max_new_tokens", 128)),
                                          int(p.get("batch", 16)), int(p.get("seed", 0)))
        except Exception as e:  # noqa: BLE001 - a failing model/task is reported, the others still run
            errors.append(f"{label}: {type(e).__name__}: {e}")
            log.error("entropy-patterns %s failed:\n%s", label, traceback.format_exc())
            continue
        ents = np.concatenate([e for _, e in resp]) if resp else np.zeros(0)
        if ents.size == 0:
            errors.append(f"{label}: no tokens sampled")
            continue
        ids = np.concatenate([np.asarray(i) for i, _ in resp])
        low, p50, p80 = float(np.mean(ents < 0.01)), float(np.percentile(ents, 50)), float(np.percentile(ents, 80))
        hi = float(np.mean(ents > PAPER_P80))
        tables.append(f"| {model} | {task} | {len(resp)} | {ents.size} | {low:.3f} | {p50:.3f} | {p80:.3f} | "
                      f"{ents.mean():.3f} | {hi:.3f} |")
        # most frequent decoded tokens among the top-20% entropy positions, and the least uncertain
        top_words = Counter(tok.decode([int(t)]).strip().lower() or repr(tok.decode([int(t)]))
                            for t in ids[ents >= p80])
        low_words = Counter(tok.decode([int(t)]).strip().lower() or repr(tok.decode([int(t)]))
                            for t in ids[ents < 0.01])
        forking = {w: top_words.get(w, 0) for w in FORKING_WORDS}
        sample = tok.decode(resp[0][0], skip_special_tokens=True)[:300].replace("\n", " ")
        sections += [f"### {label}", "",
                     "Most frequent tokens among the top-20% entropy positions (count): "
                     + ", ".join(f"`{w}` ({c})" for w, c in top_words.most_common(int(p.get("top_k", 25)))), "",
                     "Most frequent tokens with H < 0.01: "
                     + ", ".join(f"`{w}` ({c})" for w, c in low_words.most_common(12)), "",
                     "The paper's forking words among the top-20% positions: "
                     + ", ".join(f"`{w}` {c}" for w, c in forking.items()), "",
                     f"First sampled response: `{sample}`", ""]
        summary_parts.append(f"{label}: {low:.1%} of tokens below 0.01 nats, p80 {p80:.3f}")
        shape = _shape(low, p80)
        readings.append(f"{label}: {low:.1%} of the tokens below 0.01 nats and p80 {p80:.3f} nats against the "
                        f"paper's {PAPER_LOW_SHARE:.1%} and {PAPER_P80}, i.e. {shape}; the paper's forking words "
                        f"fill {sum(forking.values())} of its {int((ents >= p80).sum())} top-20% positions, whose "
                        f"most frequent tokens are " + ", ".join(f"`{w}`" for w, _ in top_words.most_common(5)) + ".")
        srt = np.sort(ents)
        ax.plot(srt, np.arange(1, srt.size + 1) / srt.size, label=label)
    ax.axvline(PAPER_P80, color="gray", ls="--", lw=1, label="paper p80 = 0.672")
    ax.axhline(PAPER_LOW_SHARE, color="gray", ls=":", lw=1, label="paper: 50.6% below 0.01")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(left=0)
    png = f"{spec.name}_cdf.png"
    save_figure(fig, ax, out / png, "Token-entropy distribution of sampled chains of thought",
                "token entropy H (nats)", "share of tokens with entropy <= H", legend=7)
    body = "\n".join(["## Token-entropy statistics", "", "\n".join(tables), "",
                      f"Entropy = full-vocabulary entropy of the HF model's logits at T = {p.get('temperature', 1.0)} "
                      "at each sampled position (learner/tokenstats.py); responses sampled with transformers "
                      "`generate` at the same temperature, top-p 1, top-k off; the EOS token counts.", "",
                      *(["**Failed:** " + "; ".join(errors), ""] if errors else []),
                      "## Plots", "", f"![cdf]({png})", "", "## High- and low-entropy tokens", "", *sections,
                      "## Reading (computed from the numbers above)", "", " ".join(readings), ""])
    summary = f"{spec.title}: " + ("; ".join(summary_parts) or "no model produced tokens") + \
        f" (paper: {PAPER_LOW_SHARE:.1%}, p80 {PAPER_P80})."
    return body, summary


def _shape(low_share: float, p80: float) -> str:
    """The profile against the paper's in words: close (low-entropy share within 0.35-0.65 and p80 within
    0.3-1.2 nats, the organism's targets in docs/organism.md), more concentrated, or flatter."""
    if 0.35 <= low_share <= 0.65 and 0.3 <= p80 <= 1.2:
        return ("close to the paper's shape: about half the positions near-deterministic and a minority carrying "
                "the uncertainty")
    if p80 < PAPER_P80:
        return ("more concentrated than the paper's: almost every position is near-deterministic and the "
                "uncertainty sits on a few")
    return ("far flatter than the paper's: the model is uncertain at most positions, so there is no sparse set of "
            "forking tokens to find")
