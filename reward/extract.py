"""The final answer of a response: what it states as final (docs/rewards.md "The final answer").

Its \\boxed{...}, "Answer: ..." lines (the DAPO prompt format), GSM8K "#### ..." lines and <answer>...</answer>
tags. One distinct statement is the answer; several different ones are one answer, their list (so hedging
over boxes is never paid for its last box). No "last number anywhere" fallback: the format is enforced by the
extractor, as in every paper we follow. Also the LaTeX command helpers the number grammar and the math
verifier share.
"""

from __future__ import annotations

import bisect
import functools
import re

# A final answer longer than this is unextractable: real final answers are short, and sympy on a long one
# only burns the timeout (a 1 MB \boxed{...} or 10k nested braces score 0 at once).
MAX_ANSWER_CHARS = 1000


class BadInput(ValueError):
    """The gold answer or task data (not the model output) is unusable; the message names the field."""


_ANSWER_LINE = re.compile(r"(?i)\banswer\s*[:：]\s*([^\n]*)")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_BOX = re.compile(r"\\boxed\s*\{")
_BRACES = re.compile(r"[{}]")
_MAX_STATEMENTS = 100  # more distinct final answers than this is not an answer


def group_end(text: str, open_at: int) -> int:
    """Index of the brace closing the one at text[open_at], or -1 if unclosed within MAX_ANSWER_CHARS."""
    depth = 0
    for m in _BRACES.finditer(text, open_at, open_at + MAX_ANSWER_CHARS + 2):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return -1


def _boxes(text: str) -> list[tuple[int, int, str | None]] | None:
    """(start, end, content) of each outermost \\boxed{...}; None if any box is unclosed or too long (such a
    text has no well-formed final answer). Scanned from the end so that a hostile unclosed box stops it at
    once; a box inside another is part of the outer one's content."""
    found: list[tuple[int, int, str | None]] = []
    for m in reversed(list(_BOX.finditer(text))):
        end = group_end(text, m.end() - 1)
        if end < 0:
            return None
        while found and found[-1][0] < end:
            found.pop()  # a box inside this one is part of its content
        found.append((m.start(), end, text[m.end():end]))
    return found[::-1]


def _tags(text: str) -> list[tuple[int, int, str]]:
    out, pos = [], 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start)
        if end < 0:
            break
        nxt = text.rfind("<answer>", start, end)  # the innermost opening tag before this closing one
        out.append((nxt, end, text[nxt + len("<answer>"):end]))
        pos = end + len("</answer>")
    return out


def _unbox(s: str) -> str | None:
    """'\\boxed{\\boxed{5}}' -> '5'; a box that is only part of the content ('5 \\boxed{6}') -> None."""
    while (m := _BOX.match(s)) and group_end(s, m.end() - 1) == len(s) - 1:
        s = s[m.end():-1].strip()
    return None if "\\boxed" in s else s


def final_statements(text: str) -> list[str] | None:
    """Every final-answer statement of a response, cleaned, in order, without repeats: each \\boxed{...},
    each "Answer: ..." line, "#### ..." line and <answer>...</answer> tag (a line or tag holding a box is
    that box; an empty line is not a statement). None when a box or tag is empty, or a statement is unclosed
    or too long: a malformed statement is no answer."""
    boxes = _boxes(text)
    if boxes is None:
        return None
    starts = [s for s, _, _ in boxes]

    def holds_box(lo: int, hi: int) -> bool:
        i = bisect.bisect_left(starts, lo)
        return i < len(starts) and starts[i] <= hi

    items = [(s, c) for s, _, c in boxes]
    for pattern in (_ANSWER_LINE, _HASHES):  # an empty line ("Final Answer:" then the box below) is a heading
        items += [(m.start(), m.group(1)) for m in pattern.finditer(text)
                  if m.group(1).strip() and not holds_box(m.start(1), m.end(1))]
    items += [(s, c) for s, e, c in _tags(text) if not holds_box(s, e)]
    out: list[str] = []
    for _, content in sorted(items, key=lambda sc: sc[0]):
        clean = clean_answer(content)
        clean = None if clean is None else _unbox(clean)
        if not clean:
            return None
        if clean not in out:
            out.append(clean)
            if len(out) > _MAX_STATEMENTS:
                return None
    return out


def clean_answer(s: str | None) -> str | None:
    """Strip whitespace, $ / \\( \\) delimiters, a trailing period and invisible \\phantom{...} groups;
    None if empty or too long."""
    if s is None:
        return None
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    # Answers travel on the stream (msgpack, UTF-8): lone surrogates become '?', NULs are dropped.
    s = s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    s = drop_commands(s, _INVISIBLE)
    if s is None:
        return None
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        if s == before:
            break
    return s or None


def extract_final(text: str) -> str | None:
    """The final answer of a response (module docstring): its one final-answer statement, or, when it states
    several different ones, all of them as one comma-separated list (math reads it as a set: an answer
    hedged over several boxes is the set of them, never its last box). None when there is none."""
    found = final_statements(text)
    if not found:
        return None
    joined = ", ".join(found)
    return joined if len(joined) <= MAX_ANSWER_CHARS else None


# A LaTeX command with one brace argument, e.g. \text{...}: where it is and where its argument ends.
_INVISIBLE = ("phantom", "hphantom", "vphantom")
TEXTLIKE = ("text", "textrm", "textnormal", "textbf", "textit", "textsf", "texttt", "mathrm", "mathbf",
             "mathit", "mathsf", "mathtt", "mathnormal", "mbox")


@functools.lru_cache(maxsize=None)
def _command_re(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\\(?:" + "|".join(names) + r")\s*\{")


def find_commands(s: str, names: tuple[str, ...]) -> list[tuple[int, int, int]] | None:
    """(start, argument start, closing brace) of each \\name{...} of s, in order; None if one is unclosed."""
    out = []
    for m in _command_re(names).finditer(s):
        end = group_end(s, m.end() - 1)
        if end < 0:
            return None
        out.append((m.start(), m.end(), end))
    return out


def drop_commands(s: str, names: tuple[str, ...], keep: bool = False) -> str | None:
    """Remove each \\name{arg} of s (keep=True: replace it by arg). None if one is unclosed."""
    for _ in range(len(s)):
        found = find_commands(s, names)
        if found is None:
            return None
        if not found:
            return s
        start, arg, end = found[-1]  # the last one holds no other command after its start
        s = s[:start] + (s[arg:end] if keep else "") + s[end + 1:]
    return s
