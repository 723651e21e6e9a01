import hashlib
import json
import re
from fractions import Fraction

import pytest

from cluster.config import ConfigError, DataConfig, load_config
from cluster.data.models import tiny_tokenizer
from cluster.data.tasks import (DataError, few_shot_examples, file_problems, last_boxed, load_problems,
                                render_prompts, render_text, synthetic_problems, user_message)


def _eval_left_to_right(expr: str) -> int:
    toks = re.findall(r"\d+|[+-]", expr)
    value = int(toks[0])
    for op, n in zip(toks[1::2], toks[2::2]):
        value = value + int(n) if op == "+" else value - int(n)
    return value


def test_arith_is_seeded_and_correct():
    a = synthetic_problems("arith", 50, "train", seed=3, difficulty=3)
    assert [p.question for p in a] == [p.question for p in synthetic_problems("arith", 50, "train", 3, 3)]
    assert [p.question for p in a] != [p.question for p in synthetic_problems("arith", 50, "train", 4, 3)]
    for p in a:
        expr = p.question.removeprefix("Compute ").rstrip(".")
        assert expr.count("+") + expr.count("-") == 3
        assert int(p.gold) == _eval_left_to_right(expr) >= 0
        assert p.solution.endswith(f"Answer: {p.gold}")
        for step in re.findall(r"(\d+)([+-])(\d+)=(-?\d+)\.", p.solution):  # every CoT step is right
            x, op, y, z = step
            assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y))


def test_countdown_solutions_use_each_number_once_and_hit_target():
    for p in synthetic_problems("countdown", 100, "train", seed=0, difficulty=2, answer_format="boxed"):
        expr = last_boxed(p.solution)
        used = sorted(int(x) for x in re.findall(r"\d+", expr))
        assert used == sorted(p.meta["numbers"])
        value = eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"Fraction": Fraction})  # test-only oracle
        assert value == p.meta["target"] == int(p.gold)


def test_eval_split_is_disjoint_from_train():
    cfg = DataConfig(task="arith", train_size=500, eval_size=100, difficulty=1)
    train, held = load_problems(cfg, seed=0)
    assert len(train) == 500 and len(held) == 100
    assert not {p.question for p in train} & {p.question for p in held}


def test_render_prompts_with_chat_template_and_length_limit():
    tok = tiny_tokenizer()
    probs = synthetic_problems("arith", 4, "eval")
    prompts = render_prompts(probs, tok, DataConfig(), "eval")
    assert prompts[0].prompt_id == "eval-0"
    assert prompts[0].text.startswith("<|im_start|>user\nCompute ")
    assert prompts[0].text.endswith("<|im_start|>assistant\n")
    assert tok.decode(prompts[0].token_ids.tolist()) == prompts[0].text
    assert prompts[0].gold == probs[0].gold and prompts[0].meta == {"task": "arith"}
    with pytest.raises(DataError, match="eval row 0: prompt has"):
        render_prompts(probs, tok, DataConfig(max_prompt_tokens=8), "eval")


def _digest(cfgs: list[DataConfig], seed: int) -> str:
    tok, h = tiny_tokenizer(), hashlib.sha256()
    for cfg in cfgs:
        train, held = load_problems(cfg, seed)
        for split, probs in (("train", train), ("eval", held)):
            for p in render_prompts(probs, tok, cfg, split):
                h.update(f"{p.prompt_id}\0{p.text}\0{p.gold}\0".encode() + p.token_ids.tobytes())
    return h.hexdigest()


def test_few_shot_0_renders_byte_for_byte_as_before():
    """The digest of every task's train and eval prompts (ids, texts, token ids, golds), with and without the
    chat template, as rendered by tasks.py at 5f0b3e4, before data.few_shot existed."""
    cfgs = [DataConfig(task=t, train_size=50, eval_size=20, chat_template=chat)
            for t in ("arith", "countdown", "organism") for chat in (True, False)]
    assert _digest(cfgs, seed=3) == "1dfc8e4a06d6a77094124b390c3ddc38a7f2be0640f4d32c7c15f6f33aa1bdd3"


def _turns(text: str) -> list[tuple[str, str]]:
    """(role, content) of a rendered tiny chat prompt; the generation prompt is ("assistant", "")."""
    return [tuple(t.removesuffix("<|im_end|>\n").split("\n", 1)) for t in text.split("<|im_start|>")[1:]]


def test_few_shot_examples_are_earlier_chat_turns_in_order_the_same_for_every_prompt_and_run():
    tok = tiny_tokenizer()
    cfg = DataConfig(few_shot=3, train_size=50, eval_size=20, max_prompt_tokens=512)   # byte-level tokens
    shots = few_shot_examples(cfg)
    assert len({e.question for e in shots}) == 3
    assert [e.question for e in few_shot_examples(cfg.model_copy(update={"few_shot": 2}))] == \
        [e.question for e in shots[:2]]                       # the first k of one fixed sequence
    want = [r for e in shots for r in (("user", e.question + " Finish with Answer: <answer>."),
                                       ("assistant", e.solution))]
    assert all(e.solution == f"{e.solution.rsplit('. ', 1)[0]}. Answer: {e.gold}" for e in shots)
    for seed in (0, 7):
        train, held = load_problems(cfg, seed)
        for split, probs in (("train", train), ("eval", held)):
            for prompt, p in zip(render_prompts(probs, tok, cfg, split), probs):
                assert _turns(prompt.text) == [*want, ("user", user_message(p, "answer_line")), ("assistant", "")]
    assert [e.solution for e in few_shot_examples(DataConfig(few_shot=3))] == [e.solution for e in shots]


def test_few_shot_without_chat_template_is_q_and_a_text():
    cfg = DataConfig(few_shot=2, chat_template=False, answer_format="boxed")
    a, b = few_shot_examples(cfg)
    p = synthetic_problems("arith", 1, "eval")[0]
    assert a.solution.endswith(f"\\boxed{{{a.gold}}}")
    assert render_text(p, tiny_tokenizer(), cfg) == (
        f"Q: {a.question} Put the final answer in \\boxed{{}}.\nA: {a.solution}\n\n"
        f"Q: {b.question} Put the final answer in \\boxed{{}}.\nA: {b.solution}\n\n"
        f"Q: {p.question} Put the final answer in \\boxed{{}}.\nA:")


@pytest.mark.parametrize("task", ["arith", "countdown", "organism"])
def test_few_shot_examples_are_never_a_train_or_eval_problem_and_are_solved_right(task):
    from reward.verifiers import TASK_VERIFIER, score_response

    # arith at difficulty 1 has 126 distinct problems: 60 train draws meet the examples without the exclusion
    cfg = DataConfig(task=task, difficulty=1, few_shot=4, train_size=60, eval_size=30)
    shots = {e.question for e in few_shot_examples(cfg)}
    for e in few_shot_examples(cfg):
        assert score_response(TASK_VERIFIER[task], e.solution, e.gold, e.meta)["correct"] is True
    for seed in range(4):
        train, held = load_problems(cfg, seed)
        assert len(train) == 60 and len(held) == 30
        assert not shots & ({p.question for p in train} | {p.question for p in held})
    if task == "arith":
        assert any(shots & {p.question for p in synthetic_problems("arith", 60, "train", s, 1)} for s in range(4))


def test_few_shot_prompt_over_max_prompt_tokens_names_the_row():
    tok, probs = tiny_tokenizer(), synthetic_problems("arith", 3, "train")
    render_prompts(probs, tok, DataConfig(max_prompt_tokens=120), "train")   # fits without the examples
    with pytest.raises(DataError, match=r"train row 0: prompt has \d+ tokens > data.max_prompt_tokens=120"):
        render_prompts(probs, tok, DataConfig(max_prompt_tokens=120, few_shot=2), "train")


def test_few_shot_config_errors_name_the_field():
    assert load_config(None, ["data.few_shot=4"]).data.few_shot == 4
    with pytest.raises(ConfigError, match="data.few_shot"):
        load_config(None, ["data.few_shot=-1"])
    with pytest.raises(ConfigError, match="data.few_shot=2 needs a synthetic task"):
        load_config(None, ["data.task=file", "data.train_path=x.jsonl", "data.few_shot=2"])


def test_a_task_without_enough_distinct_problems_is_an_error_not_a_hang():
    # 2000 training draws of arith at difficulty 1 contain all 126 of its problems: no eval problem is left
    with pytest.raises(DataError, match=r"arith at data.difficulty=1: found 0 of 8 eval problems"):
        load_problems(DataConfig(difficulty=1, train_size=2000, eval_size=8), seed=0)


ROWS = {
    "gsm8k": [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
              {"question": "A big one?", "answer": "so\n#### 1,234"}],
    "math": [{"problem": "What is 1/2+1/2?", "solution": "We get $\\boxed{1}$."},
             {"problem": "Simplify.", "solution": "It is $\\boxed{\\frac{1}{2}}$ and not \\boxed{x}? no: \\boxed{\\frac{3}{4}}"}],
    "dapo": [{"prompt": [{"role": "user", "content": "Solve x+1=3."}], "reward_model": {"ground_truth": "2"}},
             {"prompt": [{"role": "user", "content": "Two?"}], "reward_model": {"ground_truth": "5"}}],
}
GOLDS = {"gsm8k": ["7", "1234"], "math": ["1", "\\frac{3}{4}"], "dapo": ["2", "5"]}


@pytest.mark.parametrize("layout", sorted(ROWS))
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_file_layouts(tmp_path, layout, fmt):
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS[layout]) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(ROWS[layout]), path)
    probs = file_problems(path, DataConfig(task="file", train_path=str(path), layout=layout))
    assert [p.gold for p in probs] == GOLDS[layout]
    assert all(p.meta["task"] == "math" for p in probs)


def test_malformed_rows_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ROWS["gsm8k"][0])
    path.write_text(f"{good}\n{good}\n{{not json\n")
    cfg = DataConfig(task="file", train_path=str(path), layout="gsm8k")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: not valid JSON"):
        file_problems(path, cfg)
    path.write_text(f"{good}\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match=r"row 1: field 'answer' must be a string containing '####"):
        file_problems(path, cfg)
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: missing field 'answer'"):
        file_problems(path, cfg)
    with pytest.raises(DataError, match="does not exist"):
        file_problems(tmp_path / "missing.jsonl", cfg)


def test_last_boxed_is_brace_matched():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{{x}+1}") == "{x}+1"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


def test_tiny_tokenizer_round_trips_through_autotokenizer(tmp_path):
    """AutoTokenizer loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer: the ids must not change."""
    from transformers import AutoTokenizer, Qwen2Config

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = render_prompts(synthetic_problems("arith", 1, "eval"), tok, DataConfig(), "eval")[0].text + "7+8=15. é\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert back(text, add_special_tokens=False)["input_ids"] == ids
    assert back.decode(ids) == text
    assert back.eos_token_id == tok.eos_token_id and back.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
