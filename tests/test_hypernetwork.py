import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError, HyperNetwork


def test_standalone_shared_and_per_sample():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (4, 3), "b": (4,)}, hidden=(8,))
    shared = h({"lam": 0.5})
    assert {k: tuple(v.shape) for k, v in shared.items()} == {"w": (4, 3), "b": (4,)}
    per = h({"lam": torch.tensor([0.5, 0.1])})
    assert per["w"].shape == (2, 4, 3)
    assert torch.allclose(per["w"][0], shared["w"])


def test_mip_is_additive_with_visible_theta0():
    init = {"w": torch.randn(4, 3)}
    h = HyperNetwork({"lam": (0.0, 1.0)}, init, hidden=(8,))
    assert h.additive and h.encoding.name == "cossin"
    assert torch.equal(h.theta0["w"], init["w"])
    out = h({"lam": 0.3})
    assert torch.allclose(out["w"], h.theta0["w"] + h.delta({"lam": 0.3})["w"])
    assert "theta0.w" in h.state_dict()


def test_default_formulation_has_no_theta0_and_raw_input():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (4, 3)}, formulation="default")
    assert h.theta0 is None and not h.additive and h.encoding.name == "raw"
    assert torch.equal(h({"lam": 0.3})["w"], h.delta({"lam": 0.3})["w"])


@pytest.mark.parametrize(("encoding", "additive"), [("cossin", False), ("raw", True), ("identity", True)])
def test_each_half_switchable(encoding, additive):
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (2, 2)}, encoding=encoding, additive=additive)
    assert h.encoding.name == encoding and h.additive is additive
    assert (h.theta0 is not None) is additive


def test_zero_init_starts_at_theta0():
    init = {"w": torch.randn(4, 3)}
    h = HyperNetwork({"lam": (0.0, 1.0)}, init, zero_init=True)
    assert torch.equal(h({"lam": torch.rand(5)})["w"], init["w"].expand(5, 4, 3))


def test_theta0_from_shapes_uses_mip_init():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"fc.weight": (300, 200), "fc.bias": (300,)})
    assert torch.count_nonzero(h.theta0["fc.bias"]) == 0
    std = float(h.theta0["fc.weight"].detach().std())
    assert abs(std - (2 / 200) ** 0.5) / (2 / 200) ** 0.5 < 0.05  # Kaiming fan_in


def test_theta0_is_freezable():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (4, 3)})
    h.theta0.freeze()
    h({"lam": 0.5})["w"].sum().backward()
    assert h.theta0["w"].grad is None
    assert h.head.linear.weight.grad is not None


def test_batchnorm_trunk_needs_per_sample_batch():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (2,)}, norm="batchnorm")
    assert h({"lam": torch.rand(4)})["w"].shape == (4, 2)
    with pytest.raises(HyperloomError, match=re.escape("norm='batchnorm' in the hypernetwork needs per-sample")):
        h({"lam": 0.5})
    h.eval()
    assert h({"lam": 0.5})["w"].shape == (2,)


def test_lowrank_head_option():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (40, 30)}, head="lowrank", rank=2)
    assert h.num_outputs == 2 * 70
    assert h({"lam": 0.1})["w"].shape == (40, 30)


def test_dtype_follows_targets():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": torch.zeros(2, 2, dtype=torch.float64)})
    assert h.dtype == torch.float64 and h({"lam": 0.5})["w"].dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"formulation": "hyper"}, "Unknown formulation 'hyper'; valid options are ['default', 'mip']"),
        ({"head": "sparse"}, "Unknown head 'sparse'; valid options are ['dense', 'lowrank', 'chunked', 'structured']"),
        ({"head": "lowrank"}, "head='lowrank' needs rank=<int>"),
        ({"targets": {}}, "targets must be a non-empty mapping"),
        ({"targets": {"w": "big"}}, "Target 'w': expected a shape or a tensor, got 'big'"),
        ({"targets": {"w": torch.zeros(2, dtype=torch.int64)}}, "Target 'w' must be a floating tensor"),
        (
            {"targets": {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}},
            "All targets must share one dtype and device, got a: torch.float32 on cpu, b: torch.float64 on cpu",
        ),
    ],
)
def test_bad_options(kwargs, msg):
    args = {"targets": {"w": (2,)}} | kwargs
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        HyperNetwork({"lam": (0.0, 1.0)}, args.pop("targets"), **args)


def test_public():
    assert hl.HyperNetwork is HyperNetwork


def test_vectorised_range_mapping_equals_inputset_normalize():
    inputs = {"a": (-2.0, 3.0), "lr": (1e-4, 1e-1, "log"), "z": hl.Input(0.0, 1.0, dim=3)}
    h = HyperNetwork(inputs, {"w": (2,)}, encoding="identity")
    raw = torch.cat([torch.rand(7, 1) * 6 - 2.5, 10 ** (torch.rand(7, 1) * 4 - 4.5), torch.rand(7, 3)], dim=1)
    torch.testing.assert_close(h.features(raw), h.input_set.normalize(raw))


def test_shared_fast_path_equals_batched_path():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (4, 3), "b": (4,)}, hidden=(8,), head="lowrank", rank=2)
    raw, _ = h.prepare({"lam": 0.3})
    batched = h.theta_from_raw(raw)
    for k, v in h.theta_shared(raw).items():
        torch.testing.assert_close(v, batched[k][0])


def test_additive_output_has_no_second_offset():
    # theta = theta0 + W h: the head must not add a trainable bias that receives the same gradient as theta0
    for head, kw in (("dense", {}), ("lowrank", {"rank": 2})):
        h = HyperNetwork({"lam": (0.0, 1.0)}, {"fc.weight": (6, 5), "fc.bias": (6,)}, head=head, **kw)
        assert h.head.linear.bias is None
        out = h({"lam": 0.3})
        (out["fc.weight"].sum() + out["fc.bias"].sum()).backward()
        offsets = [n for n, p in h.named_parameters() if p.dim() == 1 and p.numel() == h.num_outputs]
        assert offsets == []
        assert torch.equal(h.theta0["fc.bias"].grad, torch.ones(6))
    # the default formulation (no theta0) keeps the head's bias
    d = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (3, 2)}, formulation="default")
    assert d.head.linear.bias is not None


def test_zero_dim_target():
    h = HyperNetwork({"lam": (0.0, 1.0)}, {"scale": torch.tensor(2.0), "w": (3, 2)})
    assert h({"lam": 0.5})["scale"].shape == () and h({"lam": torch.rand(4)})["scale"].shape == (4,)


def test_target_shape_must_be_integers():
    with pytest.raises(HyperloomError, match=re.escape("Target 'w': expected a shape or a tensor, got (2.7, 3)")):
        HyperNetwork({"lam": (0.0, 1.0)}, {"w": (2.7, 3)})
    with pytest.raises(HyperloomError, match=re.escape("Target 'w': expected a shape or a tensor, got (True, 3)")):
        HyperNetwork({"lam": (0.0, 1.0)}, {"w": (True, 3)})


@pytest.mark.parametrize("head,kw", [("dense", {}), ("lowrank", {"rank": 4})])
def test_huge_targets_refused_before_allocation(head, kw):
    with pytest.raises(HyperloomError, match=r"The predicted tensors hold 10,000,000,000,000 values and need .* is available on cpu"):
        HyperNetwork({"lam": (0.0, 1.0)}, {"w": (10**7, 10**6)}, head=head, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_log_input_gradient_is_finite_at_the_ends(dtype):
    # a 1e-30 floor underflowed to 0 in half precision: log(0) made the gradient NaN
    h = HyperNetwork({"lr": (1e-4, 1e-1, "log"), "lam": (0.0, 1.0)}, {"w": (3, 2)}, dtype=dtype)
    for lr, lam in ((1e-4, 0.0), (1e-1, 1.0), (1e-3, 0.5)):
        lr_t = torch.tensor(lr, dtype=dtype, requires_grad=True)
        lam_t = torch.tensor(lam, dtype=dtype, requires_grad=True)
        h({"lr": lr_t, "lam": lam_t})["w"].sum().backward()
        assert torch.isfinite(lr_t.grad) and torch.isfinite(lam_t.grad), (dtype, lr, lam)


@pytest.mark.parametrize(
    ("rng", "value", "u"),
    [((0.0, 1e-46), 5e-47, 0.5), ((1e39, 1e40), 5e39, 5 / 9 - 1 / 9), ((0.0, 0.3), 0.3, 1.0), ((-1e300, 1e300), 0.0, 0.5)],
)
def test_float64_mapping_uses_exact_range_constants(rng, value, u):
    # the constants used to be built in float32 and then cast: u was 1.0, 0.0, 0.99999998 and nan
    h = HyperNetwork({"a": rng}, {"w": (2,)}, hidden=(2,), encoding="identity", dtype=torch.float64)
    raw, _ = h.prepare({"a": value})
    assert h.features(raw).item() == pytest.approx(u, rel=1e-12, abs=1e-12)
    assert h.features(raw).item() == pytest.approx(h.input_set.normalize(raw).item(), rel=1e-12, abs=1e-12)
    assert h.double()._in_lo.dtype == torch.float64 and h.float()._in_lo.dtype == torch.float64  # casts keep them


def test_half_precision_log_range_below_the_smallest_normal():
    # the low end of a (1e-8, 1) log range used to map to 0.47 in float16
    h = HyperNetwork({"a": (1e-8, 1.0, "log")}, {"w": (2,)}, hidden=(2,), encoding="identity", dtype=torch.float16)
    for v, u in ((1e-8, 0.0), (1e-6, 0.25), (1.0, 1.0)):
        raw, _ = h.prepare({"a": v})
        assert h.features(raw).item() == pytest.approx(u, abs=2e-3)


@pytest.mark.parametrize(("rng", "dtype"), [((-1e300, 1e300), torch.float32), ((0.0, 1e-46), torch.float32), ((0.0, 1e-46), torch.float16)])
def test_ranges_that_do_not_fit_the_dtype_are_refused(rng, dtype):
    # a float32 model with a (-1e300, 1e300) range returned NaN weights, silently
    with pytest.raises(
        HyperloomError, match=re.escape(f"Input 'a': the range [{rng[0]}, {rng[1]}] cannot be mapped to [0, 1] in torch.float")
    ):
        HyperNetwork({"a": rng}, {"w": (2,)}, hidden=(2,), dtype=dtype)


def test_under_compile_raise_mode_inputs_clamp_for_every_encoding():
    # prepare(check=False) only clamped clamp-mode inputs: raw/l2 encodings extrapolated under torch.compile
    h = HyperNetwork({"g": (0.0, 1.0)}, {"w": (3,)}, hidden=(4,), formulation="default")
    raw, _ = h.input_set.prepare({"g": torch.tensor(5.0)}, dtype=torch.float32, check=False)
    assert raw.item() == 1.0
    m = hl.hypernetize(torch.nn.Linear(2, 1), inputs={"g": (0.0, 1.0)}, hidden=(4,), formulation="default")
    c = torch.compile(m, backend="aot_eager")
    x = torch.ones(1, 2)
    torch.testing.assert_close(c(x, g=torch.tensor(5.0)), m(x, g=1.0))


def test_calling_a_hypernetwork_with_a_bare_number_says_how():
    # used to raise a bare TypeError: 'float' object is not iterable
    h = hl.HyperNetwork({"lam": (0.0, 1.0)}, {"w": (2,)}, hidden=(4,))
    msg = "Conditioning must be a mapping from input name to value, e.g. {'lam': ...} (a HyperNetwork is called as hnet({'lam': ...})"
    with pytest.raises(hl.HyperloomError, match=re.escape(msg)):
        h(0.3)


def test_init_theta0_from_the_models_tensor_keeps_norm_gains():
    """init_theta0 given the model's tensor is the rule of theta0="init" (public: experiments and users build a
    plain baseline from it): weights Kaiming from the same random stream as the shape form, biases zero, norm
    gains and shifts that are not biases keep their value, dtype follows the tensor."""
    ln = nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.fill_(2.0)
    assert torch.equal(hl.init_theta0("ln.weight", ln.weight), torch.full((4,), 2.0))
    assert torch.equal(hl.init_theta0("ln.bias", ln.bias), torch.zeros(4))
    w = nn.Linear(5, 3).weight.double()
    torch.manual_seed(3)
    from_tensor = hl.init_theta0("fc.weight", w)
    torch.manual_seed(3)
    from_shape = hl.init_theta0("fc.weight", (3, 5), dtype=torch.float64)
    assert from_tensor.dtype == torch.float64 and torch.equal(from_tensor, from_shape)
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    torch.manual_seed(0)
    h = hl.hypernetize(model, inputs={"g": (0.0, 1.0)}, theta0="init")
    torch.manual_seed(0)
    expected = {n: hl.init_theta0(n, p) for n, p in model.named_parameters()}
    for n, t in h.hypernet.theta0.items():
        assert torch.equal(t, expected[n]), n


def test_init_theta0_refuses_an_integer_weight_by_name():
    with pytest.raises(HyperloomError, match=re.escape("init_theta0('fc.weight'): a weight needs a floating-point dtype, got torch.int64")):
        hl.init_theta0("fc.weight", torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(HyperloomError, match=re.escape("got torch.int32")):
        hl.init_theta0("fc.weight", (3, 4), dtype=torch.int32)
    assert hl.init_theta0("fc.bias", (3,), dtype=torch.int64).dtype == torch.int64  # zeros need no sampling
