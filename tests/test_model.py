import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError


class ConvNet(nn.Module):
    """HyperLight's README ConvNet (see docs/method.md)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
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
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.net(x).mean((2, 3)))


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- #
# Delta = 0 reproduces the original model exactly, on every supported module type
# --------------------------------------------------------------------------------------- #
class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.heads["a"](x) + self.heads["b"](x)


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), lambda: torch.randn(4, 5), {}),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()), lambda: torch.randn(4, 2, 10), {}),
    "conv2d": (ConvNet, lambda: torch.randn(4, 1, 28, 28), {}),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3), lambda: torch.randn(4, 2, 5, 5, 5), {}),
    "convtranspose": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), lambda: torch.randn(4, 2, 5, 5), {}),
    "embedding": (lambda: nn.Embedding(10, 4), lambda: torch.randint(0, 10, (4, 7)), {}),
    "layernorm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), lambda: torch.randn(4, 3), {}),
    "batchnorm-eval": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval(), lambda: torch.randn(4, 1, 6, 6), {}),
    "gru": (lambda: nn.GRU(3, 5, batch_first=True), lambda: torch.randn(4, 6, 3), {"out_dims": (0, 1)}),
    "lstm": (lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True), lambda: torch.randn(4, 6, 3), {"out_dims": (0, (1, 1))}),
    "attention": (SelfAttention, lambda: torch.randn(4, 5, 8), {}),
    "transformer": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        lambda: torch.randn(4, 5, 8),
        {},
    ),
    "nested": (Nested, lambda: torch.randn(4, 4), {}),
}


def first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


@pytest.fixture(autouse=True)
def _allow_vmap_fallback_warning():
    # vmap has no batching rule for fused attention kernels: a known, harmless PyTorch performance warning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        yield


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_delta_reproduces_original_exactly(case):
    make, data, kw = CASES[case]
    net = make()
    x = data()
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, zero_init=True, **kw)
    ref = net(x)
    for a, b in zip(flat(ref), flat(hnet(x, lam=0.7))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_matches_python_loop(case):
    make, data, kw = CASES[case]
    net = make()
    x = data()
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, **kw)
    lam = torch.rand(x.shape[0])
    batched = hnet(x, lam=lam)
    out_dims = kw.get("out_dims", 0)
    for i in range(x.shape[0]):
        single = hnet(x[i : i + 1], lam=float(lam[i]))
        for b, s, d in zip(flat(batched), flat(single), flat_dims(out_dims, single)):
            torch.testing.assert_close(b.narrow(d, i, 1), s, rtol=1e-5, atol=1e-5)


def flat_dims(dims, out):
    if isinstance(out, torch.Tensor):
        return [dims]
    sub = [dims] * len(out) if isinstance(dims, int) else dims
    return [d for o, s in zip(out, sub) for d in flat_dims(s, o)]


def test_per_sample_gradients_match_loop():
    net = ConvNet()
    hnet = hl.hypernetize(net, predict=[nn.Conv2d, nn.Linear], inputs={"lam": (0.0, 1.0)})
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    lam = torch.rand(6)
    loss = nn.functional.cross_entropy(hnet(x, lam=lam), y, reduction="sum")
    g_batched = torch.autograd.grad(loss, list(hnet.parameters()))
    loss_loop = sum(nn.functional.cross_entropy(hnet(x[i : i + 1], lam=float(lam[i])), y[i : i + 1], reduction="sum") for i in range(6))
    g_loop = torch.autograd.grad(loss_loop, list(hnet.parameters()))
    for a, b in zip(g_batched, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_vmap_and_loop_modes_agree():
    net = ConvNet()
    a = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, per_sample="vmap")
    b = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    b.load_state_dict(a.state_dict())
    x, lam = torch.randn(5, 1, 28, 28), torch.rand(5)
    torch.testing.assert_close(a(x, lam=lam), b(x, lam=lam))


def test_rnn_uses_loop_mode():
    hnet = hl.hypernetize(nn.GRU(3, 4), inputs={"lam": (0.0, 1.0)}, batch_dim=1, out_dims=(1, 1))
    assert hnet.per_sample_mode == "loop"
    out, h = hnet(torch.randn(7, 3, 3), lam=torch.rand(3))  # seq-first: samples along dim 1
    assert out.shape == (7, 3, 4) and h.shape == (1, 3, 4)


# --------------------------------------------------------------------------------------- #
# BatchNorm and dropout in per-sample mode
# --------------------------------------------------------------------------------------- #
def test_batchnorm_per_sample_training_semantics():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
    x, lam = torch.randn(4, 1, 6, 6), torch.rand(4)
    bn_before = copy.deepcopy(hnet.primary[1])
    out = hnet(x, lam=lam)
    # reference: each sample normalised alone, running stats = mean of per-sample updates
    means, vars_ = [], []
    for i in range(4):
        theta = {k: v.detach() for k, v in hnet.generate(lam=float(lam[i])).items()}
        bn = copy.deepcopy(bn_before)
        h = nn.functional.conv2d(x[i : i + 1], theta["0.weight"], theta["0.bias"])
        torch.testing.assert_close(out[i : i + 1], bn(h), rtol=1e-5, atol=1e-5)
        means.append(bn.running_mean)
        vars_.append(bn.running_var)
    bn_after = hnet.primary[1]
    torch.testing.assert_close(bn_after.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(bn_after.running_var, torch.stack(vars_).mean(0))
    assert int(bn_after.num_batches_tracked) == 1


def test_batchnorm_shared_mode_is_plain_batchnorm():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    ref = copy.deepcopy(net)
    hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)}, zero_init=True)
    x = torch.randn(4, 1, 6, 6)
    assert torch.equal(hnet(x, lam=0.5), ref(x))
    assert torch.equal(hnet.primary[1].running_mean, ref[1].running_mean)


def test_dropout_per_sample_runs_with_different_masks():
    net = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5))
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, zero_init=True)
    out = hnet(torch.ones(2, 4).expand(2, 4).contiguous(), lam=torch.tensor([0.3, 0.3]))
    assert not torch.equal(out[0] == 0, out[1] == 0)


# --------------------------------------------------------------------------------------- #
# gradcheck, torch.compile, pickling, state_dict
# --------------------------------------------------------------------------------------- #
def test_gradcheck_float64():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, hidden=(4, 6), activation="tanh")
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.2, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, lam: hnet(x, lam=lam), (x, lam))
    # with respect to the hypernetwork's own parameters (shared mode)
    names = [n for n, _ in hnet.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in hnet.parameters())

    def f(*ps):
        return torch.func.functional_call(hnet, dict(zip(names, ps)), (x.detach(),), {"lam": 0.4})

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("per_sample", [False, True])
def test_torch_compile_matches_eager(per_sample):
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})
    compiled = torch.compile(hnet, backend="aot_eager")
    x = torch.randn(3, 1, 8, 8)
    lam = torch.rand(3) if per_sample else 0.4
    torch.testing.assert_close(compiled(x, lam=lam), hnet(x, lam=lam))
    compiled(x, lam=lam).sum().backward()
    assert hnet.hypernet.head.linear.weight.grad is not None


def test_torch_save_whole_module_and_state_dict_roundtrip():
    net = ConvNet()
    hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)}, norm="weightnorm")
    x = torch.randn(2, 1, 28, 28)
    buf = io.BytesIO()
    torch.save(hnet, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(again(x, lam=0.3), hnet(x, lam=0.3))
    other = hl.hypernetize(ConvNet(), predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)}, norm="weightnorm")
    assert not torch.equal(other(x, lam=0.3), hnet(x, lam=0.3))
    other.load_state_dict(hnet.state_dict())
    assert torch.equal(other(x, lam=0.3), hnet(x, lam=0.3))


def test_state_dict_has_theta0_once_and_no_stale_weights():
    hnet = hl.hypernetize(ConvNet(), predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
    keys = list(hnet.state_dict())
    assert "hypernet.theta0.net.0.weight" in keys
    assert "primary.net.0.weight" not in keys  # the predicted weight lives in theta0 only
    assert "primary.fc.weight" in keys  # untouched parameters stay trainable in the primary
    names = [n for n, _ in hnet.named_parameters()]
    assert "primary.fc.weight" in names and not any(n.startswith("primary.net.") for n in names)


# --------------------------------------------------------------------------------------- #
# the public conveniences
# --------------------------------------------------------------------------------------- #
def test_theta0_from_pretrained_weights_and_freezable():
    net = ConvNet()
    hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
    assert torch.equal(hnet.theta0["net.0.weight"], net.net[0].weight)
    hnet.theta0.freeze()
    hnet(torch.randn(2, 1, 28, 28), lam=0.5).sum().backward()
    assert hnet.theta0["net.0.weight"].grad is None
    assert hnet.hypernet.head.linear.weight.grad is not None


def test_theta0_init_option_reinitialises():
    net = ConvNet()
    hnet = hl.hypernetize(net, predict="fc.*", inputs={"lam": (0.0, 1.0)}, theta0="init")
    assert not torch.equal(hnet.theta0["fc.weight"], net.fc.weight)
    assert torch.count_nonzero(hnet.theta0["fc.bias"]) == 0


def test_generate_delta_materialize():
    net = ConvNet()
    hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
    theta = hnet.generate(lam=0.3)
    assert list(theta) == list(hnet.predicted)
    assert theta["net.0.weight"].shape == net.net[0].weight.shape
    delta = hnet.delta(lam=0.3)
    torch.testing.assert_close(theta["net.0.weight"], hnet.theta0["net.0.weight"] + delta["net.0.weight"])
    assert hnet.generate(lam=torch.rand(5))["net.0.weight"].shape == (5, 16, 1, 5, 5)
    plain = hnet.materialize(lam=0.3)
    assert type(plain) is ConvNet
    assert isinstance(plain.net[0].weight, nn.Parameter)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(plain(x), hnet(x, lam=0.3))
    assert sorted(plain.state_dict()) == sorted(net.state_dict())
    with pytest.raises(HyperloomError, match=re.escape("materialize() needs one value per input")):
        hnet.materialize(lam=torch.rand(2))


def test_materialize_rnn_refreshes_flat_weights():
    gru = nn.GRU(3, 4, batch_first=True)
    hnet = hl.hypernetize(gru, inputs={"lam": (0.0, 1.0)}, out_dims=(0, 1))
    plain = hnet.materialize(lam=0.6)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(plain(x)[0], hnet(x, lam=0.6)[0])


def test_model_kwargs_pass_through():
    class WithFlag(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    hnet = hl.hypernetize(WithFlag(), inputs={"lam": (0.0, 1.0)})
    x = torch.randn(2, 3)
    torch.testing.assert_close(hnet(x, lam=0.5, scale=2.0), 2 * hnet(x, lam=0.5))


def test_multiple_and_vector_inputs():
    net = nn.Linear(3, 2)
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0), "z": hl.Input(0, 1, dim=4), "lr": (1e-4, 1e-1, "log")})
    x = torch.randn(5, 3)
    assert hnet(x, lam=0.5, z=torch.rand(4), lr=1e-3).shape == (5, 2)
    assert hnet(x, lam=torch.rand(5), z=torch.rand(5, 4), lr=1e-2).shape == (5, 2)


def test_float64_and_bfloat16_models():
    for dtype in (torch.float64, torch.bfloat16):
        net = nn.Linear(3, 2).to(dtype)
        hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})
        assert hnet.hypernet.dtype == dtype
        assert hnet(torch.randn(4, 3, dtype=dtype), lam=torch.rand(4)).dtype == dtype


# --------------------------------------------------------------------------------------- #
# errors name the culprit; the user's module is never modified
# --------------------------------------------------------------------------------------- #
def test_user_module_is_never_modified():
    net = ConvNet()
    before = state(net)
    params_before = [id(p) for p in net.parameters()]
    hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
    opt = torch.optim.SGD(hnet.parameters(), lr=0.1)
    hnet(torch.randn(2, 1, 28, 28), lam=torch.rand(2)).sum().backward()
    opt.step()
    assert same_state(before, state(net))
    assert [id(p) for p in net.parameters()] == params_before
    assert all(isinstance(m.weight, nn.Parameter) for m in net.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"predict": [nn.LSTM]}, "hypernetize(ConvNet): predict selector LSTM matched no parameter"),
        ({"predict": [nn.Conv2d, "net.0.bias"]}, "hypernetize(ConvNet): Parameter 'net.0.bias' is selected twice"),
        ({"inputs": {"x": (0.0, 1.0)}}, "hypernetize(ConvNet): Input name(s) ['x'] clash with argument(s) of ConvNet.forward"),
        ({"activation": "swish"}, "hypernetize(ConvNet): Unknown activation 'swish'"),
        ({"theta0": "zeros"}, "hypernetize(ConvNet): theta0 must be 'model' or 'init', got 'zeros'"),
        ({"per_sample": "fast"}, "hypernetize(ConvNet): per_sample must be one of 'auto', 'vmap', 'loop', got 'fast'"),
    ],
)
def test_wrapping_errors_leave_module_untouched(kwargs, msg):
    net = ConvNet()
    before = state(net)
    args = {"inputs": {"lam": (0.0, 1.0)}} | kwargs
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        hl.hypernetize(net, **args)
    assert same_state(before, state(net))


def test_mixed_dtype_parameters_refused():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    msg = "Predicted parameters must share one dtype and device, got 0.weight: torch.float32"
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})


def test_not_a_module():
    with pytest.raises(HyperloomError, match=re.escape("hypernetize expects an nn.Module, got function")):
        hl.hypernetize(lambda x: x, inputs={"lam": (0.0, 1.0)})


def test_handwired_hypernetwork_shape_mismatch():
    net = nn.Linear(3, 2)
    h = hl.HyperNetwork({"lam": (0.0, 1.0)}, {"weight": (3, 2)})
    with pytest.raises(HyperloomError, match=re.escape("weight: generated (3, 2), expected (2, 3)")):
        hl.HyperModel(net, h)
    h2 = hl.HyperNetwork({"lam": (0.0, 1.0)}, {"kernel": (2, 3)})
    with pytest.raises(HyperloomError, match=re.escape("Hypernetwork target(s) ['kernel'] are not parameters of Linear")):
        hl.HyperModel(net, h2)
    h3 = hl.HyperNetwork({"lam": (0.0, 1.0)}, {"weight": (2, 3)}, dtype=torch.float64)
    with pytest.raises(HyperloomError, match=re.escape("weight: generated dtype torch.float64, expected torch.float32")):
        hl.HyperModel(net, h3)


@pytest.mark.parametrize(
    ("cond", "msg"),
    [
        (
            {"lam": 0.5, "mu": 0.1},
            "Unknown keyword argument(s) ['mu']: neither declared inputs ['lam'] nor arguments of ConvNet.forward ['x']",
        ),
        ({}, "Missing conditioning input(s) ['lam']"),
        (
            {"lam": torch.rand(3)},
            "The conditioning has 3 per-sample value(s) but positional argument 0 of shape (4, 1, 28, 28) has 4 samples "
            "along its batch dimension 0",
        ),
        ({"lam": 1.5}, "Conditioning input 'lam' out of its declared range [0.0, 1.0]: got values in [1.5, 1.5]"),
        ({"lam": float("inf")}, "Conditioning input 'lam' has a non-finite value inf at sample 0"),
        ({"lam": torch.tensor(0.5, device="meta")}, "Conditioning input 'lam' is on meta but the hypernetwork is on cpu"),
    ],
)
def test_forward_errors_name_the_input(cond, msg):
    hnet = hl.hypernetize(ConvNet(), predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        hnet(torch.randn(4, 1, 28, 28), **cond)


def test_input_on_wrong_device_and_empty_batch():
    hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape("Positional input 0 is on meta but the model is on cpu")):
        hnet(torch.randn(4, 3, device="meta"), lam=0.5)
    with pytest.raises(HyperloomError, match=re.escape("Per-sample conditioning with an empty batch (0 samples)")):
        hnet(torch.randn(0, 3), lam=torch.rand(0))
    assert hnet(torch.randn(0, 3), lam=0.5).shape == (0, 2)


def test_clamp_mode_in_forward():
    hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"lam": hl.Input(0.0, 1.0, out_of_range="clamp")})
    x = torch.randn(2, 3)
    torch.testing.assert_close(hnet(x, lam=3.0), hnet(x, lam=1.0))


class WithScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))  # a 0-d parameter

    def forward(self, x):
        return self.fc(x) * self.scale


def test_zero_dim_parameter_is_predicted():
    hnet = hl.hypernetize(WithScalar(), inputs={"lam": (0.0, 1.0)}, zero_init=True)
    x = torch.randn(4, 3)
    torch.testing.assert_close(hnet(x, lam=0.5), WithScalar.forward(hnet.materialize(lam=0.5), x))
    assert hnet.generate(lam=0.2)["scale"].shape == () and hnet.generate(lam=torch.rand(4))["scale"].shape == (4,)
    assert hnet(x, lam=torch.rand(4)).shape == (4, 2)
    assert hnet.materialize(lam=0.3).scale.shape == ()


def test_theta0_init_keeps_normalisation_gains():
    # theta0="init" used to zero LayerNorm/BatchNorm gains: with zero_init=True the output was exactly 0
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, theta0="init", zero_init=True).eval()
    assert torch.equal(hnet.theta0["1.weight"], torch.ones(4)) and torch.equal(hnet.theta0["3.weight"], torch.ones(2))
    assert torch.count_nonzero(hnet.theta0["0.bias"]) == 0 and torch.count_nonzero(hnet.theta0["1.bias"]) == 0
    assert not torch.equal(hnet.theta0["0.weight"], net[0].weight)  # weights are re-initialised
    assert torch.count_nonzero(hnet(torch.randn(5, 3), lam=0.5)) > 0


def test_predicted_parameters_are_held_once():
    # the copy used to keep a stale buffer per predicted parameter (a 1000x1000 Linear cost 1,001,000 extra values)
    net = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 3))
    hnet = hl.hypernetize(net, predict=["0"], inputs={"lam": (0.0, 1.0)}, hidden=(4,))
    held = {id(t): t.numel() for t in [*hnet.parameters(), *hnet.buffers()]}
    head = hnet.hypernet.head.linear.weight.numel()
    trunk = sum(p.numel() for p in hnet.hypernet.trunk.parameters())
    untouched = sum(p.numel() for p in net[2].parameters())
    assert sum(held.values()) == 1_001_000 + head + trunk + untouched + sum(b.numel() for b in hnet.hypernet.buffers())
    # what stays in the copy is an unregistered alias of theta0 (for print / apply idioms), not a second tensor
    assert "weight" not in dict(hnet.primary[0].named_parameters()) and "0.weight" not in hnet.primary.state_dict()
    assert hnet.primary[0].weight.data_ptr() == hnet.theta0["0.weight"].data_ptr()
    x = torch.randn(2, 1000)
    torch.testing.assert_close(hnet(x, lam=0.5), hnet.materialize(lam=0.5)(x))
    assert "weight" in dict(hnet.materialize(lam=0.5)[0].named_parameters())


def test_submodules_named_like_container_methods_can_be_predicted():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.keys = nn.Linear(4, 4)
            self.values = nn.Linear(4, 4)
            self.freeze = nn.Linear(4, 4)

        def forward(self, x):
            return self.keys(x) + self.values(x) + self.freeze(x)

    hnet = hl.hypernetize(Attn(), inputs={"lam": (0.0, 1.0)})
    assert set(hnet.theta0.keys()) == {f"{m}.{p}" for m in ("keys", "values", "freeze") for p in ("weight", "bias")}
    x = torch.randn(3, 4)
    torch.testing.assert_close(hnet(x, lam=0.4), hnet.materialize(lam=0.4)(x))
    hnet.theta0.freeze("keys.weight")
    assert not hnet.theta0["keys.weight"].requires_grad


def test_input_named_self_is_refused():
    with pytest.raises(HyperloomError, match=re.escape("Input name(s) ['self'] are reserved")):
        hl.hypernetize(nn.Linear(2, 2), inputs={"self": (0.0, 1.0)})


def test_rnn_still_runs_after_its_weights_are_removed():
    gru = nn.GRU(3, 4, batch_first=True)
    hnet = hl.hypernetize(gru, inputs={"lam": (0.0, 1.0)}, out_dims=(0, 1))
    x = torch.randn(2, 5, 3)
    out, h = hnet(x, lam=0.5)
    ref_out, ref_h = hnet.materialize(lam=0.5)(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    out2, h2 = hnet(x, lam=torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out2, ref_out)
    torch.testing.assert_close(h2, ref_h)


# --------------------------------------------------------------------------------------- #
# printing, apply / modules() idioms, messages that point to the right fix
# --------------------------------------------------------------------------------------- #
def _quickstart():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return hl.hypernetize(net, predict=[nn.Conv2d, nn.Linear], inputs={"lam": (0.0, 1.0)})


def test_a_model_with_a_predicted_bias_prints_what_is_predicted():
    # print(hnet) used to raise AttributeError: 'Conv2d' object has no attribute 'bias'
    text = repr(_quickstart())
    assert "Conv2d(1, 4, kernel_size=(3, 3), stride=(1, 1))" in text
    assert "predicted=4 tensors = theta0 + Delta(lam), encoding=cossin: 0.weight (4, 1, 3, 3), 0.bias (4,)" in text
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plain = hl.hypernetize(net, predict=["2.bias"], inputs={"lam": (0.0, 1.0), "mu": (0.0, 1.0)}, formulation="default")
    assert "predicted=1 tensors = Delta(lam, mu) (no theta0), encoding=raw: 2.bias (2,)" in repr(plain)
    assert "Linear(in_features=4, out_features=2, bias=True)" in repr(plain)


def test_apply_and_modules_idioms_reach_theta0():
    # primary.apply(zeros_(m.bias)) used to raise AttributeError; now it initialises the base value theta0
    hnet = _quickstart()
    hnet.primary.apply(lambda m: nn.init.zeros_(m.bias) if isinstance(m, nn.Linear) else None)
    assert torch.equal(hnet.theta0["3.bias"], torch.zeros(10))
    hnet.apply(lambda m: nn.init.ones_(m.bias) if isinstance(m, nn.Conv2d) and m.bias is not None else None)
    assert torch.equal(hnet.theta0["0.bias"], torch.ones(4))
    convs = [m for m in hnet.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and tuple(convs[0].weight.shape) == (4, 1, 3, 3)
    # still held once, after moving, casting, copying and pickling
    for h in (hnet.double(), copy.deepcopy(hnet)):
        assert h.primary[3].bias.data_ptr() == h.theta0["3.bias"].data_ptr() and h.primary[3].bias.dtype == torch.float64
    buf = io.BytesIO()
    torch.save(hnet, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.primary[3].bias.data_ptr() == loaded.theta0["3.bias"].data_ptr()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(loaded(x, lam=0.3), hnet(x, lam=0.3))
    assert "3.bias" not in dict(hnet.primary.named_parameters()) and "primary.3.bias" not in hnet.state_dict()


def test_positional_conditioning_says_where_it_went():
    hnet = _quickstart()
    msg = (
        "Missing conditioning input(s) ['lam']: conditioning is passed by keyword, e.g. hnet(x, lam=...); positional "
        "argument(s) 1 (0.3) went to the model Sequential, not to the hypernetwork"
    )
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        hnet(torch.randn(2, 1, 8, 8), 0.3)


@pytest.mark.parametrize(("lam", "batch"), [(torch.tensor([0.3]), 16), (torch.rand(5), 8)])
def test_a_conditioning_batch_mismatch_points_to_the_conditioning(lam, batch):
    # used to suggest only in_dims={0: None}, which is the wrong fix for a batch of images
    hnet = _quickstart()
    with pytest.raises(HyperloomError) as e:
        hnet(torch.randn(batch, 1, 8, 8), lam=lam)
    assert "pass each conditioning input as a number or a 0-d tensor (e.g. lam=0.3 or torch.tensor(0.3), not shape (1,))" in str(e.value)
    assert f"for one weight set per sample, pass {batch} values per input" in str(e.value)


# --------------------------------------------------------------------------------------- #
# parametrized modules (torch.nn.utils.parametrize)
# --------------------------------------------------------------------------------------- #
def test_predict_by_type_on_weight_norm_linears_predicts_the_weight():
    # predict=[nn.Linear] used to predict only the bias and silently skip the parametrized weight
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    hnet = hl.hypernetize(net, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, zero_init=True)
    assert hnet.predicted == (
        "0.bias",
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
        "2.weight",
        "2.bias",
    )
    x = torch.randn(5, 3)
    torch.testing.assert_close(hnet(x, lam=0.5), net(x))  # Delta = 0: the original network
    for p in hnet.hypernet.head.parameters():
        nn.init.normal_(p, std=0.1)
    a, b = hnet(x, lam=0.0), hnet(x, lam=1.0)
    assert not torch.allclose(a, b)
    # the weight really comes from the generated originals: g * v / |v|
    theta = hnet.generate(lam=1.0)
    g, v = theta["0.parametrizations.weight.original0"], theta["0.parametrizations.weight.original1"]
    w = g * v / v.norm(dim=1, keepdim=True)
    ref = nn.functional.linear(torch.relu(nn.functional.linear(x, w, theta["0.bias"])), theta["2.weight"], theta["2.bias"])
    torch.testing.assert_close(b, ref)
    lam = torch.rand(5)
    loop = torch.cat([hnet(x[i : i + 1], lam=float(lam[i])) for i in range(5)])
    torch.testing.assert_close(hnet(x, lam=lam), loop)
    torch.testing.assert_close(hnet.materialize(lam=1.0)(x), b)
    assert "0.parametrizations.weight.original0 (4, 1)" in repr(hnet)


def test_parametrize_cached_does_not_reuse_generated_weights():
    # under parametrize.cached() the second call used to reuse the first call's generated weight
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    parametrize.register_parametrization(net[0], "weight", Double())
    hnet = hl.hypernetize(net, predict=["0.parametrizations.weight.original", "0.bias"], inputs={"lam": (0.0, 1.0)})
    x = torch.randn(4, 3)
    expected = [hnet(x, lam=v) for v in (0.0, 1.0)]
    with parametrize.cached():
        got = [hnet(x, lam=v) for v in (0.0, 1.0)]
        per_sample = hnet(x, lam=torch.tensor([0.0, 1.0, 0.0, 1.0]))
        original = net(x)  # the user's own model in the same block gets its own weight, not a generated one
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(per_sample[1], expected[1][1])
    torch.testing.assert_close(original, net(x))


def test_generate_called_like_hugging_face_text_generation_says_how():
    # generate(input_ids, max_new_tokens=...) was a raw TypeError (or "unknown conditioning input(s)")
    hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"lam": (0.0, 1.0)})
    for call in (
        lambda: hnet.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=3, lam=0.5),
        lambda: hnet.generate(input_ids=1, lam=0.5),
    ):
        with pytest.raises(
            hl.HyperloomError, match=re.escape("materialize one conditioning and generate with it: hnet.materialize(lam=...)")
        ):
            call()
    assert set(hnet.generate(lam=0.5)) == {"weight", "bias"}
    lora = hl.hypernetize(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), inputs={"lam": (0.0, 1.0)}, lora=hl.LoRA(rank=1, targets=nn.Linear)
    )
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRAModel.generate(**conditioning) returns the generated weights")):
        lora.generate(torch.zeros(1, 4), lam=0.5)
