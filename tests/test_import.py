import importlib
import re
from pathlib import Path

import hyperloom as hl


def test_every_public_name_imports():
    assert hl.__all__, "the public surface must not be empty"
    for name in hl.__all__:
        assert hasattr(hl, name), name
    assert len(set(hl.__all__)) == len(hl.__all__)


def test_version_has_one_source():
    version = importlib.import_module("hyperloom._version").__version__
    assert hl.__version__ == version
    # PEP 440: major.minor.patch, optionally a pre-release or .devN (0.2.0.dev0 while 0.2.0 is in progress)
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", version), version
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    release = re.match(r"\d+\.\d+\.\d+", version).group()
    assert f"## [{release}]" in changelog or f"— {release} (in progress" in changelog, f"CHANGELOG.md has no section for {release}"


def test_py_typed_is_shipped():
    from importlib.resources import files

    assert files("hyperloom").joinpath("py.typed").is_file()


def test_core_imports_nothing_beyond_torch():
    import subprocess
    import sys

    code = (
        "import sys, torch; before = {m.split('.')[0] for m in sys.modules}; import hyperloom; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - before - {'hyperloom'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
