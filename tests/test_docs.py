"""The documentation site: ``mkdocs build --strict`` passes, every public name is in the API reference, and the
Python code blocks of the pages run as written (as the README's do, tests/test_readme.py)."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import hyperloom as hl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the pages written for the site (docs/results/ holds generated experiment reports, without code blocks to run)
PAGES = sorted(p for p in DOCS.rglob("*.md") if DOCS / "results" not in p.parents)
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod, reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, not a build warning
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out), "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    return out


def test_mkdocs_build_strict_passes(site):
    for page in ("index.html", "method/index.html", "guides/per-sample/index.html", "reference/model/index.html", "changelog/index.html"):
        assert (site / page).is_file(), page
    assert "Keep a Changelog" in (site / "changelog" / "index.html").read_text()  # the snippet was included
    assert "hypernetize" in (site / "index.html").read_text()  # the README's quick start was included


def test_every_public_name_is_in_the_api_reference(site):
    anchors = set()
    for page in (site / "reference").rglob("*.html"):
        anchors |= set(re.findall(r'id="(hyperloom(?:\.[A-Za-z_]\w*)*)"', page.read_text()))
    # a name is documented where it is defined: hyperloom.<module>.<name> (or hyperloom.<name> for the package's own)
    documented = {a.rsplit(".", 1)[-1] for a in anchors if re.fullmatch(r"hyperloom(\.[a-z_]\w*)?\.\w+", a)}
    missing = sorted(set(hl.__all__) - documented)
    assert not missing, (
        f"public names missing from the API reference: {missing}; add a page docs/reference/<module>.md holding "
        "'::: hyperloom.<module>' and list it under 'API reference' in mkdocs.yml"
    )


def test_every_reference_module_has_a_page():
    pages = {p.stem for p in (DOCS / "reference").glob("*.md")} - {"index"}
    defined_in = (getattr(getattr(hl, n), "__module__", "") for n in hl.__all__)  # classes and functions
    modules = {m.split(".")[1] for m in defined_in if isinstance(m, str) and m.startswith("hyperloom.")}
    assert modules <= pages, f"modules with public names but no reference page: {sorted(modules - pages)}"
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f"reference/{p}.md" in nav for p in pages), "every reference page is in the nav"


def test_the_pages_have_code_blocks():
    assert sum(len(BLOCK.findall(p.read_text())) for p in PAGES) >= 10


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text())], ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    # blocks build on each other within a page, as a reader would run them in one session
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(block, f"{page.relative_to(ROOT)} block {i}", "exec"), namespace)


def _glance_table() -> list[str]:
    text = (DOCS / "reference" / "index.md").read_text()
    section = text.split("## At a glance", 1)[1].split("\n## ", 1)[0]
    return [ln.split(" | ", 1)[0] for ln in section.splitlines() if ln.startswith("| `")]


def _glance_entries() -> dict[str, str | None]:
    """Name -> its parameter list as written in the table (None where the row names it without a signature)."""
    entries: dict[str, str | None] = {}
    for cell in _glance_table():
        for m in re.finditer(r"`([A-Za-z_]\w*)(?:\(([^`]*)\))?`", cell):
            entries[m.group(1)] = m.group(2)
    return entries


def test_the_api_table_lists_exactly_the_public_names():
    listed = set(_glance_entries())
    public = set(hl.__all__) - {"__version__"}
    assert listed == public, f"missing from the table: {sorted(public - listed)}; not public: {sorted(listed - public)}"


@pytest.mark.parametrize("name", sorted(n for n, p in _glance_entries().items() if p is not None))
def test_the_api_table_signatures_match_the_code(name):
    import inspect

    written = _glance_entries()[name]
    flat = re.sub(r"\([^()]*\)", "", written)  # drop tuple defaults such as hidden=(16, 64, 128)
    names = [re.split(r"[=:]", part.strip().lstrip("*"), maxsplit=1)[0].strip() for part in flat.split(",")]
    names = [n for n in names if n and n != "/"]
    actual = [p for p in inspect.signature(getattr(hl, name)).parameters if p not in ("args", "kwargs")]
    assert names == actual, f"{name}: the table says ({written}), the code has {actual}"
