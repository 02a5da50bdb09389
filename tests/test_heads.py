import math
import re

import pytest
import torch

from hyperloom import DenseHead, HyperloomError, LowRankHead


def test_dense_head_shapes_and_split_init():
    torch.manual_seed(0)
    head = DenseHead(64, {"big": (200, 100), "small": (10,)}, gain=1.0)
    out = head(torch.rand(3, 64))
    assert out["big"].shape == (3, 200, 100) and out["small"].shape == (3, 10)
    w = head.linear.weight
    # each block has its own fan_out scaling: the small tensor is not shrunk by the big one
    assert math.isclose(float(w[:20000].detach().std()), 1 / math.sqrt(20000), rel_tol=0.05)
    assert math.isclose(float(w[20000:].detach().std()), 1 / math.sqrt(10), rel_tol=0.3)
    assert torch.count_nonzero(head.linear.bias) == 0


def test_dense_head_blocks_are_the_right_rows():
    head = DenseHead(2, {"a": (2, 2), "b": (3,)})
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.arange(7.0))
    out = head(torch.zeros(1, 2))
    assert torch.equal(out["a"][0], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(out["b"][0], torch.tensor([4.0, 5.0, 6.0]))


def test_zero_init_gives_zero_output():
    head = DenseHead(8, {"w": (4, 3)}, zero_init=True)
    assert torch.count_nonzero(head(torch.rand(2, 8))["w"]) == 0


def test_lowrank_matches_explicit_product_and_counts_outputs():
    head = LowRankHead(8, {"w": (30, 4, 5), "b": (30,), "tiny": (2, 2)}, rank=3)
    assert head.num_outputs == 3 * (30 + 20) + 30 + 4  # 'tiny' stays dense (rank >= min(m, n))
    h = torch.rand(2, 8)
    out = head(h)
    flat = head.linear(h)
    bm = flat[:, : 30 * 3].reshape(2, 30, 3)
    am = flat[:, 90:150].reshape(2, 3, 20)
    assert torch.allclose(out["w"], (bm @ am).reshape(2, 30, 4, 5))
    assert out["b"].shape == (2, 30) and out["tiny"].shape == (2, 2, 2)


def test_lowrank_zero_init_zeroes_b_only():
    head = LowRankHead(8, {"w": (30, 20)}, rank=2, zero_init=True)
    assert torch.count_nonzero(head(torch.rand(2, 8))["w"]) == 0
    assert torch.count_nonzero(head.linear.weight[60:]) > 0  # the A block still learns


def test_lowrank_bad_rank():
    with pytest.raises(HyperloomError, match=re.escape("Low-rank head needs an integer rank >= 1, got 0")):
        LowRankHead(8, {"w": (3, 3)}, rank=0)


def test_split_init_starts_biases_at_zero():
    head = DenseHead(16, {"fc.weight": (4, 3), "fc.bias": (4,), "attn.in_proj_bias": (6,)})
    out = head(torch.rand(5, 16))
    assert torch.count_nonzero(out["fc.bias"]) == 0 and torch.count_nonzero(out["attn.in_proj_bias"]) == 0
    assert torch.count_nonzero(out["fc.weight"]) > 0
    # the bias rows still learn
    out["fc.bias"].sum().backward()
    assert torch.count_nonzero(head.linear.weight.grad[12:16]) > 0


def test_memory_is_checked_before_allocating(monkeypatch):
    import hyperloom.heads as heads

    monkeypatch.setattr(heads, "available_memory", lambda device: 2**20)  # pretend 1 MiB is free
    msg = "The hypernetwork's output layer would need 4.9 MiB (129 x 10,000 values) but only 1.0 MiB is available on cpu"
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        DenseHead(128, {"w": (100, 100)})
    assert LowRankHead(128, {"w": (100, 100)}, rank=2).num_outputs == 400  # the way out fits


def test_available_memory_is_reported_on_cpu():
    from hyperloom.heads import available_memory

    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0


@pytest.mark.parametrize("head_cls,kw", [(DenseHead, {}), (LowRankHead, {"rank": 2})])
def test_zero_size_and_zero_dim_targets(head_cls, kw):
    # a zero-size tensor used to divide by zero in the split init; a 0-d tensor failed in view()
    head = head_cls(8, {"empty": (0, 3), "none": (0,), "scalar": (), "w": (5, 4)}, **kw)
    out = head(torch.rand(3, 8))
    assert out["empty"].shape == (3, 0, 3) and out["none"].shape == (3, 0) and out["scalar"].shape == (3,)
    shared = head(torch.rand(8))
    assert shared["scalar"].shape == () and shared["w"].shape == (5, 4)


@pytest.mark.parametrize("head_cls,kw", [(DenseHead, {}), (LowRankHead, {"rank": 2})])
def test_head_without_bias(head_cls, kw):
    head = head_cls(8, {"w": (5, 4), "b": (5,)}, bias=False, zero_init=True, **kw)
    assert head.linear.bias is None
    assert torch.count_nonzero(head(torch.rand(2, 8))["b"]) == 0


def test_available_memory_counts_reclaimable_page_cache():
    # free pages alone (SC_AVPHYS_PAGES) exclude the page cache and refused models that fit
    from hyperloom.heads import available_memory

    with open("/proc/meminfo") as f:
        meminfo = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()[1].isdigit()}
    have = available_memory(torch.device("cpu"))
    assert abs(have - meminfo["MemAvailable"]) < 256 * 2**20
    assert have >= meminfo["MemFree"] - 256 * 2**20
