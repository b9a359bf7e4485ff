"""The documentation's Python examples run, so they cannot rot.

Every ```python block of docs/*.md is run: docs/tour.md's in order in one namespace, like a notebook
(later blocks use what earlier ones defined), each other file's likewise in a namespace of its own.
A block that cannot run offline (it needs a downloaded checkpoint, a server, your files) is marked
by an HTML comment on the line before its fence, which renders as nothing:

    <!-- not run: needs a downloaded checkpoint -->

Such a block is still compiled, so its syntax is checked. The tour may skip nothing.

A ```text block right after a run block is what that block prints, and is checked line by line:
`...` matches anything, a decimal or a percentage matches within one unit of its last written
digit (37% is 36-38%, 0.033 is 0.032-0.034), and any other whole number exactly, so the outputs shown
hold on any CPU without hiding a real change.

When the model the pages run on changes (a new bundled demo model), `python -m pytest tests/test_tour.py
--update-doc-outputs` rewrites every ```text block that no longer matches with what its block prints now,
keeping the lines that still match as written (their `...` and rounding); then read the diff, and the
prose around it, which no test checks.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOUR = DOCS / "tour.md"
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")


NUMBER = re.compile(r"(?<![\w<])[-+]?\d+(?:\.\d+)?")  # not the digits inside <loc0717> or 1e+06


class Block(NamedTuple):
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the reason given by a `<!-- not run: ... -->` marker
    output: str | None  # the ```text block right after it: what it prints
    output_line: int | None  # that block's opening fence, 1-based


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        start = index
        end = _closing_fence(lines, start, path)
        previous = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.match(previous)
        after = next((i for i in range(end + 1, len(lines)) if lines[i].strip()), None)
        output = output_line = None
        if after is not None and lines[after].strip() == "```text":
            output_end = _closing_fence(lines, after, path)
            output, output_line = "\n".join(lines[after + 1:output_end]) + "\n", after + 1
        blocks.append(Block(start + 1, "\n".join(lines[start + 1:end]) + "\n", marker.group(1) if marker else None,
                            output, output_line))
        index = end + 1
    return blocks


def _closing_fence(lines: list[str], start: int, path: Path) -> int:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```"), None)
    assert end is not None, f"{path.name}:{start + 1}: a code block is never closed"
    return end


def line_matches(expected: str, actual: str) -> bool:
    """`actual` is what `expected` shows (the rules are in the module docstring)."""
    if "..." in expected:
        pattern = ".*".join(re.escape(part) for part in expected.split("..."))
        return re.fullmatch(pattern, actual) is not None
    shown, got = list(NUMBER.finditer(expected)), NUMBER.findall(actual)
    if NUMBER.split(expected) != NUMBER.split(actual) or len(shown) != len(got):
        return False
    for match, value in zip(shown, got):
        text = match.group()
        measured = "." in text or expected[match.end():match.end() + 1] == "%"  # a count must be exact
        tolerance = 10**-len(text.partition(".")[2]) * 1.001 if measured else 0
        if abs(float(text) - float(value)) > tolerance:
            return False
    return True


def updated_output(expected: list[str], actual: list[str]) -> list[str]:
    """The lines a ```text block should show now: where the line counts agree, each line that still
    matches stays as written (its `...`, its rounding) and the others become what was printed; otherwise
    all of what was printed."""
    if len(expected) != len(actual):
        return actual
    return [shown if line_matches(shown, printed) else printed for shown, printed in zip(expected, actual)]


def run_blocks(path: Path, update: bool = False) -> int:
    """Run the runnable blocks of `path` in order in one namespace, checking the outputs they show, and
    compile the others; returns how many ran. With `update`, an output that does not match is rewritten
    in the file (updated_output) instead of failing."""
    namespace = {"__name__": f"docs_{path.stem}"}
    ran, rewrites = 0, []
    for block in python_blocks(path):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (block at line {block.line})"
        compiled = compile(block.code, where, "exec")
        if block.not_run is not None:
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compiled, namespace)
        ran += 1
        if block.output is not None:
            expected, actual = block.output.splitlines(), printed.getvalue().splitlines()
            if len(expected) == len(actual) and all(map(line_matches, expected, actual)):
                continue
            assert update, f"{where} printed:\n{printed.getvalue()}\nbut the page shows:\n{block.output}"
            rewrites.append((block.output_line, len(expected), updated_output(expected, actual)))
    if rewrites:
        lines = path.read_text(encoding="utf-8").splitlines()
        for fence, old_length, new in reversed(rewrites):  # from the end, so earlier line numbers hold
            lines[fence:fence + old_length] = new
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ran


def test_every_tour_block_runs_and_prints_what_the_page_shows(monkeypatch, tmp_path, request):
    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the repository
    blocks = python_blocks(TOUR)
    assert [block.line for block in blocks if block.not_run is not None] == [], "the tour skips no block"
    assert sum(block.output is not None for block in blocks) >= len(blocks) - 2, "most blocks show their output"
    assert run_blocks(TOUR, update=request.config.getoption("--update-doc-outputs")) == len(blocks)


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
    tree = ast.parse("\n".join(block.code for block in python_blocks(TOUR)))
    quoted = [node.value for node in ast.walk(tree)
              if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "measured" for t in node.targets)]
    assert len(quoted) == 1 and isinstance(quoted[0], ast.Call)
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    for keyword in quoted[0].keywords:
        figure = ast.literal_eval(keyword.value)
        assert re.search(rf"(?<![\d.]){re.escape(str(figure))}(?![\d])", benchmarks), \
            f"docs/tour.md quotes {keyword.arg}={figure}, which BENCHMARKS.md no longer has"


@pytest.mark.parametrize("path", sorted(p for p in DOCS.glob("*.md") if p != TOUR), ids=lambda p: p.name)
def test_other_docs_blocks_run_or_say_why(path, monkeypatch, tmp_path, request):
    monkeypatch.chdir(tmp_path)
    run_blocks(path, update=request.config.getoption("--update-doc-outputs"))


def test_block_extraction_sees_markers_and_outputs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n```text\n1\n```\n<!-- not run: needs a server -->\n"
                    "```python\nimport nope\n```\n```bash\nls\n```\n", encoding="utf-8")
    assert python_blocks(page) == [(2, "x = 1\n", None, "1\n", 6), (10, "import nope\n", "needs a server", None, None)]


def test_update_rewrites_only_the_outputs_that_changed(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint('took 5 ms'); print(0.5)\n```\n\n```text\ntook ... ms\n0.7\n```\n"
                    "```python\nprint(1); print(2)\n```\n```text\n1\n```\nend\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="but the page shows"):
        run_blocks(page)
    assert run_blocks(page, update=True) == 2
    assert page.read_text(encoding="utf-8") == ("```python\nprint('took 5 ms'); print(0.5)\n```\n\n```text\n"
                                                "took ... ms\n0.5\n```\n```python\nprint(1); print(2)\n```\n"
                                                "```text\n1\n2\n```\nend\n")
    assert run_blocks(page) == 2


@pytest.mark.parametrize("expected, actual, same", [
    ("loss 0.033 over 12 tokens", "loss 0.034 over 12 tokens", True),
    ("loss 0.033 over 12 tokens", "loss 0.035 over 12 tokens", False),
    ("loss 0.033 over 12 tokens", "loss 0.033 over 13 tokens", False),
    ("37% then 4.9e-05", "38% then 5.0e-05", True),
    ("37% of 64", "37% of 65", False),
    ("37% then 4.9e-05", "37% then 4.9e-06", False),  # the exponent is text
    ("<loc0717> box", "<loc0718> box", False),  # digits inside a token are text
    ("took ... ms (...x)", "took 12 ms (3.1x)", True),
    ("took ... ms (...x)", "took 12 s (3.1x)", False),
    ("a purple circle", "a green circle", False),
])
def test_output_lines_match_to_the_last_written_digit(expected, actual, same):
    assert line_matches(expected, actual) is same
