import json
import re
from fractions import Fraction

import pytest

from cluster.config import DataConfig
from cluster.data.models import tiny_tokenizer
from cluster.data.tasks import (DataError, file_problems, last_boxed, load_problems, render_prompts,
                           synthetic_problems)


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
