"""Multi-process training with torchrun (gloo, 2 processes on this machine) equals one process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperloom as hl

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def run(args, torchrun=False):
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*cmd, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.parametrize("mode", ["shared", "per-sample"])
def test_two_process_ddp_equals_single_process(tmp_path, mode):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run(["--out", str(one), "--mode", mode, "--steps", "15"])
    out = run(["--out", str(two), "--mode", mode, "--steps", "15"], torchrun=True)
    assert "world size 2" in out.stdout
    a, meta_a = hl.load_safetensors(one)
    b, meta_b = hl.load_safetensors(two)
    assert '"world": 1' in meta_a["config"] and '"world": 2' in meta_b["config"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # and training did change the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)
    init = hl.hypernetize(
        torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
        inputs={"lam": (0.0, 1.0)},
        hidden=(16, 32),
    ).state_dict()
    assert any(not torch.allclose(init[k], a[k]) for k in a)
