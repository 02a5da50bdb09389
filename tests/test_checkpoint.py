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
    # the package validates; the messages say what it refused in this library's words, then quote it
    good = tmp_path / "good.safetensors"
    hl.save_safetensors({"w": torch.randn(8, 8), "b": torch.randn(8)}, good)
    blob = good.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + n].decode()
    uncovered = "truncated or tampered checkpoint (the tensors' data offsets do not cover its data section exactly)"
    unfit = "corrupt checkpoint header (a tensor's shape, dtype and data offsets do not fit together)"
    yield "truncated", blob[: len(blob) - 10], uncovered
    yield "header only", blob[: 8 + n], uncovered
    yield "no header", blob[:5], "truncated checkpoint (5 bytes, no header) (safetensors: Error while deserializing: header too small)"
    yield (
        "huge header",
        (10**12).to_bytes(8, "little") + blob[8:],
        f"truncated or corrupt checkpoint (header of {10**12} bytes, file of {len(blob)})",
    )
    yield (
        "garbage header",
        blob[:8] + b"{" * n + blob[8 + n :],
        "corrupt checkpoint header (safetensors: Error while deserializing: invalid JSON",
    )
    start, end = re.search(r'"w":\{[^}]*"data_offsets":\[(\d+),(\d+)\]', header).groups()
    tampered = header.replace(f'"data_offsets":[{start},{end}]', f'"data_offsets":[{start},{int(end) - 4}]')
    yield "tampered offsets", blob[:8] + tampered.encode() + blob[8 + n :], unfit
    yield "trailing bytes", blob + b"\0" * 16, uncovered
    shape = header.replace('"shape":[8,8]', '"shape":[8,9]')
    yield "tampered shape", blob[:8] + shape.encode() + blob[8 + n :], unfit


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
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: cannot write checkpoint (No space left on device)")):
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


# ------------------------------------------------------------------------------------------------
# regressions
# ------------------------------------------------------------------------------------------------


def _trained(opt_cls=torch.optim.Adam, **kw):
    model = hnet()
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    model(torch.randn(3, 4), lam=0.5).sum().backward()
    opt.step()
    return model, opt


def _snapshot(model, opt):
    return {k: v.clone() for k, v in model.state_dict().items()}, repr(opt.state_dict()), torch.get_rng_state()


def _assert_untouched(model, opt, snap):
    weights, opt_state, rng = snap
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert repr(opt.state_dict()) == opt_state
    assert torch.equal(torch.get_rng_state(), rng)


def test_load_training_validates_the_optimiser_before_restoring_anything(tmp_path):
    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    torch.rand(5)  # move the RNG on, so that a restore would be visible

    m2 = hnet()
    cases = [
        (
            torch.optim.Adam(list(m2.parameters())[:3]),
            "optimiser parameter group 0 holds 11 parameters in the checkpoint, 3 in the optimiser",
        ),
        (torch.optim.SGD(m2.parameters(), lr=0.1), "optimiser class: checkpoint torch.optim.adam.Adam, given torch.optim.sgd.SGD"),
        (
            torch.optim.Adam([{"params": list(m2.parameters())[:5]}, {"params": list(m2.parameters())[5:]}]),
            "optimiser has 1 parameter group(s) in the checkpoint, 2 in the optimiser",
        ),
    ]
    other = hl.hypernetize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), inputs={"lam": (0.0, 1.0)})
    cases.append(
        (
            torch.optim.Adam(list(m2.parameters())[:9] + list(other.parameters())[9:]),
            "optimiser parameter 9 (group 0): checkpoint shape (2, 8), optimiser (3, 8)",
        )
    )
    for opt2, msg in cases:
        snap = _snapshot(m2, opt2)
        with pytest.raises(CheckpointError, match=re.escape(f"{p}: {msg}")):
            hl.load_training(p, model=m2, optimizer=opt2)
        _assert_untouched(m2, opt2, snap)


def test_load_training_validates_the_scheduler_and_optimiser_presence(tmp_path):
    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2), step=1)
    m2 = hnet()
    o2 = torch.optim.Adam(m2.parameters())
    s2 = torch.optim.lr_scheduler.ExponentialLR(o2, 0.9)
    snap = _snapshot(m2, o2)
    msg = "scheduler class: checkpoint torch.optim.lr_scheduler.StepLR, given torch.optim.lr_scheduler.ExponentialLR"
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: {msg}")):
        hl.load_training(p, model=m2, optimizer=o2, scheduler=s2)
    _assert_untouched(m2, o2, snap)
    hl.save_training(p, model=model, step=1)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: holds no optimiser state, but an optimiser was given")):
        hl.load_training(p, model=m2, optimizer=o2)
    _assert_untouched(m2, o2, snap)


def test_load_training_of_an_adam_checkpoint_into_sgd_fails_before_step(tmp_path):
    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    m2 = hnet()
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match=re.escape("checkpoint torch.optim.adam.Adam, given torch.optim.sgd.SGD")):
        hl.load_training(p, model=m2, optimizer=sgd)
    m2(torch.randn(3, 4), lam=0.5).sum().backward()
    sgd.step()  # the optimiser still works


def test_load_training_of_an_old_adam_checkpoint_into_sgd_raises(tmp_path):
    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    _rewrite_training_meta(
        p, lambda h, t: [h.pop(k, None) for k in ("optimizer_class", "optimizer_shapes", "hypernetworks")]
    )  # as files written before
    m2 = hnet()
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1)
    snap = _snapshot(m2, sgd)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: optimiser parameter group 0 has hyperparameters [")) as e:
        hl.load_training(p, model=m2, optimizer=sgd)
    assert "'betas'" in str(e.value) and "in the checkpoint that torch.optim.sgd.SGD does not take" in str(e.value)
    _assert_untouched(m2, sgd, snap)
    assert hl.load_training(p, model=m2, optimizer=torch.optim.Adam(m2.parameters()))["step"] == 1


def _rewrite_training_meta(p, edit):
    import json

    tensors, meta = hl.load_safetensors(p)
    h = json.loads(meta["hyperloom"])
    edit(h, tensors)
    hl.save_safetensors(tensors, p, metadata={"hyperloom": json.dumps(h)})


def _adam_step_as_dict(h, t):
    import json

    s = json.dumps(h["optimizer"])
    assert '{"__tensor__": "optimizer.state.0.step"}' in s
    h["optimizer"] = json.loads(s.replace('{"__tensor__": "optimizer.state.0.step"}', '{"__dict__": []}'))


@pytest.mark.parametrize(
    ("edit", "msg"),
    [
        (lambda h, t: h.pop("step"), "corrupt training checkpoint: 'step' must be an integer, got None"),
        (lambda h, t: h.update(step="7"), "corrupt training checkpoint: 'step' must be an integer, got '7'"),
        (lambda h, t: h.pop("rng"), "corrupt training checkpoint: no RNG state"),
        (lambda h, t: h["rng"].pop("python"), "corrupt training checkpoint: no RNG state"),
        (lambda h, t: t.pop("rng.torch"), "corrupt training checkpoint: no tensor 'rng.torch'"),
        (lambda h, t: h["rng"].update(python=[1, 2]), "corrupt training checkpoint: invalid Python RNG state"),
        (lambda h, t: t.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)}), "corrupt training checkpoint: invalid torch RNG state"),
        (lambda h, t: t.pop("optimizer.state.0.exp_avg"), "corrupt training checkpoint: optimiser state refers to a missing tensor"),
        (lambda h, t: h.update(config=[1]), "corrupt training checkpoint: 'config' must be a JSON object, got [1]"),
        # found by fuzzing the training metadata
        (lambda h, t: h["rng"].update(python={"__tuple__": 1}), "corrupt training checkpoint: invalid Python RNG state"),
        (lambda h, t: h["rng"].update(python=[]), "corrupt training checkpoint: invalid Python RNG state"),
        (lambda h, t: h["rng"].update(python={"a": 1}), "corrupt training checkpoint: invalid Python RNG state"),
        (lambda h, t: h["rng"].update(python={"__tuple__": [[]] * 3}), "corrupt training checkpoint: invalid Python RNG state"),
        (_adam_step_as_dict, "the checkpoint could not be restored (TypeError: "),
        (lambda h, t: h.update(optimizer={"__dict__": 5}), "corrupt training checkpoint: malformed optimiser state"),
        (
            lambda h, t: h.update(optimizer={"__dict__": [[{"__tuple__": [{}]}, 1]]}),
            "corrupt training checkpoint: malformed optimiser state",
        ),
        (lambda h, t: h.update(optimizer={"__tensor__": 3}), "corrupt training checkpoint: optimiser state refers to a missing tensor"),
        (lambda h, t: h["optimizer_shapes"][0].append([float("inf")]), "corrupt training checkpoint: malformed optimiser parameter shapes"),
        (lambda h, t: h.update(format={}), "not a hyperloom training checkpoint"),
    ],
)
def test_load_training_with_a_broken_header_raises_checkpoint_error(tmp_path, edit, msg):
    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    _rewrite_training_meta(p, edit)
    m2 = hnet()
    o2 = torch.optim.Adam(m2.parameters())
    snap = _snapshot(m2, o2)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: {msg}")):
        hl.load_training(p, model=m2, optimizer=o2)
    _assert_untouched(m2, o2, snap)


def test_save_training_refuses_non_finite_parameters_and_keeps_the_old_file(tmp_path):
    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    before = p.read_bytes()
    with torch.no_grad():
        model.hypernet.trunk.layers[0].weight[0, 0] = float("inf")
        dict(model.named_parameters())["hypernet.theta0.0.bias"][1] = float("nan")
    msg = f"{p}: refusing to checkpoint non-finite parameters ['hypernet.trunk.layers.0.weight', 'hypernet.theta0.0.bias']"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.save_training(p, model=model, optimizer=opt, step=2)
    assert p.read_bytes() == before
    model, opt = _trained()
    next(iter(opt.state.values()))["exp_avg_sq"][0] = float("inf")
    with pytest.raises(
        CheckpointError,
        match=re.escape("refusing to checkpoint non-finite optimiser state {'hypernet.trunk.layers.0.weight': ['exp_avg_sq']}"),
    ):
        hl.save_training(p, model=model, optimizer=opt, step=2)
    assert p.read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_training_checkpoint_in_other_dtypes(tmp_path, dtype):
    model = hnet().to(dtype)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4, dtype=dtype), lam=0.5).sum().backward()
    opt.step()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    m2 = hnet().to(dtype)
    o2 = torch.optim.Adam(m2.parameters())
    assert hl.load_training(p, model=m2, optimizer=o2)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))


def _lin_hnet(**inp):
    return hl.HyperNetwork(inp or {"lam": (0.0, 1.0)}, {"w": (4, 3)}, hidden=(8,))


@pytest.mark.parametrize(
    ("other", "msg"),
    [
        ({"beta": (0.0, 1.0)}, "hypernetwork '': input names: saved ['lam'], model ['beta']"),
        ({"lam": (0.0, 2.0)}, "hypernetwork '': input 'lam' high: saved 1.0, model 2.0"),
        ({"lam": hl.Input(0.1, 1.0, scale="log")}, "hypernetwork '': input 'lam' low: saved 0.0, model 0.1"),
        ({"lam": hl.Input(0.0, 1.0, dim=2)}, "hypernetwork '': input 'lam' dim: saved 1, model 2"),
        ({"lam": hl.Input(0.0, 1.0, out_of_range="clamp")}, "hypernetwork '': input 'lam' out_of_range: saved 'raise', model 'clamp'"),
    ],
)
def test_load_model_checks_the_input_declarations(tmp_path, other, msg):
    p = tmp_path / "m.safetensors"
    hl.save_model(_lin_hnet(), p)
    target = _lin_hnet(**other)
    if any(getattr(s, "dim", 1) != 1 for s in target.input_set.specs.values()):
        msg_re = re.escape(str(p))  # other dims also change the trunk's shapes; either message names the file
        with pytest.raises(CheckpointError, match=msg_re):
            hl.load_model(target, p)
        return
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: {msg}")):
        hl.load_model(target, p)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_input_declarations_of_wrapped_models_and_training_checkpoints(tmp_path):
    p = tmp_path / "m.safetensors"
    a = hnet()
    hl.save_model(a, p)
    b = hl.hypernetize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), inputs={"lam": (0.0, 5.0)})
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: hypernetwork 'hypernet': input 'lam' high: saved 1.0, model 5.0")):
        hl.load_model(b, p)
    scale = hl.hypernetize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), inputs={"lam": (0.1, 1.0, "log")})
    with pytest.raises(CheckpointError, match=re.escape("input 'lam' low: saved 0.0, model 0.1")):
        hl.load_model(scale, p)
    hl.save_training(p, model=a, step=0)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: hypernetwork 'hypernet': input 'lam' high: saved 1.0, model 5.0")):
        hl.load_training(p, model=b)
    default = hl.hypernetize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), inputs={"lam": (0.0, 1.0)}, formulation="default")
    hl.save_model(default, p)
    with pytest.raises(CheckpointError, match=re.escape("hypernetwork 'hypernet' formulation: saved 'default', model 'mip'")):
        hl.load_model(hnet(), p)


def test_model_files_without_input_declarations_still_load(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    a = hnet()
    p = tmp_path / "old.safetensors"
    st.save_file(a.state_dict(), str(p), metadata={"format": "hyperloom.model/1", "config": "{}"})
    b = hnet()
    assert hl.load_model(b, p) == {}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unwritable_paths_raise_checkpoint_error(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for bad in (tmp_path / "file" / "m.safetensors", tmp_path / "dir", tmp_path / "file" / "sub" / "m.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(f"{bad}: cannot write checkpoint")):
            hl.save_model(hnet(), bad)
        with pytest.raises(CheckpointError, match=re.escape(f"{bad}: cannot write checkpoint")):
            hl.save_training(bad, model=hnet(), step=0)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["dir", "file"] and not list((tmp_path / "dir").iterdir())


def test_a_flipped_data_byte_raises_naming_the_file_and_tensor(tmp_path):
    p = tmp_path / "t.safetensors"
    hl.save_safetensors({"a": torch.randn(4, 4), "b": torch.randn(8)}, p, metadata={"k": "v"})
    blob = bytearray(p.read_bytes())
    assert hl.load_safetensors(p)[1] == {"k": "v"}  # the checksum is not part of the user's metadata
    blob[-1] ^= 0x01  # the last byte belongs to "b"
    p.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: b: checksum mismatch (tampered or corrupt file)")):
        hl.load_safetensors(p)
    st = pytest.importorskip("safetensors.torch")
    hl.save_safetensors({"a": torch.randn(4, 4)}, p)
    assert st.load_file(str(p))["a"].shape == (4, 4)  # still a valid safetensors file
    n = int.from_bytes(p.read_bytes()[:8], "little")
    h = p.read_bytes()[8 : 8 + n].decode()
    p.write_bytes(p.read_bytes()[:8] + h.replace('"shape":[4,4]', '"shape":[2,8]').encode() + p.read_bytes()[8 + n :])
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: a: checksum mismatch")):
        hl.load_safetensors(p)  # a reshaped tensor is caught too
    with pytest.raises(CheckpointError, match=re.escape("metadata key 'hyperloom.sha256' is reserved")):
        hl.save_safetensors({"a": torch.randn(2)}, p, metadata={"hyperloom.sha256": "{}"})


# ------------------------------------------------------------------------------------------------
# second review: regressions
# ------------------------------------------------------------------------------------------------


def _rewrite_header(p, edit):
    """Edit the raw JSON header of a safetensors file (``__metadata__`` included), keeping the data section."""
    import json

    blob = p.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(len(h).to_bytes(8, "little") + h + blob[8 + n :])


def test_load_model_refuses_values_that_overflow_in_the_models_dtype(tmp_path):
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(1e5)
    p = tmp_path / "m.safetensors"
    hl.save_model(m, p)
    m16 = nn.Linear(2, 1).half()
    before = {k: v.clone() for k, v in m16.state_dict().items()}
    msg = (
        f"{p}: weight: finite values overflow when cast to the model's dtype: checkpoint torch.float32 with magnitudes up to "
        "100000, model torch.float16 whose largest finite value is 65504"
    )
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.load_model(m16, p)
    assert all(torch.equal(before[k], v) for k, v in m16.state_dict().items())
    m.weight.data.fill_(3.0)
    hl.save_model(m, p)
    hl.load_model(m16, p)  # narrowing without overflow is fine
    assert torch.equal(m16.weight, torch.full((1, 2), 3.0, dtype=torch.float16))


def test_load_training_refuses_values_that_overflow_in_the_models_dtype(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    (model(torch.ones(1, 2)) * 1e4).sum().backward()  # exp_avg_sq ~ 1e5 overflows float16, the weights do not
    opt.step()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    m16 = nn.Linear(2, 1).half()
    o16 = torch.optim.Adam(m16.parameters())
    snap = _snapshot(m16, o16)
    msg = f"{p}: optimiser state 'exp_avg_sq' of weight: finite values overflow when cast to the model's dtype: checkpoint torch.float32"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.load_training(p, model=m16, optimizer=o16)
    _assert_untouched(m16, o16, snap)
    with torch.no_grad():
        model.weight.fill_(1e6)
    hl.save_training(p, model=model, step=1)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: weight: finite values overflow when cast to the model's dtype")):
        hl.load_training(p, model=m16)
    _assert_untouched(m16, o16, snap)


def _chained(opt, *, exp=True):
    subs = [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)] + ([torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)] if exp else [])
    return torch.optim.lr_scheduler.ChainedScheduler(subs)


def test_load_training_refuses_a_scheduler_of_another_structure_untouched(tmp_path):
    model, opt = _trained()
    sched = _chained(opt)
    opt.step()
    sched.step()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, scheduler=sched, step=1)
    torch.rand(3)
    m2 = hnet()
    o2 = torch.optim.Adam(m2.parameters())
    s2 = _chained(o2, exp=False)
    snap, sched_before = _snapshot(m2, o2), repr(s2.state_dict())
    msg = (
        f"{p}: scheduler structure: checkpoint ['torch.optim.lr_scheduler.StepLR', 'torch.optim.lr_scheduler.ExponentialLR'], "
        "given ['torch.optim.lr_scheduler.StepLR']"
    )
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.load_training(p, model=m2, optimizer=o2, scheduler=s2)
    _assert_untouched(m2, o2, snap)
    assert repr(s2.state_dict()) == sched_before
    # a file without the structure (older): the scheduler fails inside torch, everything is rolled back
    _rewrite_training_meta(p, lambda h, t: h.pop("scheduler_structure"))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: the checkpoint could not be restored (IndexError: ")) as e:
        hl.load_training(p, model=m2, optimizer=o2, scheduler=s2)
    assert "the model, optimiser, scheduler, generators and RNG states were left as they were" in str(e.value)
    assert isinstance(e.value.__cause__, IndexError)
    _assert_untouched(m2, o2, snap)
    assert repr(s2.state_dict()) == sched_before
    s3 = _chained(o2)
    assert hl.load_training(p, model=m2, optimizer=o2, scheduler=s3)["step"] == 1
    assert repr(s3.state_dict()) == repr(sched.state_dict())


def test_load_training_rolls_everything_back_when_a_late_restore_fails(tmp_path, monkeypatch):
    import random

    model, opt = _trained()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(5)
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, scheduler=sched, step=1, generators={"g": gen})
    m2 = hnet()
    o2 = torch.optim.Adam(m2.parameters())
    s2 = torch.optim.lr_scheduler.StepLR(o2, 2, 0.5)
    g2 = torch.Generator().manual_seed(7)
    torch.rand(3)
    snap, sched_before, gen_before, py_before = _snapshot(m2, o2), repr(s2.state_dict()), g2.get_state(), random.getstate()
    real, calls = random.setstate, []

    def fail_once(state):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        real(state)

    monkeypatch.setattr(random, "setstate", fail_once)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: the checkpoint could not be restored (RuntimeError: boom)")):
        hl.load_training(p, model=m2, optimizer=o2, scheduler=s2, generators={"g": g2})
    _assert_untouched(m2, o2, snap)
    assert repr(s2.state_dict()) == sched_before and torch.equal(g2.get_state(), gen_before) and random.getstate() == py_before


def test_metadata_is_checksummed(tmp_path):
    model, _ = _trained()
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=1)
    blob = p.read_bytes()
    assert blob.count(b"0.001") == 1
    p.write_bytes(blob.replace(b"0.001", b"0.901"))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: metadata checksum mismatch (tampered or corrupt file)")):
        hl.load_training(p, model=hnet(), optimizer=torch.optim.Adam(hnet().parameters()))
    q = tmp_path / "t.safetensors"
    hl.save_safetensors({"a": torch.ones(2)}, q, metadata={"k": "v"})
    q.write_bytes(q.read_bytes().replace(b'"k":"v"', b'"k":"w"'))
    with pytest.raises(CheckpointError, match=re.escape(f"{q}: metadata checksum mismatch")):
        hl.load_safetensors(q)


_SUMS = ("hyperloom.sha256", "hyperloom.metadata_sha256")


def _strip(keys, rename):
    def edit(h):
        for k in keys:
            v = h["__metadata__"].pop(k)
            if rename:
                h["__metadata__"][k + "x"] = v

    return edit


@pytest.mark.parametrize(
    ("keys", "rename", "msg"),
    [
        (_SUMS[:1], False, "the metadata has a checksum but the tensors have none (tampered file)"),
        (_SUMS[:1], True, "metadata checksum mismatch (tampered or corrupt file)"),
        # a plain file without the metadata's checksum is one of an earlier version: only refused on demand
        (_SUMS[1:], True, "checksums required, but the file has none for its metadata"),
    ],
)
def test_removing_or_renaming_a_checksum_is_caught(tmp_path, keys, rename, msg):
    p = tmp_path / "m.safetensors"
    hl.save_safetensors({"a": torch.ones(2)}, p, metadata={"k": "v"})
    _rewrite_header(p, _strip(keys, rename))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: {msg}")):
        hl.load_safetensors(p, require_checksums=keys == _SUMS[1:])
    hl.save_model(hnet(), p)
    _rewrite_header(p, _strip(keys, rename))
    with pytest.raises(CheckpointError, match=re.escape(str(p))):
        hl.load_model(hnet(), p)


@pytest.mark.parametrize("rename", [False, True])
def test_new_files_without_checksums_are_refused(tmp_path, rename):
    p = tmp_path / "m.safetensors"
    hl.save_model(hnet(), p)
    _rewrite_header(p, _strip(_SUMS, rename))
    assert hl.load_safetensors(p)[0]  # a plain safetensors file: no checksums to check
    msg = f"{p}: the file claims format 'hyperloom.model/2', which carries checksums, but it has none for its tensors and metadata"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.load_model(hnet(), p)
    msg = f"{p}: checksums required, but the file has none for its tensors and metadata"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.load_safetensors(p, require_checksums=True)
    model, opt = _trained()
    hl.save_training(p, model=model, optimizer=opt, step=1)
    _rewrite_header(p, _strip(_SUMS, rename))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: the file claims format 'hyperloom.training/2', which carries checksums")):
        hl.load_training(p, model=hnet())


def test_version_1_files_still_load(tmp_path):
    import json

    model, opt = _trained()
    p = tmp_path / "run.safetensors"
    hl.save_training(p, model=model, optimizer=opt, step=3)

    def as_v1(h):  # as the previous version wrote it: tensor checksums only, format /1
        meta = h["__metadata__"]
        del meta["hyperloom.metadata_sha256"]
        inner = json.loads(meta["hyperloom"])
        inner["format"] = "hyperloom.training/1"
        inner.pop("scheduler_structure", None)
        meta["hyperloom"] = json.dumps(inner)

    _rewrite_header(p, as_v1)
    assert hl.load_training(p, model=hnet(), optimizer=torch.optim.Adam(hnet().parameters()))["step"] == 3
    _rewrite_header(p, lambda h: h["__metadata__"].pop("hyperloom.sha256"))  # or none at all (other tools)
    assert hl.load_training(p, model=hnet())["step"] == 3
    q = tmp_path / "m.safetensors"
    hl.save_model(model, q)
    _rewrite_header(q, _strip(_SUMS, False))
    _rewrite_header(q, lambda h: h["__metadata__"].update(format="hyperloom.model/1"))
    hl.load_model(hnet(), q)
    assert json.loads(hl.load_safetensors(tmp_path / "run.safetensors")[1]["hyperloom"])["format"] == "hyperloom.training/1"
    hl.save_model(model, q)
    assert hl.load_safetensors(q, require_checksums=True)[1]["format"] == "hyperloom.model/2"


def test_a_negated_or_conjugated_view_is_saved_with_its_values(tmp_path):
    c = torch.tensor([1 + 2j, 3 - 4j])
    t = {"neg": c.conj().imag, "conj": c.conj()}
    assert t["neg"].is_neg() and t["conj"].is_conj()
    p = tmp_path / "t.safetensors"
    hl.save_safetensors(t, p)
    out, _ = hl.load_safetensors(p)
    assert out["neg"].tolist() == [-2.0, 4.0] and out["conj"].tolist() == [1 - 2j, 3 + 4j]


_EXTRA = ["U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"]
_TORCH = {
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}


def _bits(t):
    return t.contiguous().view(torch.uint8).tolist() if t.numel() else []


@pytest.mark.parametrize("name", _EXTRA)
def test_every_safetensors_dtype_torch_has_roundtrips(tmp_path, name):
    st = pytest.importorskip("safetensors.torch")
    dtype = getattr(torch, _TORCH[name], None)
    if dtype is None:
        pytest.skip(f"this torch has no {_TORCH[name]}")
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 1.5
    t = src.to(torch.int64).to(dtype) if name.startswith("U") else src.to(dtype)
    tensors = {"t": t, "empty": torch.zeros(0, 2).to(dtype)}
    ref = tmp_path / "ref.safetensors"
    st.save_file(tensors, str(ref))
    back, _ = hl.load_safetensors(ref)
    assert back["t"].dtype == dtype and _bits(back["t"]) == _bits(t) and back["empty"].shape == (0, 2)
    ours = tmp_path / "ours.safetensors"
    hl.save_safetensors(tensors, ours)
    theirs = st.load_file(str(ours))
    assert theirs["t"].dtype == dtype and _bits(theirs["t"]) == _bits(t)
    assert _bits(hl.load_safetensors(ours)[0]["t"]) == _bits(t)


def test_an_unknown_dtype_is_unsupported_not_corrupt(tmp_path):
    p = tmp_path / "t.safetensors"
    hl.save_safetensors({"a": torch.ones(4, dtype=torch.uint8)}, p)
    # F4 (4-bit floats, two a byte) is a dtype the package reads but no torch dtype this library maps
    _rewrite_header(p, lambda h: h["a"].update(dtype="F4", shape=[8]))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: a: unsupported dtype 'F4'")):
        hl.load_safetensors(p)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: c: dtype torch.complex128 cannot be stored in a safetensors checkpoint")):
        hl.save_safetensors({"c": torch.ones(2, dtype=torch.complex128)}, p)


@pytest.mark.parametrize(
    ("tensors", "msg"),
    [
        ({"__metadata__": torch.ones(1)}, "tensor name '__metadata__' is reserved for the metadata"),
        ({1: torch.ones(1), "1": torch.ones(1)}, "tensor names must be strings, got int 1"),
        ({"a": [1.0]}, "a: expected a torch.Tensor, got list"),
        ({"w": torch.empty(2, device="meta")}, "w: tensor on the meta device has no data to save"),
        ({"s": torch.eye(2).to_sparse()}, "s: tensors of layout torch.sparse_coo cannot be stored (convert with .to_dense())"),
    ],
)
def test_save_safetensors_refuses_what_it_cannot_load(tmp_path, tensors, msg):
    p = tmp_path / "t.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: {msg}")):
        hl.save_safetensors(tensors, p)
    assert not p.exists()


def test_save_model_refuses_meta_tensors_and_non_json_configs(tmp_path):
    p = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: weight: tensor on the meta device has no data to save")):
        hl.save_model(nn.Linear(2, 1, device="meta"), p)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: weight: tensor on the meta device has no data to save")):
        hl.save_training(p, model=nn.Linear(2, 1, device="meta"), step=0)
    msg = f"{p}: config is not JSON-serialisable (Object of type Tensor is not JSON serializable)"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.save_model(nn.Linear(2, 1), p, config={"a": torch.ones(1)})
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.save_training(p, model=nn.Linear(2, 1), step=0, config={"a": torch.ones(1)})
    assert not p.exists()


def test_long_file_names(tmp_path):
    p = tmp_path / ("a" * 250)
    hl.save_safetensors({"a": torch.ones(2)}, p)
    assert torch.equal(hl.load_safetensors(p)[0]["a"], torch.ones(2))
    assert sorted(f.name for f in tmp_path.iterdir()) == [p.name]
    q = tmp_path / ("b" * 260)
    with pytest.raises(CheckpointError, match=re.escape(f"{q}: cannot write checkpoint (File name too long)")):
        hl.save_safetensors({"a": torch.ones(2)}, q)
    with pytest.raises(CheckpointError, match=re.escape(f"{q}: cannot read checkpoint (File name too long)")):
        hl.load_safetensors(q)


def test_bad_path_arguments(tmp_path):
    bad = str(tmp_path / "a\0b.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{bad!r}: invalid checkpoint path (it contains a NUL byte)")):
        hl.save_safetensors({"a": torch.ones(2)}, bad)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad!r}: invalid checkpoint path (it contains a NUL byte)")):
        hl.load_safetensors(bad)
    with pytest.raises(CheckpointError, match=re.escape("checkpoint path must be a str or os.PathLike, got int 3")):
        hl.load_model(nn.Linear(2, 1), 3)
    with pytest.raises(CheckpointError, match=re.escape("checkpoint path must be a str or os.PathLike, got int 3")):
        hl.save_model(nn.Linear(2, 1), 3)
    assert sorted(f.name for f in tmp_path.iterdir()) == []


def test_a_deeply_nested_header_is_corrupt(tmp_path):
    p = tmp_path / "t.safetensors"
    h = b'{"a":' + b"[" * 100000
    p.write_bytes(len(h).to_bytes(8, "little") + h)
    msg = f"{p}: corrupt checkpoint header (safetensors: Error while deserializing: invalid JSON in header: recursion limit exceeded"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.load_safetensors(p)
    import json

    hl.save_safetensors({}, p, metadata={"hyperloom": json.dumps({"format": "hyperloom.training/2"})[:-1] + ',"x":' + "[" * 100000})
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: not a hyperloom training checkpoint")):
        hl.load_training(p, model=hnet())


# ------------------------------------------------------------------------------------------------
# files written by earlier versions (tests/fixtures, remade by tests/fixtures/make_checkpoints.py)
# ------------------------------------------------------------------------------------------------

FIXTURES = Path(__file__).with_name("fixtures")


def _fixture_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_checkpoints", FIXTURES / "make_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recorded():
    import json

    return json.loads((FIXTURES / "checkpoints.json").read_text())


def _as_tensor(entry, dtype=torch.float32):
    return torch.tensor(entry["values"], dtype=dtype).reshape(entry["shape"])


def test_a_model_checkpoint_of_version_0_1_0_loads_with_the_recorded_values():
    fx, rec = _fixture_module(), _recorded()
    assert rec["writer"] == "hyperloom 0.1.0"
    model = fx.build()
    assert hl.load_model(model, fx.MODEL) == rec["config"]
    state = model.state_dict()
    assert sorted(state) == sorted(rec["state"])
    for k, entry in rec["state"].items():
        assert torch.equal(state[k], _as_tensor(entry, state[k].dtype)), k
    x, lam = fx.probe()
    # the state is compared bit for bit above; the output is a float32 computation whose last bit depends on the
    # CPU's matmul kernels (it differs between the AMD EPYC machines this runs on), so it is compared to 1e-6
    torch.testing.assert_close(model(x, lam=lam).flatten(), torch.tensor(rec["output"]), rtol=1e-6, atol=1e-7)


def test_a_training_checkpoint_of_version_0_1_0_restores_the_recorded_run():
    import random

    fx, rec = _fixture_module(), _recorded()
    model = fx.build()
    opt, sched = fx.optimizer_and_scheduler(model)
    gen = torch.Generator()
    info = hl.load_training(fx.TRAINING, model=model, optimizer=opt, scheduler=sched, generators={"data": gen})
    assert info == {"step": rec["step"], "config": rec["config"]}
    for k, v in model.state_dict().items():
        assert torch.equal(v, _as_tensor(rec["state"][k], v.dtype)), k
    params = list(model.parameters())
    assert [float(opt.state[p]["step"]) for p in params] == rec["optimizer_step"]
    for p, sq in zip(params, rec["optimizer_exp_avg_sq"], strict=True):
        assert opt.state[p]["exp_avg_sq"].flatten().tolist() == torch.tensor(sq).tolist()
    assert sched.last_epoch == rec["scheduler"]["last_epoch"] and sched.get_last_lr() == rec["scheduler"]["lr"]
    draws = rec["draws"]
    assert torch.rand(3).tolist() == torch.tensor(draws["torch"]).tolist()
    assert random.random() == draws["random"]
    assert torch.rand(3, generator=gen).tolist() == torch.tensor(draws["data"]).tolist()
    x, lam = fx.probe()
    # the state is compared bit for bit above; the output is a float32 computation whose last bit depends on the
    # CPU's matmul kernels (it differs between the AMD EPYC machines this runs on), so it is compared to 1e-6
    torch.testing.assert_close(model(x, lam=lam).flatten(), torch.tensor(rec["output"]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# the safetensors package underneath: fuzzed files, shared memory, no numpy
# ------------------------------------------------------------------------------------------------


def test_fuzzed_files_load_identically_or_raise_checkpoint_error(tmp_path):
    import random

    p = tmp_path / "m.safetensors"
    model = hnet()
    hl.save_model(model, p, config={"k": [1, 2]})
    good = p.read_bytes()
    rng = random.Random(0)
    outcomes = {"error": 0, "same": 0}
    for i in range(300):
        blob = bytearray(good)
        kind = i % 4
        if kind == 0:  # flip bytes anywhere
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            blob = blob[: rng.randrange(len(blob))]
        elif kind == 2:  # random bytes in the header
            n = int.from_bytes(good[:8], "little")
            j = rng.randrange(8, 8 + n)
            blob[j : j + 3] = bytes(rng.randrange(256) for _ in range(3))
        else:  # append or insert garbage
            j = rng.randrange(len(blob) + 1)
            blob[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        q = tmp_path / f"f{i}.safetensors"
        q.write_bytes(bytes(blob))
        target = hnet()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        try:
            config = hl.load_model(target, q)
        except CheckpointError as e:
            assert str(q) in str(e)
            assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched
            outcomes["error"] += 1
        else:  # a change the format ignores (header padding turned into other whitespace, say)
            assert config == {"k": [1, 2]}
            assert all(torch.equal(model.state_dict()[k], v) for k, v in target.state_dict().items())
            outcomes["same"] += 1
    assert outcomes["error"] >= 250, outcomes


def test_tensors_sharing_memory_are_saved_each_with_its_values(tmp_path):
    w = torch.randn(4, 3)
    tensors = {"w": w, "tied": w, "row": w[1], "t": w.t()}  # the package's own save refuses these
    p = tmp_path / "t.safetensors"
    hl.save_safetensors(tensors, p)
    out, _ = hl.load_safetensors(p)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    out["w"].add_(1)  # loaded tensors own their memory
    assert torch.equal(out["tied"], w)


def test_checkpoints_need_no_numpy(tmp_path):
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch, hyperloom as hl\n"
        f"p = {str(tmp_path / 'm.safetensors')!r}\n"
        "m = torch.nn.Linear(3, 2)\n"
        "hl.save_model(m, p)\n"
        "m2 = torch.nn.Linear(3, 2)\n"
        "hl.load_model(m2, p)\n"
        "assert torch.equal(m.weight, m2.weight)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# the whole hypernetwork configuration is recorded (HyperNetwork.config) and checked by field name
# ------------------------------------------------------------------------------------------------


def _net_with(**hyper):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return hl.hypernetize(net, inputs={"lam": (0.0, 1.0), "task": hl.Task(2, dim=4, max_tasks=3)}, **{"hidden": (8,), **hyper})


@pytest.mark.parametrize(
    ("saved", "model", "field"),
    [
        ({"activation": "tanh"}, {"activation": "relu"}, "activation: saved 'tanh', model 'relu'"),
        ({"hidden": (8,)}, {"hidden": (8,), "norm": "layernorm"}, "norm: saved 'none', model 'layernorm'"),
        ({"head": "lowrank", "rank": 2}, {"head": "lowrank", "rank": 3}, "rank: saved 2, model 3"),
        ({"encoding": "cossin"}, {"encoding": "identity"}, "encoding: saved 'cossin', model 'identity'"),
        ({"formulation": "default", "additive": True}, {"formulation": "default"}, "additive: saved True, model False"),
    ],
)
def test_a_file_of_another_hypernetwork_configuration_is_refused_by_field(tmp_path, saved, model, field):
    a, b = _net_with(**saved), _net_with(**model)
    p = tmp_path / "m.safetensors"
    hl.save_model(a, p)
    hl.save_training(tmp_path / "t.safetensors", model=a, step=1)
    with pytest.raises(CheckpointError, match=re.escape(f"hypernetwork 'hypernet' {field}")):
        hl.load_model(b, p)
    with pytest.raises(CheckpointError, match=re.escape(f"hypernetwork 'hypernet' {field}")):
        hl.load_training(tmp_path / "t.safetensors", model=b)


def test_a_tanh_file_into_a_relu_model_was_silently_wrong(tmp_path):
    a, b = _net_with(activation="tanh"), _net_with(activation="relu")
    hl.save_model(a, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("hypernetwork 'hypernet' activation: saved 'tanh', model 'relu'")):
        hl.load_model(b, tmp_path / "m.safetensors")
    hl.load_model(_net_with(activation="tanh"), tmp_path / "m.safetensors")  # the same configuration loads


def test_task_declarations_and_init_only_options(tmp_path):
    a = _net_with(zero_init=True, init="torch")
    a.add_task()  # num_tasks is state: restored, not compared
    hl.save_model(a, tmp_path / "m.safetensors")
    b = _net_with()
    hl.load_model(b, tmp_path / "m.safetensors")
    assert b.inputs["task"].num_tasks == 3
    torch.manual_seed(0)
    other = hl.hypernetize(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        inputs={"lam": (0.0, 1.0), "task": hl.Task(2, dim=4, max_tasks=3, norm=None)},
        hidden=(8,),
    )
    with pytest.raises(CheckpointError, match=re.escape("input 'task' norm: saved 'unit', model None")):
        hl.load_model(other, tmp_path / "m.safetensors")


def test_the_record_holds_every_constructor_argument():
    import inspect

    h = hl.HyperNetwork({"lam": (0.0, 1.0)}, {"w": (2, 3)}, hidden=(4,), head="lowrank", rank=1)
    params = set(inspect.signature(hl.HyperNetwork.__init__).parameters) - {"self", "dtype", "device"}
    cfg = h.config()
    assert params <= set(cfg)
    assert cfg["head"] == "lowrank" and cfg["rank"] == 1 and cfg["targets"] == {"w": [2, 3]}
    import json

    assert json.loads(json.dumps(cfg)) == cfg  # JSON as it is


def test_files_with_the_earlier_partial_record_still_load(tmp_path):
    """Files written before the whole configuration was recorded (inputs, formulation, encoding, additive only)."""
    import json

    a = _net_with()
    a.add_task()
    p = tmp_path / "m.safetensors"
    hl.save_model(a, p)
    tensors, meta = hl.load_safetensors(p)
    lam = {"kind": "Input", "low": 0.0, "high": 1.0, "scale": "linear", "dim": 1, "out_of_range": "raise"}
    task = {"kind": "Task", "dim": 4, "embedding_norm": "unit", "max_tasks": 3, "num_tasks": 3}
    for f in ("low", "high", "scale", "out_of_range"):
        task[f] = None
    lam.update(embedding_norm=None, max_tasks=None, num_tasks=None)
    old = {"hypernet": {"inputs": {"lam": lam, "task": task}, "formulation": "mip", "encoding": "cossin", "additive": True}}
    hl.save_safetensors(tensors, p, metadata={**meta, "hypernetworks": json.dumps(old)})
    b = _net_with()
    hl.load_model(b, p)
    x = torch.randn(2, 4)
    assert torch.equal(a(x, lam=0.3, task=2), b(x, lam=0.3, task=2))
    task["embedding_norm"] = "none"
    hl.save_safetensors(tensors, p, metadata={**meta, "hypernetworks": json.dumps(old)})
    with pytest.raises(CheckpointError, match=re.escape("input 'task' embedding_norm: saved 'none', model 'unit'")):
        hl.load_model(_net_with(), p)


def test_strict_false_with_no_key_in_common_is_refused(tmp_path):
    # strict=False loaded the keys in common: with none (a file of another model) it loaded nothing and returned {}
    hl.save_model(nn.Linear(3, 2), tmp_path / "other.safetensors")
    model = hl.hypernetize(nn.Linear(3, 2), inputs={"lam": (0.0, 1.0)})
    with pytest.raises(hl.CheckpointError, match=re.escape("no key of the checkpoint is in the model (strict=False would load nothing)")):
        hl.load_model(model, tmp_path / "other.safetensors", strict=False)
