"""`forkrl grade` (reward.cli.grade_stream) with its real isolated worker."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reward.cli import grade_stream
from reward.extract import MAX_ANSWER_CHARS


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
    graded = [r for r in rows if "reward" in r]
    assert all(0 < r["seconds"] < 1.0 for r in graded if r.get("error") != "timeout")   # answered in time
    assert rows[5]["seconds"] >= 1.0                       # the hang was stopped at --timeout, not before


@pytest.mark.timeout(120)
def test_vote_and_countdown():
    lines = [json.dumps(t) for t in ["Answer: 0.5", "\\boxed{1/2}", "Answer: 1/3", "nothing", "Answer: \\frac{1}{3}",
                                     "Answer: 2", "Answer: 50\\%"]]
    code, rows = grade(lines, task="math", vote=True, answer="1/3")
    assert code == 0
    assert [r["reward"] for r in rows] == [1, 1, 0, 0, 0, 0, 1]  # 50% = 0.5 = 1/2: three votes
    assert [r["cluster"] for r in rows] == [0, 0, 1, None, 1, 2, 0]  # numbered by their smallest key
    assert {r["label"] for r in rows} == {"1/2"} and {r["votes"] for r in rows} == {3}
    assert [r["correct"] for r in rows] == [False, False, True, False, True, False, False]
    code, rows = grade(lines[:6], task="math", vote=True)       # 2-2 tie: no label, nobody agrees
    assert [r["reward"] for r in rows] == [0] * 6 and {r["label"] for r in rows} == {None}
    assert {r["votes"] for r in rows} == {0} and [r["correct"] for r in rows] == [None] * 6

    code, rows = grade([json.dumps("8*3=24. 24-4=20. Answer: (8*3)-4"), json.dumps("Answer: 8*3-4-4")],
                       task="countdown", answer="target=20 numbers=3,8,4")
    assert code == 0 and [r["reward"] for r in rows] == [1.0, 0.0]


@pytest.mark.parametrize("kw,msg", [
    ({"task": "chess", "answer": "1"}, "--task"),
    ({"task": "numeric"}, "--answer is required"),
    ({"task": "numeric", "answer": "seven"}, "is not one number"),
    ({"task": "numeric", "answer": "\\boxed{1}\\boxed{2}"}, "is not one number"),
    ({"task": "countdown", "answer": "24"}, "target=24 numbers"),
    ({"task": "math", "answer": "1", "timeout": 0.0}, "--timeout"),
    ({"task": "math", "answer": "1", "timeout": float("inf")}, "--timeout inf"),
    ({"task": "math", "answer": "1", "timeout": float("nan")}, "--timeout nan"),
])
def test_bad_options_exit_2(kw, msg, capsys):
    assert grade_stream(io.StringIO(""), io.StringIO(), **{"answer": None, "vote": False, "timeout": 5.0, **kw}) == 2
    assert msg in capsys.readouterr().err


# ------------------------------------------------------------------------------ the real `forkrl grade` CLI

FORKRL = str(Path(sys.executable).with_name("forkrl"))


def forkrl_grade(args, lines, env=None):
    """Run `forkrl grade ARGS` with lines (str: JSON-encoded here; bytes: sent as they are) on stdin."""
    data = b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines)
    proc = subprocess.run([FORKRL, "grade", *args], input=data, capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr.decode()


# (args, responses, expected rewards): the commands of issue 17, and the answers it lists as paid wrongly
ISSUE_COMMANDS = [
    (["--task", "numeric", "--answer", "400"], ["\\boxed{1e400}", "\\boxed{4e2}", "\\boxed{400}"], [0, 1, 1]),
    (["--task", "numeric", "--answer", "10"], ["\\boxed{2^{10}}", "\\boxed{10}"], [0, 1]),
    (["--task", "numeric", "--answer", "5"], ["\\boxed{3\\times 10^{5}}"], [0]),
    (["--task", "numeric", "--answer", "300000"], ["\\boxed{3\\times 10^{5}}"], [1]),
    (["--task", "numeric", "--answer", "2"], ["\\boxed{\\sqrt{2}}"], [0]),
    (["--task", "numeric", "--answer", "3"], ["\\boxed{1.5e3}"], [0]),
    (["--task", "numeric", "--answer", "1500"], ["\\boxed{1.5e3}"], [1]),
    (["--task", "numeric", "--answer", "-3"], ["\\boxed{10-3}"], [0]),
    (["--task", "numeric", "--answer", "12"], ["\\boxed{\\frac12}"], [0]),
    (["--task", "numeric", "--answer", "0.5"], ["\\boxed{\\frac12}"], [1]),
    (["--task", "numeric", "--answer", "10"], ["\\boxed{0x10}"], [0]),
    (["--task", "math", "--answer", "\\frac{1}{\\text{e}}"],
     ["\\boxed{\\frac{1}{\\text{e}^2}}", "\\boxed{e^{-1}}"], [0, 1]),
    (["--task", "math", "--answer", "\\sqrt{\\mathrm{e}}"],
     ["\\boxed{\\sqrt{\\mathrm{e}+1}}", "\\boxed{\\sqrt{e}}"], [0, 1]),
    (["--task", "math", "--answer", "\\boxed{1}\\boxed{2}"],
     ["\\boxed{2}", "\\boxed{1}\\boxed{2}", "\\boxed{2} and \\boxed{1}", "\\boxed{1, 2}"], [0, 1, 1, 1]),
    (["--task", "math", "--answer", "1000"], ["\\boxed{1 000}", "\\boxed{1\\,000}", "\\boxed{1{,}000}"], [1, 1, 1]),
    (["--task", "countdown", "--answer", "target=400 numbers=" + ",".join(["1"] * 400)],
     ["Answer: " + "+".join(["1"] * 400), "Answer: " + "+".join(["1"] * 399)], [1, 0]),
]


@pytest.mark.timeout(600)
def test_issue_commands_through_the_real_cli():
    for args, responses, rewards in ISSUE_COMMANDS:
        code, rows, err = forkrl_grade(args, responses)
        assert code == 0 and err == "", (args, err)
        assert [r["reward"] for r in rows] == rewards, (args, rows)


@pytest.mark.timeout(300)
def test_issue_vote_in_every_order_through_the_real_cli():
    for order in (["50\\%", "0.5", "50"], ["0.5", "50", "50\\%"], ["50", "50\\%", "0.5"]):
        code, rows, _ = forkrl_grade(["--task", "math", "--vote"], [f"\\boxed{{{a}}}" for a in order])
        assert code == 0
        assert [r["reward"] for r in rows] == [0.0 if a == "50" else 1.0 for a in order]
        assert {r["label"] for r in rows} == {"1/2"} and {r["votes"] for r in rows} == {2}


@pytest.mark.timeout(300)
def test_invalid_utf8_stdin_with_a_strict_locale():
    lines = ["Answer: 7", b'"\\\\boxed{7}\xff\xfe tail"', b"\xc3\x28 not json", "Answer: 8"]
    code, rows, err = forkrl_grade(["--task", "numeric", "--answer", "7"], lines,
                                   env={"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C", "LANG": "C"})
    assert code == 1 and "Traceback" not in err                 # line 3 is not JSON: reported, the rest graded
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("reward") for r in rows] == [1.0, 1.0, None, 0.0]
    assert "JSON string" in rows[2]["error"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_bad_timeout_is_one_line_and_exit_2(value):
    code, rows, err = forkrl_grade(["--task", "math", "--answer", "1", "--timeout", value], ["\\boxed{1}"])
    assert code == 2 and rows == [] and "Traceback" not in err
    assert err.count("\n") == 1 and "--timeout" in err


def test_help_documents_fields_exit_codes_and_the_cap():
    out = subprocess.run([FORKRL, "grade", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"}).stdout
    out = " ".join(out.split())                           # however the help formatter wraps it
    for word in ("line", "reward", "answer", "correct", "seconds", "reason", "error", "cluster", "label", "votes",
                 "Exit codes", "0 every line graded", "1 some lines", "2 a bad option",
                 f"{MAX_ANSWER_CHARS} characters"):
        assert word in out, word
