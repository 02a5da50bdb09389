import math
import pickle
import re

import pytest
import torch

from hyperloom import ACTIVATIONS, NORMS, HyperloomError, Trunk, WeightNormLinear


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("norm", NORMS)
def test_trunk_builds_and_runs(activation, norm):
    t = Trunk(4, (8, 16), activation=activation, norm=norm)
    out = t(torch.rand(5, 4))
    assert out.shape == (5, 16)
    assert t.out_features == 16


def test_mip_init_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    t = Trunk(2, (4000,), activation="relu")
    lin = t.layers[0]
    assert torch.count_nonzero(lin.bias) == 0
    # fan_out = 4000, gain sqrt(2): std = sqrt(2 / 4000)
    assert math.isclose(float(lin.weight.detach().std()), math.sqrt(2 / 4000), rel_tol=0.05)


def test_linear_hypernetwork_has_no_layers():
    t = Trunk(3, ())
    x = torch.rand(2, 3)
    assert torch.equal(t(x), x) and t.out_features == 3


def test_weight_norm_linear_equals_v_at_start_and_pickles():
    layer = WeightNormLinear(3, 5)
    assert torch.allclose(layer.weight, layer.v)
    x = torch.randn(2, 3)
    again = pickle.loads(pickle.dumps(layer))
    assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"activation": "swish"}, "Unknown activation 'swish'; valid options are ['elu', 'gelu'"),
        ({"norm": "groupnorm"}, "Unknown norm 'groupnorm'; valid options are ['none', 'batchnorm'"),
        ({"init": "xavier"}, "Unknown init 'xavier'; valid options are ['mip', 'torch']"),
        ({"hidden": (8, 0)}, "hidden widths must be >= 1, got [8, 0]"),
    ],
)
def test_bad_options(kwargs, msg):
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        Trunk(2, **kwargs)
