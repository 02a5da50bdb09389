import pickle
import re

import pytest
import torch

from hyperloom import HyperloomError, ParamStore


def test_keys_match_state_dict_names():
    s = ParamStore({"enc.0.conv.weight": torch.ones(2, 2), "enc.0.conv.bias": torch.zeros(2), "head": torch.ones(1)})
    # state_dict lists a module's own parameters before its children's, as PyTorch always does
    assert sorted(s.state_dict()) == sorted(["enc.0.conv.weight", "enc.0.conv.bias", "head"])
    assert s.keys() == ["enc.0.conv.weight", "enc.0.conv.bias", "head"]
    assert torch.equal(s["enc.0.conv.weight"], torch.ones(2, 2))
    assert "head" in s and "nope" not in s and len(s) == 3
    assert sorted(n for n, _ in s.named_parameters()) == sorted(s.keys())


def test_values_are_copied():
    t = torch.zeros(3)
    s = ParamStore({"b": t})
    with torch.no_grad():
        s["b"].add_(1)
    assert torch.count_nonzero(t) == 0


def test_freeze_and_unfreeze():
    s = ParamStore({"a.weight": torch.ones(2), "a.bias": torch.ones(2)})
    s.freeze("a.bias")
    assert s["a.weight"].requires_grad and not s["a.bias"].requires_grad
    s.freeze()
    assert not any(p.requires_grad for p in s.values())
    s.unfreeze()
    assert all(p.requires_grad for p in s.values())


def test_errors():
    s = ParamStore({"a.weight": torch.ones(2)})
    with pytest.raises(HyperloomError, match=re.escape("Unknown parameter name(s) ['b']; stored: ['a.weight']")):
        s.freeze("b")
    with pytest.raises(KeyError, match="'b' is not a stored parameter"):
        s["b"]
    with pytest.raises(HyperloomError, match=re.escape("Invalid parameter name 'a..b'")):
        ParamStore({"a..b": torch.ones(1)})
    with pytest.raises(HyperloomError, match=re.escape("Cannot store parameter 'a.weight.x': 'weight' is already a parameter")):
        ParamStore({"a.weight": torch.ones(1), "a.weight.x": torch.ones(1)})
    with pytest.raises(HyperloomError, match=re.escape("Cannot store parameter 'a': 'a' already holds other parameters")):
        ParamStore({"a.weight": torch.ones(1), "a": torch.ones(1)})


def test_names_that_are_method_names_are_stored():
    # attention code names submodules keys / values; they must not collide with the container's methods
    names = ["freeze", "keys.weight", "values.bias", "items.0.weight", "unfreeze", "training", "_names"]
    s = ParamStore({n: torch.full((2,), float(i)) for i, n in enumerate(names)})
    assert s.keys() == names and sorted(s.state_dict()) == sorted(names)
    assert [float(s[n][0].detach()) for n in names] == [float(i) for i in range(len(names))]
    s.freeze("keys.weight")
    assert not s["keys.weight"].requires_grad and s["values.bias"].requires_grad
    assert [k for k, _ in s.items()] == names and len(s.values()) == len(names)
    again = pickle.loads(pickle.dumps(s))
    assert again.keys() == names and torch.equal(again["values.bias"], s["values.bias"])


def test_pickles():
    s = ParamStore({"a.weight": torch.randn(2)})
    again = pickle.loads(pickle.dumps(s))
    assert torch.equal(again["a.weight"], s["a.weight"]) and again.keys() == ["a.weight"]
