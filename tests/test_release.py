"""The release artefacts: ``python -m build`` makes an sdist and a wheel; the wheel installs into a fresh virtual
environment (torch and safetensors from the package index, nothing from this checkout) and runs the README's
quick start outside the repository."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

import hyperloom as hl

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md", "src"]
MODULES = sorted(p.name for p in (ROOT / "src" / "hyperloom").glob("*.py"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="the dev extra is not installed: pip install -e '.[dev]'")
    # build from a copy, so that setuptools' build/ and egg-info never land in the checkout
    src = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools) of this environment, no download of a fresh one
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


def test_the_wheel_holds_every_module_py_typed_and_the_license(dist):
    wheel, _ = dist
    assert wheel.name == f"hyperloom-{hl.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [m for m in MODULES if f"hyperloom/{m}" not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "hyperloom/py.typed" in names
    info = f"hyperloom-{hl.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in meta
    requires = re.findall(r"^Requires-Dist: ([^;\n]+)$", meta, flags=re.M)  # the core's, without extras
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in requires) == ["safetensors", "torch"], requires
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "benchmarks/", "examples/"))]


def test_the_sdist_holds_the_license_readme_changelog_and_sources(dist):
    _, sdist = dist
    top = f"hyperloom-{hl.__version__}"
    names = set(tarfile.open(sdist).getnames())
    for f in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "src/hyperloom/py.typed"):
        assert f"{top}/{f}" in names, f
    assert all(f"{top}/src/hyperloom/{m}" in names for m in MODULES)


def _quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("[start:quickstart]", 1)[1].split("[end:quickstart]", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3, "the README's quick start has its code blocks between the quickstart markers"
    return "\n".join(blocks)


def _install_and_run(wheel: Path, tmp_path: Path, *, standalone: bool) -> str:
    """Install ``wheel`` into a fresh venv and run the README's quick start there, outside the repository.

    ``standalone``: torch and safetensors come from the package index into the venv (the real proof, about
    25 s on an idle 2-core machine and 80 s on a loaded one, most of it copying torch and deleting it
    again); otherwise the venv is made without pip, the wheel is installed with ``--no-deps`` and a ``.pth``
    file lends it the torch and safetensors of this environment (a few seconds).
    """
    venv = tmp_path / "venv"
    work = tmp_path / "elsewhere"  # outside the repository: nothing of the checkout is importable from here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    try:
        if standalone:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            torch_version = torch.__version__.split("+")[0]
            # --no-compile: byte-compiling torch's files doubles the install time and is not what is tested
            install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", f"torch=={torch_version}", str(wheel)]
        else:
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
            install = [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(venv / "bin" / "python"),
                "install",
                "-q",
                "--no-deps",
                "--no-compile",
                str(wheel),
            ]
        r = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env, cwd=work)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        python = venv / "bin" / "python"
        if not standalone:
            import safetensors

            site = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
            ).stdout.strip()
            # a .pth line adds a directory without running the .pth files in it (this checkout's editable install)
            lent = dict.fromkeys(str(Path(m.__file__).parents[1]) for m in (torch, safetensors))
            (Path(site) / "lent_torch.pth").write_text("\n".join(lent) + "\n")
        code = "import hyperloom\nprint('FROM', hyperloom.__file__, hyperloom.__version__)\n" + _quick_start()
        (work / "quick_start.py").write_text(code)
        r = subprocess.run([str(python), "quick_start.py"], capture_output=True, text=True, timeout=300, env=env, cwd=work)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        origin = re.search(r"^FROM (\S+) (\S+)$", r.stdout, flags=re.M)
        assert origin and Path(origin.group(1)).is_relative_to(venv) and origin.group(2) == hl.__version__, r.stdout[:2000]
        assert "torch.Size([8, 10])" in r.stdout  # the quick start's first print
        return f"install and quick start {time.perf_counter() - t0:.1f} s"
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 0.8 GB with torch


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_quick_start(dist, tmp_path):
    print(_install_and_run(dist[0], tmp_path, standalone=False))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HYPERLOOM_SLOW") != "1", reason="installs torch into a fresh venv (25-80 s); HYPERLOOM_SLOW=1 runs it")
def test_the_wheel_installs_standalone_with_torch_from_the_index(dist, tmp_path):
    print(_install_and_run(dist[0], tmp_path, standalone=True))
