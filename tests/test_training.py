import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import CheckpointError, HyperloomError


def hnet():
    return hl.hypernetize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), inputs={"lam": (0.0, 1.0)})


def _finite(path):
    tensors, _ = hl.load_safetensors(path)
    return {k: bool(torch.isfinite(v).all()) for k, v in tensors.items() if v.dtype.is_floating_point}


def test_trainer_never_checkpoints_parameters_that_overflowed_in_the_step(tmp_path):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)

    def loss_fn(model, step):
        if step == 2:  # finite loss and gradients, but the update overflows the weights to +-inf
            opt.param_groups[0]["lr"] = 1e38
        return model(x, lam=0.5).pow(2).mean() * 100, {"lam": 0.5}

    ck = tmp_path / "run.safetensors"
    with pytest.raises(hl.NonFiniteLossError, match=re.escape("after the optimiser step at step 2 with conditioning lam=0.5")) as e:
        hl.Trainer(model, opt, loss_fn, checkpoint=ck, every=1).fit(10)
    assert e.value.step == 2 and e.value.conditioning == {"lam": 0.5} and e.value.parameters
    assert set(e.value.parameters) <= {n for n, _ in model.named_parameters()}
    assert f"the last good checkpoint {ck} (step 2) was left untouched" in str(e.value)
    assert all(_finite(ck).values())
    assert hl.load_training(ck, model=hnet(), restore_rng=False)["step"] == 2


def test_trainer_stops_on_non_finite_optimiser_state(tmp_path):
    model = hnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w = model.hypernet.head.linear.weight

    def loss_fn(model, step):
        out = model(torch.randn(2, 4), lam=0.5).sum()
        if step == 1:  # gradient 1e30 is finite, its square (exp_avg_sq) overflows; Adam's update stays finite (m / inf = 0)
            out = out + w.sum() * 1e30
        return out, {"lam": 0.5}

    ck = tmp_path / "run.safetensors"
    with pytest.raises(
        hl.NonFiniteLossError, match=re.escape("non-finite optimiser state {'hypernet.head.linear.weight': ['exp_avg_sq']}")
    ) as e:
        hl.Trainer(model, opt, loss_fn, checkpoint=ck, every=1).fit(5)
    assert e.value.step == 1 and e.value.parameters == ["hypernet.head.linear.weight"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the parameters alone look healthy
    assert all(_finite(ck).values())
    assert hl.load_training(ck, model=hnet(), restore_rng=False)["step"] == 1


def test_trainer_save_refuses_non_finite_parameters_and_keeps_the_old_file(tmp_path):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = tmp_path / "run.safetensors"
    trainer = hl.Trainer(model, opt, lambda m, s: (m(torch.randn(2, 4), lam=0.5).sum(), {}), checkpoint=ck)
    trainer.fit(1)
    before = ck.read_bytes()
    with torch.no_grad():
        model.hypernet.trunk.layers[0].bias[0] = float("nan")
    with pytest.raises(
        CheckpointError, match=re.escape(f"{ck}: refusing to checkpoint non-finite parameters ['hypernet.trunk.layers.0.bias']")
    ):
        trainer.save()
    assert ck.read_bytes() == before


def test_trainer_reports_the_non_finite_loss_when_saving_the_last_good_state_fails(tmp_path):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "file").write_text("not a directory")
    ck = tmp_path / "file" / "run.safetensors"

    def loss_fn(model, step):
        return model(torch.randn(2, 4), lam=0.5).pow(2).sum() * float("inf"), {"lam": 0.5}

    with pytest.raises(hl.NonFiniteLossError, match=re.escape("Non-finite loss inf at step 0 with conditioning lam=0.5")) as e:
        hl.Trainer(model, opt, loss_fn, checkpoint=ck).fit(3)
    assert e.value.step == 0
    assert f"could not save the last good state: {ck}: cannot write checkpoint ({tmp_path / 'file'} is a file" in str(e.value)
    assert isinstance(e.value.__cause__, CheckpointError)


@pytest.mark.parametrize(
    ("ret", "msg"),
    [
        (0.5, "loss_fn must return a scalar torch.Tensor loss, got float 0.5 at step 0"),
        (3, "loss_fn must return a scalar torch.Tensor loss, got int 3 at step 0"),
        ("vec", "loss_fn must return a scalar loss, got a tensor of shape (2, 2) at step 0 (reduce it, e.g. with .mean())"),
        ("nograd", "loss_fn returned a loss that does not require grad at step 0"),
    ],
)
def test_trainer_rejects_a_loss_that_is_not_a_scalar_tensor(ret, msg):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(model, step):
        out = model(torch.randn(2, 4), lam=0.5)
        loss = {"vec": out, "nograd": out.sum().detach()}.get(ret, ret) if isinstance(ret, str) else ret
        return loss, {"lam": 0.5}

    with pytest.raises(HyperloomError, match=re.escape(msg)):
        hl.Trainer(model, opt, loss_fn).fit(2)


def test_trainer_rejects_a_loss_fn_that_does_not_return_a_pair():
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(HyperloomError, match=re.escape("loss_fn must return (loss, conditioning), got Tensor at step 0")):
        hl.Trainer(model, opt, lambda m, s: m(torch.randn(2, 4), lam=0.5).sum()).fit(1)
    with pytest.raises(HyperloomError, match=re.escape("loss_fn must return a mapping as conditioning, got list at step 0")):
        hl.Trainer(model, opt, lambda m, s: (m(torch.randn(2, 4), lam=0.5).sum(), [0.5])).fit(1)


# ------------------------------------------------------------------------------------------------
# second review: regressions
# ------------------------------------------------------------------------------------------------


def test_non_finite_loss_error_pickles_and_copies():
    import copy
    import pickle

    e = hl.NonFiniteLossError("x", step=1, conditioning={"lam": 0.5}, parameters=["w"])
    e.add_note("note")
    for back in (pickle.loads(pickle.dumps(e)), copy.copy(e), copy.deepcopy(e)):
        assert type(back) is hl.NonFiniteLossError and str(back) == "x"
        assert (back.step, back.conditioning, back.parameters, back.__notes__) == (1, {"lam": 0.5}, ["w"], ["note"])


def test_trainer_with_reduce_lr_on_plateau(tmp_path):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)

    def loss_fn(model, step):  # a constant loss never improves: the rate halves after every step but the first
        return model(torch.randn(2, 4), lam=0.5).sum() * 0 + 1.0, {}

    ck = tmp_path / "run.safetensors"
    hl.Trainer(model, opt, loss_fn, checkpoint=ck, every=1, scheduler=sched).fit(3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    m2 = hnet()
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    s2 = torch.optim.lr_scheduler.ReduceLROnPlateau(o2, patience=0, factor=0.5)
    t2 = hl.Trainer(m2, o2, loss_fn, checkpoint=ck, every=1, scheduler=s2)
    t2.fit(4)
    assert t2.step == 4 and o2.param_groups[0]["lr"] == pytest.approx(0.0125) and s2.best == 1.0


def test_trainer_rejects_a_complex_loss():
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(model, step):
        return model(torch.randn(2, 4), lam=0.5).sum() * (1 + 1j), {}

    with pytest.raises(HyperloomError, match=re.escape("loss_fn must return a real loss, got a tensor of torch.complex64 at step 0")):
        hl.Trainer(model, opt, loss_fn).fit(2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("every", "msg"),
    [
        ("3", "every must be a positive int, got str '3'"),
        (1.5, "every must be a positive int, got float 1.5"),
        (True, "every must be a positive int, got bool True"),
        (0, "every must be a positive int, got int 0"),
    ],
)
def test_trainer_every_must_be_a_positive_int(every, msg):
    model = hnet()
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        hl.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, s: (m(torch.randn(2, 4), lam=0.5).sum(), {}), every=every)


def test_trainer_fit_steps_must_be_an_int():
    model = hnet()
    trainer = hl.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, s: (m(torch.randn(2, 4), lam=0.5).sum(), {}))
    with pytest.raises(HyperloomError, match=re.escape("steps must be a non-negative int, got float 2.5")):
        trainer.fit(2.5)
    assert trainer.step == 0


def test_trainer_refuses_a_non_json_config(tmp_path):
    model = hnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = tmp_path / "run.safetensors"
    msg = f"{ck}: config is not JSON-serialisable (Object of type Tensor is not JSON serializable)"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        hl.Trainer(model, opt, lambda m, s: (m(torch.randn(2, 4), lam=0.5).sum(), {}), checkpoint=ck, config={"a": torch.ones(1)})
    assert not ck.exists()


def _bn_run(tmp_path, fail_at):
    """A hypernetwork over a BatchNorm network; from step ``fail_at`` the input is NaN (so are the running stats)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def loss_fn(m, step):
        lam = torch.rand(())
        xx = x if step < fail_at else x * float("nan")
        return ((m(xx, lam=lam) - y) ** 2).mean(), {"lam": lam}

    return model, hl.Trainer(model, opt, loss_fn, checkpoint=tmp_path / "run.safetensors", every=100)


def test_a_non_finite_step_leaves_no_trace_in_buffers_or_generators(tmp_path):
    # the forward of the failed step updated BatchNorm's running statistics with NaNs and drew from torch's RNG:
    # the "last good state" saved on the stop (and the model in memory) used to hold the NaN statistics
    model, trainer = _bn_run(tmp_path, fail_at=3)
    trainer.fit(3)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(hl.NonFiniteLossError, match="saved the last good state"):
        trainer.fit(10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in good.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(_finite(tmp_path / "run.safetensors").values())
    fresh, _ = _bn_run(tmp_path / "other", fail_at=99)
    info = hl.load_training(tmp_path / "run.safetensors", model=fresh)
    assert info["step"] == 3 and all(torch.equal(v, fresh.state_dict()[k]) for k, v in good.items())
    assert torch.equal(torch.get_rng_state(), rng)  # resuming draws what the failed step drew


def test_an_exception_in_loss_fn_rewinds_buffers_and_generators():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})
    x = torch.randn(8, 3)

    def loss_fn(m, step):
        m(x, lam=torch.rand(()))  # moves the running statistics and the generator, then fails
        raise KeyError("no such batch")

    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    with pytest.raises(KeyError, match="no such batch"):
        hl.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn).fit(1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)


class _Odd(nn.Module):
    """Buffers of every awkward kind: tied between modules, an expanded (not writable in place) constant, one
    set to None and one registered by the forward, all changed by a forward whose input is NaN."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        shared = torch.zeros(3)
        self.a, self.b = nn.Module(), nn.Module()
        self.a.register_buffer("s", shared)
        self.b.register_buffer("s", shared)
        self.register_buffer("const", torch.ones(()).expand(3))
        self.register_buffer("gone", torch.ones(2))
        self.register_buffer("late", None)

    def forward(self, x):
        if bool(x.isnan().any()):
            self.a.s.add_(x.mean())  # in place, seen through the tie
            self.b.s = torch.full((5,), float("nan"))  # the tie broken by a tensor of another shape
            self.gone = None
            self.late = x.mean(0)
            self.register_buffer("new", torch.ones(1))
        return self.lin(x)


def test_rewind_restores_ties_none_entries_and_removes_buffers_registered_by_the_failed_step(tmp_path):
    torch.manual_seed(0)
    model = _Odd()
    x = torch.randn(4, 3)

    def loss_fn(m, step):
        return m(x if step < 2 else x * float("nan")).pow(2).mean(), {}

    trainer = hl.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, checkpoint=tmp_path / "c.safetensors")
    with pytest.raises(hl.NonFiniteLossError, match="saved the last good state"):
        trainer.fit(5)  # before the fix: a RuntimeError from writing the expanded constant hid the stop
    assert model.a.s is model.b.s and torch.equal(model.a.s, torch.zeros(3))
    assert torch.equal(model.gone, torch.ones(2)) and model.late is None and not hasattr(model, "new")
    fresh = _Odd()
    fresh.const = fresh.const.clone()  # torch's load_state_dict cannot write into an expanded tensor
    assert hl.load_training(tmp_path / "c.safetensors", model=fresh)["step"] == 2  # the keys match a fresh model


def test_lazy_modules_train_under_the_trainer():
    net = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d(affine=False), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    losses = hl.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), lambda m, step: (m(x).pow(2).mean(), {})).fit(2)
    assert len(losses) == 2 and net[1].running_mean.shape == (4,)


def test_an_extras_own_generator_is_rewound_with_the_failed_step(tmp_path):
    # OutputRegularizer(num_sampled=...) draws its task subset from its own generator (its extra state)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    poison = {"step": None}

    def build(path):
        torch.manual_seed(0)
        model = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(4, max_tasks=4)}, hidden=(8,))
        reg = hl.continual.OutputRegularizer(model, beta=0.01, num_sampled=2, seed=0)
        reg.snapshot(4)

        def loss_fn(m, step):
            loss = ((m(x, task=3) - y) ** 2).mean() + reg.penalty()
            return (loss * float("nan") if step == poison["step"] else loss), {}

        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return hl.Trainer(model, opt, loss_fn, checkpoint=path, every=1000, extras={"reg": reg}), reg

    trainer, reg = build(tmp_path / "a.safetensors")
    trainer.fit(3)
    state = reg.generator.get_state().clone()
    poison["step"] = 3
    with pytest.raises(hl.NonFiniteLossError):
        trainer.fit(6)
    assert torch.equal(reg.generator.get_state(), state)
    poison["step"] = None
    straight, _ = build(tmp_path / "b.safetensors")
    straight.fit(6)
    resumed, _ = build(tmp_path / "a.safetensors")
    resumed.fit(6)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in straight.model.state_dict().items())


def test_a_non_finite_error_raised_inside_loss_fn_saves_the_last_good_state(tmp_path):
    model = hl.hypernetize(nn.Linear(3, 1), inputs={"wd": (1e-4, 1.0, "log")})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tuner = hl.SelfTuner(model, opt, hyper_lr=0.05)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss_fn(m, step):
        cond = tuner.sample()
        if step == 3:
            tuner.hyper_step(lambda mm, **c: ((mm(x, **c) - y) ** 2).mean() * float("nan"))
        return ((m(x, **cond) - y) ** 2).mean(), cond

    ck = tmp_path / "t.safetensors"
    with pytest.raises(hl.NonFiniteLossError, match=r"inside loss_fn at step 3; saved the last good state .*SelfTuner") as e:
        hl.Trainer(model, opt, loss_fn, checkpoint=ck, every=1000, extras={"tuner": tuner}).fit(6)
    assert e.value.step == 3
    again = hl.Trainer(model, opt, loss_fn, checkpoint=ck, extras={"tuner": tuner})
    assert again.resume() and again.step == 3


def test_rewind_false_saves_nothing_on_a_non_finite_loss(tmp_path):
    model, trainer = _bn_run(tmp_path, fail_at=3)
    trainer.rewind = False
    trainer.every = 2
    with pytest.raises(hl.NonFiniteLossError, match=r"nothing was saved \(rewind=False.*\(step 2\) stays"):
        trainer.fit(10)
    assert hl.load_training(tmp_path / "run.safetensors", model=_bn_run(tmp_path / "o", 99)[0])["step"] == 2
    with pytest.raises(HyperloomError, match="rewind must be True or False, got int 1"):
        hl.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, s: None, rewind=1)
