import csv
import math
import re

import pytest
import torch
from torch import nn

import hyperloom as hl

# -- sample -------------------------------------------------------------------------------------------------


def _ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of samples in [0, 1] to the uniform distribution."""
    u = u.flatten().sort().values.double()
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


def test_sample_shapes_shared_and_per_sample():
    specs = {"lam": (0.0, 1.0), "z": hl.Input(-1.0, 1.0, dim=3)}
    shared = hl.sample(specs)
    assert shared["lam"].shape == () and shared["z"].shape == (3,)
    per = hl.sample(specs, n=5)
    assert per["lam"].shape == (5,) and per["z"].shape == (5, 3)
    assert per["lam"].dtype == torch.get_default_dtype()


def test_sample_follows_model_dtype_and_feeds_it():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0), "wd": (1e-5, 1e-1, "log")})
    cond = hl.sample(hnet, n=6, generator=torch.Generator().manual_seed(1), ends=0.5)
    assert all(v.dtype == torch.float64 for v in cond.values())
    out = hnet(torch.randn(6, 3, dtype=torch.float64), **cond)
    assert out.shape == (6, 2)


def test_sample_is_reproducible_with_a_generator():
    specs = {"lam": (0.0, 1.0), "wd": (1e-4, 1.0, "log")}
    a = hl.sample(specs, n=10, generator=torch.Generator().manual_seed(3), ends=0.3)
    b = hl.sample(specs, n=10, generator=torch.Generator().manual_seed(3), ends=0.3)
    c = hl.sample(specs, n=10, generator=torch.Generator().manual_seed(4), ends=0.3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lam"], c["lam"])


def test_sample_linear_is_uniform_and_log_is_log_uniform():
    n = 20_000
    g = torch.Generator().manual_seed(0)
    s = hl.sample({"lam": (2.0, 6.0), "wd": (1e-4, 1e2, "log")}, n=n, generator=g, dtype=torch.float64)
    # KS test at the 0.1% level: critical distance 1.95 / sqrt(n)
    crit = 1.95 / math.sqrt(n)
    assert _ks_uniform((s["lam"] - 2.0) / 4.0) < crit
    assert _ks_uniform((s["wd"].log10() + 4.0) / 6.0) < crit
    # a log-uniform draw is NOT uniform on the linear scale: the KS distance is large
    assert _ks_uniform((s["wd"] - 1e-4) / (1e2 - 1e-4)) > 10 * crit
    # one decade out of six of the draws per decade
    per_decade = torch.histc(s["wd"].log10(), bins=6, min=-4, max=2) / n
    assert torch.allclose(per_decade, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.015)


def test_sample_ends_put_the_asked_mass_on_the_end_points():
    n, p = 40_000, 0.3
    s = hl.sample({"lam": (0.0, 1.0), "wd": (1e-3, 1.0, "log")}, n=n, generator=torch.Generator().manual_seed(0), ends=p)
    for name, lo, hi in (("lam", 0.0, 1.0), ("wd", 1e-3, 1.0)):
        v = s[name].double()
        at_lo = float((v == torch.tensor(lo, dtype=s[name].dtype).double()).double().mean())
        at_hi = float((v == torch.tensor(hi, dtype=s[name].dtype).double()).double().mean())
        se = math.sqrt(p / 2 * (1 - p / 2) / n)
        assert abs(at_lo - p / 2) < 4 * se, (name, at_lo)
        assert abs(at_hi - p / 2) < 4 * se, (name, at_hi)
    # without ends, the end points are (almost surely) never drawn
    s0 = hl.sample({"lam": (0.0, 1.0)}, n=n, generator=torch.Generator().manual_seed(0))
    assert not bool(((s0["lam"] == 0) | (s0["lam"] == 1)).any())


def test_sample_ends_one_gives_exact_end_points_in_range_for_every_dtype():
    specs = {"wd": (1e-3, 10.0, "log"), "phi": (0.1, 0.7)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        s = hl.sample(specs, n=200, generator=torch.Generator().manual_seed(0), ends=1.0, dtype=dtype)
        for name, (lo, hi, *_) in specs.items():
            ends = {float(torch.tensor(lo, dtype=dtype)), float(torch.tensor(hi, dtype=dtype))}
            assert set(s[name].double().tolist()) <= ends
        # the model accepts every value drawn (its range check rounds the end points to the value's dtype)
        hl.InputSet(specs).prepare(s, dtype=torch.float32)


def test_sample_vector_inputs_draw_coordinates_independently():
    s = hl.sample({"z": hl.Input(0.0, 1.0, dim=2)}, n=20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    corr = torch.corrcoef(s["z"].T)[0, 1]
    assert abs(float(corr)) < 0.03
    assert _ks_uniform(s["z"][:, 0]) < 1.95 / math.sqrt(20_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "hl.sample: n must be None (one shared value) or an integer >= 1 (one per sample), got 0"),
        ({"n": 2.0}, "hl.sample: n must be None (one shared value) or an integer >= 1 (one per sample), got 2.0"),
        ({"n": True}, "hl.sample: n must be None (one shared value) or an integer >= 1 (one per sample), got True"),
        ({"ends": 1.5}, "hl.sample: ends must be a probability in [0, 1], got 1.5"),
        ({"ends": -0.1}, "hl.sample: ends must be a probability in [0, 1], got -0.1"),
        ({"dtype": torch.int64}, "hl.sample: dtype must be a floating torch.dtype, got torch.int64"),
        ({"generator": 3}, "hl.sample: generator must be a torch.Generator, got int"),
    ],
)
def test_sample_refuses_bad_arguments(kwargs, message):
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        hl.sample({"lam": (0.0, 1.0)}, **kwargs)


def test_sample_refuses_what_declares_no_inputs():
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.sample: expected a hypernetwork model (from hl.hypernetize)")):
        hl.sample(nn.Linear(2, 2))


# -- sweep --------------------------------------------------------------------------------------------------


def _two_input_model() -> hl.HyperModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    return hl.hypernetize(net, inputs={"lam": (0.0, 1.0), "wd": (1e-4, 1e-1, "log")})


def test_sweep_two_inputs_is_the_cartesian_product_and_matches_direct_calls():
    hnet = _two_input_model()
    x = torch.randn(16, 3)
    calls = []

    def evaluate(m, **c):
        calls.append(c)
        out = m(x, **c)
        return {"mean": out.mean(), "max": float(out.max())}

    s = hl.sweep(hnet, evaluate, {"lam": [0.0, 0.25, 1.0], "wd": 3})
    assert len(s) == 9 and s.names == ("lam", "wd") and s.metrics == ("mean", "max")
    assert [r["lam"] for r in s.rows] == [0.0] * 3 + [0.25] * 3 + [1.0] * 3  # first axis slowest
    assert s.column("wd")[:3] == [1e-4, pytest.approx(10**-2.5), 1e-1]
    assert s.column("wd")[0] == 1e-4 and s.column("wd")[2] == 1e-1  # end points exact
    for c, r in zip(calls, s.rows):
        assert set(c) == {"lam", "wd"}
        with torch.no_grad():
            assert r["mean"] == float(hnet(x, lam=c["lam"], wd=c["wd"]).mean())
    best = s.best("mean", mode="max")
    assert best["mean"] == max(s.column("mean"))
    assert s.best("mean")["mean"] == min(s.column("mean"))


def test_sweep_int_grid_is_spaced_on_the_inputs_own_scale():
    hnet = _two_input_model()
    s = hl.sweep(hnet, lambda m, **c: {"v": 0.0}, {"wd": 4})
    assert s.column("wd") == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1], rel=1e-12)
    s = hl.sweep(hnet, lambda m, **c: {"v": 0.0}, {"lam": 5})
    assert s.column("lam") == [0.0, 0.25, 0.5, 0.75, 1.0]
    s = hl.sweep(hnet, lambda m, **c: {"v": 0.0}, {"wd": 1})
    assert s.column("wd") == pytest.approx([math.sqrt(1e-4 * 1e-1)])


def test_sweep_restores_modes_and_runs_without_grad():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})
    hnet.train()
    hnet.primary[1].eval()  # a mixed state must come back as it was
    seen = []

    def evaluate(m, lam):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"v": m(torch.ones(2, 3), lam=lam).sum()}

    hl.sweep(hnet, evaluate, {"lam": 2})
    assert seen == [(False, False), (False, False)]
    assert hnet.training and not hnet.primary[1].training and hnet.primary[0].training
    hl.sweep(hnet, evaluate, {"lam": 1}, eval_mode=False, no_grad=False)
    assert seen[-1] == (True, True)


def test_sweep_vector_inputs_and_per_metric_best():
    hnet = hl.hypernetize(nn.Linear(2, 2), inputs={"z": hl.Input(0.0, 1.0, dim=2)})
    s = hl.sweep(hnet, lambda m, z: {"a": z[0] - z[1], "b": z[1] - z[0]}, {"z": [[0.0, 1.0], [1.0, 0.0], torch.tensor([0.5, 0.5])]})
    assert s.best("a", mode="max")["z"] == [1.0, 0.0]
    assert s.best("b", mode="max")["z"] == [0.0, 1.0]


def test_sweep_best_skips_nan_and_refuses_unknown_metric():
    hnet = _two_input_model()
    s = hl.sweep(hnet, lambda m, lam: {"v": math.nan if lam == 0.0 else lam}, {"lam": [0.0, 0.5, 1.0]})
    assert s.best("v")["lam"] == 0.5
    with pytest.raises(hl.HyperloomError, match=re.escape("Sweep: unknown metric 'x'; metrics are ['v']")):
        s.best("x")
    with pytest.raises(hl.HyperloomError, match=re.escape("Sweep.best: mode must be 'min' or 'max', got 'low'")):
        s.best("v", mode="low")
    s = hl.sweep(hnet, lambda m, lam: {"v": math.nan}, {"lam": 2})
    with pytest.raises(hl.HyperloomError, match=re.escape("Sweep.best: every value of 'v' is NaN")):
        s.best("v")


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({}, "hl.sweep: grid must be a non-empty mapping of input name -> values, got {}"),
        ({"mu": 3}, "hl.sweep: grid names ['mu'] are not declared inputs; declared inputs are ['lam', 'wd']"),
        ({"lam": 0}, "grid['lam']: the number of points must be >= 1, got 0"),
        ({"lam": [0.5, 1.5]}, "'lam'"),
        ({"wd": [0.0]}, "'wd'"),
        ({"lam": []}, "grid['lam']: no values"),
        ({"lam": "0.5"}, "grid['lam']: expected a sequence of values or an integer number of points"),
        ({"lam": [[0.1, 0.2]]}, "grid['lam']: each value must be a number, got [0.1, 0.2]"),
    ],
)
def test_sweep_validates_the_grid_before_evaluating(grid, message):
    hnet = _two_input_model()
    calls = []
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        hl.sweep(hnet, lambda m, **c: calls.append(c) or {"v": 0.0}, grid)
    assert calls == []


def test_sweep_int_grid_on_a_vector_input_is_refused():
    hnet = hl.hypernetize(nn.Linear(2, 2), inputs={"z": hl.Input(0.0, 1.0, dim=2)})
    with pytest.raises(
        hl.HyperloomError, match=re.escape("grid['z']: an integer spaces points on a scalar input's scale, but 'z' has dim=2")
    ):
        hl.sweep(hnet, lambda m, z: {"v": 0.0}, {"z": 3})


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (0.5, "hl.sweep: evaluate returned float at lam=0.0; expected a mapping of metric name -> number"),
        ({"v": "high"}, "hl.sweep: metric 'v' at lam=0.0 must be a number, got 'high'"),
        ({"v": torch.ones(3)}, "hl.sweep: metric 'v' at lam=0.0 must be a number or a one-element tensor"),
        ({"v": True}, "hl.sweep: metric 'v' at lam=0.0 must be a number, got True"),
        ({1: 0.5}, "hl.sweep: evaluate returned a metric name 1 at lam=0.0; metric names must be strings"),
        ({"lam": 0.5}, "hl.sweep: metric names ['lam'] clash with swept input names; rename the metrics"),
    ],
)
def test_sweep_refuses_bad_results(result, message):
    hnet = _two_input_model()
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        hl.sweep(hnet, lambda m, **c: result, {"lam": [0.0]})


def test_sweep_notes_the_grid_point_on_an_error_in_evaluate():
    hnet = _two_input_model()

    def evaluate(m, lam):
        if lam > 0.5:
            raise ValueError("boom")
        return {"v": lam}

    with pytest.raises(ValueError, match="boom") as info:
        hl.sweep(hnet, evaluate, {"lam": 3})
    assert "hl.sweep: raised by evaluate at lam=1.0" in getattr(info.value, "__notes__", ["hl.sweep: raised by evaluate at lam=1.0"])


def test_sweep_to_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    hnet = _two_input_model()
    x = torch.randn(8, 3)
    s = hl.sweep(hnet, lambda m, **c: {"a": m(x, **c).mean(), "b": m(x, **c).std()}, {"wd": 5, "lam": [0.0, 1.0]})
    path = s.to_csv(tmp_path / "sweep.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["wd", "lam", "a", "b"] and len(rows) == 10
    assert [float(r["a"]) for r in rows] == s.column("a")  # repr round-trips floats exactly
    fig = s.plot("a", tmp_path / "a.png", mark="min")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "wd"
    assert len(ax.get_lines()) == 2 + 2  # a line per lam value, a marker line each
    assert (tmp_path / "a.png").stat().st_size > 0
    fig = s.plot(["a", "b"], x="lam")
    assert fig.axes[0].get_xscale() == "linear" and len(fig.axes[0].get_lines()) == 2 * 5
    with pytest.raises(hl.HyperloomError, match=re.escape("Sweep.plot: x='mu' is not a swept input; swept inputs are ['wd', 'lam']")):
        s.plot("a", x="mu")


def test_sweep_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    import sys

    hnet = _two_input_model()
    s = hl.sweep(hnet, lambda m, lam: {"v": lam}, {"lam": 2})
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(hl.HyperloomError, match=re.escape("Sweep.plot needs matplotlib, an optional dependency: pip install matplotlib")):
        s.plot("v")


# -- tune ---------------------------------------------------------------------------------------------------


def _state(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def test_tune_leaves_the_model_exactly_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, predict=[nn.Linear])
    x = torch.randn(16, 3)
    hnet(x, lam=0.3).sum().backward()  # existing gradients must survive
    params = list(hnet.parameters())
    params[0].requires_grad_(False)  # and a frozen parameter stays frozen, a trainable one trainable
    hnet.train()
    hnet.primary[1].eval()
    before = _state(hnet)
    t = hl.tune(hnet, lambda m, lam: m(x, lam=lam).pow(2).mean(), steps=5)
    # with eval_mode=False the BatchNorm in train mode updates its running stats during the search: restored too
    t2 = hl.tune(hnet, lambda m, lam: m(x, lam=lam).pow(2).mean(), steps=5, eval_mode=False)
    after = _state(hnet)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    for (f0, g0), (f1, g1) in zip(before[1], after[1]):
        assert f0 == f1
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert before[2] == after[2]
    assert len(t.history) == 6 and len(t2.history) == 6


def test_tune_finds_a_known_optimum_from_several_starts():
    torch.manual_seed(0)
    hnet = hl.hypernetize(nn.Linear(2, 1), inputs={"wd": (1e-3, 1e1, "log")})
    x = torch.randn(64, 2)
    with torch.no_grad():
        target = hnet(x, wd=0.05)
    # the landscape (a sweep of 25 points) falls monotonically to 0.05 from both ends of [1e-3, 1]; above ~3 it has
    # a local minimum, where a gradient search from 10 stops: the test starts in the basin
    for start in (1e-3, 0.3, 1.0):
        t = hl.tune(hnet, lambda m, wd: (m(x, wd=wd) - target).pow(2).mean(), init={"wd": start}, steps=300, lr=0.03)
        assert t.values["wd"] == pytest.approx(0.05, rel=0.05), start
        assert t.history[0]["values"]["wd"] == pytest.approx(start)
        assert t.objective == min(h["objective"] for h in t.history)


def test_tune_stays_in_range_and_reaches_the_boundary_exactly():
    hnet = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0), "wd": (1e-3, 1.0, "log")})
    x = torch.ones(4, 2)
    # the objective keeps decreasing past the upper end of lam and the lower end of wd
    t = hl.tune(hnet, lambda m, lam, wd: -lam + wd.log() + 0 * m(x, lam=lam, wd=wd).sum(), steps=100, lr=0.1)
    for h in t.history:
        assert 0.0 <= h["values"]["lam"] <= 1.0 and 1e-3 <= h["values"]["wd"] <= 1.0
    assert t.history[-1]["values"] == {"lam": 1.0, "wd": 1e-3}  # the projection reaches the ends exactly
    # (the best point may be an earlier one whose objective rounds to the same float32 value)
    assert t.values["lam"] == pytest.approx(1.0, abs=1e-6) and t.values["wd"] == pytest.approx(1e-3, rel=1e-5)


def test_tune_some_inputs_keeps_the_others_fixed_and_handles_vectors():
    hnet = hl.hypernetize(nn.Linear(2, 2), inputs={"lam": (0.0, 1.0), "z": hl.Input(-1.0, 1.0, dim=2)})
    x = torch.ones(3, 2)
    goal = torch.tensor([0.5, -0.25], dtype=torch.float64)
    t = hl.tune(
        hnet,
        lambda m, lam, z: (z - goal).pow(2).sum() + 0 * m(x, lam=lam, z=z).sum(),
        inputs="z",
        init={"lam": 0.3},
        steps=300,
        lr=0.02,
    )
    assert {h["values"]["lam"] for h in t.history} == {0.3}
    assert t.values["z"] == pytest.approx([0.5, -0.25], abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs": "mu"}, "hl.tune: inputs ['mu'] are not declared inputs; declared inputs are ['lam']"),
        ({"inputs": []}, "hl.tune: inputs is empty; name at least one of the declared inputs ['lam']"),
        ({"init": {"mu": 0.1}}, "hl.tune: init names ['mu'] are not declared inputs; declared inputs are ['lam']"),
        ({"init": {"lam": 2.0}}, "'lam'"),
        ({"init": {"lam": [0.1, 0.2]}}, "hl.tune: init['lam']: each value must be a number, got [0.1, 0.2]"),
        ({"steps": -1}, "hl.tune: steps must be an integer >= 0, got -1"),
        ({"lr": 0.0}, "hl.tune: lr must be a finite number > 0, got 0.0"),
        ({"lr": math.inf}, "hl.tune: lr must be a finite number > 0, got inf"),
    ],
)
def test_tune_refuses_bad_arguments(kwargs, message):
    hnet = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0)})
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        hl.tune(hnet, lambda m, lam: m(torch.ones(1, 2), lam=lam).sum(), **kwargs)


def test_tune_refuses_objectives_without_gradient_or_not_finite():
    hnet = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0)})
    x = torch.ones(1, 2)
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: objective must return a real one-element tensor, got 0.5")):
        hl.tune(hnet, lambda m, lam: 0.5)
    with pytest.raises(
        hl.HyperloomError, match=re.escape("hl.tune: the objective has no gradient with respect to the tuned inputs ['lam']")
    ):
        hl.tune(hnet, lambda m, lam: m(x, lam=lam).sum().detach())
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: objective is nan at step 0, at lam=0.5")):
        hl.tune(hnet, lambda m, lam: m(x, lam=lam).sum() * math.nan)
    before = _state(hnet)
    with pytest.raises(hl.HyperloomError):
        hl.tune(hnet, lambda m, lam: m(x, lam=lam).sum().detach())
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), _state(hnet)[0].values()))
    assert [p.requires_grad for p in hnet.parameters()] == [f for f, _ in before[1]]


# -- regressions found by review ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("spec", [(0.1, 0.7), (1e-3, 0.3, "log")])
def test_tune_leaves_an_end_point_in_every_dtype(dtype, spec):
    # an end point rounded outwards by the model's dtype (0.7 -> 0.70019 in float16) used to have zero gradient
    torch.manual_seed(0)
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": spec}).to(dtype)
    x = torch.randn(8, 2, dtype=dtype)
    mid = hl.Input(*spec).midpoint()
    with torch.no_grad():
        target = m(x, lam=mid)

    def obj(mm, lam):
        return (mm(x, lam=lam) - target).float().pow(2).mean()

    for start in (spec[0], spec[1]):
        t = hl.tune(m, obj, init={"lam": start}, steps=5, lr=0.05)
        moved = {h["values"]["lam"] for h in t.history}
        assert len(moved) > 1, (dtype, start)
        assert all(spec[0] <= v <= spec[1] for v in moved)


def test_tune_non_finite_gradient_is_an_error_naming_the_input():
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"wd": (1e-6, 1e3, "log")}).half()
    x = torch.randn(8, 2).half()

    def obj(mm, wd):
        return mm(x, wd=wd).float().pow(2).mean() + 1e-3 * wd.float().log().pow(2)

    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: the gradient with respect to 'wd' is not finite at step")):
        # a search that reaches the low end of the range in float16: d log(wd) / d wd overflows there
        hl.tune(m, lambda mm, wd: obj(mm, wd) * 1e4, init={"wd": 1e-6}, steps=3, lr=0.5)


def test_sweep_and_tune_accept_end_points_in_lower_precision():
    np = pytest.importorskip("numpy")
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 0.1), "wd": (1e-3, 1.0, "log")})
    x = torch.randn(4, 2)

    def ev(mm, **c):
        return {"o": mm(x, **c).mean()}

    for grid in (np.array([0.0, 0.1], np.float32), torch.tensor([0.0, 0.1]), [torch.tensor(0.0), torch.tensor(0.1)]):
        s = hl.sweep(m, ev, {"lam": grid, "wd": [torch.tensor(1.0, dtype=torch.bfloat16)]})
        assert s.column("lam") == [0.0, 0.1] and s.column("wd") == [1.0, 1.0]
    t = hl.tune(m, lambda mm, lam, wd: mm(x, lam=lam, wd=wd).pow(2).mean(), init={"lam": torch.tensor(0.1)}, inputs="wd", steps=2)
    assert {h["values"]["lam"] for h in t.history} == {0.1}


def test_tune_does_not_touch_the_callers_tensors_or_other_modules():
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0), "wd": (1e-3, 1.0, "log")})
    x = torch.randn(4, 2)
    u = torch.tensor(0.2, requires_grad=True)
    hl.tune(m, lambda mm, lam, wd: mm(x, lam=lam, wd=wd).pow(2).mean(), init={"lam": u}, inputs="wd", steps=2)
    assert u.grad is None
    hl.tune(m, lambda mm, lam, wd: mm(x, lam=lam, wd=wd).pow(2).mean(), init={"lam": torch.tensor(0.1, requires_grad=True)}, steps=2)
    critic = nn.Linear(1, 1)
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: the objective has no gradient with respect to the tuned inputs")):
        hl.tune(m, lambda mm, lam, wd: critic(mm(x, lam=0.5, wd=0.1)).pow(2).mean(), steps=2)
    assert critic.weight.grad is None


def test_tune_runs_under_no_grad_and_refuses_inference_mode():
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0)})
    x = torch.randn(4, 2)
    with torch.no_grad():
        t = hl.tune(m, lambda mm, lam: mm(x, lam=lam).pow(2).mean(), steps=3)
    assert len({h["values"]["lam"] for h in t.history}) > 1
    with (
        torch.inference_mode(),
        pytest.raises(hl.HyperloomError, match=re.escape("hl.tune needs autograd: call it outside torch.inference_mode()")),
    ):
        hl.tune(m, lambda mm, lam: mm(x, lam=lam).pow(2).mean(), steps=3)


def test_tune_history_keeps_inputs_named_like_its_keys_and_refuses_a_non_mapping_init():
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"step": (0.0, 1.0), "objective": (0.0, 1.0)})
    x = torch.randn(4, 2)
    t = hl.tune(m, lambda mm, **c: mm(x, **c).pow(2).mean(), steps=2)
    assert [h["step"] for h in t.history] == [0, 1, 2] and set(t.history[0]["values"]) == {"step", "objective"}
    for init in ([0.5], 0.5):
        with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: init must be a mapping of input name -> starting value")):
            hl.tune(m, lambda mm, **c: mm(x, **c).pow(2).mean(), init=init)


def test_tune_restores_gradients_zeroed_in_place_by_the_objective():
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0)})
    x = torch.randn(4, 2)
    m(x, lam=0.3).sum().backward()
    before = [p.grad.clone() for p in m.parameters()]

    def obj(mm, lam):
        mm.zero_grad(set_to_none=False)
        return mm(x, lam=lam).pow(2).mean()

    hl.tune(m, obj, steps=2)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))


def test_sample_and_denormalize_in_half_precision():
    with pytest.raises(
        hl.HyperloomError, match=re.escape("hl.sample: input 'wd': the range [0.01, 1000000.0] does not fit in torch.float16")
    ):
        hl.sample({"wd": (1e-2, 1e6, "log")}, n=2000, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    v = hl.Input(1e-2, 1e6, scale="log").denormalize(torch.tensor([0.0, 1.0], dtype=torch.float16))
    assert v.dtype == torch.float32 and v.tolist() == pytest.approx([1e-2, 1e6])


def test_grid_counts_and_rates_accept_numpy_scalars_and_integer_grids_have_no_float_noise():
    np = pytest.importorskip("numpy")
    m = hl.hypernetize(nn.Linear(2, 1), inputs={"k": (0.0, 10.0), "w": (1e-4, 1e4, "log")})
    s = hl.sweep(m, lambda mm, **c: {"v": 0.0}, {"k": np.int64(11), "w": 9})
    assert sorted(set(s.column("k"))) == [float(i) for i in range(11)]
    assert sorted(set(s.column("w"))) == [10.0**e for e in range(-4, 5)]
    hl.tune(m, lambda mm, **c: mm(torch.ones(1, 2), **c).sum(), steps=1, lr=np.float32(0.1))
    assert hl.sample({"lam": (0.0, 1.0)}, ends=np.float32(0.5))["lam"].shape == ()


# -- Task inputs ----------------------------------------------------------------------------------------------


def _task_model() -> hl.HyperModel:
    torch.manual_seed(0)
    return hl.hypernetize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), inputs={"task": hl.Task(3, dim=4), "lam": (0.0, 1.0)})


def test_sample_draws_valid_task_ids_that_the_model_accepts():
    m = _task_model()
    s = hl.sample(m, n=3000, generator=torch.Generator().manual_seed(0))
    assert s["task"].dtype == torch.int64 and s["task"].shape == (3000,)
    counts = torch.bincount(s["task"], minlength=3).double() / 3000
    assert torch.allclose(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)
    shared = hl.sample(m, generator=torch.Generator().manual_seed(1))
    assert shared["task"].shape == ()
    x = torch.randn(3000, 3)
    assert m(x, **s).shape == (3000, 1) and m(x[:5], **shared).shape == (5, 1)


def test_sweep_over_task_ids_and_per_task_best():
    m = _task_model()
    x = torch.randn(8, 3)
    s = hl.sweep(m, lambda mm, task, lam: {"out": mm(x, task=task, lam=lam).mean()}, {"task": range(3), "lam": 3})
    assert s.column("task") == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with torch.no_grad():
        assert s.rows[4]["out"] == float(m(x, task=1, lam=0.5).mean())
    pytest.importorskip("matplotlib")
    assert s.plot("out", x="task").axes[0].get_xlabel() == "task"
    with pytest.raises(
        hl.HyperloomError, match=re.escape("grid['task']: a Task input takes a sequence of task ids, e.g. range(3) for all")
    ):
        hl.sweep(m, lambda mm, **c: {"v": 0.0}, {"task": 3})
    with pytest.raises(hl.HyperloomError, match=re.escape("grid['task']:")):
        hl.sweep(m, lambda mm, **c: {"v": 0.0}, {"task": [0, 3]})


def test_tune_keeps_a_task_fixed_and_refuses_to_tune_it():
    m = _task_model()
    x = torch.randn(8, 3)
    seen = []

    def obj(mm, task, lam):
        seen.append(task)
        return mm(x, task=task, lam=lam).pow(2).mean()

    t = hl.tune(m, obj, init={"task": 2}, inputs="lam", steps=3)
    assert set(seen) == {2} and t.values["task"] == 2 and all(h["values"]["task"] == 2 for h in t.history)
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: ['task'] are Task inputs (categorical ids)")):
        hl.tune(m, obj, steps=3)
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: init['task']:")):
        hl.tune(m, obj, init={"task": 5}, inputs="lam", steps=1)


def test_sample_sweep_and_tune_work_on_a_lora_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    m = hl.hypernetize(base, inputs={"lam": (0.0, 1.0)}, predict=["0"], lora=hl.LoRA(rank=2, alpha=4))
    x = torch.randn(6, 4)
    cond = hl.sample(m, n=6, generator=torch.Generator().manual_seed(0))
    assert m(x, **cond).shape == (6, 2)
    s = hl.sweep(m, lambda mm, lam: {"out": mm(x, lam=lam).mean()}, {"lam": 3})
    assert len(s) == 3
    flags = [p.requires_grad for p in m.parameters()]
    t = hl.tune(m, lambda mm, lam: mm(x, lam=lam).pow(2).mean(), steps=2)
    assert 0.0 <= t.values["lam"] <= 1.0 and [p.requires_grad for p in m.parameters()] == flags


def test_tune_names_duplicates_data_inits_and_plot_formats(tmp_path):
    pytest.importorskip("matplotlib")
    enc = nn.Sequential(nn.Flatten(), nn.Linear(4, 6))
    m = hl.hypernetize(nn.Linear(3, 1), inputs={"d": hl.Data(enc, per="set"), "lam": (0.0, 1.0)}, hidden=(8,))
    x, data = torch.randn(5, 3), torch.randn(1, 4)

    def objective(q, lam):
        return q(x, d=data, lam=lam).pow(2).mean()

    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: inputs ['lam', 'lam'] name an input more than once")):
        hl.tune(m, objective, inputs=["lam", "lam"], steps=1)
    # a Data input in init was called "not declared"
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.tune: init names Data input(s) ['d']: data is not tuned")):
        hl.tune(m, objective, inputs="lam", init={"d": data}, steps=1)
    sweep = hl.sweep(m, lambda q, lam: {"o": objective(q, lam)}, {"lam": 3})
    with pytest.raises(hl.HyperloomError, match=re.escape("Sweep.plot: cannot save a figure as 'xyz'")):  # was matplotlib's ValueError
        sweep.plot("o", tmp_path / "s.xyz")
    assert not (tmp_path / "s.xyz").exists()
    sweep.plot("o", tmp_path / "s.svg")
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
