"""Shared heads (chunked, structured): init scale, per-sample = loop, every path the dense head works in, LoRA, checkpoints."""

import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom.continual import OutputRegularizer
from hyperloom.shared_heads import ChunkedHead, StructuredHead, head_spec


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.LeakyReLU(), nn.Conv2d(8, 8, 3), nn.LeakyReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    )


HEADS = [
    hl.Chunked(chunk_size=96, width=16),
    hl.Structured(block=8, width=16),
    hl.Chunked(chunk_size=96, width=16, combine="concat"),
    hl.Structured(block=8, width=16, combine="concat"),
]
FORMS = {"default": {"formulation": "default"}, "mip": {}, "mip-no-theta0": {"additive": False}}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{type(h).__name__}-{h.combine}")
def test_each_tensors_delta_has_the_dense_heads_scale(head, form):
    """At init each target's Delta std (over conditioning and seeds) is within 2x of the dense head's split init."""
    net = _net()
    cond = {"lam": torch.linspace(0.05, 0.95, 16)}
    stds = {"dense": {}, "shared": {}}
    for seed in range(4):
        for kind, h in (("dense", "dense"), ("shared", head)):
            torch.manual_seed(seed)
            hm = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, hidden=(16, 32), head=h, **FORMS[form])
            with torch.no_grad():
                for k, v in hm.delta(**cond).items():
                    stds[kind][k] = stds[kind].get(k, 0.0) + float(v.std()) / 4
    for k, d in stds["dense"].items():
        s = stds["shared"][k]
        if k.endswith("bias"):
            assert d == 0.0 and s == 0.0, k  # biases start at theta0 in both heads
        else:
            assert 0.5 < s / d < 2.0, f"{k}: shared {s:.4g}, dense {d:.4g}"


@pytest.mark.parametrize("head", HEADS[:2], ids=["chunked", "structured"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_per_sample_equals_a_loop_of_shared_calls(head, mode):
    torch.manual_seed(0)
    hm = hl.hypernetize(_net(), inputs={"lam": (0.0, 1.0)}, hidden=(16,), head=head, per_sample=mode)
    x, lam = torch.randn(5, 1, 10, 10), torch.rand(5)
    out = hm(x, lam=lam)
    ref = torch.cat([hm(x[i : i + 1], lam=float(lam[i])) for i in range(5)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert hm.hypernet.head.gains.grad is not None and hm.hypernet.head.gains.grad.abs().sum() > 0


def test_chunk_size_that_does_not_divide_pads_and_shapes_are_right():
    head = ChunkedHead(4, {"w": (7, 3), "b": (7,)}, hl.Chunked(chunk_size=8, width=4))
    assert head.num_chunks == 4 and head.num_outputs == 28  # 32 generated, the last 4 dropped
    out = head(torch.randn(3, 4))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"w": (3, 7, 3), "b": (3, 7)}
    one = head(torch.randn(4))  # no leading dimension (the shared path)
    assert tuple(one["w"].shape) == (7, 3)


def test_structured_blocks_assemble_large_kernels_and_share_one_generator():
    shapes = {"a.weight": (16, 8, 3, 3), "b.weight": (8, 8, 3, 3), "c.weight": (8, 16)}
    head = StructuredHead(6, shapes, hl.Structured(block=8, width=4))
    assert [key for key, _ in head.groups] == [(8, 8)]  # every tensor cut into 8 x 8 blocks
    assert head.generators[0].embedding.shape[0] == 2 * 9 + 9 + 2
    h = torch.randn(2, 6)
    out = head(h)
    # block (i, j) of a.weight seen as (16, 72) is the generator's output for its embedding
    gen = head.generators[0]
    blocks = gen(h) * head.gains[0]
    mat = out["a.weight"].reshape(2, 16, 72)
    torch.testing.assert_close(mat[:, 8:16, 16:24], blocks[:, 1 * 9 + 2].reshape(2, 8, 8))


def test_structured_pads_a_side_the_block_does_not_divide_and_crops_it():
    head = StructuredHead(6, {"a.weight": (8, 20), "b.weight": (4, 8)}, hl.Structured(block=8, width=4))
    assert sorted(k for k, _ in head.groups) == [(4, 8), (8, 8)]  # a: 1 x 3 blocks of 8 x 8, b: one 4 x 8 block
    h = torch.randn(3, 6)
    out = head(h)
    assert tuple(out["a.weight"].shape) == (3, 8, 20)
    gen = head.generators[[key for key, _ in head.groups].index((8, 8))]
    last = (gen(h) * head.gains[0])[:, 2].reshape(3, 8, 8)
    torch.testing.assert_close(out["a.weight"][:, :, 16:], last[:, :, :4])


def test_bad_options_are_clear_errors():
    with pytest.raises(hl.HyperloomError, match=re.escape("Chunked head: dim must be an integer >= 1, got 0")):
        hl.Chunked(dim=0)
    with pytest.raises(
        hl.HyperloomError, match=re.escape("Structured head: unknown combine 'film'; valid options are ['product', 'concat']")
    ):
        hl.Structured(combine="film")
    with pytest.raises(hl.HyperloomError, match=re.escape("Unknown head 'chunky'; valid options are")):
        head_spec("chunky")
    with pytest.raises(
        hl.HyperloomError, match=re.escape("no two predicted tensors (or blocks) share a shape (weight: (3, 4), bias: (3,))")
    ):
        hl.hypernetize(nn.Linear(4, 3), inputs={"lam": (0, 1)}, head="structured")
    with pytest.raises(hl.HyperloomError, match=re.escape("rank=2 applies to head='lowrank' only")):
        hl.hypernetize(nn.Linear(4, 3), inputs={"lam": (0, 1)}, head="chunked", rank=2)


def test_zero_init_starts_at_the_model_and_learns():
    net = _net()
    hm = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, hidden=(16,), head="structured", zero_init=True)
    x = torch.randn(3, 1, 10, 10)
    torch.testing.assert_close(hm(x, lam=0.4), net(x))
    hm(x, lam=torch.rand(3)).pow(2).sum().backward()
    assert hm.hypernet.head.gains.grad.abs().sum() > 0


def test_save_load_round_trip_and_head_checked_on_load(tmp_path):
    torch.manual_seed(0)
    kw = {"inputs": {"lam": (0.0, 1.0)}, "hidden": (16,)}
    hm = hl.hypernetize(_net(), head=hl.Chunked(chunk_size=64, width=8), **kw)
    with torch.no_grad():
        hm.hypernet.head.gains.mul_(3.0)
    hl.save_model(hm, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    back = hl.hypernetize(_net(), head=hl.Chunked(chunk_size=64, width=8), **kw)
    hl.load_model(back, tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 10, 10)
    torch.testing.assert_close(back(x, lam=0.3), hm(x, lam=0.3), rtol=0, atol=0)
    other = hl.hypernetize(_net(), head=hl.Chunked(chunk_size=32, width=8), **kw)
    with pytest.raises(hl.CheckpointError, match=re.escape("head: saved {'kind': 'chunked', 'chunk_size': 64")):
        hl.load_model(other, tmp_path / "m.safetensors")


def test_tasks_materialize_generate_sweep_and_the_continual_regulariser():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    hm = hl.hypernetize(net, inputs={"task": hl.Task(1, dim=4, max_tasks=3), "lam": (0.0, 1.0)}, hidden=(8,), head="structured")
    x = torch.randn(4, 6)
    plain = hm.materialize(task=0, lam=0.5)
    torch.testing.assert_close(plain(x), hm(x, task=0, lam=0.5))
    theta = hm.generate(task=0, lam=0.5)
    assert theta["2.weight"].shape == (6, 6)
    sw = hl.sweep(hm, lambda m, **c: {"out": m(x, **c).sum()}, {"lam": 3, "task": [0]})
    assert len(sw) == 3
    reg = OutputRegularizer(hm, beta=1.0, conditioning={"lam": 0.5})
    reg.snapshot()
    hm.add_task()
    opt = torch.optim.SGD(hm.parameters(), lr=0.1)
    loss = hm(x, task=1, lam=0.5).pow(2).mean() + reg.penalty()
    loss.backward()
    opt.step()
    assert reg.penalty().item() > 0  # the shared generator moved task 0's weights: the regulariser sees it


def test_lora_structured_head_starts_at_the_model_per_sample_equals_loop_and_round_trips(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Sequential(nn.Linear(12, 12), nn.ReLU()) for _ in range(4)], nn.Linear(12, 3))
    lora = hl.LoRA(rank=2, alpha=4, targets=["*.0"])
    hm = hl.hypernetize(base, inputs={"lam": (0.0, 1.0)}, hidden=(8,), lora=lora, head="structured")
    head = hm.hypernet.head
    assert isinstance(head, StructuredHead) and sorted(k for k, _ in head.groups) == [(2, 12), (12, 2)]
    x = torch.randn(5, 12)
    torch.testing.assert_close(hm(x, lam=0.3), base(x), rtol=0, atol=0)  # B = 0 exactly at the start
    opt = torch.optim.Adam(hm.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        hm(x, lam=torch.rand(5)).pow(2).mean().backward()
        opt.step()
    lam = torch.rand(5)
    ref = torch.cat([hm(x[i : i + 1], lam=float(lam[i])) for i in range(5)])
    torch.testing.assert_close(hm(x, lam=lam), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref, base(x))
    hm.save_pretrained(tmp_path / "a")
    back = hl.LoRAModel.from_pretrained(tmp_path / "a", base)
    assert back.hypernet.head_options == hl.Structured()
    torch.testing.assert_close(back(x, lam=lam), hm(x, lam=lam), rtol=0, atol=0)
