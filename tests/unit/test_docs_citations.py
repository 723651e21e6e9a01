"""Every citation of a reference document points at a document of this repository, and at a part of it
that exists.

- No tracked file cites the upper-case reference files that live outside the repository (their names are
  assembled below, so this file does not cite them itself); the repository's own docs replace them:
  docs/algorithms.md, docs/platform.md, docs/architecture.md.
- `docs/algorithms.md N.M` (also lists and ranges: "1.3, 2.4-2.6, 5", "1.4/6", "4 and 5") names sections
  that exist: headings "## N ..." or "### N.M ..." of docs/algorithms.md.
- `docs/platform.md "Heading"` names a heading of docs/platform.md exactly, and no citation of
  docs/platform.md outside that file leaves the heading out.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALGORITHMS = ROOT / "docs" / "algorithms.md"
PLATFORM = ROOT / "docs" / "platform.md"

EXTERNAL = ("ALGORITHMS", "PLATFORM", "ARCHITECTURE", "ANCHORS", "STYLE")
EXTERNAL_RE = re.compile(r"\b(?:" + "|".join(EXTERNAL) + r")\.md\b")

_NUM = r"\d+(?:\.\d+)?"
ALG_CITE = re.compile(r"docs/algorithms\.md[ ,(]*(?:§\s*|sections?\s+)?"
                      rf"({_NUM}(?:\s*(?:,|-|–|/|\band\b)\s*{_NUM})*)")
PLAT_CITE = re.compile(r'docs/platform\.md(\s*"([^"\n]+)")?')
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
SECTION = re.compile(rf"^#{{2,3}}\s+({_NUM})\.?\s", re.M)


def tracked_text_files() -> list[tuple[str, str]]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():   # listed in the index but moved or deleted in the work tree
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue                        # binary (images)
        files.append((name, data.decode("utf-8", "replace")))
    return files


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def algorithm_sections() -> set[str]:
    return set(SECTION.findall(ALGORITHMS.read_text()))


def platform_headings() -> set[str]:
    return set(HEADING.findall(PLATFORM.read_text()))


@pytest.fixture(scope="module")
def files() -> list[tuple[str, str]]:
    return tracked_text_files()


def test_the_reference_docs_exist_and_keep_their_section_numbers():
    sections = algorithm_sections()
    # the numbering every citation relies on (one-to-one with the sections the recipes were written from)
    expected = {"1", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8", "2", "2.1", "2.2", "2.3", "2.4",
                "2.5", "2.6", "2.7", "3", "3.1", "3.2", "3.3", "4", "4.1", "4.2", "4.3", "5", "6", "7", "8"}
    assert expected <= sections, f"docs/algorithms.md lacks sections {sorted(expected - sections)}"
    assert platform_headings(), "docs/platform.md has no headings"


def test_no_file_cites_the_reference_docs_outside_the_repository(files):
    bad = [f"{name}:{line_of(text, m.start())}: {m.group()}"
           for name, text in files for m in EXTERNAL_RE.finditer(text)]
    assert not bad, ("cite docs/algorithms.md, docs/platform.md or docs/architecture.md instead:\n  "
                     + "\n  ".join(bad))


def test_every_cited_algorithms_section_exists(files):
    sections = algorithm_sections()
    cited = 0
    bad = []
    for name, text in files:
        for m in ALG_CITE.finditer(text):
            for num in re.findall(_NUM, m.group(1)):
                cited += 1
                if num not in sections:
                    bad.append(f"{name}:{line_of(text, m.start())}: {m.group()!r} (no section {num})")
    assert not bad, "citations of missing docs/algorithms.md sections:\n  " + "\n  ".join(bad)
    assert cited > 0, "no docs/algorithms.md citation found: is the pattern still right?"


def test_every_platform_citation_names_an_existing_heading(files):
    headings = platform_headings()
    bad = []
    for name, text in files:
        if name in ("docs/platform.md", "tests/unit/test_docs_citations.py"):   # the doc; this file's examples
            continue
        for m in PLAT_CITE.finditer(text):
            where = f"{name}:{line_of(text, m.start())}"
            if m.group(2) is None:
                bad.append(f'{where}: name the heading: docs/platform.md "<heading>"')
            elif m.group(2) not in headings:
                bad.append(f"{where}: docs/platform.md has no heading {m.group(2)!r}")
    assert not bad, "\n  ".join(["bad docs/platform.md citations:"] + bad)


def test_the_citation_patterns_parse_what_they_should():
    def nums(s: str) -> list[str]:
        return [n for m in ALG_CITE.finditer(s) for n in re.findall(_NUM, m.group(1))]

    assert nums("(docs/algorithms.md 1.3, 2.4-2.6, 3.1, 5).") == ["1.3", "2.4", "2.6", "3.1", "5"]
    assert nums("# docs/algorithms.md 1.4/6: DAPO verifier +1") == ["1.4", "6"]
    assert nums("docs/algorithms.md 1.4: 32B ~1,400 steps") == ["1.4"]
    assert nums("docs/algorithms.md (sections 1.4, 2.5-2.7, 4.1), not") == ["1.4", "2.5", "2.7", "4.1"]
    assert nums("docs/algorithms.md 4 and 5)") == ["4", "5"]
    assert nums("not given in docs/algorithms.md; 800 steps") == []
    m = PLAT_CITE.search('(docs/platform.md "Weight broadcast on CPU")')
    assert m and m.group(2) == "Weight broadcast on CPU"
