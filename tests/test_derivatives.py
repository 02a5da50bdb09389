"""Input derivatives of a hypernetwork model (PINNs, neural fields): torch.func and autograd, shared and per sample;
hl.laplacian (hyperloom.derivatives): per-sample u and Δu in one call.

The reference is always a loop of shared calls (one weight set each, the plain materialised network); float64, 1e-8.
"""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, jvp, vmap

import hyperloom as hl
from hyperloom import HyperloomError

with warnings.catch_warnings():  # torch's first forward-mode use scripts its jvp decompositions (deprecated jit: a warning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp

MODES = ["vmap", "loop"]
TOL = {"atol": 1e-8, "rtol": 1e-8}


def make(per_sample="vmap", inputs=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return hl.hypernetize(net, inputs=inputs or {"a": (0.0, 1.0)}, hidden=(8,), per_sample=per_sample)


def data(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_jacrev_per_sample_equals_loop(mode):
    hnet = make(mode)
    x, a = data()
    j = jacrev(lambda x: hnet(x, a=a))(x)  # (B, 1, B, 2): block diagonal
    for i in range(len(a)):
        plain = hnet.materialize(a=float(a[i]))
        ref = jacrev(lambda z, plain=plain: plain(z[None])[0])(x[i])
        torch.testing.assert_close(j[i, :, i, :], ref, **TOL)
        off = torch.cat([j[i, :, :i, :].reshape(-1), j[i, :, i + 1 :, :].reshape(-1)])
        assert off.abs().max().item() == 0.0  # samples never mix


def test_jacrev_and_hessian_shared_equal_the_materialised_network():
    hnet = make()
    x, _ = data()
    plain = hnet.materialize(a=0.3)
    torch.testing.assert_close(jacrev(lambda x: hnet(x, a=0.3))(x), jacrev(plain)(x), **TOL)
    torch.testing.assert_close(hessian(lambda z: hnet(z[None], a=0.3)[0, 0])(x[0]), hessian(lambda z: plain(z[None])[0, 0])(x[0]), **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_jvp_per_sample_equals_loop(mode):
    hnet = make(mode)
    x, a = data()
    v = torch.randn_like(x)
    out, tangent = jvp(lambda x: hnet(x, a=a), (x,), (v,))
    for i in range(len(a)):
        plain = hnet.materialize(a=float(a[i]))
        o, t = jvp(lambda z, plain=plain: plain(z[None])[0], (x[i],), (v[i],))
        torch.testing.assert_close(out[i], o, **TOL)
        torch.testing.assert_close(tangent[i], t, **TOL)


@pytest.mark.parametrize("shared", [True, False])
def test_hessian_inside_the_users_vmap_equals_loop(shared):
    """The issue's call: a HyperModel inside a user's own vmap(hessian(...)) (the range check reads no values there)."""
    hnet = make()
    x, a = data()
    if shared:
        h = vmap(lambda z: hessian(lambda z: hnet(z[None], a=0.3)[0, 0])(z))(x)
    else:
        h = vmap(lambda z, a: hessian(lambda z: hnet(z[None], a=a[None])[0, 0])(z))(x, a)
    for i in range(len(a)):
        plain = hnet.materialize(a=0.3 if shared else float(a[i]))
        torch.testing.assert_close(h[i], hessian(lambda z, plain=plain: plain(z[None])[0, 0])(x[i]), **TOL)


def test_users_vmap_with_a_0d_value_and_a_task():
    hnet = make(inputs={"task": hl.Task(3, dim=4), "a": (0.0, 1.0)})
    x, a = data(3)
    ids = torch.tensor([0, 2, 1])
    lap = vmap(lambda z, a, t: torch.trace(hessian(lambda z: hnet(z[None], a=a[None], task=t[None])[0, 0])(z)))(x, a, ids)
    for i in range(3):
        plain = hnet.materialize(a=float(a[i]), task=int(ids[i]))
        ref = torch.trace(hessian(lambda z, plain=plain: plain(z[None])[0, 0])(x[i]))
        torch.testing.assert_close(lap[i], ref, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_autograd_create_graph_per_sample_equals_loop(mode):
    """A PINN residual: the Laplacian by autograd.grad(create_graph=True), then a loss backpropagated to the hypernetwork."""
    hnet = make(mode)
    x, a = data()

    def laplacian(u, z):
        (g,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        return sum(torch.autograd.grad(g[:, k].sum(), z, create_graph=True)[0][:, k] for k in range(z.shape[1]))

    z = x.clone().requires_grad_(True)
    lap = laplacian(hnet(z, a=a)[:, 0], z)
    hnet.zero_grad()
    lap.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in hnet.named_parameters() if p.grad is not None}  # the last bias: no gradient
    hnet.zero_grad()
    refs = []
    for i in range(len(a)):
        zi = x[i : i + 1].clone().requires_grad_(True)
        li = laplacian(hnet(zi, a=float(a[i]))[:, 0], zi)
        li.pow(2).sum().backward()
        refs.append(li.detach())
    torch.testing.assert_close(lap.detach(), torch.cat(refs), **TOL)
    assert len(grads) >= 5
    for n, p in hnet.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, **TOL, msg=n)
        else:
            assert p.grad is None, n


def test_under_vmap_values_are_clamped_not_checked():
    """Documented: under a transform that cannot read values the range check is skipped and values are clamped."""
    hnet = make()
    x, _ = data(2)
    with pytest.raises(HyperloomError, match="out of its declared range"):
        hnet(x, a=torch.tensor([0.5, 1.5], dtype=torch.float64))
    out = vmap(lambda z, a: hnet(z[None], a=a[None])[0])(x, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(out[1], hnet(x[1:], a=1.0)[0], **TOL)


# -- hl.laplacian ---------------------------------------------------------------------------


def mlp(d=2, out=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 12), nn.Tanh(), nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, out)).double()


def autograd_laplacian(hnet, x, **cond):
    """Reference: a shared call for one member, second derivatives by torch.autograd, one output at a time."""
    x = x.detach().requires_grad_(True)
    u = hnet(x, **cond)
    laps = []
    for o in range(u.shape[1]):
        (g,) = torch.autograd.grad(u[:, o].sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
        laps.append(lap)
    return u, torch.stack(laps, 1)


@pytest.mark.parametrize("formulation", ["mip", "default"])
@pytest.mark.parametrize("d,out", [(2, 1), (3, 2)])
def test_per_sample_matches_a_loop_over_members(formulation, d, out):
    hnet = hl.hypernetize(mlp(d, out), inputs={"a": hl.Input(-1.0, 1.0, dim=2), "k": (1.0, 4.0)}, hidden=(8,), formulation=formulation)
    g = torch.Generator().manual_seed(1)
    a, k = torch.rand(4, 2, generator=g, dtype=torch.float64) * 2 - 1, 1 + 3 * torch.rand(4, generator=g, dtype=torch.float64)
    x = torch.rand(4, 7, d, generator=g, dtype=torch.float64)
    u, lap = hl.laplacian(hnet, x, a=a, k=k)
    assert u.shape == lap.shape == (4, 7, out) and u.dtype == torch.float64
    for i in range(4):
        ref_u, ref_lap = autograd_laplacian(hnet, x[i], a=a[i], k=float(k[i]))
        torch.testing.assert_close(u[i], ref_u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lap[i], ref_lap, rtol=1e-9, atol=1e-10)


def test_shared_conditioning_and_known_function():
    """A linear-then-square network: u = (w·x + b)², Δu = 2|w|² exactly."""

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x) ** 2

    hnet = hl.hypernetize(Square().double(), inputs={"k": (0.0, 1.0)}, hidden=(4,))
    x = torch.rand(5, 3, dtype=torch.float64)
    u, lap = hl.laplacian(hnet, x, k=0.5)
    w = hnet.generate(k=0.5)["fc.weight"]
    torch.testing.assert_close(u, hnet(x, k=0.5))
    torch.testing.assert_close(lap, (2 * (w**2).sum()).expand(5, 1))


def test_gradients_reach_the_hypernetwork_and_match_the_loop():
    hnet = hl.hypernetize(mlp(), inputs={"k": (1.0, 4.0)}, hidden=(8,))
    x, k = torch.rand(3, 5, 2, dtype=torch.float64), torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)
    u, lap = hl.laplacian(hnet, x, k=k)
    grads = torch.autograd.grad((lap**2).sum() + u.sum(), list(hnet.parameters()))
    ref = sum((lambda r: (r[1] ** 2).sum() + r[0].sum())(autograd_laplacian(hnet, x[i], k=float(k[i]))) for i in range(3))
    ref_grads = torch.autograd.grad(ref, list(hnet.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_errors_name_the_problem():
    hnet = hl.hypernetize(mlp().float(), inputs={"k": (1.0, 4.0)}, hidden=(4,))
    with pytest.raises(HyperloomError, match="needs a HyperModel"):
        hl.laplacian(nn.Linear(2, 1), torch.rand(3, 2), k=1.0)
    with pytest.raises(HyperloomError, match=re.escape("x must have shape (B, N, d) with per-sample conditioning, got (3, 2)")):
        hl.laplacian(hnet, torch.rand(3, 2), k=torch.ones(3))
    with pytest.raises(HyperloomError, match=re.escape("x must have shape (N, d) with shared conditioning, got (3, 4, 2)")):
        hl.laplacian(hnet, torch.rand(3, 4, 2), k=1.0)
    with pytest.raises(HyperloomError, match=r"x holds 2 members .* the conditioning has 3 values"):
        hl.laplacian(hnet, torch.rand(2, 4, 2), k=torch.ones(3))
    with pytest.raises(HyperloomError, match="x must be a floating tensor"):
        hl.laplacian(hnet, torch.ones(3, 2, dtype=torch.int64), k=1.0)
    with pytest.raises(HyperloomError, match="'k'"):
        hl.laplacian(hnet, torch.rand(3, 2), k=9.0)

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(x).sum()

    pooled = hl.hypernetize(Pooled(), inputs={"k": (1.0, 4.0)}, hidden=(4,))
    with pytest.raises(HyperloomError, match=re.escape("maps one point (1, 2) to ()")):
        hl.laplacian(pooled, torch.rand(3, 2), k=1.0)

    drop = hl.hypernetize(nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 1)), inputs={"k": (1.0, 4.0)}, hidden=(4,))
    with pytest.raises(HyperloomError, match=re.escape("could not run under torch.func")):
        hl.laplacian(drop, torch.rand(2, 3, 2), k=torch.ones(2))


@pytest.mark.parametrize("mode", MODES)
def test_neural_field_conditioned_on_its_observations_per_sample(mode):
    """A neural field whose weights come from each sample's own set of observed points (hl.Data per sample):
    the Laplacian w.r.t. the query point equals a loop of shared calls, each with that sample's set (per='set')."""

    def field(per, pool):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
        net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        return hl.hypernetize(net, inputs={"obs": hl.Data(enc, per=per, pool=pool)}, hidden=(8,), per_sample=mode).double()

    per_sample, shared = field("sample", "mean"), field("set", "mean")
    shared.load_state_dict(per_sample.state_dict())
    x, _ = data()
    obs = torch.randn(4, 5, 3, dtype=torch.float64)

    def laplacian(u, z):
        (g,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        return sum(torch.autograd.grad(g[:, k].sum(), z, create_graph=True)[0][:, k] for k in range(z.shape[1]))

    z = x.clone().requires_grad_(True)
    lap = laplacian(per_sample(z, obs=obs)[:, 0], z)
    for i in range(4):
        zi = x[i : i + 1].clone().requires_grad_(True)
        torch.testing.assert_close(lap[i : i + 1], laplacian(shared(zi, obs=obs[i])[:, 0], zi), **TOL)
