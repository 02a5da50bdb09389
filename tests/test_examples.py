"""The scripts in examples/ run as documented, at a tiny size (examples/ddp_train.py: tests/test_distributed.py).

They run in this process (their ``main(argv)``), which saves a second import of torch and transformers.
"""

import importlib.util
from pathlib import Path

import pytest

import hyperloom as hl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args, cwd, capsys, monkeypatch):
    monkeypatch.chdir(cwd)
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main(list(args))
    return capsys.readouterr().out


def test_every_example_is_tested():
    tested = {"hf_per_sample.py", "checkpoint_resume.py", "ddp_train.py"}  # the last one in test_distributed.py
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_hf_per_sample(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    out = run(
        "hf_per_sample.py", "--tiny", "--out", str(tmp_path / "bert.safetensors"), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch
    )
    assert "predicted 34 tensors of a tiny BERT" in out
    assert "per-sample call equals a loop of shared calls: ok" in out
    tensors, meta = hl.load_safetensors(tmp_path / "bert.safetensors", require_checksums=True)
    assert '"example": "hf_per_sample"' in meta["config"]
    assert any(k.startswith("hypernet.") for k in tensors)


def test_checkpoint_resume(tmp_path, capsys, monkeypatch):
    out = run("checkpoint_resume.py", "--dir", str(tmp_path / "run"), "--tiny", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert "resumed at step" in out
    assert "resumed run bit-identical to the uninterrupted one: True" in out
    assert "outputs equal" in out
    assert (tmp_path / "run" / "model.safetensors").is_file()
