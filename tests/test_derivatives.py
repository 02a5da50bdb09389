"""hl.laplacian: per-sample u and Δu against a loop over members with autograd, in float64; errors."""

import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError


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
