import copy
import re

import pytest
import torch
from torch import nn

import hyperloom as hl


def _net():
    return nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 256), nn.Dropout(0.1))


def _bound(per_sample="auto", seed=0):
    torch.manual_seed(seed)
    hnet = hl.hypernetize(_net(), predict=[nn.Linear], inputs={"d1": (0.0, 1.0), "wd": (1e-4, 1.0, "log")}, per_sample=per_sample)
    return hl.bind_dropout(hnet, {"d1": ["2", "4"]})


def test_a_shared_rate_drops_that_fraction_and_rescales():
    hnet = _bound()
    x = torch.randn(64, 8)
    for p in (0.0, 0.3, 0.8):
        hnet.eval()
        ref = hnet(x, d1=p, wd=0.01)  # eval: no dropout, the same weights
        hnet.train()
        hnet.primary[2].eval()  # only the last dropout acts
        out = hnet(x, d1=p, wd=0.01)
        # the last layer's output is dropped: kept entries are the eval output / (1 - p), the rest 0
        kept = out != 0
        assert torch.allclose(out[kept], ref[kept] / (1 - p), rtol=1e-5, atol=1e-6)
        assert abs(float((~kept).float().mean()) - p) < 0.02
    hnet.train()
    out = hnet(x, d1=1.0, wd=0.01)
    assert torch.equal(out, torch.zeros_like(out))
    hnet.zero_grad()
    hnet(x, d1=1.0, wd=0.01).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in hnet.parameters() if p.grad is not None)


def test_per_sample_rates_under_vmap_equal_a_loop_with_the_same_random_stream():
    x = torch.randn(6, 8)
    rates = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.3, 1.0])
    wd = torch.full((6,), 0.01)
    outs = {}
    for mode in ("vmap", "loop"):
        hnet = _bound(per_sample=mode)
        hnet.train()
        hnet.primary[4].eval()  # one dropout layer: the random stream of vmap (layer by layer) is then the loop's
        torch.manual_seed(7)
        outs[mode] = hnet(x, d1=rates, wd=wd)
    torch.manual_seed(7)
    shared = torch.cat([hnet(x[i : i + 1], d1=float(rates[i]), wd=0.01) for i in range(6)])  # a loop of shared calls
    assert torch.equal(outs["vmap"], outs["loop"])
    assert torch.allclose(outs["vmap"], shared, rtol=1e-5, atol=1e-6)
    assert not torch.equal(outs["vmap"][2], hnet.eval()(x[2:3], d1=0.5, wd=0.01)[0])  # dropout did act


def test_per_sample_rates_are_honoured_per_sample():
    rates = torch.tensor([0.05, 0.3, 0.6, 0.9]).repeat_interleave(50)
    net = nn.Sequential(nn.Linear(8, 512), nn.Dropout(0.5))
    h2 = hl.bind_dropout(hl.hypernetize(net, inputs={"d": (0.0, 0.95)}), {"d": "1"})
    out2 = h2(torch.rand(200, 8) + 1.0, d=rates)
    dropped = (out2 == 0).float().mean(1)
    for i, r in enumerate((0.05, 0.3, 0.6, 0.9)):
        assert abs(float(dropped[i * 50 : (i + 1) * 50].mean()) - r) < 0.02


def test_the_user_model_and_the_state_dict_are_untouched(tmp_path):
    net = _net()
    hnet = hl.hypernetize(net, predict=[nn.Linear], inputs={"d1": (0.0, 0.9)})
    keys = list(hnet.state_dict())
    hl.bind_dropout(hnet, {"d1": ["2", "4"]})
    assert type(net[2]) is nn.Dropout and net[2].p == 0.5 and isinstance(hnet.primary[2], hl.BoundDropout)
    assert list(hnet.state_dict()) == keys
    hl.save_model(hnet, tmp_path / "m.safetensors")
    fresh = hl.bind_dropout(hl.hypernetize(_net(), predict=[nn.Linear], inputs={"d1": (0.0, 0.9)}), {"d1": ["2", "4"]})
    hl.load_model(fresh, tmp_path / "m.safetensors")
    x = torch.randn(3, 8)
    hnet.eval()
    fresh.eval()
    assert torch.equal(hnet(x, d1=0.4), fresh(x, d1=0.4))
    assert copy.deepcopy(hnet).bound == hnet.bound


def test_a_bound_rate_is_tuned_by_the_self_tuner():
    hnet = hl.bind_dropout(hl.hypernetize(_net(), predict=[nn.Linear], inputs={"d1": (0.0, 0.9)}), {"d1": "2"})
    tuner = hl.SelfTuner(hnet, torch.optim.Adam(hnet.parameters(), lr=1e-3), perturb=0.1)
    x, y = torch.randn(16, 8), torch.randn(16, 256)
    tuner.train_step(lambda m, d1: ((m(x, d1=d1) - y) ** 2).mean(), n=16)  # per-sample rates in training
    u0 = tuner.u.clone()
    tuner.hyper_step(lambda m, d1: ((m(x, d1=d1) - y) ** 2).mean(), n=16)  # eval mode: the rate acts through the weights
    assert not torch.equal(tuner.u, u0)


def test_bad_bindings_are_named():
    hnet = hl.hypernetize(_net(), predict=[nn.Linear], inputs={"d1": (0.0, 0.9), "big": (0.0, 2.0), "z": hl.Input(0, 1, dim=2)})
    cases = [
        ({"nope": "2"}, "'nope' is not a declared input; declared inputs are ['d1', 'big', 'z']"),
        ({"big": "2"}, "input 'big' has range [0.0, 2.0]; a dropout probability needs a range in [0, 1]"),
        ({"z": "2"}, "input 'z' must be a scalar hl.Input"),
        ({"d1": "0"}, "module '0' is a Linear, expected nn.Dropout; the dropout modules are ['2', '4']"),
        ({"d1": "9*"}, "'9*' matches no module; the dropout modules are ['2', '4']"),
        ({"d1": 2}, "bindings['d1'] must be a module name or glob"),
        ({"d1": []}, "bindings['d1'] must be a module name or glob"),
    ]
    for bindings, msg in cases:
        with pytest.raises(hl.HyperloomError, match=re.escape(msg)):
            hl.bind_dropout(hnet, bindings)
    assert hnet.bound == {} and type(hnet.primary[2]) is nn.Dropout  # nothing changed by a refused call
    hl.bind_dropout(hnet, {"d1": "2"})
    with pytest.raises(hl.HyperloomError, match=re.escape("module '2' is already bound to input 'd1'")):
        hl.bind_dropout(hnet, {"d1": "2"})
    with pytest.raises(hl.HyperloomError, match="must be a HyperModel"):
        hl.bind_dropout(_net(), {"d1": "2"})


def test_a_bound_hugging_face_attention_dropout_whose_p_is_read_by_its_parent():
    # BERT's attention passes `self.dropout.p` to scaled_dot_product_attention: the bound module must answer it
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16
    )
    ids = torch.randint(0, 50, (3, 5))
    for mode in ("vmap", "loop"):
        torch.manual_seed(0)
        hnet = hl.hypernetize(BertModel(cfg), predict=["*.intermediate.dense"], inputs={"d": (0.0, 1.0)}, per_sample=mode)
        hl.bind_dropout(hnet, {"d": "*dropout"})
        assert abs(hnet.primary.encoder.layer[0].attention.self.dropout.p - 0.1) < 1e-7  # the replaced module's rate
        hnet.train()
        assert hnet(input_ids=ids, d=0.3).last_hidden_state.shape == (3, 5, 16)
        assert torch.equal(hnet(input_ids=ids, d=1.0).last_hidden_state, torch.zeros(3, 5, 16))  # the output dropout
        rates = torch.tensor([0.1, 0.2, 0.3])
        if mode == "loop":
            assert hnet(input_ids=ids, d=rates).last_hidden_state.shape == (3, 5, 16)
        else:  # a per-sample rate is not a number under vmap: said so, naming the input
            with pytest.raises(hl.HyperloomError, match=r"BoundDropout \(input 'd'\).*read as a number.*per_sample='loop'"):
                hnet(input_ids=ids, d=rates)
