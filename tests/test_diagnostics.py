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


def test_theta_norms_with_a_task_input_uses_one_id():
    # a Task(dim=8) input used to get a list of 8 ids (its embedding width): 8 per-sample copies, norms sqrt(8) too large
    hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(3, dim=8), "lam": (0.0, 1.0)}, hidden=(8,))
    norms = hl.theta_norms(hnet, "lam", [0.0, 1.0])
    expected = [float(torch.cat([t.reshape(-1) for t in hnet.generate(task=0, lam=v).values()]).norm().detach()) for v in (0.0, 1.0)]
    assert norms == pytest.approx(expected, rel=1e-6)
    by_task = hl.theta_norms(hnet, "task", [0, 2], lam=0.5)
    assert by_task[1] == pytest.approx(float(torch.cat([t.reshape(-1) for t in hnet.generate(task=2, lam=0.5).values()]).norm().detach()))


def test_theta_norms_on_a_lora_model():
    # used to raise a raw AttributeError: 'input_set'
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    lm = hl.hypernetize(base, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, lora=hl.LoRA(rank=2), hidden=(8,))
    norms = hl.theta_norms(lm, "lam", [0.0, 1.0])
    expected = [float(torch.cat([t.reshape(-1) for t in lm.hypernet({"lam": v}).values()]).norm().detach()) for v in (0.0, 1.0)]
    assert norms == pytest.approx(expected, rel=1e-6)
    with pytest.raises(
        hl.HyperloomError, match=re.escape("hl.theta_norms expects a HyperModel, a LoRAModel or a HyperNetwork, got Linear")
    ):
        hl.theta_norms(nn.Linear(2, 2), "lam", [0.0])


def test_theta_norms_with_a_data_input_needs_its_data():
    """A Data input has no midpoint: theta_norms asks for its data (it fed the encoder a list of zeros and
    complained about 'a list of sets per sample'); given the data, it measures as one input among others."""
    torch.manual_seed(0)
    model = hl.hypernetize(nn.Linear(3, 2), inputs={"s": hl.Data(nn.Linear(3, 4), per="set"), "lam": (0.0, 1.0)}, hidden=(8,))
    with pytest.raises(hl.HyperloomError, match=re.escape("hl.theta_norms: 's' is a Data input: pass its data (s=...)")):
        hl.theta_norms(model, "lam", [0.1, 0.9])
    support = torch.randn(5, 3)
    norms = hl.theta_norms(model, "lam", [0.1, 0.9], s=support)
    with torch.no_grad():
        ref = [float(torch.cat([t.reshape(-1) for t in model.hypernet({"s": support, "lam": v}).values()]).norm()) for v in (0.1, 0.9)]
    assert norms == ref


def test_theta_norms_refuses_unknown_inputs_the_varied_input_and_a_bare_value():
    # a typo (lamb=) used to be dropped: the norms were measured at lam's midpoint without a word
    h = hl.HyperNetwork({"g": (0.0, 4.0), "lam": (0.0, 1.0)}, {"w": (4, 4)})
    with pytest.raises(hl.HyperloomError, match=re.escape("unknown input(s) ['lamb']; declared inputs are ['g', 'lam']")):
        hl.theta_norms(h, "g", [1.0, 2.0], lamb=0.9)
    with pytest.raises(hl.HyperloomError, match=re.escape("'g' is the input varied")):
        hl.theta_norms(h, "g", [1.0, 2.0], g=3.0)
    with pytest.raises(hl.HyperloomError, match=re.escape("values must be a sequence of values of 'g', got 1.0")):
        hl.theta_norms(h, "g", 1.0)
    assert hl.theta_norms(h, "g", [1.0], lam=0.9) != hl.theta_norms(h, "g", [1.0])  # the value given is used
