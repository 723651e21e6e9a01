"""The token-entropy profile of a model's own chains of thought (the 80/20 paper's statistics, docs/organism.md).

`sample_entropies` samples responses with transformers (cluster.data.sampling.hf_sample) and reads the
full-vocabulary entropy of every sampled position at the sampling temperature (learner.tokenstats, the
learner's own entropy); `entropy_profile` summarises them: the share of tokens below 0.01 nats, the 50th and
80th percentiles, the most frequent tokens among the top-20% positions, examples in context and, with
`kinds`, which kind of position (e.g. the organism's connectives, operands, result digits) the top 20% are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

LOW = 0.01     # nats: the paper's "near-deterministic" threshold
TOP = 0.2      # the top-20% entropy positions (the forking tokens)


class Sampled(NamedTuple):
    ids: list[int]          # the response's tokens through its EOS
    entropy: np.ndarray     # [len(ids)] float64 nats at the sampling temperature
    text: str               # decoded, special tokens dropped
    problem: Any


def sample_entropies(model, tokenizer, problems, data_cfg, *, samples: int = 1, temperature: float = 1.0,
                     max_new_tokens: int = 96, batch: int = 64, seed: int = 0) -> list[Sampled]:
    """`samples` responses per problem at `temperature` (top-p 1, top-k off), with each position's entropy."""
    import torch

    from cluster.data.sampling import cut_at_eos, hf_sample
    from cluster.data.tasks import render_text
    from learner.tokenstats import token_stats

    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    rows = [p for p in problems for _ in range(samples)]
    torch.manual_seed(seed)
    out: list[Sampled] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            enc = tokenizer([render_text(p, tokenizer, data_cfg) for p in chunk], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            gen = hf_sample(model, enc, temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id, logits=True)
            logits = torch.stack(gen.logits, 1)            # [B, L, V] raw logits of each sampled position
            for b, p in enumerate(chunk):
                ids, _ = cut_at_eos(gen.tokens[b].tolist(), (eos,))
                n = len(ids)
                _, ent = token_stats(logits[b, :n].float(), gen.tokens[b, :n], temperature, compiled=False)
                out.append(Sampled(ids, ent.double().numpy(), tokenizer.decode(ids, skip_special_tokens=True), p))
    return out


def answer_correct(text: str, gold: str | None) -> bool:
    """The response's last "Answer:" line equals the gold answer (the synthetic tasks' exact check)."""
    return gold is not None and "Answer:" in text and text.rsplit("Answer:", 1)[-1].strip() == gold.strip()


def entropy_profile(sampled: Sequence[Sampled], tokenizer, *, kinds: Callable[[list[str]], list[str]] | None = None,
                    examples: int = 12, context: int = 6, seed: int = 0) -> dict[str, Any]:
    """The statistics of `sampled` (all response tokens, the EOS included):
    tokens, responses, low_share (H < 0.01 nats), p50, p80, mean; accuracy (answer_correct against each
    problem's gold); top_tokens: the most frequent decoded tokens among the top-20% positions (H >= p80);
    examples: `examples` random top-20% positions as "context [token] context" with their entropy; with
    `kinds` (decoded tokens of one response -> a kind per token): kinds_all / kinds_top, the share of each
    kind among all tokens and among the top-20% positions, and low_by_kind: each kind's share below 0.01."""
    ents = np.concatenate([s.entropy for s in sampled]) if sampled else np.zeros(0)
    if ents.size == 0:
        raise ValueError("no tokens sampled")
    p80 = float(np.percentile(ents, 100 * (1 - TOP)))   # the top-20% threshold
    words = [[tokenizer.decode([t]) for t in s.ids] for s in sampled]
    top = [(r, k) for r, s in enumerate(sampled) for k in range(len(s.ids)) if s.entropy[k] >= p80]
    counts = Counter(words[r][k] for r, k in top)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(top), size=min(examples, len(top)), replace=False).tolist()) if top else []
    shown = []
    for i in pick:
        r, k = top[i]
        w = words[r]
        shown.append({"text": "".join(w[max(0, k - context):k]) + f"[{w[k]}]" + "".join(w[k + 1:k + 1 + context]),
                      "token": w[k], "entropy": round(float(sampled[r].entropy[k]), 3)})
    out: dict[str, Any] = {
        "responses": len(sampled), "tokens": int(ents.size),
        "low_share": round(float(np.mean(ents < LOW)), 4),
        "p50": round(float(np.percentile(ents, 50)), 4), "p80": round(p80, 4), "mean": round(float(ents.mean()), 4),
        "accuracy": round(float(np.mean([answer_correct(s.text, s.problem.gold) for s in sampled])), 4),
        "mean_length": round(float(np.mean([len(s.ids) for s in sampled])), 1),
        "top_tokens": counts.most_common(15), "examples": shown,
    }
    if kinds is not None:
        labels = [kinds(w) for w in words]
        flat = [x for lab in labels for x in lab]
        top_labels = [labels[r][k] for r, k in top]
        all_n, top_n = Counter(flat), Counter(top_labels)
        out["kinds_all"] = {k: round(v / len(flat), 3) for k, v in all_n.most_common()}
        out["kinds_top"] = {k: round(top_n.get(k, 0) / max(1, len(top_labels)), 3) for k, _ in all_n.most_common()}
        low = Counter(x for lab, s in zip(labels, sampled) for x, h in zip(lab, s.entropy) if h < LOW)
        out["low_by_kind"] = {k: round(low.get(k, 0) / v, 3) for k, v in all_n.most_common()}
    return out


def organism_kinds(tokens: list[str]) -> list[str]:
    """The kind of each position of an organism chain of thought (decoded tokens): `connective` (the token
    after a step's result: a connective word, "," or the final "."; after "," the next one too: " wait" or
    none), `operand` (the first token of an operand: which of the two numbers comes first), `operand+` (an
    operand's later digits and the "+"), `result` (the digits after "="), `check` (the step done again after
    " wait"), `answer` (the answer line) and `format` (the rest: "=" and spaces)."""
    out, state = [], "operand"
    for t in tokens:
        s = t.strip()
        digit = s.isdigit()
        if state == "answer" or s == "Answer":
            kind, state = "answer", "answer"
        elif state in ("result", "check_result") and not digit:
            kind, state = "connective", {".": "answer", ",": "after_comma"}.get(t, "space")
        elif state == "after_comma":
            kind, state = "connective", "check" if s == "wait" else "operand"
        elif state == "space":
            kind, state = "format", "operand"
        elif state in ("check", "check_result"):
            kind, state = "check", "check_result" if t == "=" or state == "check_result" else "check"
        elif state == "result":
            kind = "result"
        elif digit:
            kind, state = ("operand", "operand+") if state == "operand" else ("operand+", state)
        elif t == "+":
            kind, state = "operand+", "operand"
        else:
            kind, state = "format", "result" if t == "=" else state
        out.append(kind)
    return out
