"""Buffers in per-sample calls: one rule for every buffer a forward writes (hyperloom.buffers)."""

import copy
import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError

MODES = ["vmap", "loop"]


def _bn_net():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


class Ema(nn.Module):
    """A forward that reassigns a buffer (no BatchNorm) and counts its calls in place."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("ema", torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        y = self.fc(x)
        self.ema = 0.9 * self.ema + 0.1 * y.mean()
        self.calls += 1
        return y


class InPlaceSeen(nn.Module):
    """A forward that writes a per-sample value into a buffer in place."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x):
        y = self.fc(x)
        self.seen.mul_(0.5).add_(y.detach().mean(0))
        return y


def _reference_buffers(hnet, x, lam, names):
    """Each sample as a shared call on a fresh copy of the model: the per-sample results, stacked."""
    out = {k: [] for k in names}
    for i in range(len(lam)):
        h = copy.deepcopy(hnet)
        h(x[i : i + 1], lam=float(lam[i]))
        bufs = dict(h.primary.named_buffers())
        for k in names:
            out[k].append(bufs[k])
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("mode", MODES)
def test_reassigned_buffer_gets_the_mean_and_the_model_stays_usable(mode):
    # the reassigned buffer used to stay a tensor that escaped vmap: every later call and save_model raised
    torch.manual_seed(0)
    hnet = hl.hypernetize(Ema(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    x, lam = torch.randn(5, 3), torch.rand(5)
    ema, calls = hnet.primary.ema, hnet.primary.calls
    ref = _reference_buffers(hnet, x, lam, ["ema", "calls"])
    hnet(x, lam=lam)
    assert hnet.primary.ema is ema and hnet.primary.calls is calls  # written in place, same tensors
    assert not ema.requires_grad  # values, not graphs
    torch.testing.assert_close(hnet.primary.ema, ref["ema"].mean(0))
    assert int(hnet.primary.calls) == 1
    # usable afterwards: shared and per-sample calls, a backward, saving
    hnet(x, lam=0.5).sum().backward()
    hnet(x, lam=lam).sum().backward()
    sd = hnet.state_dict()
    assert torch.equal(sd["primary.ema"], hnet.primary.ema)


def test_reassigned_buffer_vmap_equals_loop():
    torch.manual_seed(0)
    a = hl.hypernetize(Ema(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample="vmap")
    b = copy.deepcopy(a)
    b.per_sample_mode = "loop"
    x, lam = torch.randn(6, 3), torch.rand(6)
    for _ in range(3):
        torch.testing.assert_close(a(x, lam=lam), b(x, lam=lam))
    torch.testing.assert_close(a.primary.ema, b.primary.ema)
    assert int(a.primary.calls) == int(b.primary.calls) == 3


def test_save_model_after_a_per_sample_call_with_a_reassigned_buffer(tmp_path):
    hnet = hl.hypernetize(Ema(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)})
    hnet(torch.randn(4, 3), lam=torch.rand(4))
    hl.save_model(hnet, tmp_path / "m.pt")
    fresh = hl.hypernetize(Ema(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)})
    hl.load_model(fresh, tmp_path / "m.pt")
    assert torch.equal(fresh.primary.ema, hnet.primary.ema)


@pytest.mark.parametrize("mode", MODES)
def test_in_place_per_sample_write_into_a_buffer(mode):
    torch.manual_seed(0)
    hnet = hl.hypernetize(InPlaceSeen(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    x, lam = torch.randn(4, 3), torch.rand(4)
    ref = _reference_buffers(hnet, x, lam, ["seen"])
    seen = hnet.primary.seen
    hnet(x, lam=lam)
    assert hnet.primary.seen is seen
    torch.testing.assert_close(seen, ref["seen"].mean(0))
    hnet(x, lam=lam)  # the layout that needs batched buffers is remembered; still right
    assert hnet._batched_buffers or mode == "loop"


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_batchnorm_under_inference_mode_leaves_no_inference_tensors(mode):
    # recalibrating BatchNorm statistics under inference_mode used to leave inference tensors in the model:
    # the next training call raised "Inplace update to inference tensor outside InferenceMode"
    hnet = hl.hypernetize(_bn_net(), predict=[nn.Conv2d, nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    x = torch.randn(4, 1, 6, 6)
    with torch.inference_mode():
        hnet(x, lam=torch.rand(4))
    assert not any(b.is_inference() for b in hnet.buffers())
    assert int(hnet.primary[1].num_batches_tracked) == 1
    hnet(x, lam=torch.rand(4)).sum().backward()  # plain PyTorch runs this sequence too
    hnet(x, lam=0.3).sum().backward()
    assert int(hnet.primary[1].num_batches_tracked) == 3


def test_plain_pytorch_runs_the_inference_mode_sequence():
    net = _bn_net()
    x = torch.randn(4, 1, 6, 6)
    with torch.inference_mode():
        net(x)
    net(x).sum().backward()


@pytest.mark.parametrize("use", ["sweep", "tune"])
def test_sweep_and_tune_restore_buffers_exactly_after_per_sample_calls(use):
    # the write-back used to rebind module._buffers to new tensors and the restore copied into the old ones
    torch.manual_seed(0)
    hnet = hl.hypernetize(_bn_net(), predict=[nn.Conv2d, nn.Linear], inputs={"lam": (0.0, 1.0)})
    x = torch.randn(4, 1, 6, 6)
    hnet(x, lam=torch.rand(4))  # non-trivial statistics
    before = {k: v.clone() for k, v in hnet.state_dict().items()}
    ids = {k: id(v) for k, v in hnet.primary.named_buffers()}
    if use == "sweep":
        hl.sweep(hnet, lambda m, lam: {"out": m(x, lam=torch.full((4,), lam)).mean()}, {"lam": 3}, eval_mode=False)
    else:
        hl.tune(hnet, lambda m, lam: m(x, lam=lam.expand(4)).pow(2).mean(), steps=3, eval_mode=False)
    after = hnet.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert {k: id(v) for k, v in hnet.primary.named_buffers()} == ids


def test_buffer_that_changes_shape_is_refused_by_name_and_nothing_is_written():
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("last", torch.zeros(1, 2))
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

        def forward(self, x):
            self.calls += 1
            y = self.fc(x)
            self.last = y.detach()[:, :1]  # (1, 1): another shape
            return y

    for mode in MODES:
        hnet = hl.hypernetize(Cache(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode)
        with pytest.raises(HyperloomError, match=re.escape("Buffer 'last': a per-sample forward wrote a value of shape (1, 1)")):
            hnet(torch.randn(4, 3), lam=torch.rand(4))
        assert int(hnet.primary.calls) == 0 and torch.equal(hnet.primary.last, torch.zeros(1, 2))
        assert hnet(torch.randn(4, 3), lam=0.5).shape == (4, 2)  # still usable


def test_counter_that_differs_per_sample_is_refused():
    class Count(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("hits", torch.zeros((), dtype=torch.int64))

        def forward(self, x):
            self.hits = self.hits + (x.sum() > 0).long()
            return self.fc(x)

    hnet = hl.hypernetize(Count(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    x = torch.tensor([[1.0, 1, 1], [-1, -1, -1]])
    with pytest.raises(HyperloomError, match=re.escape("Buffer 'hits' (torch.int64): the samples of a per-sample call wrote different")):
        hnet(x, lam=torch.rand(2))
    assert int(hnet.primary.hits) == 0


def test_plain_tensor_attributes_set_in_forward_are_put_back_after_vmap():
    class Remember(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = torch.ones(2)  # a plain attribute, not a buffer

        def forward(self, x):
            y = self.fc(x) * self.scale
            self.scale = torch.ones(2) + 0 * y.detach().mean(0)  # recomputed at every call
            self.last = y.detach()  # set by the call
            return y

    hnet = hl.hypernetize(Remember(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample="vmap")
    hnet.check_outputs = False  # its shared dry run would set the attributes too (a shared call does)
    scale = hnet.primary.scale
    hnet(torch.randn(4, 3), lam=torch.rand(4))
    assert hnet.primary.scale is scale and not hasattr(hnet.primary, "last")
    assert hnet(torch.randn(4, 3), lam=torch.rand(4)).shape == (4, 2)
    assert hnet(torch.randn(4, 3), lam=0.2).shape == (4, 2)


def test_buffer_registered_during_a_per_sample_forward_is_refused():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            self.register_buffer("late", y.detach().mean(0))
            return y

    hnet = hl.hypernetize(Late(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample="vmap")
    with pytest.raises(HyperloomError, match=re.escape("Buffer(s) ['late'] were registered during a per-sample forward")):
        hnet(torch.randn(4, 3), lam=torch.rand(4))
    assert "late" not in dict(hnet.primary.named_buffers())


def test_batchnorm_momentum_none_runs_per_sample():
    # the call counter stays one shared value under vmap, so BatchNorm's cumulative average works
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=None))
    a = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)}, per_sample="vmap")
    b = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    b.load_state_dict(a.state_dict())
    x, lam = torch.randn(4, 1, 6, 6), torch.rand(4)
    for _ in range(2):
        torch.testing.assert_close(a(x, lam=lam), b(x, lam=lam))
    torch.testing.assert_close(a.primary[1].running_mean, b.primary[1].running_mean)
    torch.testing.assert_close(a.primary[1].running_var, b.primary[1].running_var)


class DataSeen(InPlaceSeen):
    """InPlaceSeen written through ``.data``, the EMA idiom of VQ-VAE codebooks (its version counter does not move)."""

    def forward(self, x):
        y = self.fc(x)
        self.seen.data.mul_(0.5).add_(y.detach().mean(0))
        return y


def test_a_buffer_written_through_data_is_kept_in_loop_mode():
    # the write was detected by the version counter only, which .data writes leave as it was: the update was lost
    torch.manual_seed(0)
    hnet = hl.hypernetize(DataSeen(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    x, lam = torch.randn(4, 3), torch.rand(4)
    ref = _reference_buffers(hnet, x, lam, ["seen"])
    hnet(x, lam=lam)
    assert bool(ref["seen"].abs().sum() > 0)
    torch.testing.assert_close(hnet.primary.seen, ref["seen"].mean(0))
