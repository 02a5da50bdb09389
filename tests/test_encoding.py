import re

import pytest
import torch

import hyperloom as hl
from hyperloom import HyperloomError, get_encoding


def test_cossin_has_constant_norm_and_is_injective():
    u = torch.linspace(0, 1, 101).reshape(-1, 1).repeat(1, 3)
    e = get_encoding("cossin")(u, u)
    assert e.shape == (101, 6)
    assert torch.allclose(e.norm(dim=1), torch.full((101,), 3**0.5))
    # injective on [0, 1]: distinct u give distinct encodings
    d = torch.cdist(e, e) + torch.eye(101)
    assert float(d.min()) > 1e-3


@pytest.mark.parametrize("name", sorted(hl.ENCODINGS))
def test_every_encoding_shape(name):
    k = 3
    enc = get_encoding(name)
    raw = torch.rand(5, k) * 4
    u = raw / 4
    out = enc(raw, u)
    assert out.shape == (5, enc.out_features(k))


def test_encoding_values():
    raw = torch.tensor([[2.0, 4.0]])
    u = torch.tensor([[0.5, 1.0]])
    assert torch.equal(get_encoding("raw")(raw, u), raw)
    assert torch.equal(get_encoding("identity")(raw, u), u)
    assert torch.equal(get_encoding("zoneminusz")(raw, u), torch.tensor([[0.5, 1.0, 0.5, 0.0]]))
    assert torch.allclose(get_encoding("l2")(raw, u).norm(), torch.tensor(1.0))
    s = get_encoding("standardize")(raw, u)
    assert torch.allclose(s, torch.tensor([[0.0, 0.5 * 12**0.5]]))


def test_l2_needs_two_coordinates():
    with pytest.raises(HyperloomError, match=re.escape("Encoding 'l2' needs at least 2 input coordinates")):
        get_encoding("l2").out_features(1)


def test_unknown_encoding_lists_options():
    with pytest.raises(HyperloomError, match=re.escape("Unknown encoding 'fourier'; valid options are ['cossin'")):
        get_encoding("fourier")


def test_instance_passes_through():
    enc = hl.CosSin()
    assert get_encoding(enc) is enc


@pytest.mark.parametrize(("formulation", "encoding"), [("default", None), ("mip", "raw"), ("mip", "l2")])
def test_clamp_mode_clamps_what_raw_encodings_see(formulation, encoding):
    # 'raw' and 'l2' read the raw values, not u: out_of_range='clamp' must clamp those too
    dim = 2 if encoding == "l2" else 1
    h = hl.HyperNetwork({"g": hl.Input(0.0, 1.0, dim=dim, out_of_range="clamp")}, {"w": (3, 2)}, formulation=formulation, encoding=encoding)
    one = torch.ones(dim) if dim > 1 else 1.0
    big = torch.tensor([5.0, 1.0]) if dim > 1 else 5.0
    assert torch.equal(h({"g": big})["w"], h({"g": one})["w"])
    g = torch.tensor([5.0, 1.0, 0.5, -3.0, 0.0])
    ref = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0])
    if dim > 1:
        g, ref = torch.stack([g, torch.full_like(g, 2.0)], 1), torch.stack([ref, torch.ones_like(ref)], 1)
    out, out_ref = h({"g": g})["w"], h({"g": ref})["w"]
    assert out.shape == (5, 3, 2) and torch.equal(out, out_ref)
    assert not torch.equal(out[0], out[2])  # the test can tell values apart
