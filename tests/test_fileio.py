"""hyperloom.fileio: the one atomic writer (every file, all or nothing, CheckpointError naming the path)."""

from __future__ import annotations

import errno
import os
import re

import pytest
from torch import nn

import hyperloom as hl
from hyperloom.fileio import atomic_write_bytes, atomic_write_files, atomic_write_text


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_at(monkeypatch, module, name, k):
    """Make ``module.name`` raise ENOSPC on its ``k``-th call (1-based); return the call counter."""
    real, calls = getattr(module, name), [0]

    def fn(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fn)
    return calls


def test_several_files_are_written_in_order(tmp_path):
    atomic_write_files({tmp_path / "d" / "w.bin": [b"12", b"34"], tmp_path / "d" / "c.json": [b"{}"]})
    assert (tmp_path / "d" / "w.bin").read_bytes() == b"1234" and (tmp_path / "d" / "c.json").read_bytes() == b"{}"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["c.json", "w.bin"]


@pytest.mark.parametrize("what", ["fsync", "replace", "link"])
def test_a_failure_at_any_point_leaves_every_old_file(tmp_path, monkeypatch, what):
    a, b = tmp_path / "w.bin", tmp_path / "c.json"
    atomic_write_files({a: [b"old weights"], b: [b"old config"]})
    for k in (1, 2):
        calls = _fail_at(monkeypatch, os, what, k)
        with pytest.raises(hl.CheckpointError, match=re.escape("cannot write checkpoint (No space left on device")):
            atomic_write_files({a: [b"new weights"], b: [b"new config"]})
        monkeypatch.undo()
        assert calls[0] >= k
        assert a.read_bytes() == b"old weights" and b.read_bytes() == b"old config", (what, k)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "w.bin"]  # no temporary or backup file left


def test_a_new_file_is_removed_when_a_later_rename_fails(tmp_path, monkeypatch):
    a, b = tmp_path / "w.bin", tmp_path / "c.json"
    _fail_at(monkeypatch, os, "replace", 2)
    with pytest.raises(hl.CheckpointError, match=re.escape(f"{b}: cannot write checkpoint (No space left on device")):
        atomic_write_files({a: [b"new"], b: [b"new"]})
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_are_checkpoint_errors_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(hl.CheckpointError, match=re.escape(f"{tmp_path / 'file' / 'a.json'}: cannot write checkpoint")):
        atomic_write_text(tmp_path / "file" / "a.json", "{}")
    with pytest.raises(hl.CheckpointError, match=re.escape(f"{tmp_path}: cannot write checkpoint (it is a directory)")):
        atomic_write_bytes(tmp_path, [b""])
    with pytest.raises(hl.CheckpointError, match=re.escape("invalid checkpoint path (it contains a NUL byte)")):
        atomic_write_text(str(tmp_path / "a\0b"), "")
    with pytest.raises(hl.CheckpointError, match=re.escape("the same file is given twice")):
        atomic_write_files({tmp_path / "a": [b""], str(tmp_path / "a"): [b""]})


def test_sweep_tables_and_figures_go_through_the_writer(tmp_path, monkeypatch):
    model = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0)}, hidden=(4,))
    sweep = hl.sweep(model, lambda m, lam: {"loss": lam * 2}, {"lam": 3})
    sweep.to_csv(tmp_path / "s.csv")
    old = (tmp_path / "s.csv").read_text()
    assert old.splitlines()[0] == "lam,loss"
    (tmp_path / "file").write_text("x")
    with pytest.raises(hl.CheckpointError, match=re.escape(str(tmp_path / "file" / "s.csv"))):
        sweep.to_csv(tmp_path / "file" / "s.csv")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(hl.CheckpointError, match="No space left on device"):
        sweep.to_csv(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text() == old


def test_a_file_system_without_hard_links_still_saves(tmp_path, monkeypatch):
    a, b = tmp_path / "w.bin", tmp_path / "c.json"
    atomic_write_files({a: [b"old"], b: [b"old"]})

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    atomic_write_files({a: [b"new"], b: [b"new"]})
    assert a.read_bytes() == b"new" and b.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "w.bin"]
