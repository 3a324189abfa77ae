"""Every Python code block in README.md and docs/*.md runs, so an example that raises fails the suite.

A Python block is a fenced block whose info string is ``python`` or ``py``. Each one runs on its own in a fresh
interpreter (what a reader gets by pasting it), started in the repository root with one intra-op thread, and must
finish in seconds on a CPU.

Convention for blocks that are not meant to run standalone (an excerpt of a training loop, a sketch that needs a
dataset, a GPU, several processes or long training): put the HTML comment ``<!-- fragment -->`` alone on the line
directly above the opening fence. The comment is invisible in the rendered page and on GitHub. Where it is cheap,
make a short block self-contained instead (a tiny model and random batches) rather than marking it.

Tests are named ``<file>-<n>``, n counting the file's Python blocks from 0, fragments included, so a failure names
the block; the message gives its line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
PYTHON_INFO = {"python", "py"}
TIMEOUT_S = 120  # generous for a loaded CI machine; a block should take a few seconds
OPEN_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`{]*)")


class Block(NamedTuple):
    doc: str  # path relative to the repository root
    index: int  # among the file's Python blocks
    line: int  # 1-based line of the opening fence
    code: str
    fragment: bool


def python_blocks(path: Path) -> list[Block]:
    """The fenced Python blocks of one Markdown file, with their fragment marks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        start, body = i, []
        i += 1
        # A closing fence uses the same character, at least as many times, and nothing else.
        while i < len(lines) and not re.fullmatch(rf" *{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[i]):
            # Fences inside list items are indented; their content is too.
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            i += 1
        i += 1
        if opening["info"].lower() in PYTHON_INFO:
            fragment = start > 0 and lines[start - 1].strip() == FRAGMENT
            blocks.append(Block(str(path.relative_to(ROOT)), len(blocks), start + 1, "\n".join(body) + "\n", fragment))
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in python_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if not block.fragment]


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.doc}-{b.index}" for b in RUNNABLE])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / f"{Path(block.doc).stem}_{block.index}.py"
    script.write_text(block.code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    where = f"{block.doc} line {block.line} (Python block {block.index})"
    try:
        done = subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where} ran over {TIMEOUT_S} s: shrink it, or mark it {FRAGMENT}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"{where} exited with {done.returncode}; mark it {FRAGMENT} if it is not meant to run "
            f"standalone.\n{done.stderr[-4000:]}",
            pytrace=False,
        )


def test_fragment_marks_sit_above_python_blocks() -> None:
    """A mark anywhere else (a blank line between it and the fence, a bash block) would be silently ignored."""
    marked = {(b.doc, b.line - 1) for b in ALL_BLOCKS if b.fragment}
    stray = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in DOC_FILES
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip() == FRAGMENT and (str(path.relative_to(ROOT)), n) not in marked
    ]
    assert not stray, f"{FRAGMENT} must sit on the line directly above a Python fence: {stray}"
    assert RUNNABLE, "no runnable Python block found: the fence parser is broken"
