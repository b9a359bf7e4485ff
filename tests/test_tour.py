"""The documentation's Python examples run, so they cannot rot.

Every ```python block of docs/*.md is run: docs/tour.md's in order in one namespace, like a notebook
(later blocks use what earlier ones defined), each other file's likewise in a namespace of its own.
A block that cannot run offline (it needs a downloaded checkpoint, a server, your files) is marked
by an HTML comment on the line before its fence, which renders as nothing:

    <!-- not run: needs a downloaded checkpoint -->

Such a block is still compiled, so its syntax is checked. The tour may skip nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOUR = DOCS / "tour.md"
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, reason it is not run or None) for each ```python block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        start = index
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```"), None)
        assert end is not None, f"{path.name}:{start + 1}: a ```python block is never closed"
        previous = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.match(previous)
        blocks.append((start + 1, "\n".join(lines[start + 1:end]) + "\n", marker.group(1) if marker else None))
        index = end + 1
    return blocks


def run_blocks(path: Path) -> int:
    """Run the runnable blocks of `path` in order in one namespace, compile the others; returns how many ran."""
    namespace = {"__name__": f"docs_{path.stem}"}
    ran = 0
    for line, code, reason in python_blocks(path):
        compiled = compile(code, f"{path.relative_to(ROOT)} (block at line {line})", "exec")
        if reason is None:
            exec(compiled, namespace)
            ran += 1
    return ran


def test_every_tour_block_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the repository
    blocks = python_blocks(TOUR)
    assert [line for line, _, reason in blocks if reason is not None] == [], "the tour skips no block"
    assert run_blocks(TOUR) == len(blocks)
    out = capsys.readouterr().out
    assert "a purple circle, a red triangle and a green circle" in out  # the first block's greedy caption


def test_every_tour_section_has_an_experiment():
    text = TOUR.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) >= 13
    for section in sections:
        assert "```python" in section, f"section {section.splitlines()[0]!r} has no snippet"
        assert "](../paligemma/" in section or "](../BENCHMARKS.md)" in section, \
            f"section {section.splitlines()[0]!r} links no code"


def test_tour_pictures_exist():
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", TOUR.read_text(encoding="utf-8")):
        assert (DOCS / target).resolve().is_file(), f"docs/tour.md shows {target}, which does not exist"


def test_quoted_measurements_are_in_benchmarks_md():
    """The performance section's `measured = dict(...)` quotes BENCHMARKS.md; each figure must still be there."""
    tree = ast.parse("\n".join(code for _, code, _ in python_blocks(TOUR)))
    quoted = [node.value for node in ast.walk(tree)
              if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "measured" for t in node.targets)]
    assert len(quoted) == 1 and isinstance(quoted[0], ast.Call)
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    for keyword in quoted[0].keywords:
        figure = ast.literal_eval(keyword.value)
        assert re.search(rf"(?<![\d.]){re.escape(str(figure))}(?![\d])", benchmarks), \
            f"docs/tour.md quotes {keyword.arg}={figure}, which BENCHMARKS.md no longer has"


@pytest.mark.parametrize("path", sorted(p for p in DOCS.glob("*.md") if p != TOUR), ids=lambda p: p.name)
def test_other_docs_blocks_run_or_say_why(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run_blocks(path)


def test_block_extraction_sees_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n<!-- not run: needs a server -->\n```python\nimport nope\n```\n"
                    "```bash\nls\n```\n", encoding="utf-8")
    assert python_blocks(page) == [(2, "x = 1\n", None), (7, "import nope\n", "needs a server")]
