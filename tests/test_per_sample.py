"""Per-sample execution: which arguments carry the batch, how outputs come back, and clear errors."""

import collections
import dataclasses
import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError

MODES = ["vmap", "loop"]


def loop_reference(hnet, lam, make_call):
    """Shared calls, one per sample, each with that sample's own arguments."""
    return [hnet(*a, **kw, lam=float(lam[i])) for i, (a, kw) in enumerate(make_call(i) for i in range(len(lam)))]


class Masked(nn.Module):
    """Takes a keyword mask and labels, returns a dict with a loss (like Hugging Face models)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids, mask=None, labels=None, table=None):
        h = self.emb(ids)
        if table is not None:
            h = h + table
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        logits = self.fc(h.sum(1))
        out = {"logits": logits, "n_layers": 2, "name": "masked", "nothing": None}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def masked_batch(b=4, t=5):
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (b, t))
    mask = torch.ones(b, t)
    for i in range(b):
        mask[i, t - i :] = 0  # every sample has its own padding
    return ids, mask, torch.randint(0, 3, (b,))


@pytest.mark.parametrize("mode", MODES)
def test_keyword_tensors_are_split_per_sample(mode):
    torch.manual_seed(0)
    hnet = hl.hypernetize(Masked(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode).eval()
    ids, mask, labels = masked_batch()
    table = torch.randn(5, 6)  # shared by all samples
    hnet.in_dims = {"table": None}
    lam = torch.rand(4)
    out = hnet(ids, mask=mask, labels=labels, table=table, lam=lam)
    refs = loop_reference(hnet, lam, lambda i: ((ids[i : i + 1],), {"mask": mask[i : i + 1], "labels": labels[i : i + 1], "table": table}))
    torch.testing.assert_close(out["logits"], torch.cat([r["logits"] for r in refs]))
    # a loss is 0-d in every single-sample call: it comes back as the (B,) per-sample losses
    torch.testing.assert_close(out["loss"], torch.stack([r["loss"] for r in refs]))
    assert out["n_layers"] == 2 and out["name"] == "masked" and out["nothing"] is None
    assert list(out) == list(refs[0])


@pytest.mark.parametrize("mode", MODES)
def test_positional_mask_is_split_too(mode):
    hnet = hl.hypernetize(Masked(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    ids, mask, _ = masked_batch()
    lam = torch.rand(4)
    out = hnet(ids, mask, lam=lam)["logits"]
    refs = loop_reference(hnet, lam, lambda i: ((ids[i : i + 1], mask[i : i + 1]), {}))
    torch.testing.assert_close(out, torch.cat([r["logits"] for r in refs]))


def test_mismatched_keyword_batch_names_the_argument():
    hnet = hl.hypernetize(Masked(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)})
    ids, mask, labels = masked_batch()
    with pytest.raises(
        HyperloomError,
        match=re.escape(
            "The conditioning has 4 per-sample value(s) but keyword argument 'labels' of shape (3,) has 3 samples along its batch "
            "dimension 0."
        ),
    ):
        hnet(ids, mask=mask, labels=labels[:3], lam=torch.rand(4))
    # a shared table that is not declared shared: its first dimension (5) is not the batch (4)
    with pytest.raises(HyperloomError, match=re.escape("keyword argument 'table' of shape (5, 6) has 5 samples")):
        hnet(ids, table=torch.randn(5, 6), lam=torch.rand(4))
    with pytest.raises(HyperloomError, match=re.escape("keyword argument 'labels' of shape () has no batch dimension 0")):
        hnet(ids, labels=torch.tensor(1), lam=torch.rand(4))


def test_in_dims_validation():
    net = Masked()
    for bad, msg in [
        ([0], "in_dims must be a mapping"),
        ({-1: None}, "in_dims key -1: expected a positional index"),
        ({"lam": None}, "in_dims key 'lam' is a conditioning input"),
        ({"mask": 1.5}, "in_dims['mask']: expected an int (the batch dimension) or None (shared), got 1.5"),
        ({"mask": True}, "in_dims['mask']: expected an int"),
    ]:
        with pytest.raises(HyperloomError, match=re.escape(msg)):
            hl.hypernetize(net, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, in_dims=bad)


@pytest.mark.parametrize("mode", MODES)
def test_in_dims_other_dimension(mode):
    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, extra):  # x: (T, B, 3), extra: (B, 3)
            return self.fc(x + extra)

    hnet = hl.hypernetize(TimeMajor(), inputs={"lam": (0.0, 1.0)}, per_sample=mode, in_dims={0: 1}, out_dims=1)
    x, extra, lam = torch.randn(7, 4, 3), torch.randn(4, 3), torch.rand(4)
    out = hnet(x, extra, lam=lam)
    ref = torch.cat([hnet(x[:, i : i + 1], extra[i : i + 1], lam=float(lam[i])) for i in range(4)], dim=1)
    torch.testing.assert_close(out, ref)


Pair = collections.namedtuple("Pair", ["a", "b"])


@dataclasses.dataclass
class Result:
    y: torch.Tensor
    note: str


class Structured(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.kind = kind

    def forward(self, x):
        y = self.fc(x)
        if self.kind == "namedtuple":
            return Pair(y, y.sum(-1))
        if self.kind == "nested":
            return (y, [y * 2, {"z": y.mean(-1), "k": 3}], None)
        return {"y": y, "aux": (y.relu(), "tag")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["namedtuple", "nested", "dict"])
def test_structured_outputs_keep_their_structure(mode, kind):
    hnet = hl.hypernetize(Structured(kind), inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    x, lam = torch.randn(5, 3), torch.rand(5)
    out = hnet(x, lam=lam)
    refs = [hnet(x[i : i + 1], lam=float(lam[i])) for i in range(5)]
    flat, spec = torch.utils._pytree.tree_flatten(out)
    ref_flat = [torch.utils._pytree.tree_flatten(r)[0] for r in refs]
    assert spec == torch.utils._pytree.tree_flatten(refs[0])[1]
    assert type(out) is type(refs[0])
    for j, leaf in enumerate(flat):
        if isinstance(leaf, torch.Tensor):
            torch.testing.assert_close(leaf, torch.cat([r[j] for r in ref_flat]))
        else:
            assert leaf == ref_flat[0][j]


class Opaque:
    """An object that is not a pytree node (like transformers' DynamicCache)."""

    def __init__(self, t):
        self.t = t


@pytest.mark.parametrize("mode", MODES)
def test_opaque_output_objects_raise_naming_the_leaf(mode):
    class WithObject(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return {"y": y, "obj": Opaque(y)}

    hnet = hl.hypernetize(WithObject(), inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    with pytest.raises(
        HyperloomError, match=re.escape("Per-sample output ['obj'] is a test_per_sample.Opaque, which per-sample mode cannot stack")
    ):
        hnet(torch.randn(3, 3), lam=torch.rand(3))
    assert isinstance(hnet(torch.randn(3, 3), lam=0.5)["obj"], Opaque)  # shared mode returns it as is


@dataclasses.dataclass
class PlainOut:
    logits: torch.Tensor


@pytest.mark.parametrize("mode", MODES)
def test_plain_dataclass_output_raises_and_registered_one_is_stacked(mode):
    class M(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.fc, self.cls = nn.Linear(3, 2), cls

        def forward(self, x):
            return self.cls(self.fc(x))

    # it used to come back as None, silently
    hnet = hl.hypernetize(M(PlainOut), inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    with pytest.raises(HyperloomError, match=re.escape("register it with torch.utils._pytree.register_dataclass")):
        hnet(torch.randn(4, 3), lam=torch.rand(4))

    @dataclasses.dataclass
    class Registered:
        logits: torch.Tensor

    torch.utils._pytree.register_dataclass(Registered)
    hnet = hl.hypernetize(M(Registered), inputs={"lam": (0.0, 1.0)}, per_sample=mode)
    x, lam = torch.randn(4, 3), torch.rand(4)
    out = hnet(x, lam=lam)
    assert isinstance(out, Registered)
    torch.testing.assert_close(out.logits, torch.cat([hnet(x[i : i + 1], lam=float(lam[i])).logits for i in range(4)]))


def test_loop_output_that_is_none_for_some_samples_raises():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, y):
            o = self.fc(x)
            return o, (o.pow(2).mean() if bool(y.any()) else None)

    hnet = hl.hypernetize(M(), inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    for flags in ([[0], [1]], [[1], [0]]):  # sample 1's loss used to be dropped when sample 0 had none
        with pytest.raises(HyperloomError, match=re.escape("Per-sample output [1] is a tensor for some samples and not for others")):
            hnet(torch.randn(2, 3), torch.tensor(flags), lam=torch.rand(2))


def test_loop_outputs_of_different_sizes_raise_naming_the_leaf():
    class Trim(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, m):
            return self.fc(x[:, : int(m.sum())])

    hnet = hl.hypernetize(Trim(), inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    with pytest.raises(HyperloomError, match=re.escape("The per-sample output has shapes (1, 3, 2) and (1, 5, 2) for different samples")):
        hnet(torch.randn(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), lam=torch.rand(2))


def test_loop_nan_constant_is_one_value():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), float("nan")

    for mode in MODES:
        out = hl.hypernetize(M(), inputs={"lam": (0.0, 1.0)}, per_sample=mode)(torch.randn(2, 3), lam=torch.rand(2))
        assert isinstance(out[1], float) and out[1] != out[1]


class SharedW(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, w=None):
        return self.fc(x * w)


@pytest.mark.parametrize("in_dims", [{"w": None}, {1: None}])
def test_in_dims_by_name_or_position_apply_both_ways(in_dims):
    # {"w": None} used to be ignored when w was passed by position: with B == L it was split, silently
    hnet = hl.hypernetize(SharedW(), inputs={"lam": (0.0, 1.0)}, in_dims=in_dims)
    x, w, lam = torch.randn(3, 3, 4), torch.randn(3, 4), torch.rand(3)
    ref = torch.cat([hnet(x[i : i + 1], w, lam=float(lam[i])) for i in range(3)])
    torch.testing.assert_close(hnet(x, w, lam=lam), ref)
    torch.testing.assert_close(hnet(x, w=w, lam=lam), ref)


def test_in_dims_keys_must_be_arguments():
    for bad, msg in [
        ({"ww": None}, "in_dims key 'ww' is not an argument of forward(x, w=None); its arguments are ['x', 'w']"),
        ({9: None}, "in_dims key 9: forward(x, w=None) takes 2 positional argument(s)"),
        ({1: None, "w": 0}, "in_dims gives argument 'w' twice: None and 0"),
    ]:
        with pytest.raises(HyperloomError, match=re.escape(msg)):
            hl.hypernetize(SharedW(), inputs={"lam": (0.0, 1.0)}, in_dims=bad)


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 5, batch_first=True)

    def forward(self, x, state=False):
        o, hn = self.gru(x)
        return (o, hn) if state else o


def test_shape_check_is_not_fooled_by_an_earlier_layout():
    x = torch.randn(4, 6, 3)
    # (a) a batch of one first: it cannot tell the sample dimension, so it must not mark the layout checked
    h = hl.hypernetize(Enc(), inputs={"lam": (0.0, 1.0)})
    h(x[:1], True, lam=torch.rand(1))
    with pytest.raises(HyperloomError, match=re.escape("Per-sample output [1] came out as (4, 1, 5)")):
        h(x, True, lam=torch.rand(4))
    # (b) a flag that changes the output structure is part of the layout
    h = hl.hypernetize(Enc(), inputs={"lam": (0.0, 1.0)})
    h(x, False, lam=torch.rand(4))
    with pytest.raises(HyperloomError, match=re.escape("Per-sample output [1] came out as (4, 1, 5)")):
        h(x, True, lam=torch.rand(4))


def test_sweeping_one_shared_input_over_many_conditionings():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    h = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, in_dims={0: None})
    x, lam = torch.randn(1, 3), torch.linspace(0, 1, 5)
    out = h(x, lam=lam)  # used to raise: nothing is batched, so there is no sample dimension to check
    torch.testing.assert_close(out, torch.cat([h(x, lam=float(v)) for v in lam]))


def test_a_call_that_fails_the_check_changes_no_running_statistics():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.gru = nn.GRU(3, 5, batch_first=True)

        def forward(self, x):
            return self.gru(self.bn(x))

    h = hl.hypernetize(M(), inputs={"lam": (0.0, 1.0)}, predict=[nn.GRU]).train()
    with pytest.raises(HyperloomError, match="came out as"):
        h(torch.randn(4, 6, 3) + 5, lam=torch.rand(4))
    assert int(h.primary.bn.num_batches_tracked) == 0 and torch.equal(h.primary.bn.running_mean, torch.zeros(6))


def test_shape_check_keeps_python_and_numpy_random_state():
    import random

    np = pytest.importorskip("numpy")

    class Draws(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            random.random()
            np.random.rand()
            return self.fc(x)

    h = hl.hypernetize(Draws(), inputs={"lam": (0.0, 1.0)}, per_sample="loop")
    random.seed(0)
    np.random.seed(0)
    h(torch.randn(3, 3), lam=torch.rand(3))  # first call of the layout: checked against a shared call
    first = (random.random(), np.random.rand())
    random.seed(0)
    np.random.seed(0)
    h(torch.randn(3, 3), lam=torch.rand(3))  # already checked
    assert first == (random.random(), np.random.rand())
    h.check_outputs = False
    h2 = hl.hypernetize(Enc(), inputs={"lam": (0.0, 1.0)})
    h2.check_outputs = False  # the switch: no check, no second call (the transposed h_n is then the user's choice)
    assert h2(torch.randn(4, 6, 3), True, lam=torch.rand(4))[1].shape == (4, 1, 5)


@pytest.mark.parametrize("mode", ["auto", "loop"])  # GRU has no vmap batching rule: auto runs a loop
def test_wrong_out_dims_raises_instead_of_a_silent_shape(mode):
    # nn.GRU's h_n is (layers, B, H): with the default out_dims=0 it used to come back (B*layers, 1, H)
    for layers in (1, 2):
        gru = nn.GRU(3, 5, num_layers=layers, batch_first=True)
        hnet = hl.hypernetize(gru, inputs={"lam": (0.0, 1.0)}, per_sample=mode)
        with pytest.raises(HyperloomError, match=r"Per-sample output \[1\] (has shape|came out as)"):
            hnet(torch.randn(4, 6, 3), lam=torch.rand(4))
        good = hl.hypernetize(gru, inputs={"lam": (0.0, 1.0)}, per_sample="loop", out_dims=(0, 1))
        x, lam = torch.randn(4, 6, 3), torch.rand(4)
        out, h = good(x, lam=lam)
        assert out.shape == (4, 6, 5) and h.shape == (layers, 4, 5)
        ref = [good(x[i : i + 1], lam=float(lam[i])) for i in range(4)]
        torch.testing.assert_close(h, torch.cat([r[1] for r in ref], dim=1))
    with pytest.raises(HyperloomError, match=re.escape("out_dims=(0, 1, 2) does not match the model's output structure")):
        hl.hypernetize(gru, inputs={"lam": (0.0, 1.0)}, per_sample="loop", out_dims=(0, 1, 2))(torch.randn(2, 6, 3), lam=torch.rand(2))


def test_per_sample_count_must_match_every_batched_argument():
    hnet = hl.hypernetize(Masked(), predict=[nn.Linear], inputs={"lam": (0.0, 1.0)})
    ids, mask, _ = masked_batch()
    with pytest.raises(HyperloomError, match=re.escape("keyword argument 'mask' of shape (3, 5) has 3 samples")):
        hnet(ids, mask=mask[:3], lam=torch.rand(4))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


class UpdatesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x):
        y = self.fc(x)
        self.seen.copy_(y.detach().mean(0))
        return y


@pytest.mark.parametrize(
    "make",
    [
        DataDependent,
        lambda: nn.utils.spectral_norm(nn.Linear(3, 2)),
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)),
    ],
)
def test_vmap_failures_name_the_way_out(make):
    net = make()
    predict = [nn.Linear]
    hnet = hl.hypernetize(net, predict=predict, inputs={"lam": (0.0, 1.0)}, per_sample="vmap")
    x = torch.randn(4, 3) if not isinstance(net, nn.Sequential) else torch.randn(4, 5, 3).transpose(1, 2)[:, :, 0]
    with pytest.raises(HyperloomError, match=re.escape("pass per_sample='loop' to hypernetize")):
        hnet(x, lam=torch.rand(4))
    if not isinstance(net, nn.Sequential):  # BatchNorm1d on (1, C) cannot normalise one value per channel, even in a loop
        loop = hl.hypernetize(make(), predict=predict, inputs={"lam": (0.0, 1.0)}, per_sample="loop")
        assert loop(x, lam=torch.rand(4)).shape == (4, 2)


def test_batchnorm1d_per_sample_training_says_why():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for mode in MODES:
        hnet = hl.hypernetize(net, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample=mode)
        with pytest.raises(HyperloomError, match=re.escape("BatchNorm in training mode cannot normalise one value per channel")):
            hnet(torch.randn(4, 3), lam=torch.rand(4))
        assert hnet.eval()(torch.randn(4, 3), lam=torch.rand(4)).shape == (4, 4)


def test_shared_then_per_sample_batchnorm_then_backward():
    # the per-sample running-stat write-back used to bump the version of a tensor the first graph saved
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    hnet = hl.hypernetize(net, predict=[nn.Conv2d, nn.Linear], inputs={"lam": (0.0, 1.0)})
    x = torch.randn(4, 1, 6, 6)
    first = hnet(x, lam=0.3).sum()
    second = hnet(x, lam=torch.rand(4)).sum()
    first.backward()
    second.backward()
    bn = hnet.primary[1]
    assert int(bn.num_batches_tracked) == 2


def test_per_sample_keeps_the_random_state_of_a_shared_check():
    # the one-off shape check against a shared call must not consume random numbers or touch buffers
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    hnet = hl.hypernetize(net, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)}, per_sample="loop").eval()
    hnet.primary[1].train()
    x, lam = torch.randn(4, 3), torch.rand(4)
    torch.manual_seed(5)
    a = hnet(x, lam=lam)
    after_first = torch.rand(1)
    torch.manual_seed(5)
    b = hnet(x, lam=lam)  # the layout is checked now: no second shared call
    assert torch.equal(a, b) and torch.equal(after_first, torch.rand(1))
    assert torch.equal(hnet.primary[2].running_mean, torch.zeros(4))


def test_a_packed_sequence_says_what_works():
    # a PackedSequence used to be split into its fields, with an in_dims suggestion that does not help
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 4, batch_first=True)

        def forward(self, packed):
            return self.gru(packed)[1][-1]

    class Padded(Packed):
        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            return self.gru(packed)[1][-1]

    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    hnet = hl.hypernetize(Packed(), inputs={"lam": (0.0, 1.0)})
    assert hnet(packed, lam=0.3).shape == (3, 4)  # shared conditioning takes it
    with pytest.raises(HyperloomError, match=re.escape("Per-sample mode cannot split the PackedSequence positional argument 0")):
        hnet(packed, lam=torch.rand(3))
    # what the message says works: the padded batch and the lengths, packed inside the model
    padded = hl.hypernetize(Padded(), inputs={"lam": (0.0, 1.0)})
    padded.load_state_dict(hnet.state_dict())
    lam = torch.rand(3)
    out = padded(x, lengths, lam=lam)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], padded(x[i : i + 1, : lengths[i]], lengths[i : i + 1], lam=float(lam[i])))
    assert pad_packed_sequence(packed, batch_first=True)[0].shape == (3, 5, 3)
