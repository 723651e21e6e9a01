"""`forkrl grade` (reward.cli.grade_stream) with its real isolated worker."""

import io
import json

import pytest

from reward.cli import grade_stream


def grade(lines, **kw):
    out = io.StringIO()
    kw = {"answer": None, "vote": False, "timeout": 5.0, **kw}
    code = grade_stream(io.StringIO("".join(l + "\n" for l in lines)), out, **kw)
    return code, [json.loads(x) for x in out.getvalue().splitlines()]


@pytest.mark.timeout(120)
def test_grades_each_line_and_survives_a_hang():
    lines = [json.dumps("so \\boxed{\\frac{1}{2}}."), json.dumps("Answer: 0.5"), json.dumps("Answer: 1/3"),
             "not json", json.dumps(["a list"]), json.dumps("\\boxed{10^{10^{10^{10}}}}"), "",
             json.dumps("Answer: \\dfrac{2}{4}")]
    code, rows = grade(lines, task="math", answer="0.5", timeout=1.0)
    assert code == 1                                       # two lines were not JSON strings
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 8]
    assert [r.get("reward") for r in rows] == [1.0, 1.0, 0.0, None, None, 0.0, 1.0]
    assert [r.get("answer") for r in rows] == ["\\frac{1}{2}", "0.5", "1/3", None, None, None, "\\dfrac{2}{4}"]
    assert "JSON string" in rows[3]["error"] and rows[5]["error"] == "timeout"
    assert all(r["seconds"] >= 0 for r in rows if "reward" in r)


@pytest.mark.timeout(120)
def test_vote_and_countdown():
    lines = [json.dumps(t) for t in ["Answer: 0.5", "\\boxed{1/2}", "Answer: 1/3", "nothing", "Answer: \\frac{1}{3}",
                                     "Answer: 2"]]
    code, rows = grade(lines, task="math", vote=True, answer="1/3")
    assert code == 0
    assert [r["reward"] for r in rows] == [1, 1, 0, 0, 0, 0]     # 2-2 tie: the first answer's cluster wins
    assert [r["cluster"] for r in rows] == [0, 0, 1, None, 1, 2]
    assert {r["label"] for r in rows} == {"0.5"} and {r["votes"] for r in rows} == {2}
    assert [r["correct"] for r in rows] == [False, False, True, False, True, False]

    code, rows = grade([json.dumps("8*3=24. 24-4=20. Answer: (8*3)-4"), json.dumps("Answer: 8*3-4-4")],
                       task="countdown", answer="target=20 numbers=3,8,4")
    assert code == 0 and [r["reward"] for r in rows] == [1.0, 0.0]


@pytest.mark.parametrize("kw,msg", [
    ({"task": "chess", "answer": "1"}, "--task"),
    ({"task": "numeric"}, "--answer is required"),
    ({"task": "numeric", "answer": "seven"}, "has no number"),
    ({"task": "countdown", "answer": "24"}, "target=24 numbers"),
    ({"task": "math", "answer": "1", "timeout": 0.0}, "--timeout"),
])
def test_bad_options_exit_2(kw, msg, capsys):
    assert grade_stream(io.StringIO(""), io.StringIO(), **{"answer": None, "vote": False, "timeout": 5.0, **kw}) == 2
    assert msg in capsys.readouterr().err
