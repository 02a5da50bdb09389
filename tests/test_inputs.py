import math
import re

import pytest
import torch

import hyperloom as hl
from hyperloom import HyperloomError, Input, InputSet


def test_linear_and_log_normalisation():
    lin = Input(-2.0, 2.0)
    assert torch.allclose(lin.normalize(torch.tensor([-2.0, 0.0, 2.0])), torch.tensor([0.0, 0.5, 1.0]))
    log = Input(1e-3, 1e1, scale="log")
    u = log.normalize(torch.tensor([1e-3, 1e-1, 1e1]))
    assert torch.allclose(u, torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)
    assert math.isclose(log.midpoint(), 1e-1, rel_tol=1e-9)


def test_normalize_clamps_without_branching():
    spec = Input(0.0, 1.0, out_of_range="clamp")
    x = torch.tensor([-1.0, 0.5, 3.0])
    assert torch.equal(spec.normalize(x), torch.tensor([0.0, 0.5, 1.0]))
    # branch-free: works under vmap
    out = torch.func.vmap(spec.normalize)(x)
    assert torch.equal(out, torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"low": 1.0, "high": 0.0}, "Input range must satisfy low < high, got low=1.0, high=0.0"),
        ({"low": 0.0, "high": float("inf")}, "Input range must be finite"),
        ({"low": 0.0, "high": 1.0, "scale": "log"}, "A log-scale input needs low > 0, got low=0.0"),
        ({"low": 0.0, "high": 1.0, "scale": "cubic"}, "Input scale must be one of 'linear', 'log', got 'cubic'"),
        ({"low": 0.0, "high": 1.0, "dim": 0}, "Input dim must be an integer >= 1, got 0"),
        ({"low": 0.0, "high": 1.0, "out_of_range": "warn"}, "out_of_range must be one of 'raise', 'clamp'"),
    ],
)
def test_bad_declarations(kwargs, msg):
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        Input(**kwargs)


def test_inputset_parses_tuples_and_specs():
    s = InputSet({"lam": (0.0, 1.0), "lr": (1e-4, 1e-1, "log"), "z": Input(0, 1, dim=3)})
    assert s.names == ("lam", "lr", "z")
    assert s.total_dim == 5
    assert s.specs["lr"].scale == "log"


@pytest.mark.parametrize(
    ("inputs", "msg"),
    [
        ({}, "inputs must be a non-empty mapping"),
        ({"not valid": (0, 1)}, "Input names must be Python identifiers, got 'not valid'"),
        ({"lam": 3}, "inputs['lam']: expected hl.Input(low, high, ...)"),
    ],
)
def test_inputset_bad(inputs, msg):
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        InputSet(inputs)


def test_prepare_shared_and_per_sample():
    s = InputSet({"lam": (0.0, 1.0), "z": Input(0, 1, dim=2)})
    raw, per = s.prepare({"lam": 0.25, "z": [0.1, 0.2]}, dtype=torch.float64)
    assert not per and raw.shape == (1, 3) and raw.dtype == torch.float64
    raw, per = s.prepare({"lam": torch.rand(4), "z": [0.1, 0.2]}, batch=4, dtype=torch.float32)
    assert per and raw.shape == (4, 3)
    assert torch.allclose(raw[:, 1:], torch.tensor([0.1, 0.2]).expand(4, 2))
    raw, per = s.prepare({"lam": 0.5, "z": torch.rand(3, 2)}, dtype=torch.float32)
    assert per and raw.shape == (3, 3)


@pytest.mark.parametrize(
    ("values", "batch", "msg"),
    [
        ({"lam": 0.5, "mu": 1.0}, None, "Unknown conditioning input(s) ['mu']; declared inputs are ['lam', 'z']"),
        ({"lam": 0.5}, None, "Missing conditioning input(s) ['z']; declared inputs are ['lam', 'z']"),
        (
            {"lam": torch.rand(3), "z": [0.1, 0.2]},
            4,
            "Conditioning input 'lam' has 3 per-sample values but the batch has 4 samples",
        ),
        (
            {"lam": torch.rand(3), "z": torch.rand(2, 2)},
            None,
            "Conditioning input 'z' has 2 per-sample values but 'lam' has 3",
        ),
        (
            {"lam": torch.rand(3, 2), "z": [0.1, 0.2]},
            3,
            "Conditioning input 'lam': expected a scalar or shape (B,) with B = 3, got shape (3, 2)",
        ),
        (
            {"lam": 0.5, "z": [0.1, 0.2, 0.3]},
            None,
            "Conditioning input 'z': expected shape (2,) or (B, 2) with B = B, got shape (3,)",
        ),
        ({"lam": float("nan"), "z": [0.1, 0.2]}, None, "Conditioning input 'lam' has a non-finite value nan at sample 0"),
        (
            {"lam": 0.5, "z": torch.tensor([[0.1, float("inf")]])},
            None,
            "Conditioning input 'z' has a non-finite value inf at sample 0, coordinate 1",
        ),
        (
            {"lam": torch.tensor([0.5, 1.5]), "z": [0.1, 0.2]},
            None,
            "Conditioning input 'lam' out of its declared range [0.0, 1.0]: got values in [0.5, 1.5]",
        ),
        ({"lam": "high", "z": [0.1, 0.2]}, None, "Conditioning input 'lam' must be a number, a sequence of numbers"),
        ({"lam": True, "z": [0.1, 0.2]}, None, "Conditioning input 'lam' must be a number or tensor, got bool"),
        (
            {"lam": torch.tensor(0.5j), "z": [0.1, 0.2]},
            None,
            "Conditioning input 'lam' must be real numbers, got dtype torch.complex64",
        ),
    ],
)
def test_prepare_errors_name_the_input(values, batch, msg):
    s = InputSet({"lam": (0.0, 1.0), "z": Input(0, 1, dim=2)})
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        s.prepare(values, batch=batch, dtype=torch.float32)


def test_clamp_mode_accepts_out_of_range():
    s = InputSet({"lam": Input(0.0, 1.0, out_of_range="clamp")})
    raw, _ = s.prepare({"lam": 2.0}, dtype=torch.float32)
    assert torch.equal(s.normalize(raw), torch.ones(1, 1))


def test_integer_tensors_are_cast():
    s = InputSet({"task": (0, 9)})
    raw, per = s.prepare({"task": torch.tensor([1, 2, 3])}, dtype=torch.float32)
    assert per and raw.dtype == torch.float32


def test_device_mismatch_is_named():
    s = InputSet({"lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape("Conditioning input 'lam' is on cpu but the hypernetwork is on meta")):
        s.prepare({"lam": torch.tensor(0.5)}, dtype=torch.float32, device="meta")


def test_public_alias():
    assert hl.Input is Input
