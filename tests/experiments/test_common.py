"""The experiments' shared plumbing: variants (plain, 2x2, baselines), theta0 init, hyperfan-in, traces."""

import math

import pytest
import torch
from torch import nn

import hyperloom as hl
from experiments.classify import ConvNet
from experiments.common import (
    FORMULATIONS,
    MAIN_VARIANTS,
    VARIANTS,
    Plain,
    build_variant,
    formulation,
    hyperfan_in_,
    trace_probe,
    train_loop,
)

CFG = {"hidden": [16, 64, 128], "activation": "leaky_relu", "theta0": "init"}


def test_main_variants_are_the_2x2_and_the_plain_network():
    assert MAIN_VARIANTS == ("plain", "default", "encoding-only", "additive-only", "mip")
    assert all(v in VARIANTS for v in MAIN_VARIANTS)
    with pytest.raises(ValueError, match="plain"):
        formulation("plain", CFG)


def test_theta0_uses_the_methods_init_not_pytorchs():
    """Design fix 3: Kaiming fan-in (normal) weights and zero biases; 'mip-theta0-model' keeps PyTorch's."""
    torch.manual_seed(0)
    primary = ConvNet()
    before = {k: v.clone() for k, v in primary.state_dict().items()}
    mip = build_variant("mip", CFG, primary, {"z": hl.Input(0.0, 1.0, dim=2)})
    t0 = mip.theta0
    assert t0 is not None
    for name, t in t0.items():
        t = t.detach()
        if name.endswith("bias"):
            assert torch.count_nonzero(t) == 0, name
        else:
            fan_in = t[0].numel()
            assert abs(float(t.std()) / math.sqrt(2.0 / fan_in) - 1) < 0.2, name  # He normal, not a=sqrt(5) uniform
            assert not torch.equal(t, before[name])
    torch.manual_seed(0)
    primary = ConvNet()
    model_init = build_variant("mip-theta0-model", CFG, primary, {"z": hl.Input(0.0, 1.0, dim=2)})
    assert all(torch.equal(t, before[k]) for k, t in model_init.theta0.items())
    assert torch.count_nonzero(model_init.theta0["fc.bias"]) > 0


def test_plain_ignores_conditioning_and_starts_from_the_methods_init():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    flow = net[2].weight.detach().clone()
    plain = Plain(net, ("lam",), predict=["0"])
    assert torch.count_nonzero(net[0].bias) == 0 and torch.equal(net[2].weight, flow)  # only the selected layer
    x = torch.randn(3, 5)
    assert torch.equal(plain(x, lam=0.1), plain(x, lam=0.9)) and torch.equal(plain(x), net(x))


def test_hyperfan_in_puts_the_generated_weights_at_kaiming_scale():
    torch.manual_seed(0)
    model = build_variant("default", CFG, ConvNet(), {"z": hl.Input(0.0, 1.0, dim=2)})
    draws = hl.sample(model, 2000, generator=torch.Generator().manual_seed(7))  # other draws than the calibration's

    @torch.no_grad()
    def ratios() -> dict[str, float]:
        delta = model.delta(**draws)
        return {k: float(d.pow(2).mean()) / (2.0 / d[0, 0].numel()) for k, d in delta.items() if d.dim() >= 3}

    before = ratios()
    assert max(abs(math.log(r)) for r in before.values()) > math.log(2)  # the plain default is off by > 2x somewhere
    factors = hyperfan_in_(model)
    after = ratios()
    assert set(factors) == set(after)
    assert all(abs(r - 1) < 0.1 for r in after.values()), after
    with torch.no_grad():
        assert all(torch.count_nonzero(d) == 0 for k, d in model.delta(**draws).items() if k.endswith("bias"))
    # built through the variant table as well
    torch.manual_seed(0)
    hf = build_variant("default-hyperfan", CFG, ConvNet(), {"z": hl.Input(0.0, 1.0, dim=2)})
    assert torch.allclose(hf.hypernet.head.linear.weight, model.hypernet.head.linear.weight)


def test_hyperfan_in_refuses_a_head_with_a_bias_it_cannot_scale():
    model = build_variant("default", CFG, nn.Linear(3, 2), {"lam": (0.0, 1.0)})
    with torch.no_grad():
        model.hypernet.head.linear.bias.fill_(0.5)
    with pytest.raises(ValueError, match="zero bias"):
        hyperfan_in_(model)


def test_trace_probe_measures_use_of_the_conditioning():
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    for variant in FORMULATIONS:
        m = build_variant(variant, CFG, nn.Linear(3, 2), {"lam": (0.0, 1.0)})
        rec = trace_probe(m, lambda v, m=m: m(x, lam=v), lambda v, m=m: m(x, lam=v).pow(2).mean(), lambda v: {"lam": v}, [0.1, 0.5, 0.9])
        assert rec["output_variation"] > 0
        assert (rec["delta_ratio"] is None) == (not FORMULATIONS[variant]["additive"])
        assert len(rec["grad_norm_by_gamma"]) == 3 and all(g > 0 for g in rec["grad_norm_by_gamma"])
    plain = Plain(nn.Linear(3, 2), ("lam",))
    rec = trace_probe(plain, lambda v: plain(x, lam=v), lambda v: plain(x).pow(2).mean(), lambda v: {"lam": v}, [0.1, 0.9])
    assert rec["output_variation"] == 0 and rec["delta_ratio"] is None
    # delta_ratio is ||Delta|| / ||theta0||: doubling theta0 halves it
    model = build_variant("mip", CFG, nn.Linear(3, 2), {"lam": (0.0, 1.0)})
    r1 = trace_probe(model, lambda v: model(x, lam=v), lambda v: model(x, lam=v).sum(), lambda v: {"lam": v}, [0.3])["delta_ratio"]
    with torch.no_grad():
        for t in model.theta0.values():
            t.mul_(2)
    r2 = trace_probe(model, lambda v: model(x, lam=v), lambda v: model(x, lam=v).sum(), lambda v: {"lam": v}, [0.3])["delta_ratio"]
    assert r2 == pytest.approx(r1 / 2, rel=1e-6)


def _toy_run(tmp_path, crash_at=None):
    torch.manual_seed(0)
    model = build_variant("mip", CFG, nn.Linear(3, 1), {"lam": (0.0, 1.0)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3)

    def step_loss(step):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt
        lam = float(torch.rand((), generator=gen))
        return (model(x, lam=lam) - x.sum(1, keepdim=True) * lam).pow(2).mean()

    def probe():
        return trace_probe(model, lambda v: model(x, lam=v), lambda v: model(x, lam=v).pow(2).mean(), lambda v: {"lam": v}, [0.2, 0.8])

    return train_loop(step_loss, model, opt, 30, gen=gen, checkpoint=tmp_path / "c.safetensors", every=5, probe=probe, probe_every=10)


def test_train_loop_records_the_trace_and_resumes_it_exactly(tmp_path):
    full = _toy_run(tmp_path / "a")
    assert [t["step"] for t in full["trace"]] == [0, 10, 20, 30]
    assert full["trace"][-1]["output_variation"] != full["trace"][0]["output_variation"]
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "b", crash_at=17)
    resumed = _toy_run(tmp_path / "b")
    assert resumed["trace"] == full["trace"] and resumed["curve"] == full["curve"]


def test_sgd_momentum_variants_for_the_ablation():
    from experiments.common import make_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert [make_optimizer(n, p, 0.1).param_groups[0]["momentum"] for n in ("sgd", "sgd0", "sgd99")] == [0.9, 0.0, 0.99]
    with pytest.raises(ValueError, match="sgd99"):
        make_optimizer("sgd5", p, 0.1)


def test_flat_weights_probe_runs_with_batchnorm_in_the_hypernetwork_and_changes_nothing():
    """The relative-step probe crashed the ablation's norm=batchnorm runs (BatchNorm refuses one conditioning
    value while training); it now runs in eval mode, leaves the training mode and the running statistics alone."""
    import hyperloom as hl
    from experiments.common import flat_weights

    torch.manual_seed(0)
    model = hl.hypernetize(torch.nn.Linear(3, 2), inputs={"z": (0.0, 1.0)}, norm="batchnorm", hidden=(8,))
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert stats
    w = flat_weights(model, {"z": torch.tensor(0.5)})
    assert w.shape == (3 * 2 + 2,) and torch.isfinite(w).all()
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
