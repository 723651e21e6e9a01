"""Problems to train and evaluate on: seeded synthetic verifiable tasks and local dataset files.

Synthetic tasks (deterministic for a seed):
- arith: left-to-right multi-step arithmetic over one-digit operands with a short chain of thought,
  "Compute 7+8-4." -> "7+8=15. 15-4=11. Answer: 11". Each intermediate digit is a decision point.
- countdown (TinyZero): reach a target with the given numbers, each used at most once,
  "Use 3, 8, 4 to make 20." -> "8*3=24. 24-4=20. Answer: (8*3)-4".
- organism: the model organism's traces (cluster/data/models.py build_organism, docs/organism.md), "Add 5, 7, 1, 9."
  -> "7+5=12 then 12+1=14, wait, 12+1=13 so 9+13=22. Answer: 22": the order of a step's operands and the
  connectives are free choices (many correct paths), the digits after a choice follow from it, and
  the traces slip like people do (a forgotten carry, an answer off by one; more often on a carry) and
  sometimes notice it (", wait, " and the step again, done right), so a model trained on them is right only
  part of the time.
data.few_shot shows k of a task's worked solutions as earlier turns of every prompt (few_shot_examples: a split
of their own, never a train or eval question), so that an instruct model answers in the task's format.
Files: JSONL or Parquet read through `datasets`, in the GSM8K, MATH or DAPO-Math-17K layout (or custom
columns). A malformed row is an error naming the file and the row index.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.config import DataConfig
from cluster.types import Prompt

SPLIT_SEEDS = {"train": 1, "eval": 2, "sft": 3, "sft-eval": 4, "few-shot": 5}
ARITH_MAX = 9   # operands 1..9: a tiny model learns the table partly within minutes; carries stay hard
MAX_MISSES = 10_000   # consecutive draws that are all excluded: the task has no new problem left to draw


@dataclass
class Problem:
    question: str                  # the problem statement, without the answer-format instruction
    gold: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    solution: str | None = None    # a worked chain of thought ending in the answer line (synthetic tasks)


class DataError(ValueError):
    """A problem with a dataset file, naming the file and the row."""


# ---------------------------------------------------------------- synthetic tasks

def _arith(rng: random.Random, difficulty: int, answer_format: str) -> Problem:
    value = rng.randint(1, ARITH_MAX)
    expr, steps = str(value), []
    for _ in range(difficulty):
        op = rng.choice("+-") if value > 0 else "+"
        operand = rng.randint(1, ARITH_MAX) if op == "+" else rng.randint(1, min(ARITH_MAX, value))
        new = value + operand if op == "+" else value - operand
        steps.append(f"{value}{op}{operand}={new}.")
        expr += f"{op}{operand}"
        value = new
    return Problem(f"Compute {expr}.", str(value), {"task": "arith"},
                   " ".join(steps) + " " + format_answer(str(value), answer_format))


def _countdown_solve(numbers: list[int], rng: random.Random) -> tuple[int, list[str], str]:
    """Pick a random left-to-right derivation using every number once; return target, steps, expression."""
    order = numbers[:]
    rng.shuffle(order)
    value, expr, steps = order[0], str(order[0]), []
    for n in order[1:]:
        ops = ["+", "*"] + (["-"] if value > n else []) + (["/"] if n > 1 and value % n == 0 else [])
        op = rng.choice(ops)
        new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
        steps.append(f"{value}{op}{n}={new}.")
        expr = f"({expr}){op}{n}" if steps[:-1] else f"{expr}{op}{n}"
        value = new
    return value, steps, expr


def _countdown(rng: random.Random, difficulty: int, answer_format: str) -> Problem:
    numbers = [rng.randint(1, 12) for _ in range(difficulty + 1)]
    target, steps, expr = _countdown_solve(numbers, rng)
    shown = ", ".join(map(str, numbers))
    return Problem(f"Use {shown} to make {target}.", str(target),
                   {"task": "countdown", "numbers": numbers, "target": target},
                   " ".join(steps) + " " + format_answer(expr, answer_format))


# The organism's trace distribution (docs/organism.md). A strategy fixes which numbers each step adds:
# L left to right, R right to left, P the two pairs and then their sums (weights); each step writes its two
# operands in either order (swapped with `swap`) after a connective (weights; "," = none). The step a+b is
# written wrong with p_easy (an operand a multiple of ten), p_carry (a carry: the classic slip) or p_plain; a
# carry slip is a forgotten carry with `forget`, else off by one. After a step the trace checks itself
# (", wait, " and the step again, done right) with `wait_slip` after a slip and `wait_ok` after a right one.
ORGANISM = dict(strategies=(("L", 1),), swap=0.5,
                connectives=((" then", 3), (" thus", 1), (" so", 3), (" next", 2), (" now", 1), (" and", 1), (",", 3)),
                p_easy=0.05, p_carry=0.6, p_plain=0.25, forget=0.5, wait_slip=0.3, wait_ok=0.1)
ORGANISM_WORDS = (" then", " thus", " so", " next", " now", " and", " wait", " Answer")  # one token each


def _weighted(rng: random.Random, items) -> Any:
    x = rng.random() * sum(w for _, w in items)
    for v, w in items:
        x -= w
        if x < 0:
            return v
    return items[-1][0]


def _organism_step(rng: random.Random, a: int, b: int) -> tuple[int, bool]:
    """The written result of a+b and whether it slipped."""
    o, s, carry = ORGANISM, a + b, a % 10 + b % 10 >= 10
    p = o["p_easy"] if a % 10 == 0 or b % 10 == 0 else o["p_carry"] if carry else o["p_plain"]
    if rng.random() >= p:
        return s, False
    if carry and rng.random() < o["forget"]:
        return s - 10, True
    return s + rng.choice((-1, 1)), True


def organism_trace(numbers: list[int], rng: random.Random, answer_format: str = "answer_line") -> str:
    """One sampled chain of thought adding `numbers` (see ORGANISM): a strategy, then one step per addition."""
    o = ORGANISM
    strategy = _weighted(rng, o["strategies"])
    todo = list(numbers) if strategy != "R" else list(numbers)[::-1]
    results: list[int] = []
    parts = []
    while todo or len(results) > 1:
        if strategy == "P" and len(todo) < 2:          # pairs: the pairs' sums, then their sum
            x, y = results.pop(0), (todo.pop(0) if todo else results.pop(0))
        elif not results or (strategy == "P" and len(todo) >= 2):
            x, y = todo.pop(0), todo.pop(0)
        else:
            x, y = results.pop(), todo.pop(0)
        a, b = (y, x) if rng.random() < o["swap"] else (x, y)
        s, slipped = _organism_step(rng, a, b)
        step = f"{a}+{b}={s}"
        if rng.random() < (o["wait_slip"] if slipped else o["wait_ok"]):
            s = a + b
            step += f", wait, {a}+{b}={s}"
        parts.append(step if not parts else f"{_weighted(rng, o['connectives'])} {step}")
        results.append(s)
    return "".join(parts) + ". " + format_answer(str(results[0]), answer_format)


def _organism(rng: random.Random, difficulty: int, answer_format: str) -> Problem:
    numbers = [rng.randint(1, 9) for _ in range(difficulty + 2)]
    total = sum(numbers)
    return Problem(f"Add {', '.join(map(str, numbers))}.", str(total), {"task": "organism", "numbers": numbers},
                   organism_trace(numbers, rng, answer_format))


SYNTHETIC = {"arith": _arith, "countdown": _countdown, "organism": _organism}


def synthetic_problems(task: str, n: int, split: str, seed: int = 0, difficulty: int = 2,
                       answer_format: str = "answer_line", exclude: set[str] | None = None) -> list[Problem]:
    """n seeded problems; splits use disjoint seeds, and questions in `exclude` are skipped (so that a
    held-out split never repeats a training question)."""
    if task not in SYNTHETIC:
        raise ValueError(f"unknown synthetic task {task!r} (arith | countdown | organism)")
    rng = random.Random(seed * 1000 + SPLIT_SEEDS[split])
    exclude = exclude or set()
    return _draw(rng, task, n, difficulty, answer_format, lambda p: p.question not in exclude,
                 f"{split} problems outside the {len(exclude)} excluded questions")


def _draw(rng: random.Random, task: str, n: int, difficulty: int, answer_format: str, keep, what: str
          ) -> list[Problem]:
    """n problems of `task` that `keep` accepts; an error, not an endless loop, when none is left to draw
    (arith at difficulty 1 has 126 distinct problems: 2000 training draws contain all of them)."""
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        p = SYNTHETIC[task](rng, difficulty, answer_format)
        if keep(p):
            out.append(p)
            misses = 0
        elif (misses := misses + 1) >= MAX_MISSES:
            raise DataError(f"{task} at data.difficulty={difficulty}: found {len(out)} of {n} {what} in "
                            f"{MAX_MISSES} draws; the task has too few distinct problems for that (lower "
                            f"data.train_size or data.few_shot, or raise data.difficulty)")
    return out


@functools.lru_cache(maxsize=32)
def _few_shot(task: str, k: int, difficulty: int, answer_format: str) -> tuple[Problem, ...]:
    from reward.verifiers import TASK_VERIFIER, score_response

    seen: set[str] = set()

    def keep(p: Problem) -> bool:   # distinct, and a solution the task's own verifier pays (organism slips)
        ok = p.question not in seen and score_response(TASK_VERIFIER[task], p.solution, p.gold, p.meta)["correct"]
        seen.add(p.question)
        return bool(ok)

    return tuple(_draw(random.Random(SPLIT_SEEDS["few-shot"]), task, k, difficulty, answer_format, keep,
                       "distinct few-shot examples with a correct solution"))


def few_shot_examples(cfg: DataConfig) -> list[Problem]:
    """The data.few_shot worked examples shown before every problem: the first k distinct problems of the
    `few-shot` split (seed 0 whatever run.seed is, so the same for every prompt and run; k=2 is a prefix of
    k=4) whose solution is right. load_problems keeps their questions out of train and eval."""
    if not cfg.few_shot:
        return []
    return list(_few_shot(cfg.task, cfg.few_shot, cfg.difficulty, cfg.answer_format))


def format_answer(answer: str, answer_format: str) -> str:
    return f"\\boxed{{{answer}}}" if answer_format == "boxed" else f"Answer: {answer}"


INSTRUCTIONS = {
    "answer_line": " Finish with Answer: <answer>.",
    "boxed": " Put the final answer in \\boxed{}.",
}


# ---------------------------------------------------------------- files

def _gsm8k_gold(answer: Any) -> str:
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError("field 'answer' must be a string containing '#### <answer>'")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (brace-matched), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i != -1 and text[start + 6:i].strip() == "":
            depth, j = 0, i
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def _row_to_problem(row: dict[str, Any], cfg: DataConfig) -> Problem:
    def need(name: str) -> Any:
        if name not in row or row[name] is None:
            raise ValueError(f"missing field {name!r}")
        return row[name]

    if cfg.layout == "gsm8k":
        q, gold = need("question"), _gsm8k_gold(need("answer"))
    elif cfg.layout == "math":
        q = need("problem")
        gold = row.get("answer") or last_boxed(str(need("solution")))
        if gold is None:
            raise ValueError("field 'solution' has no \\boxed{} answer and there is no 'answer' field")
    elif cfg.layout == "dapo":
        prompt = need("prompt")
        if isinstance(prompt, list):
            users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            if not users or not isinstance(users[-1], str):
                raise ValueError("field 'prompt' has no user message")
            q = users[-1]
        else:
            q = prompt
        rm = need("reward_model")
        if not isinstance(rm, dict) or rm.get("ground_truth") in (None, ""):
            raise ValueError("field 'reward_model.ground_truth' is missing")
        gold = str(rm["ground_truth"])
    else:
        q, gold = need(cfg.prompt_field), need(cfg.answer_field)
    if not isinstance(q, str) or not q.strip():
        raise ValueError("the prompt is empty or not a string")
    return Problem(q.strip(), str(gold).strip(), {"task": "math"})


def _check_jsonl(path: Path) -> None:
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: row {i}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {i}: a row must be a JSON object")


def file_problems(path: str | Path, cfg: DataConfig) -> list[Problem]:
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
    if kind == "json":
        _check_jsonl(path)  # datasets' own error does not say which row is broken
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train",
                                   cache_dir=str(_datasets_cache()))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"{path}: cannot be read as {kind}: {e}") from None
    out = []
    for i, row in enumerate(ds):
        try:
            out.append(_row_to_problem(row, cfg))
        except ValueError as e:
            raise DataError(f"{path}: row {i}: {e}") from None
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _datasets_cache() -> Path:
    from cluster.runtime import cache_dir

    return cache_dir("datasets")


# ---------------------------------------------------------------- splits and rendering

def load_problems(cfg: DataConfig, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems for the configured task."""
    if cfg.task in SYNTHETIC:
        shots = {p.question for p in few_shot_examples(cfg)}
        train = synthetic_problems(cfg.task, cfg.train_size, "train", seed, cfg.difficulty, cfg.answer_format,
                                   exclude=shots)
        held = synthetic_problems(cfg.task, cfg.eval_size, "eval", seed, cfg.difficulty, cfg.answer_format,
                                  exclude=shots | {p.question for p in train})
        return train, held
    train = file_problems(cfg.train_path, cfg)
    if cfg.eval_path:
        return train, file_problems(cfg.eval_path, cfg)
    if len(train) <= cfg.eval_size:
        raise DataError(f"{cfg.train_path}: {len(train)} rows cannot hold out data.eval_size={cfg.eval_size}")
    return train[:-cfg.eval_size], train[-cfg.eval_size:]


def user_message(p: Problem, answer_format: str) -> str:
    return p.question + INSTRUCTIONS[answer_format]


def render_text(p: Problem, tokenizer, cfg: DataConfig) -> str:
    """The prompt text of `p`: the data.few_shot examples (few_shot_examples) as earlier user/assistant turns
    of the chat template, or as "Q: ... A: ..." text without one, then the problem."""
    content = user_message(p, cfg.answer_format)
    shots = few_shot_examples(cfg)
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        turns = [m for e in shots for m in ({"role": "user", "content": user_message(e, cfg.answer_format)},
                                            {"role": "assistant", "content": e.solution})]
        return tokenizer.apply_chat_template([*turns, {"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    if not shots:
        return content + "\n"
    return "".join(f"Q: {user_message(e, cfg.answer_format)}\nA: {e.solution}\n\n" for e in shots) + \
        f"Q: {content}\nA:"


def render_prompts(problems: list[Problem], tokenizer, cfg: DataConfig, split: str) -> list[Prompt]:
    """Problems -> Prompts (chat template applied, tokenized); a too-long prompt names its row."""
    out = []
    for i, p in enumerate(problems):
        text = render_text(p, tokenizer, cfg)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            raise DataError(f"{split} row {i}: prompt has {len(ids)} tokens > data.max_prompt_tokens="
                            f"{cfg.max_prompt_tokens}")
        out.append(Prompt(f"{split}-{i}", text, np.asarray(ids, dtype=np.int32), p.gold, dict(p.meta)))
    return out



class PromptStream:
    """Training prompts in a reshuffled order each epoch; its position is saved with checkpoints."""

    def __init__(self, prompts: list[Prompt], batch: int, seed: int):
        self.prompts, self.batch, self.seed = prompts, batch, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next(self, n: int | None = None) -> list[Prompt]:
        """The next `n` prompts (default: the batch)."""
        n = self.batch if n is None else n
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            draw = self.epoch * len(self._order) + self.pos
            out.append(dataclasses.replace(self.prompts[self._order[self.pos]], draw=draw))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()
