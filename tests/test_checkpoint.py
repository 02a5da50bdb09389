import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import CheckpointError

WORKER = Path(__file__).with_name("_train_worker.py")


def hnet():
    return hl.hypernetize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), inputs={"lam": (0.0, 1.0)})


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
)
def test_safetensors_roundtrip_every_dtype(tmp_path, dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    p = tmp_path / "a.safetensors"
    hl.save_safetensors({"t": t, "empty": torch.zeros(0, 4, dtype=dtype), "scalar": t[0, 0]}, p, metadata={"k": "v"})
    out, meta = hl.load_safetensors(p)
    assert torch.equal(out["t"], t) and out["t"].dtype == dtype
    assert out["empty"].shape == (0, 4) and out["scalar"].shape == ()
    assert meta == {"k": "v"}


def test_interoperates_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5), "h": torch.randn(2).half()}
    ours = tmp_path / "ours.safetensors"
    hl.save_safetensors(tensors, ours, metadata={"who": "hyperloom"})
    theirs = st.load_file(str(ours))
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    ref = tmp_path / "ref.safetensors"
    st.save_file(tensors, str(ref), metadata={"who": "safetensors"})
    back, meta = hl.load_safetensors(ref)
    assert all(torch.equal(back[k], v) for k, v in tensors.items()) and meta == {"who": "safetensors"}


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    hl.save_safetensors({"w": torch.randn(8, 8), "b": torch.randn(8)}, good)
    blob = good.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + n].decode()
    yield "truncated", blob[: len(blob) - 10], "do not fit shape"
    yield "header only", blob[: 8 + n], "do not fit shape"
    yield "no header", blob[:5], "truncated checkpoint (5 bytes, no header)"
    yield "huge header", (10**12).to_bytes(8, "little") + blob[8:], "truncated or corrupt checkpoint"
    yield "garbage header", blob[:8] + b"{" * n + blob[8 + n :], "corrupt checkpoint header"
    tampered = header.replace('"data_offsets":[0,256]', '"data_offsets":[0,252]')
    yield "tampered offsets", blob[:8] + tampered.encode() + blob[8 + n :], "do not fit shape"
    yield "trailing bytes", blob + b"\0" * 16, "16 trailing bytes after the last tensor"
    shape = header.replace('"shape":[8,8]', '"shape":[8,9]')
    yield "tampered shape", blob[:8] + shape.encode() + blob[8 + n :], "do not fit shape"


def test_bad_files_raise_naming_the_file(tmp_path):
    cases = list(_bad_files(tmp_path))
    assert len(cases) == 8
    for name, data, msg in cases:
        p = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(str(p))) as e:
            hl.load_safetensors(p)
        assert msg in str(e.value), (name, str(e.value))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        hl.load_safetensors(tmp_path / "missing.safetensors")


def test_model_roundtrip_and_no_half_loaded_model(tmp_path):
    a, b = hnet(), hnet()
    p = tmp_path / "m.safetensors"
    hl.save_model(a, p, config={"inputs": {"lam": [0, 1]}})
    before = {k: v.clone() for k, v in b.state_dict().items()}
    p.write_bytes(p.read_bytes()[:-7])  # truncate
    with pytest.raises(CheckpointError, match=re.escape(str(p))):
        hl.load_model(b, p)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    hl.save_model(a, p, config={"inputs": {"lam": [0, 1]}})
    assert hl.load_model(b, p) == {"inputs": {"lam": [0, 1]}}
    x = torch.randn(3, 4)
    assert torch.equal(a(x, lam=0.4), b(x, lam=0.4))
    other = hl.hypernetize(nn.Linear(4, 2), inputs={"lam": (0.0, 1.0)})
    with pytest.raises(CheckpointError, match="keys do not match the model"):
        hl.load_model(other, p)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    hl.save_safetensors({"w": torch.ones(3)}, p)
    real_fsync = os.fsync

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        hl.save_safetensors({"w": torch.zeros(3)}, p)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.equal(hl.load_safetensors(p)[0]["w"], torch.ones(3))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_no_pickle_on_the_load_path(tmp_path, monkeypatch):
    import pickle

    model = hnet()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4), lam=0.5).sum().backward()
    opt.step()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)

    def refuse(*a, **k):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert hl.load_training(p, model=hnet(), optimizer=torch.optim.Adam(hnet().parameters()))["step"] == 1


def test_training_checkpoint_roundtrip(tmp_path):
    import random

    import numpy as np

    model = hnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x, lam=torch.rand(5)).sum().backward()
        opt.step()
        sched.step()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, scheduler=sched, step=3, config={"lr": 0.01})
    expect = (torch.rand(3), np.random.rand(), random.random())
    m2 = hnet()
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 2, 0.5)
    info = hl.load_training(p, model=m2, optimizer=o2, scheduler=s2)
    assert info == {"step": 3, "config": {"lr": 0.01}}
    assert torch.equal(torch.rand(3), expect[0]) and np.random.rand() == expect[1] and random.random() == expect[2]
    assert s2.state_dict() == sched.state_dict()
    sa, sb = opt.state_dict(), o2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name])


def _run_worker(ckpt, steps, **kw):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(ckpt), str(steps), "--every", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    steps = 40
    ref = _run_worker(tmp_path / "ref.safetensors", steps)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    cycles = 0
    ckpt = tmp_path / "crash.safetensors"
    for kill_after in (8, 23):  # two kill/resume cycles, each mid-way between checkpoints
        proc = _run_worker(ckpt, steps)
        seen = 0
        for line in proc.stdout:
            seen = int(line.split()[1])
            if seen >= kill_after:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        cycles += 1
        assert hl.load_training(ckpt, model=hnet_like_worker(), restore_rng=False)["step"] % 5 == 0
    final = _run_worker(ckpt, steps)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert cycles == 2
    a, _ = hl.load_safetensors(str(tmp_path / "ref.safetensors") + ".final")
    b, _ = hl.load_safetensors(str(ckpt) + ".final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted run"


def hnet_like_worker():
    net = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    return hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, hidden=(16, 32))


def test_trainer_stops_on_non_finite_loss_after_saving_the_last_good_state(tmp_path):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def loss_fn(model, step):
        lam = torch.tensor(0.25 * (step % 4))
        out = model(x, lam=lam).pow(2).mean()
        return (out * float("nan") if step == 3 else out), {"lam": lam}

    ck = tmp_path / "run.safetensors"
    trainer = hl.Trainer(model, opt, loss_fn, checkpoint=ck, every=100)
    with pytest.raises(hl.NonFiniteLossError, match=re.escape("Non-finite loss nan at step 3 with conditioning lam=0.75")) as e:
        trainer.fit(10)
    assert e.value.step == 3 and str(ck) in str(e.value)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    m2 = hnet()
    assert hl.load_training(ck, model=m2, restore_rng=False)["step"] == 3
    assert all(torch.equal(good[k], v) for k, v in m2.state_dict().items())


class _InfGrad(torch.autograd.Function):
    """Zero in the forward pass, an infinite gradient in the backward pass."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("inf"))


def test_trainer_names_parameters_with_non_finite_gradients():
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(model, step):
        out = model(torch.randn(2, 4), lam=0.5).sum()
        return out + _InfGrad.apply(model.hypernet.head.linear.weight), {"lam": 0.5}

    msg = "Non-finite gradient at step 0 with conditioning lam=0.5; non-finite parameters or gradients: ['hypernet.head.linear.weight']"
    with pytest.raises(hl.NonFiniteLossError, match=re.escape(msg)):
        hl.Trainer(model, opt, loss_fn).fit(2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the bad step was not applied
