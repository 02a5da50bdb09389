import re

import pytest
import torch
from torch import nn

import hyperloom as hl

GAMMAS = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0]


def convnet():
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.LeakyReLU(),
        nn.Conv2d(16, 32, 3),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.LeakyReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_default_formulation_is_exactly_proportional(activation):
    h = hl.hypernetize(convnet(), inputs={"g": (0.0, 4.0)}, formulation="default", activation=activation)
    norms = hl.theta_norms(h, "g", GAMMAS)
    assert norms[0] == 0.0  # the primary network collapses at gamma = 0
    for g, n in zip(GAMMAS[1:], norms[1:]):
        assert n / norms[4] == pytest.approx(g, rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_mip_removes_proportionality(seed):
    torch.manual_seed(seed)
    h = hl.hypernetize(convnet(), inputs={"g": (0.0, 4.0)})
    norms = hl.theta_norms(h, "g", GAMMAS)
    # default: |theta(4)| / |theta(0.1)| = 40 and |theta(0)| = 0; MIP: bounded away from 0 and nearly flat
    # (measured 1.05-1.16 for max/min over these seeds: the encoding has constant norm, the trunk is not isotropic)
    assert min(norms) > 0
    assert max(norms) / min(norms) < 1.5


def test_tanh_breaks_exact_proportionality():
    h = hl.hypernetize(convnet(), inputs={"g": (0.0, 4.0)}, formulation="default", activation="tanh")
    norms = hl.theta_norms(h, "g", [1.0, 4.0])
    assert norms[1] / norms[0] != pytest.approx(4.0, rel=1e-3)


def test_delta_and_other_inputs():
    h = hl.HyperNetwork({"a": (0.0, 1.0), "z": hl.Input(0, 1, dim=2)}, {"w": (3, 3)})
    assert len(hl.theta_norms(h, "a", [0.0, 1.0], delta=True, z=[0.2, 0.4])) == 2
    with pytest.raises(hl.HyperloomError, match=re.escape("Unknown input 'b'; declared inputs are ['a', 'z']")):
        hl.theta_norms(h, "b", [0.0])


def test_theta_norms_leaves_no_graph():
    h = hl.HyperNetwork({"a": (0.0, 1.0)}, {"w": (3, 3)})
    assert all(isinstance(v, float) for v in hl.theta_norms(h, "a", [0.5]))
    assert h.head.linear.weight.grad is None
    assert torch.is_grad_enabled()
