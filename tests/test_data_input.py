"""hl.Data: data as conditioning (per sample, per set), set pooling, variable sizes, composition, checkpoints, bad input."""

import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom import HyperloomError
from hyperloom.checkpoint import CheckpointError

MODES = ["vmap", "loop"]
POOLS = ["mean", "attention"]
TOL = {"atol": 1e-10, "rtol": 1e-10}


def encoder(d_in=3, k=8):
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, k))


def primary():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def build(inputs, *, seed=0, **kw):
    torch.manual_seed(seed)
    return hl.hypernetize(primary(), inputs=inputs, hidden=(8,), **kw).double()


def twin(model, inputs, **kw):
    """A model declared differently (e.g. per='set' instead of per='sample') with the same weights."""
    other = build(inputs, **kw)
    other.load_state_dict(model.state_dict())
    return other


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- per sample ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_per_sample_datum_equals_a_loop_of_shared_calls(mode):
    """Dynamic hypernetwork: each sample's weights come from its own input; reference: one shared call per sample."""
    model = build({"x_in": hl.Data(encoder(), per="sample"), "lam": (0.0, 1.0)}, per_sample=mode)
    shared = twin(model, {"x_in": hl.Data(encoder(), per="set", pool=None), "lam": (0.0, 1.0)})
    x, lam = rand(5, 3), torch.rand(5, dtype=torch.float64)
    out = model(x, x_in=x, lam=lam)
    for i in range(5):
        torch.testing.assert_close(out[i], shared(x[i : i + 1], x_in=x[i], lam=float(lam[i]))[0], **TOL)
        torch.testing.assert_close(out[i], shared.materialize(x_in=x[i], lam=float(lam[i]))(x[i : i + 1])[0], **TOL)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("mode", MODES)
def test_per_sample_sets_equal_a_loop_of_per_set_calls(pool, mode):
    model = build({"ctx": hl.Data(encoder(), per="sample", pool=pool)}, per_sample=mode)
    per_set = twin(model, {"ctx": hl.Data(encoder(), per="set", pool=pool)})
    x, sets = rand(4, 3), rand(4, 6, 3, seed=2)
    out = model(x, ctx=sets)
    for i in range(4):
        torch.testing.assert_close(out[i], per_set(x[i : i + 1], ctx=sets[i])[0], **TOL)


@pytest.mark.parametrize("pool", POOLS)
def test_variable_set_sizes_list_and_mask_equal_a_loop(pool):
    model = build({"ctx": hl.Data(encoder(), per="sample", pool=pool)})
    per_set = twin(model, {"ctx": hl.Data(encoder(), per="set", pool=pool)})
    x, padded = rand(3, 3), rand(3, 5, 3, seed=2)
    sizes = [2, 5, 1]
    mask = torch.arange(5)[None, :] < torch.tensor(sizes)[:, None]
    padded = torch.where(mask[..., None], padded, torch.full_like(padded, 7.0))  # padding must not matter
    by_list = model(x, ctx=[padded[i, : sizes[i]] for i in range(3)])
    by_mask = model(x, ctx=hl.Masked(padded, mask))
    for i in range(3):
        ref = per_set(x[i : i + 1], ctx=padded[i, : sizes[i]])[0]
        torch.testing.assert_close(by_list[i], ref, **TOL)
        torch.testing.assert_close(by_mask[i], ref, **TOL)
    per_set_masked = per_set(x, ctx=hl.Masked(padded[1], mask[1]))  # a mask with per='set' too
    torch.testing.assert_close(per_set_masked, per_set(x, ctx=padded[1]), **TOL)


# -- per set ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", POOLS)
def test_set_pooling_is_permutation_invariant(pool):
    model = build({"support": hl.Data(encoder(), per="set", pool=pool)})
    x, support = rand(4, 3), rand(9, 3, seed=2)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x, support=support[perm]), model(x, support=support), atol=1e-12, rtol=1e-12)
    other = support.clone()
    other[0] += 1.0
    assert not torch.allclose(model(x, support=other), model(x, support=support))  # the set does matter
    per_sample = twin(model, {"support": hl.Data(encoder(), per="sample", pool=pool)})
    sets = torch.stack([support, support[perm]])
    out = per_sample(x[:1].expand(2, 3), support=sets)
    torch.testing.assert_close(out[0], out[1], atol=1e-12, rtol=1e-12)


def test_labelled_set_as_a_tuple_and_a_dict():
    """A support set of (features, labels): a tuple goes to encoder(*value), a dict to encoder(**value)."""

    class Labelled(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 5)
            self.fc = nn.Linear(3 + 5, 8)

        def forward(self, feats, labels):
            return self.fc(torch.cat([feats, self.emb(labels)], dim=-1))

    model = build({"support": hl.Data(Labelled(), per="set")})
    feats, labels, x = rand(7, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2]), rand(2, 3)
    out = model(x, support=(feats, labels))
    torch.testing.assert_close(model(x, support={"feats": feats, "labels": labels}), out, **TOL)
    perm = torch.randperm(7)
    torch.testing.assert_close(model(x, support=(feats[perm], labels[perm])), out, atol=1e-12, rtol=1e-12)


def test_shared_set_with_per_sample_range_and_task_equals_a_loop():
    inputs = {"support": hl.Data(encoder(), per="set"), "lam": (0.0, 1.0), "task": hl.Task(3, dim=4)}
    model = build(inputs)
    x, support = rand(3, 3), rand(6, 3, seed=2)
    lam, task = torch.rand(3, dtype=torch.float64), torch.tensor([2, 0, 1])
    out = model(x, support=support, lam=lam, task=task)
    for i in range(3):
        plain = model.materialize(support=support, lam=float(lam[i]), task=int(task[i]))
        torch.testing.assert_close(out[i], plain(x[i : i + 1])[0], **TOL)


def test_materialize_gives_an_ordinary_module_for_that_set():
    model = build({"support": hl.Data(encoder(), per="set", pool="attention")})
    x, support = rand(5, 3), rand(8, 3, seed=2)
    plain = model.materialize(support=support)
    assert type(plain) is nn.Sequential and not any(isinstance(m, hl.HyperModel) for m in plain.modules())
    torch.testing.assert_close(plain(x), model(x, support=support), **TOL)
    with pytest.raises(HyperloomError, match="materialize\\(\\) needs one value per input"):
        build({"d": hl.Data(encoder(), per="sample")}).materialize(d=x)


# -- the encoder: trained, frozen, saved --------------------------------------------------------------------------------
def test_encoder_is_a_submodule_trained_by_default_and_freezable():
    enc = encoder()
    model = build({"support": hl.Data(enc, per="set", pool="attention")})
    assert model.hypernet.data["support"].encoder is enc
    names = [n for n, _ in model.named_parameters()]
    assert "hypernet.data.support.encoder.0.weight" in names and "hypernet.data.support.pool.seed" in names
    x, support = rand(4, 3), rand(6, 3, seed=2)
    model(x, support=support).sum().backward()
    assert enc[0].weight.grad is not None and enc[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    enc.requires_grad_(False)  # a pretrained, frozen encoder
    model(x, support=support).sum().backward()
    assert enc[0].weight.grad is None and model.hypernet.trunk.layers[0].weight.grad is not None


def test_unit_norm_code_is_invariant_to_the_encoders_scale_and_plain_is_not():
    x, support = rand(4, 3), rand(6, 3, seed=2)
    for norm in ["unit", None]:
        model = build({"support": hl.Data(encoder(), per="set", norm=norm)})
        before = model(x, support=support)
        with torch.no_grad():
            last = model.hypernet.data["support"].encoder[2]
            last.weight.mul_(3.0)
            last.bias.mul_(3.0)
        after = model(x, support=support)
        assert torch.allclose(before, after, atol=1e-12) == (norm == "unit")


def test_save_load_round_trip_and_configuration_checked(tmp_path):
    inputs = {"support": hl.Data(encoder(), per="set", pool="attention"), "lam": (0.0, 1.0)}
    model = build(inputs)
    with torch.no_grad():
        model.hypernet.data["support"].encoder[0].weight.add_(0.5)  # trained weights, not the init
    x, support = rand(3, 3), rand(5, 3, seed=2)
    path = tmp_path / "m.safetensors"
    hl.save_model(model, path)
    fresh = build({"support": hl.Data(encoder(), per="set", pool="attention"), "lam": (0.0, 1.0)}, seed=9)
    assert not torch.allclose(fresh(x, support=support, lam=0.3), model(x, support=support, lam=0.3))
    hl.load_model(fresh, path)
    torch.testing.assert_close(fresh(x, support=support, lam=0.3), model(x, support=support, lam=0.3), **TOL)
    for other, field in [
        (hl.Data(encoder(), per="set", pool="mean"), "pool"),
        (hl.Data(encoder(), per="sample", pool="attention"), "per"),
        (hl.Data(encoder(), per="set", pool="attention", norm=None), "norm"),
    ]:
        wrong = build({"support": other, "lam": (0.0, 1.0)})
        with pytest.raises(CheckpointError, match=rf"support\W.*{field}"):  # the input and the field that differs
            hl.load_model(wrong, path)


def test_lora_mode():
    lin = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    torch.manual_seed(0)
    model = hl.hypernetize(
        lin, predict=[nn.Linear], inputs={"support": hl.Data(encoder(), per="set"), "lam": (0.0, 1.0)}, lora=hl.LoRA(rank=1)
    ).double()
    x, support, lam = rand(4, 3), rand(6, 3, seed=2), torch.rand(4, dtype=torch.float64)
    with torch.no_grad():
        for p in model.hypernet.parameters():
            p.add_(0.1 * torch.randn_like(p))  # B != 0, so the adapter does something
    out = model(x, support=support, lam=lam)
    assert not torch.allclose(out, lin(x))
    for i in range(4):
        torch.testing.assert_close(out[i], model.materialize(support=support, lam=float(lam[i]))(x[i : i + 1])[0], **TOL)


def test_sample_sweep_and_tune_say_data_cannot_be_sampled():
    model = build({"support": hl.Data(encoder(), per="set"), "lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape("hl.sample: ['support'] is a Data input")):
        hl.sample(model, n=3)
    with pytest.raises(HyperloomError, match=re.escape("hl.sweep: ['support'] is a Data input")):
        hl.sweep(model, lambda m, **c: {"v": 0.0}, {"support": [1], "lam": 3})
    with pytest.raises(HyperloomError, match=re.escape("hl.tune: ['support'] is a Data input")):
        hl.tune(model, lambda m, **c: torch.zeros(()), inputs=["support"])
    sampled = hl.sample({k: s for k, s in model.inputs.items() if not isinstance(s, hl.Data)}, n=3)
    assert list(sampled) == ["lam"]
    x, support = rand(3, 3), rand(4, 3, seed=2)
    tuned = hl.tune(model, lambda m, **c: m(x, support=support, **c).pow(2).mean(), steps=2)
    assert list(tuned.values) == ["lam"]


# -- bad input ------------------------------------------------------------------------------------------------------
def test_declaration_errors():
    with pytest.raises(HyperloomError, match="choose per='sample'"):
        hl.Data(encoder())
    with pytest.raises(HyperloomError, match="per must be one of"):
        hl.Data(encoder(), per="batch")
    with pytest.raises(HyperloomError, match="pool must be one of"):
        hl.Data(encoder(), per="set", pool="max")
    with pytest.raises(HyperloomError, match="norm must be one of"):
        hl.Data(encoder(), per="set", norm="l2")
    with pytest.raises(HyperloomError, match=re.escape("encoder must be an nn.Module")):
        hl.Data(lambda x: x, per="set")
    with pytest.raises(HyperloomError, match="cannot infer the code size of ReLU"):
        hl.Data(nn.ReLU(), per="set")
    with pytest.raises(HyperloomError, match="dim must be an integer >= 1, got 0"):
        hl.Data(nn.ReLU(), per="set", dim=0)
    assert hl.Data(encoder(k=5), per="set").dim == 5 and hl.Data(nn.ReLU(), per="set", dim=3).dim == 3


@pytest.mark.parametrize(
    ("per", "pool", "value", "message"),
    [
        ("sample", None, rand(4, 4), "Data input 'd': the encoder Sequential failed on a batch of (4, 4) float64 (RuntimeError: mat1"),
        ("sample", None, torch.ones(4, 3, dtype=torch.int64), "the encoder Sequential failed on a batch of (4, 3) int64"),
        ("sample", None, torch.ones(4, 3, dtype=torch.bool), "Data input 'd': expected real-valued tensors, got dtype torch.bool"),
        ("sample", None, 3.0, "expected a tensor (or tuple/dict of tensors) of shape (B, ...): one datum per sample, got float"),
        ("sample", None, torch.zeros(0, 3, dtype=torch.float64), "Data input 'd': an empty batch (0 samples): (0, 3) float64"),
        ("sample", None, rand(5, 3), "Data input(s) ['d'] (per='sample') give 5 per-sample codes"),
        ("sample", None, (rand(4, 3), rand(5, 3)), "Data input 'd': the tensors of the value disagree on their batch size"),
        ("sample", "mean", rand(4, 3), "Data input 'd': the encoder Sequential failed on 12 set elements stacked as (12,) float64"),
        ("sample", "mean", rand(4, 0, 3), "Data input 'd': an empty set: (4, 0, 3) float64"),
        ("sample", "mean", [rand(2, 3), rand(0, 3)], "Data input 'd': set 1 is empty"),
        ("sample", "mean", [rand(2, 3), rand(2, 4)], "Data input 'd': set 1's elements (2, 4) float64 differ from set 0's (2, 3) float64"),
        ("sample", "mean", hl.Masked(rand(4, 2, 3), torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]]).bool()), "the set of sample 2 is empty"),
        ("sample", "mean", hl.Masked(rand(4, 2, 3), torch.ones(4, 3).bool()), "the mask has shape (4, 3), expected (4, 2)"),
        ("sample", "mean", hl.Masked(rand(4, 2, 3), torch.ones(4, 2)), "the mask must be a bool tensor"),
        ("set", "mean", torch.zeros(0, 3, dtype=torch.float64), "Data input 'd': an empty set: (0, 3) float64"),
        ("set", "mean", [rand(2, 3)], "Data input 'd': a list holds one set per sample"),
        ("set", None, rand(2, 3), "Data input 'd': the encoder's output for one datum has shape (2, 8), expected (8,) or (1, 8)"),
        ("set", None, hl.Masked(rand(2, 3), torch.ones(2).bool()), "hl.Masked is for sets"),
    ],
)
def test_bad_values_name_the_input_and_the_shapes(per, pool, value, message):
    model = build({"d": hl.Data(encoder(), per=per, pool=pool)})
    with pytest.raises(HyperloomError, match=re.escape(message)):
        model(rand(4, 3), d=value)


@pytest.mark.parametrize(("per", "pool", "shape"), [("sample", None, (4, 3)), ("set", "mean", (6, 3)), ("sample", "attention", (4, 2, 3))])
def test_nan_in_the_data_is_refused_with_its_index(per, pool, shape):
    model = build({"d": hl.Data(encoder(), per=per, pool=pool)})
    value = rand(*shape)
    value[(1,) * len(shape)] = float("nan")
    with pytest.raises(HyperloomError, match=re.escape(f"Data input 'd': non-finite value nan at index {(1,) * len(shape)}")):
        model(rand(4, 3), d=value)


class Broken(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.out = out

    def forward(self, x):
        return self.out(self.fc(x))


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda h: h[:, :5], "the encoder's output for 4 samples"),
        (lambda h: h.sum(), "the encoder's output for"),
        (lambda h: (h, h), "the encoder returned a tuple, expected a tensor of codes"),
        (lambda h: h * float("inf"), "the encoder produced a non-finite code"),
    ],
)
def test_bad_encoder_outputs(out, message):
    model = build({"d": hl.Data(Broken(out), per="sample")})
    with pytest.raises(HyperloomError, match=re.escape(message) if "samples" not in message else "expected \\(4, 8\\)"):
        model(rand(4, 3), d=rand(4, 3))


def test_wrong_device_and_inputset_prepare():
    model = build({"d": hl.Data(encoder(), per="sample")})
    with pytest.raises(HyperloomError, match="Data input 'd' is on meta but the hypernetwork is on cpu"):
        model(rand(4, 3), d=torch.zeros(4, 3, device="meta"))
    with pytest.raises(HyperloomError, match="Data input 'd' is encoded by its HyperNetwork's encoder"):
        model.hypernet.input_set.prepare({"d": rand(4, 3)}, dtype=torch.float64)


def test_mismatch_with_other_per_sample_inputs_names_both():
    model = build({"d": hl.Data(encoder(), per="sample"), "lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match="Conditioning input 'lam' has 3 per-sample values but 'd' has 4"):
        model(rand(4, 3), d=rand(4, 3), lam=torch.rand(3, dtype=torch.float64))


# -- regressions found by the adversarial review ---------------------------------------------------------------------
@pytest.mark.parametrize("scale", [3e4, 1e-6])
def test_unit_norm_code_in_float16_is_a_unit_vector_for_large_and_tiny_codes(scale):
    """float16: the norm of a code with entries ~3e4 overflows to inf (the code became 0) and one of a code with
    entries ~1e-6 falls below float16's tiny (the code was not unit): the normalisation runs in float32."""
    torch.manual_seed(0)
    enc = nn.Linear(3, 8)
    model = hl.hypernetize(primary(), inputs={"support": hl.Data(enc, per="set")}, hidden=(8,)).half()
    x, support = rand(4, 3).half(), rand(6, 3, seed=2).half()
    with torch.no_grad():  # every element's code: the bias (its norm: sqrt(8) |b|, with |b| = scale after the scaling)
        enc.weight.zero_()
        enc.bias.copy_(torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0]))
    before = model(x, support=support)
    with torch.no_grad():
        enc.bias.mul_(scale)
    code = model.hypernet.data["support"].encode(support, dtype=torch.float16, device=torch.device("cpu")).code
    torch.testing.assert_close(code.float().norm(dim=-1), torch.ones(1), atol=2e-3, rtol=0)
    torch.testing.assert_close(model(x, support=support), before, atol=5e-3, rtol=0)


def test_lora_per_sample_data_with_a_mismatched_batch_names_the_data_input():
    lin = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model = hl.hypernetize(lin, predict=[nn.Linear], inputs={"own": hl.Data(encoder(), per="sample")}, lora=hl.LoRA(rank=1)).double()
    with pytest.raises(HyperloomError, match=re.escape("Data input(s) ['own'] (per='sample') give 3 per-sample codes")):
        model(rand(4, 3), own=rand(3, 3))


def test_list_of_sets_with_different_structures_says_so():
    class Labelled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, feats, labels):
            return self.fc(torch.cat([feats, labels[:, None].to(feats.dtype)], dim=-1))

    model = build({"ctx": hl.Data(Labelled(), per="sample", pool="mean")})
    sets = [(rand(2, 3), torch.arange(2)), {"feats": rand(2, 3), "labels": torch.arange(2)}]
    with pytest.raises(HyperloomError, match=r"set 1 is a dict.*set 0 is a tuple"):
        model(rand(2, 3), ctx=sets)


def test_checkpoint_checks_the_encoders_class(tmp_path):
    """Two encoders with the same state_dict keys but different classes (different forward): refused, not loaded silently."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 8)

        def forward(self, v):
            return self.fc(v)

    class Rectified(Plain):
        def forward(self, v):
            return torch.relu(self.fc(v))

    path = tmp_path / "m.safetensors"
    hl.save_model(build({"support": hl.Data(Plain(), per="set")}), path)
    hl.load_model(build({"support": hl.Data(Plain(), per="set")}, seed=3), path)
    with pytest.raises(CheckpointError, match=r"support\W.*encoder.*'Plain'.*'Rectified'"):
        hl.load_model(build({"support": hl.Data(Rectified(), per="set")}), path)


def test_sample_and_tune_of_a_model_with_only_data_inputs_say_there_is_nothing_to_do():
    """Only Data inputs: hl.sample advised 'use hl.sample on the other inputs []' and hl.tune 'name one of ['support']'
    (which it then refuses); both now say the model has no other input."""
    model = build({"support": hl.Data(encoder(), per="set")})
    with pytest.raises(HyperloomError, match=re.escape("the model has no other inputs: nothing to sample; pass the data")):
        hl.sample(model, n=3)
    with pytest.raises(HyperloomError, match=re.escape("the model has no other inputs: nothing to tune; pass the data")):
        hl.tune(model, lambda m, **c: m(rand(2, 3), support=rand(4, 3), **c).sum())


def test_materialize_with_a_per_sample_data_input_says_how_to_get_one_datums_model():
    """A per='sample' Data input always gives per-sample codes (even for one datum): materialize said only
    'got per-sample values'; it now names the input and the way out (the same weights declared per='set', pool=None)."""
    model = build({"own": hl.Data(encoder(), per="sample")})
    hint = re.escape("Data input(s) ['own'] are per='sample'") + ".*" + re.escape("per='set', pool=None")
    with pytest.raises(HyperloomError, match=hint):
        model.materialize(own=rand(1, 3))
    lin = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    lora = hl.hypernetize(lin, predict=[nn.Linear], inputs={"own": hl.Data(encoder(), per="sample")}, lora=hl.LoRA(rank=1)).double()
    with pytest.raises(HyperloomError, match=hint):
        lora.materialize(own=rand(1, 3))
    twin_model = twin(model, {"own": hl.Data(encoder(), per="set", pool=None)})  # the way out the message gives
    x = rand(1, 3)
    torch.testing.assert_close(twin_model.materialize(own=x[0])(x), model(x, own=x), **TOL)


@pytest.mark.parametrize(("per", "pool"), [("set", None), ("sample", None), ("set", "mean")])
def test_an_integer_code_is_refused_for_one_datum_too(per, pool):
    """An encoder returning integers (no gradient, e.g. an argmax) was refused for sets and batches but cast
    silently to a float code for one datum (per='set', pool=None)."""
    model = build({"d": hl.Data(Broken(lambda h: h.round().long()), per=per, pool=pool)})
    value = rand(3) if pool is None and per == "set" else rand(4, 3)
    with pytest.raises(HyperloomError, match=re.escape("Data input 'd': the encoder's output has dtype torch.int64, expected a floating")):
        model(rand(4, 3), d=value)


def test_a_wrongly_inferred_code_size_says_it_was_inferred():
    """dim is read from the last nn.Linear *registered*; an encoder that registers its output layer first got
    'expected (n, 32)' for a size the user never gave: the message now says where 32 came from and to pass dim=."""

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 8)
            self.body = nn.Linear(3, 32)

        def forward(self, v):
            return self.head(torch.relu(self.body(v)))

    model = build({"s": hl.Data(HeadFirst(), per="set")})
    with pytest.raises(HyperloomError, match=re.escape("expected (5, 32) (dim=32 inferred from HeadFirst's last nn.Linear/nn.Embedding")):
        model(rand(2, 3), s=rand(5, 3))
    fixed = build({"s": hl.Data(HeadFirst(), per="set", dim=8)})
    assert fixed(rand(2, 3), s=rand(5, 3)).shape == (2, 2)


def test_lora_save_pretrained_with_a_data_input_gives_the_way_out(tmp_path):
    """save_pretrained cannot rebuild an encoder from JSON: it said 'input 'support' is a Data' and nothing more;
    it now points to hl.save_model / hl.load_model, which round-trip the model (tested here)."""
    lin = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    inputs = {"support": hl.Data(encoder(), per="set")}
    model = hl.hypernetize(lin, predict=[nn.Linear], inputs=inputs, lora=hl.LoRA(rank=1)).double()
    with pytest.raises(HyperloomError, match=re.escape("input 'support' is an hl.Data input") + ".*hl.save_model.*hl.load_model"):
        model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        for p in model.hypernet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hl.save_model(model, tmp_path / "m.safetensors")
    other = hl.hypernetize(lin, predict=[nn.Linear], inputs={"support": hl.Data(encoder(), per="set")}, lora=hl.LoRA(rank=1)).double()
    hl.load_model(other, tmp_path / "m.safetensors")
    x, support = rand(4, 3), rand(5, 3, seed=2)
    torch.testing.assert_close(other(x, support=support), model(x, support=support), **TOL)


def test_floating_data_of_another_dtype_than_the_encoder_says_which_dtype_is_expected():
    """float32 data into a float64 model: the message showed only torch's 'mat1 and mat2 must have the same dtype';
    it now gives the expected dtype (the encoder's parameters')."""
    model = build({"s": hl.Data(encoder(), per="set")})
    with pytest.raises(HyperloomError, match=re.escape("the data is torch.float32 but the encoder's parameters are torch.float64")):
        model(rand(2, 3), s=torch.randn(5, 3))


# -- reviewed in round 8 -----------------------------------------------------------------------------------------
def test_masked_padding_never_reaches_a_batchnorm_encoder_in_train_mode():
    # the padding went through the encoder with the valid elements: a BatchNorm in train mode mixed it into the
    # batch statistics (the codes, so the output, depended on the padding values) and into its running statistics
    enc = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
    model = build({"ctx": hl.Data(enc, per="sample", pool="mean")}).train()
    bn = model.hypernet.data["ctx"].encoder[1]
    x, padded = rand(3, 3), rand(3, 5, 3, seed=2)
    sizes = [2, 5, 3]
    mask = torch.arange(5)[None, :] < torch.tensor(sizes)[:, None]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    by_list = model(x, ctx=[padded[i, : sizes[i]] for i in range(3)])
    list_stats = bn.running_mean.clone()
    for pad in (0.0, 100.0, float("nan")):  # any padding, not even finite, gives the list's answer
        bn.running_mean.copy_(stats[0]), bn.running_var.copy_(stats[1]), bn.num_batches_tracked.copy_(stats[2])
        odd = torch.where(mask[..., None], padded, torch.full_like(padded, pad))
        torch.testing.assert_close(model(x, ctx=hl.Masked(odd, mask)), by_list, **TOL)
        torch.testing.assert_close(bn.running_mean, list_stats, **TOL)
    odd[0, 0, 1] = float("nan")  # a NaN in a valid element is still refused, at its index in the valid elements
    with pytest.raises(HyperloomError, match=re.escape("non-finite value nan at index (0, 1) of the data (its valid elements)")):
        model(x, ctx=hl.Masked(odd, mask))


def test_data_inputs_on_the_meta_device_build_shapes_without_value_checks():
    with torch.device("meta"):
        net, enc = nn.Linear(16, 4), nn.Linear(16, 8)
    x = torch.empty(5, 16, device="meta")
    model = hl.hypernetize(net, inputs={"s": hl.Data(enc, per="set")}, hidden=(8,))
    assert model(x, s=torch.empty(3, 16, device="meta")).shape == (5, 4)  # was a raw Tensor.item() error
    with torch.device("meta"):
        net, enc = nn.Linear(16, 4), nn.Linear(16, 8)
    sets = hl.hypernetize(net, inputs={"s": hl.Data(enc, per="sample", pool="mean")}, hidden=(8,))
    mask = torch.ones(5, 3, dtype=torch.bool, device="meta")
    assert sets(x, s=hl.Masked(torch.empty(5, 3, 16, device="meta"), mask)).shape == (5, 4)


@pytest.mark.parametrize(
    "head", [hl.Chunked(chunk_size=64, width=16, combine="concat"), hl.Structured(block=8, width=16, combine="concat")]
)
def test_a_concat_shared_head_conditioned_on_data_alone_does_not_start_at_zero(head):
    # the concat gains were calibrated at the Data input's midpoint, a zero code with zero features: every gain
    # was scaled by 0 (a silent zero_init); they are calibrated at a unit-norm code now
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = hl.hypernetize(net, inputs={"s": hl.Data(nn.Linear(16, 8), per="set")}, hidden=(32,), head=head)
    gains = model.hypernet.head.gains
    assert bool((gains != 0).any())
    assert float(model.delta(s=torch.randn(5, 16))["0.weight"].detach().abs().max()) > 0.01


def test_exports_run_the_data_encoder_in_eval_mode():
    # materialize()/to_peft() in train mode ran a Dropout encoder at random (two exports differed) and moved
    # BatchNorm's running statistics on every export
    enc = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 8))
    model = build({"ctx": hl.Data(enc, per="set", pool="mean")}).train()
    bn = model.hypernet.data["ctx"].encoder[1]
    support = rand(6, 3, seed=2)
    a, b = model.materialize(ctx=support), model.materialize(ctx=support)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert int(bn.num_batches_tracked) == 0 and model.training and enc.training  # modes restored
    torch.testing.assert_close(a(rand(4, 3)), model.eval()(rand(4, 3), ctx=support), **TOL)
    lora = hl.hypernetize(
        primary().double(), inputs={"ctx": hl.Data(enc, per="set")}, hidden=(8,), lora=hl.LoRA(rank=1, targets=nn.Linear)
    ).train()
    c, d = lora.materialize(ctx=support), lora.materialize(ctx=support)
    assert all(torch.equal(p, q) for p, q in zip(c.state_dict().values(), d.state_dict().values()))
    assert int(bn.num_batches_tracked) == 0 and lora.training


def test_masked_sets_under_a_users_vmap_equal_the_selected_sets():
    # under torch.func.vmap the valid elements cannot be selected (their number differs per sample): the padding
    # is encoded there and ignored by the pooling, as before
    model = build({"ctx": hl.Data(encoder(), per="set", pool="mean")})
    sets, x = rand(6, 5, 3, seed=2), rand(6, 1, 3)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    out = torch.func.vmap(lambda xi, si, mi: model(xi, ctx=hl.Masked(si, mi)))(x, sets, mask)
    for i in range(6):
        torch.testing.assert_close(out[i], model(x[i], ctx=sets[i][mask[i]]), **TOL)
