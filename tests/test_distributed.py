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


FSDP_WORKER = Path(__file__).resolve().parent / "_fsdp_worker.py"


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    """fully_shard on the base model's blocks (gloo, CPU): losses and gradients of 2 processes equal 1 process's."""
    import json
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.Popen([sys.executable, str(FSDP_WORKER), "0", "1", str(tmp_path / "s1"), str(tmp_path / "one.json")], env=env)
    two = [
        subprocess.Popen([sys.executable, str(FSDP_WORKER), str(r), "2", str(tmp_path / "s2"), str(tmp_path / "two.json")], env=env)
        for r in (0, 1)
    ]
    assert all(p.wait(timeout=300) == 0 for p in (one, *two))
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    for kind in ("hyper", "lora"):
        assert a[kind]["sharded"] == [] and "primary.2.0.weight" in b[kind]["sharded"]  # the base blocks really were sharded
        assert any(n.startswith("hypernet.") for n in b[kind]["sharded"])  # and the root unit holds the hypernetwork
        torch.testing.assert_close(torch.tensor(b[kind]["losses"]), torch.tensor(a[kind]["losses"]), rtol=1e-5, atol=1e-6)
        assert sorted(a[kind]["grads"]) == sorted(b[kind]["grads"]) and any(k.startswith("hypernet.") for k in a[kind]["grads"])
        for k, v in a[kind]["grads"].items():
            torch.testing.assert_close(torch.tensor(b[kind]["grads"][k]), torch.tensor(v), rtol=1e-4, atol=1e-6, msg=f"{kind} {k}")
