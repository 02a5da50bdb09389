import math
import re

import pytest
import torch
from torch import nn

import hyperloom as hl

# -- the ridge known answer ------------------------------------------------------------------------


def _diabetes_split():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:60], perm[60:260]  # a small training set: regularisation matters
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()
    return x[tr], y[tr], x[va], y[va]


def _ridge_val_loss(lam: float, xtr, ytr, xva, yva) -> float:
    """The validation MSE of the exact ridge solution (bias unpenalised; data centred on the training set)."""
    n = len(xtr)
    w = torch.linalg.solve(xtr.T @ xtr / n + lam * torch.eye(xtr.shape[1], dtype=torch.float64), xtr.T @ ytr / n)
    return float(((xva @ w - yva) ** 2).mean())


def test_ridge_reaches_the_exact_validation_optimal_lambda():
    xtr, ytr, xva, yva = _diabetes_split()
    grid = torch.linspace(math.log(1e-4), math.log(1e2), 1201, dtype=torch.float64).exp()
    losses = torch.tensor([_ridge_val_loss(float(g), xtr, ytr, xva, yva) for g in grid])
    lam_star, f_star = float(grid[losses.argmin()]), float(losses.min())
    assert 1e-2 < lam_star < 1.0 / 2  # an interior optimum, more than a factor 2 from the start
    assert _ridge_val_loss(1.0, xtr, ytr, xva, yva) > 1.05 * f_star  # the start is measurably worse

    model = hl.hypernetize(nn.Linear(10, 1), inputs={"lam": (1e-4, 1e2, "log")})
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    tuner = hl.SelfTuner(model, opt, init={"lam": 1.0}, hyper_lr=5e-3, perturb=0.05)
    a, b, c, d = (t.float() for t in (xtr, ytr, xva, yva))

    def train_loss(m, lam):
        return ((m(a, lam=lam).squeeze(-1) - b) ** 2).mean() + lam * m.generate(lam=lam)["weight"].pow(2).sum()

    def val_loss(m, lam):
        return ((m(c, lam=lam).squeeze(-1) - d) ** 2).mean()

    for _ in range(200):  # warm-up at the starting value (STN trains the best response first)
        tuner.train_step(train_loss)
    for step in range(300):
        tuner.train_step(train_loss)
        if step % 2:
            tuner.hyper_step(val_loss)
    lam = tuner.values["lam"]
    assert lam_star / 2 <= lam <= 2 * lam_star, (lam, lam_star)
    assert _ridge_val_loss(lam, xtr, ytr, xva, yva) <= 1.01 * f_star
    assert len(tuner.history) == 150 and tuner.history[-1]["values"]["lam"] == lam


# -- the two steps touch only their own side --------------------------------------------------------


def _setup(**kw):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 1))
    model = hl.hypernetize(net, predict=[nn.Linear], inputs={"wd": (1e-4, 1.0, "log"), "mix": (0.0, 0.7)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tuner = hl.SelfTuner(model, opt, **kw)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def train_loss(m, wd, mix):
        return ((m(x, wd=wd, mix=mix) - y) ** 2).mean() + (wd * mix).mean()

    def val_loss(m, wd, mix):
        return ((m(x + 0.1, wd=wd, mix=mix) - y) ** 2).mean()

    return model, opt, tuner, train_loss, val_loss


def _tuner_state(tuner):
    return {k: v.clone() for k, v in tuner.state_dict().items()}


def _same(a, b):
    return torch.equal(a, b) or (a.is_floating_point() and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def test_hyper_step_leaves_the_model_bit_identical():
    model, opt, tuner, train_loss, val_loss = _setup()
    tuner.train_step(train_loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    u0 = tuner.u.clone()
    model.train()
    for _ in range(3):
        tuner.hyper_step(val_loss)
        tuner.hyper_step(val_loss, n=16)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # parameters and running stats
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert all(torch.equal(v, opt_state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
    assert not torch.equal(tuner.u, u0) and tuner.hyper_steps == 6


def test_train_step_leaves_the_hyperparameters_bit_identical():
    model, _, tuner, train_loss, val_loss = _setup()
    tuner.hyper_step(val_loss)
    before = _tuner_state(tuner)
    p0 = [p.clone() for p in model.parameters()]
    for n in (None, None, None):
        tuner.train_step(train_loss, n=n)
    after = tuner.state_dict()
    changed = [k for k in before if not _same(before[k], after[k])]
    assert changed == ["counters"] and after["counters"][0] == before["counters"][0] + 3  # only the draw counter
    assert any(not torch.equal(a, p) for a, p in zip(p0, model.parameters()))


# -- ranges ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["low", "high"])
def test_values_stay_in_range_at_the_boundaries(end):
    model = hl.hypernetize(nn.Linear(2, 1), inputs={"wd": (1e-4, 1e2, "log"), "mix": (0.0, 0.7)})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    init = {"wd": 1e-4, "mix": 0.0} if end == "low" else {"wd": 1e2, "mix": 0.7}
    tuner = hl.SelfTuner(model, opt, init=init, hyper_lr=0.2, perturb=1.0)
    x = torch.randn(8, 2)
    sign = 1.0 if end == "low" else -1.0  # a validation loss that pushes both inputs out of their range

    def val_loss(m, wd, mix):
        return m(x, wd=wd, mix=mix).sum() * 0 + sign * (wd.log() + mix).mean()

    for _ in range(20):
        tuner.hyper_step(val_loss, n=8)
        v = tuner.values
        assert 1e-4 <= v["wd"] <= 1e2 and 0.0 <= v["mix"] <= 0.7
    assert tuner.values == ({"wd": 1e-4, "mix": 0.0} if end == "low" else {"wd": 1e2, "mix": 0.7})  # the ends exactly
    draws = tuner.sample(n=2000)  # perturbations (scale 1 = the whole range) are projected onto the range
    assert float(draws["wd"].min()) >= torch.tensor(1e-4).item() and float(draws["wd"].max()) <= torch.tensor(1e2).item()
    assert float(draws["mix"].min()) >= 0.0 and float(draws["mix"].max()) <= torch.tensor(0.7).item()
    model(torch.randn(2000, 2), **draws)  # the model accepts every draw (float32 rounding kept inside)


def test_log_inputs_move_on_their_log_scale():
    model = hl.hypernetize(nn.Linear(2, 1), inputs={"wd": (1e-4, 1e2, "log")})
    tuner = hl.SelfTuner(model, torch.optim.SGD(model.parameters(), lr=0.0), init={"wd": 1e-2}, hyper_lr=0.01)
    x = torch.randn(4, 2)
    tuner.hyper_step(lambda m, wd: m(x, wd=wd).sum() * 0 + wd)  # d/du of wd = wd * log(1e6): Adam's first step is lr
    assert math.isclose(math.log(tuner.values["wd"]), math.log(1e-2) - 0.01 * math.log(1e6), rel_tol=1e-9)
    draws = tuner.sample(n=20_000)["wd"].double()
    assert abs(float(draws.log().median()) - math.log(tuner.values["wd"])) < 0.05  # symmetric in log, not in value


# -- resume -----------------------------------------------------------------------------------------


def _resumable_run(tmp_path, steps, name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    model = hl.hypernetize(net, inputs={"wd": (1e-4, 1.0, "log")})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tuner = hl.SelfTuner(model, opt, hyper_lr=0.05, history_size=4)  # small: the history is thinned on the way
    g = torch.Generator().manual_seed(1)
    x, y, xv, yv = (
        torch.randn(12, 3, generator=g),
        torch.randn(12, 1, generator=g),
        torch.randn(6, 3, generator=g),
        torch.randn(6, 1, generator=g),
    )

    def loss_fn(m, step):
        if step % 2 == 1:
            tuner.hyper_step(lambda m, wd: ((m(xv, wd=wd) - yv) ** 2).mean(), n=6)
        cond = tuner.sample(12)
        return ((m(x, **cond) - y) ** 2).mean() + (cond["wd"] * m.generate(**cond)["0.weight"].pow(2).flatten(1).sum(1)).mean(), cond

    trainer = hl.Trainer(model, opt, loss_fn, checkpoint=tmp_path / name, every=3, extras={"tuner": tuner})
    trainer.fit(steps)
    return model, tuner


def test_exact_resume_through_the_trainer(tmp_path):
    model_a, tuner_a = _resumable_run(tmp_path, 13, "a.safetensors")
    _resumable_run(tmp_path, 7, "b.safetensors")  # interrupted after 7 steps (last checkpoint at step 7)
    model_b, tuner_b = _resumable_run(tmp_path, 13, "b.safetensors")  # a fresh process resumes
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
    assert all(_same(v, tuner_b.state_dict()[k]) for k, v in tuner_a.state_dict().items())
    assert tuner_a.history == tuner_b.history and tuner_a.values == tuner_b.values
    assert tuner_a.hyper_steps == 6 and [r["step"] for r in tuner_a.history] == [1, 3, 5]  # thinned: every 2nd step


def test_history_plot_and_repr(tmp_path):
    pytest.importorskip("matplotlib")
    _, _, tuner, train_loss, val_loss = _setup(perturb=0.2)
    with pytest.raises(hl.HyperloomError, match=re.escape("no hyper step recorded yet")):
        tuner.plot(tmp_path / "t.png")
    for _ in range(3):
        tuner.train_step(train_loss)
        tuner.hyper_step(val_loss)
    rows = tuner.history
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["train_steps"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"step", "train_steps", "val_loss", "values", "scales"} and set(rows[0]["values"]) == {"wd", "mix"}
    assert rows[-1]["values"] == tuner.values and rows[-1]["scales"] == tuner.scales
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use("svg")  # a caller's backend (a notebook's, say) is left as it is
    try:
        assert tuner.plot(tmp_path / "t.png").stat().st_size > 1000
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        matplotlib.use(backend)
    (tmp_path / "file").write_text("x")  # through the library's one atomic writer: a bad path is a CheckpointError
    with pytest.raises(hl.CheckpointError, match=re.escape(f"{tmp_path / 'file' / 't.png'}: cannot write")):
        tuner.plot(tmp_path / "file" / "t.png")
    assert "3 hyper steps" in repr(tuner)


def test_vector_inputs_are_tuned_per_coordinate():
    model = hl.hypernetize(nn.Linear(2, 1), inputs={"z": hl.Input(0.0, 1.0, dim=3)})
    tuner = hl.SelfTuner(model, torch.optim.SGD(model.parameters(), lr=0.0), init={"z": [0.1, 0.5, 0.9]})
    assert tuner.sample()["z"].shape == (3,) and tuner.sample(5)["z"].shape == (5, 3)
    x = torch.randn(4, 2)
    tuner.hyper_step(lambda m, z: m(x, z=z).sum() * 0 + z[0] - z[2])
    v = tuner.values["z"]
    assert v[0] < 0.1 and v[1] == 0.5 and v[2] > 0.9


# -- bad input --------------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    model = hl.hypernetize(nn.Linear(2, 1), inputs={"task": hl.Task(3), "wd": (1e-4, 1.0, "log")})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(hl.HyperloomError, match=re.escape("['task'] are not continuous inputs ({'task': 'Task'})")):
        hl.SelfTuner(model, opt, inputs=["task", "wd"])
    with pytest.raises(hl.HyperloomError, match=re.escape("inputs ['lr'] are not declared inputs; declared inputs are ['task', 'wd']")):
        hl.SelfTuner(model, opt, inputs="lr")
    with pytest.raises(hl.HyperloomError, match=re.escape("init['wd']")):
        hl.SelfTuner(model, opt, init={"wd": 5.0})
    with pytest.raises(hl.HyperloomError, match=re.escape("perturb must lie in [0.0001, 1.0]")):
        hl.SelfTuner(model, opt, perturb=2.0)
    with pytest.raises(hl.HyperloomError, match="must be a hypernetwork model"):
        hl.SelfTuner(nn.Linear(2, 1), opt)
    enc = nn.Sequential(nn.Linear(2, 8))
    with_data = hl.hypernetize(nn.Linear(2, 1), inputs={"support": hl.Data(enc, per="set"), "wd": (1e-4, 1.0, "log")}, hidden=(8,))
    with pytest.raises(hl.HyperloomError, match=re.escape("['support'] are not continuous inputs ({'support': 'Data'})")):
        hl.SelfTuner(with_data, torch.optim.SGD(with_data.parameters(), lr=0.1), inputs=["support", "wd"])
    assert hl.SelfTuner(with_data, torch.optim.SGD(with_data.parameters(), lr=0.1)).names == ("wd",)
    tuner = hl.SelfTuner(model, opt)  # default: the continuous inputs only; the task id is the losses' business
    assert tuner.names == ("wd",)
    x = torch.randn(4, 2)
    tuner.train_step(lambda m, wd: m(x, task=1, wd=wd).pow(2).mean())
    with pytest.raises(hl.HyperloomError, match=re.escape("n must be None (one shared value) or an integer >= 1")):
        tuner.sample(0)


def test_losses_without_a_gradient_path_are_refused():
    tuner = _setup()[2]
    x = torch.randn(16, 4)
    fixed = {"wd": 0.1, "mix": 0.3}
    with pytest.raises(hl.HyperloomError, match=re.escape("val_loss does not depend on the conditioning ['wd', 'mix'] (no gradient path)")):
        tuner.hyper_step(lambda m, wd, mix: m(x, **fixed).mean())
    with pytest.raises(hl.HyperloomError, match=re.escape("train_loss does not depend on the conditioning ['wd', 'mix']")):
        tuner.train_step(lambda m, wd, mix: m(x, **fixed).pow(2).mean())
    with pytest.raises(hl.HyperloomError, match="val_loss must return a real one-element tensor"):
        tuner.hyper_step(lambda m, wd, mix: 1.0)
    with pytest.raises(hl.HyperloomError, match="train_loss returned a loss without a gradient"):
        tuner.train_step(lambda m, wd, mix: m(x, wd=wd, mix=mix).mean().detach())


@pytest.mark.parametrize("rule", ["raise", "skip"])
def test_non_finite_losses_follow_the_rule(rule):
    model, _, tuner, train_loss, val_loss = _setup(on_nonfinite=rule)
    tuner.train_step(train_loss)
    tuner.hyper_step(val_loss)
    state, params = _tuner_state(tuner), [p.clone() for p in model.parameters()]
    nan_train = lambda m, wd, mix: train_loss(m, wd, mix) * float("nan")  # noqa: E731
    nan_grad = lambda m, wd, mix: train_loss(m, wd, mix) + (m(torch.randn(16, 4), wd=wd, mix=mix) * 0).sqrt().sum()  # noqa: E731
    nan_val = lambda m, wd, mix: val_loss(m, wd, mix) + float("inf")  # noqa: E731
    for step, loss in ((tuner.train_step, nan_train), (tuner.train_step, nan_grad), (tuner.hyper_step, nan_val)):
        if rule == "raise":
            with pytest.raises(hl.NonFiniteLossError, match="nothing was updated"):
                step(loss)
        else:
            step(loss)  # skipped, counted
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = tuner.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in ("u", "log_scale", "adam_m", "adam_v", "adam_t"))
    assert tuner.skipped == ({"train": 2, "hyper": 1} if rule == "skip" else {"train": 0, "hyper": 0})
    assert all(math.isfinite(v) for v in tuner.values.values())


def test_a_state_of_other_inputs_is_refused_naming_both(tmp_path):
    model = hl.hypernetize(nn.Linear(2, 1), inputs={"a": (0.0, 1.0), "b": (0.0, 1.0), "wd": (1e-4, 1.0, "log")})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = hl.SelfTuner(model, opt, inputs="a", init={"a": 0.9}).state_dict()
    other = hl.SelfTuner(model, opt, inputs="b")  # the same sizes: loading would silently make b = 0.9
    with pytest.raises(hl.HyperloomError, match=re.escape("it tunes {a: dim=1, [0.0, 1.0], linear}, this tuner tunes {b: dim=1")):
        other.load_state_dict(state)
    assert other.values == {"b": 0.5}
    with pytest.raises(hl.HyperloomError, match=re.escape("this tuner tunes {a: dim=1, [0.0, 1.0], linear; b: dim=1")):
        hl.SelfTuner(model, opt).load_state_dict(state)  # other sizes: named, not a raw size-mismatch error
    with pytest.raises(
        hl.HyperloomError, match=re.escape("history_rows has shape (10000, 5), this tuner's has (4, 5) (history_size differs)")
    ):
        hl.SelfTuner(model, opt, inputs="a", history_size=4).load_state_dict(state)
    same = hl.SelfTuner(model, opt, inputs="a")
    same.load_state_dict(state)
    assert same.values == {"a": 0.9}
    x = torch.randn(4, 2)

    def fit(name, steps):  # resuming a run through the Trainer with a tuner of another input is refused too
        tuner = hl.SelfTuner(model, opt, inputs=name)

        def loss_fn(m, step):
            cond = {"a": 0.5, "b": 0.5, "wd": 0.01, **tuner.sample()}
            return m(x, **cond).pow(2).mean(), cond

        hl.Trainer(model, opt, loss_fn, checkpoint=tmp_path / "run.safetensors", every=1, extras={"tuner": tuner}).fit(steps)

    fit("a", 1)
    with pytest.raises(hl.HyperloomError, match=re.escape("(extras.tuner) is that of a tuner of other inputs: it tunes {a: dim=1")):
        fit("b", 2)


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    import sys

    _, _, tuner, _, val_loss = _setup()
    tuner.hyper_step(val_loss)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(hl.HyperloomError, match=re.escape("SelfTuner.plot needs matplotlib: pip install matplotlib")):
        tuner.plot(tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("bad", ["loss", "gradient", "val_loss"])
def test_a_raised_non_finite_step_leaves_the_tuner_and_its_draws_as_before_the_call(bad):
    # the raise used to leave the draw counter (and torch's generator, which the draws use) advanced: a run that
    # caught the error and went on drew other values than the run in which the bad step never happened
    def run(with_bad_step):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))  # no BatchNorm: the forward updates no buffer
        model = hl.hypernetize(net, predict=[nn.Linear], inputs={"wd": (1e-4, 1.0, "log"), "mix": (0.0, 0.7)}, hidden=(8,))
        tuner = hl.SelfTuner(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), hyper_lr=0.05)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        draws = []

        def train_loss(m, wd, mix):
            draws.append((float(wd.detach()), float(mix.detach())))
            return ((m(x, wd=wd, mix=mix) - y) ** 2).mean() + (wd * mix).mean()

        def val_loss(m, wd, mix):
            return ((m(x + 0.1, wd=wd, mix=mix) - y) ** 2).mean()

        bad_loss = {
            "loss": lambda m, wd, mix: train_loss(m, wd, mix) * float("nan"),
            "gradient": lambda m, wd, mix: train_loss(m, wd, mix) + (m(x, wd=wd, mix=mix) * 0 - 1).sqrt().sum() * 0,
            "val_loss": lambda m, wd, mix: val_loss(m, wd, mix) + float("inf"),
        }[bad]
        for step in range(4):
            tuner.train_step(train_loss)
            tuner.hyper_step(val_loss)
            if with_bad_step and step == 1:
                before, rng, n_draws = _tuner_state(tuner), torch.get_rng_state(), len(draws)
                with pytest.raises(hl.NonFiniteLossError, match="the tuner's state and the random generators are as before the call"):
                    (tuner.hyper_step if bad == "val_loss" else tuner.train_step)(bad_loss)
                after = tuner.state_dict()
                assert all(_same(before[k], after[k]) for k in before), [k for k in before if not _same(before[k], after[k])]
                assert torch.equal(torch.get_rng_state(), rng)
                del draws[n_draws:]  # the bad step's own draw
        return draws, tuner.steps, tuner.history, _tuner_state(tuner)

    draws, steps, history, state = run(True)
    ref_draws, ref_steps, ref_history, ref_state = run(False)
    assert draws == ref_draws and steps == ref_steps == 4
    assert history == ref_history
    assert all(_same(state[k], ref_state[k]) for k in ref_state)


def test_a_non_finite_step_in_the_trainer_does_not_move_the_tuners_draws(tmp_path):
    # the loss function draws with tuner.sample() (the draw counter moves) and then the Trainer stops on a NaN:
    # the checkpointed "last good state" must hold the counter of before the step, or a resume draws other values
    torch.manual_seed(0)
    model = hl.hypernetize(nn.Linear(3, 1), inputs={"wd": (1e-4, 1.0, "log")})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tuner = hl.SelfTuner(model, opt, hyper_lr=0.05)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss_fn(m, step):
        cond = tuner.sample(8)
        loss = ((m(x, **cond) - y) ** 2).mean()
        return (loss * float("nan") if step == 2 else loss), cond

    trainer = hl.Trainer(model, opt, loss_fn, checkpoint=tmp_path / "t.safetensors", extras={"tuner": tuner})
    trainer.fit(2)
    counters = tuner.counters.clone()
    with pytest.raises(hl.NonFiniteLossError):
        trainer.fit(5)
    assert torch.equal(tuner.counters, counters)
    other = hl.SelfTuner(model, opt, hyper_lr=0.05)
    hl.Trainer(model, opt, loss_fn, checkpoint=tmp_path / "t.safetensors", extras={"tuner": other}).resume()
    assert torch.equal(other.counters, counters)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_nan_input_leaves_no_nan_running_statistics(mode):
    # the forward of a failed train_step updated BatchNorm's running statistics with the NaN batch: with "skip"
    # the model then silently answered NaN in eval mode; with "raise" the "as before the call" state held them
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model = hl.hypernetize(net, inputs={"wd": (1e-4, 1.0, "log")})
    tuner = hl.SelfTuner(model, torch.optim.SGD(model.parameters(), lr=0.1), hyper_lr=0.05, on_nonfinite=mode)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    tuner.train_step(lambda m, wd: ((m(x, wd=wd) - y) ** 2).mean())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    bad = lambda m, wd: ((m(x * float("nan"), wd=wd) - y) ** 2).mean()  # noqa: E731
    if mode == "raise":
        with pytest.raises(hl.NonFiniteLossError, match="buffers"):
            tuner.train_step(bad)
    else:
        tuner.train_step(bad)
        assert tuner.skipped["train"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    model.eval()
    assert bool(torch.isfinite(model(x, wd=0.1)).all())


def test_a_corrupted_state_and_an_unknown_plot_format_are_refused(tmp_path):
    pytest.importorskip("matplotlib")
    model, _, tuner, _, val_loss = _setup()
    tuner.hyper_step(val_loss)
    for key, bad in (("u", float("nan")), ("u", 1.5), ("log_scale", 5.0)):
        state = tuner.state_dict()
        state[key] = torch.full_like(state[key], bad)
        other = hl.SelfTuner(model, torch.optim.SGD(model.parameters(), lr=0.0))
        before = other.values
        with pytest.raises(hl.HyperloomError, match=re.escape(f"SelfTuner.load_state_dict: {key} holds")):
            other.load_state_dict(state)  # the values held a NaN after it ("they never do")
        assert other.values == before
    with pytest.raises(hl.HyperloomError, match=re.escape("SelfTuner.plot: cannot save a figure as 'xyz'")):
        tuner.plot(tmp_path / "t.xyz")
