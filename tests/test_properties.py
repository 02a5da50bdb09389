"""Property-based tests: random module trees, selectors, dtypes, batch sizes and conditioning values.

Every input either works and matches a reference, or raises HyperloomError naming the culprit:
never a raw error from deep inside, never a silently wrong shape, never a modified user module.
"""

import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError

EXAMPLES = 300


@st.composite
def module_trees(draw):
    """A random MLP-like tree (Linear, LayerNorm, activations, nested Sequentials) and its input width."""
    d_in = draw(st.integers(1, 6))
    width = d_in

    def block(depth):
        nonlocal width
        layers = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["linear", "linear", "norm", "act", "nest"] if depth < 2 else ["linear", "act"]))
            if kind == "linear":
                out = draw(st.integers(1, 6))
                layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
                width = out
            elif kind == "norm":
                layers.append(nn.LayerNorm(width))
            elif kind == "act":
                layers.append(draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU]))())
            else:
                layers.append(block(depth + 1))
        return nn.Sequential(*layers)

    net = block(0)
    if not any(p.requires_grad for p in net.parameters()):
        net.append(nn.Linear(width, 2))
    return net, d_in


SELECTORS = st.sampled_from(
    [None, [nn.Linear], [nn.LayerNorm], "*.weight", "*bias", re.compile(r"0\..*"), "0", [nn.Conv2d], "missing.weight"]
)


@st.composite
def conditioning(draw, batch):
    """A conditioning value for an input with range [0, 2]: valid or not, shared or per sample."""
    kind = draw(st.sampled_from(["shared", "per-sample", "per-sample", "wrong-batch", "nan", "inf", "out-of-range", "matrix"]))
    if kind == "shared":
        return draw(st.floats(0.0, 2.0)), True
    if kind == "per-sample":
        return torch.rand(batch, dtype=draw(st.sampled_from([torch.float16, torch.float32, torch.float64]))) * 2, True
    if kind == "wrong-batch":
        return torch.rand(batch + draw(st.integers(1, 3))), False
    if kind == "nan":
        return float("nan"), False
    if kind == "inf":
        return torch.tensor([float("inf")] * batch) if batch else float("-inf"), False
    if kind == "out-of-range":
        return draw(st.sampled_from([-0.5, 2.5, 1e9])), False
    return torch.rand(batch, 3), False


def snapshot(net):
    return [(n, p.detach().clone(), id(p), type(p)) for n, p in net.named_parameters()]


def unchanged(net, snap):
    now = list(net.named_parameters())
    return len(now) == len(snap) and all(
        n == n0 and torch.equal(p, p0) and id(p) == i0 and type(p) is t0 for (n, p), (n0, p0, i0, t0) in zip(now, snap)
    )


def selects_something(net, predict):
    try:
        hl.select_parameters(net, predict)
        return True
    except HyperloomError:
        return False


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=module_trees(),
    predict=SELECTORS,
    batch=st.integers(0, 5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    data=st.data(),
)
def test_random_models_work_or_raise_the_library_error(tree, predict, batch, dtype, data):
    net, d_in = tree
    net = net.to(dtype)
    snap = snapshot(net)
    try:
        hnet = hl.hypernetize(net, predict=predict, inputs={"g": (0.0, 2.0)}, hidden=(4,))
    except HyperloomError:
        event("wrapping refused (selector matched nothing)")
        assert not selects_something(net, predict)
        assert unchanged(net, snap)
        return
    assert selects_something(net, predict)
    value, valid = data.draw(conditioning(batch))
    x = torch.randn(batch, d_in, dtype=dtype)
    per_sample = isinstance(value, torch.Tensor) and value.dim() == 1
    if per_sample and batch == 0 and valid:
        valid = False  # an empty per-sample batch is refused with a clear message
    try:
        out = hnet(x, g=value)
    except HyperloomError:
        event("conditioning refused")
        assert not valid, f"valid input refused: {value!r}"
        assert unchanged(net, snap)
        return
    assert valid, f"invalid input accepted: {value!r}"
    ref_out = net(x)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert unchanged(net, snap)
    tol = {"rtol": 5e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    event(f"ran and matched the reference ({'per sample' if per_sample else 'shared'}, {dtype})")
    if per_sample:
        for i in range(batch):
            single = hnet(x[i : i + 1], g=float(value[i]))
            torch.testing.assert_close(out[i : i + 1], single, **tol)
    else:
        plain = hnet.materialize(g=value)
        torch.testing.assert_close(out, plain(x), **tol)


@settings(max_examples=40, deadline=None)
@given(
    low=st.floats(-1e3, 1e3, allow_nan=False),
    span=st.floats(1e-3, 1e3),
    log=st.booleans(),
    u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
)
def test_declared_ranges_map_into_unit_interval(low, span, log, u):
    if log:
        low = abs(low) + 1e-3
    spec = hl.Input(low, low + span, scale="log" if log else "linear")
    vals = torch.tensor([spec.low + v * (spec.high - spec.low) for v in u], dtype=torch.float64)
    mapped = spec.normalize(vals)
    assert bool(((mapped >= 0) & (mapped <= 1)).all())
    assert torch.all(mapped[1:][torch.tensor(u[1:]) > torch.tensor(u[:-1])] >= mapped[:-1][torch.tensor(u[1:]) > torch.tensor(u[:-1])])
    enc = hl.CosSin()(vals[:, None], mapped[:, None])
    assert torch.allclose(enc.norm(dim=1), torch.ones(len(u), dtype=torch.float64))


def test_models_on_different_devices_are_refused():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(
        HyperloomError, match=re.escape("Predicted parameters must share one dtype and device, got 0.weight: torch.float32 on cpu")
    ):
        hl.hypernetize(net, inputs={"g": (0.0, 1.0)})
    meta = hl.hypernetize(nn.Linear(2, 2, device="meta"), inputs={"g": (0.0, 1.0)})
    assert meta.hypernet.device.type == "meta"
    with pytest.raises(HyperloomError, match=re.escape("Positional input 0 is on cpu but the model is on meta")):
        meta(torch.randn(3, 2), g=0.5)
