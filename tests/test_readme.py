"""The README's Python code blocks run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_code_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i):
    # blocks build on each other, as a reader would run them in one session
    namespace: dict = {}
    for block in BLOCKS[: i + 1]:
        exec(compile(block, f"README.md block {i}", "exec"), namespace)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S).group(1)
    lines = [ln for ln in first_block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[1].strip() in ci, "the README's test command must be what .ci/run runs"


def test_the_readme_has_no_repository_relative_links_or_images():
    # the README is the wheel's long description: a relative link or image breaks off the repository
    text = README.read_text()
    relative = [t for t in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://"))]
    assert not relative, f"relative links in README.md (they break in the packaged description): {relative}"
    assert len(text) < 15_000, f"README.md is {len(text)} characters: keep it a five-minute read, move the rest to docs/"
