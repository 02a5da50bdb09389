"""Integration tests on real Hugging Face ``transformers`` models (tiny configs built in code, nothing downloaded).

Families: a BERT encoder (sequence classification, real per-sample padding, ``labels=``), a GPT-2 decoder
(``GPT2LMHeadModel`` with its default ``use_cache``, so its output carries a ``DynamicCache``) and a
Llama-style decoder (RoPE, grouped-query attention, left padding).

What these models do under ``torch.func.vmap`` (transformers 5.x):

* a 2-D ``attention_mask`` makes transformers' mask builder test ``padding_mask.all()`` (data-dependent
  control flow, refused by ``vmap``) for bidirectional models with any attention implementation, and for
  causal models with ``attn_implementation="sdpa"`` (the default). ``attn_implementation="eager"`` never
  takes that shortcut for causal masks, so GPT-2 / Llama with padding run under ``vmap``;
* a prepared 4-D additive mask ``(B, 1, 1, L)`` is used as it is, so BERT with padding runs under ``vmap``;
* SDPA under ``vmap`` has no batching rule on CPU and falls back to a per-sample loop with a UserWarning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402

import hyperloom as hl  # noqa: E402

transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.filterwarnings(
    # torch: SDPA has no vmap batching rule on CPU; vmap falls back to a (correct) per-sample loop
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning",
)

VOCAB, L, B, N_LABELS = 100, 8, 4, 3
TOL = {"rtol": 1e-4, "atol": 1e-5}
HIDDEN = (16, 32)


# ------------------------------------------------------------------------------------------------
# tiny models and their inputs
# ------------------------------------------------------------------------------------------------


def bert(attn: str = "sdpa") -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=N_LABELS,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2(attn: str = "eager") -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids_and_mask(n: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a padding mask whose length differs per sample (real padding)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, VOCAB, (n, L), generator=g)
    lengths = [L, L - 3, 2, L - 1, 5, 3][:n] if n <= 6 else [L] * n
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, k in enumerate(lengths):
        if left:
            mask[i, L - k :] = 1
        else:
            mask[i, :k] = 1
    return ids, mask


def bert_inputs(n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids, mask = _ids_and_mask(n)
    g = torch.Generator().manual_seed(5)
    token_type = torch.randint(0, 2, (n, L), generator=g) * mask
    labels = torch.randint(0, N_LABELS, (n,), generator=g)
    return (ids,), {"attention_mask": mask, "token_type_ids": token_type, "labels": labels, "output_hidden_states": True}


def bert_4d_inputs(n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A prepared additive mask (B, 1, 1, L): transformers uses it as is, no data-dependent shortcut."""
    ids, mask = _ids_and_mask(n)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    labels = torch.randint(0, N_LABELS, (n,), generator=torch.Generator().manual_seed(6))
    return (ids,), {"attention_mask": additive, "labels": labels}


def causal_inputs(n: int, *, left: bool = False) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids, mask = _ids_and_mask(n, left=left)
    return (ids,), {"attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def nomask_inputs(n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids, _ = _ids_and_mask(n)
    return (ids,), {"labels": ids}


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]
    predict: Any
    vmap: bool  # whether the model with these inputs can run under torch.func.vmap
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


CASES = [
    # encoder, default SDPA, 2-D padding mask: data-dependent branch in transformers, loop only
    Case("bert", bert, bert_inputs, [nn.Linear], vmap=False),
    # encoder with a prepared 4-D mask: vmap works
    Case("bert-4d-mask", lambda: bert("eager"), bert_4d_inputs, ["bert.encoder.layer.*.attention.self.query", "classifier"], vmap=True),
    # decoder, eager attention, 2-D padding mask, default use_cache (DynamicCache in the output)
    Case("gpt2", gpt2, causal_inputs, "transformer.h.*", vmap=True),
    # decoder with the default SDPA attention and no mask
    Case("gpt2-sdpa", lambda: gpt2("sdpa"), nomask_inputs, [Conv1D], vmap=True),
    # Llama-style decoder, left padding
    Case(
        "llama",
        llama,
        lambda n: causal_inputs(n, left=True),
        [re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+\.weight"), "lm_head"],
        vmap=True,
    ),
]
BY_NAME = {c.name: c for c in CASES}
FAMILIES = [BY_NAME["bert"], BY_NAME["gpt2"], BY_NAME["llama"]]


def modes(case: Case) -> list[str]:
    return ["loop", "vmap", "auto"] if case.vmap else ["loop"]


CASE_MODES = [pytest.param(c, m, id=f"{c.name}-{m}") for c in CASES for m in modes(c)]


def make(case: Case, per_sample: str = "auto", **kw: Any) -> hl.HyperModel:
    hnet = hl.hypernetize(case.build(), inputs={"lam": (0.0, 1.0)}, predict=case.predict, hidden=HIDDEN, per_sample=per_sample, **kw)
    return hnet.eval()


# ------------------------------------------------------------------------------------------------
# output comparison
# ------------------------------------------------------------------------------------------------


def _take(x: Any, i: int) -> Any:
    return x.narrow(0, i, 1) if isinstance(x, torch.Tensor) else x


def loop_reference(hnet, args, kwargs, lam, shared=()):
    """A Python loop of shared calls, each with its sample's own arguments and conditioning value."""
    outs = []
    for i in range(lam.shape[0]):
        a = tuple(_take(x, i) for x in args)
        k = {n: (v if n in shared else _take(v, i)) for n, v in kwargs.items()}
        outs.append(hnet(*a, **k, lam=float(lam[i])))
    return outs


def assert_matches_loop(out: Any, refs: list[Any], where: str = "output") -> None:
    """``out`` (per-sample) equals the per-sample ``refs`` stacked: (B,) for 0-d leaves, else cat along 0."""
    first = refs[0]
    if isinstance(first, torch.Tensor):
        assert isinstance(out, torch.Tensor), f"{where}: expected a tensor, got {type(out).__name__}"
        expected = torch.stack(refs) if first.dim() == 0 else torch.cat(refs, 0)
        torch.testing.assert_close(out, expected, **TOL, msg=lambda m: f"{where}: {m}")
    elif isinstance(first, ModelOutput):
        assert type(out) is type(first), f"{where}: {type(out).__name__} != {type(first).__name__}"
        assert set(out.keys()) <= set(first.keys()), f"{where}: keys {list(out.keys())} vs {list(first.keys())}"
        for key in first.keys():
            assert_matches_loop(getattr(out, key), [r[key] for r in refs], f"{where}.{key}")
    elif isinstance(first, (tuple, list)):
        assert isinstance(out, type(first)) and len(out) == len(first), f"{where}: structure differs"
        for j in range(len(first)):
            assert_matches_loop(out[j], [r[j] for r in refs], f"{where}[{j}]")
    elif first is None or isinstance(first, (bool, int, float, str)):
        assert out == first, f"{where}: {out!r} != {first!r}"
    else:  # an object that cannot be stacked (GPT-2's DynamicCache): None in per-sample mode
        assert out is None, f"{where}: expected None for {type(first).__name__} in per-sample mode, got {type(out).__name__}"


def assert_same_output(a: Any, b: Any, where: str = "output") -> None:
    """Two outputs of the same call: equal tensors, same structure, same types elsewhere."""
    if isinstance(b, torch.Tensor):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{where}: {m}")
    elif isinstance(b, ModelOutput):
        assert type(a) is type(b) and list(a.keys()) == list(b.keys()), f"{where}: {type(a).__name__}{list(a.keys())}"
        for key in b.keys():
            assert_same_output(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, (tuple, list)):
        assert isinstance(a, type(b)) and len(a) == len(b), f"{where}: structure differs"
        for j in range(len(b)):
            assert_same_output(a[j], b[j], f"{where}[{j}]")
    else:
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------------
# shared conditioning, materialize, generate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_shared_forward_equals_materialized(case):
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hnet = hl.hypernetize(model, inputs={"lam": (0.0, 1.0)}, predict=case.predict, hidden=HIDDEN).eval()
    args, kwargs = case.inputs(B)
    out = hnet(*args, **kwargs, lam=0.3)
    plain = hnet.materialize(lam=0.3)
    assert type(plain) is type(model)
    params = dict(plain.named_parameters())
    assert set(hnet.predicted) <= set(params)
    theta = hnet.generate(lam=0.3)
    for name in hnet.predicted:
        torch.testing.assert_close(params[name], theta[name].detach())
    with torch.no_grad():
        assert_same_output(out, plain.eval()(*args, **kwargs))
    # the user's model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n for n, _ in model.named_parameters()} >= set(hnet.predicted)


def test_gpt2_materialized_keeps_tied_head():
    hnet = make(BY_NAME["gpt2"])
    plain = hnet.materialize(lam=0.7)
    assert plain.lm_head.weight is plain.transformer.wte.weight


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generate_shared_and_per_sample(case):
    hnet = make(case)
    model = case.build()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    lam = torch.rand(B)
    shared = hnet.generate(lam=0.3)
    per = hnet.generate(lam=lam)
    assert list(shared) == list(hnet.predicted) == list(per)
    for name in hnet.predicted:
        assert shared[name].shape == shapes[name]
        assert per[name].shape == (B, *shapes[name])
        for i in range(B):
            torch.testing.assert_close(per[name][i], hnet.generate(lam=float(lam[i]))[name], **TOL)


# ------------------------------------------------------------------------------------------------
# per-sample conditioning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "mode"), CASE_MODES)
def test_per_sample_equals_loop_of_shared_calls(case, mode):
    hnet = make(case, mode)
    args, kwargs = case.inputs(B)
    lam = torch.rand(B)
    with torch.no_grad():
        out = hnet(*args, **kwargs, lam=lam)
        refs = loop_reference(hnet, args, kwargs, lam)
    assert_matches_loop(out, refs)
    if "labels" in kwargs:
        assert out.loss.shape == (B,)
    # samples really get different weights: sample 0 under another sample's lam differs
    assert not torch.allclose(
        refs[0].logits, hnet(*(_take(a, 0) for a in args), **{k: _take(v, 0) for k, v in kwargs.items()}, lam=0.99).logits
    )


@pytest.mark.parametrize(("case", "mode"), CASE_MODES)
def test_per_sample_backward_reaches_hypernetwork(case, mode):
    hnet = make(case, mode)
    args, kwargs = case.inputs(B)
    lam = torch.rand(B)
    out = hnet(*args, **kwargs, lam=lam)
    (out.loss.sum() + out.logits.square().mean()).backward()
    params = dict(hnet.hypernet.named_parameters())
    grads = {n: p.grad for n, p in params.items() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing
    assert all(torch.isfinite(g).all() for g in grads.values())
    for part in ("trunk.", "head."):
        assert sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith(part)) > 0, part
    # the same gradients as the loop of shared calls
    got = {n: g.clone() for n, g in grads.items()}
    hnet.zero_grad(set_to_none=True)
    refs = loop_reference(hnet, args, kwargs, lam)
    (torch.stack([r.loss for r in refs]).sum() + torch.cat([r.logits for r in refs]).square().mean()).backward()
    for n, p in params.items():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize(("case", "mode"), CASE_MODES)
def test_per_sample_train_mode_runs(case, mode):
    hnet = make(case, mode).train()
    args, kwargs = case.inputs(B)
    out = hnet(*args, **kwargs, lam=torch.rand(B))
    assert out.logits.shape[0] == B and out.loss.shape == (B,)
    assert all(torch.isfinite(t).all() for t in tensor_leaves(out))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_gpt2_cache_is_none_per_sample(mode):
    hnet = make(BY_NAME["gpt2"], mode)
    args, kwargs = causal_inputs(B)
    with torch.no_grad():
        shared = hnet(*args, **kwargs, lam=0.5)
        per = hnet(*args, **kwargs, lam=torch.full((B,), 0.5))
    if not isinstance(shared.past_key_values, transformers.DynamicCache):  # transformers < 4.4x: legacy tuples, stacked like tensors
        pytest.skip(f"this transformers returns {type(shared.past_key_values).__name__} caches")
    assert per.past_key_values is None
    torch.testing.assert_close(per.logits, shared.logits, **TOL)
    assert per.loss.shape == (B,)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_keyword_only_inputs_are_split(mode):
    hnet = make(BY_NAME["gpt2"], mode)
    (ids,), kwargs = causal_inputs(B)
    lam = torch.rand(B)
    with torch.no_grad():
        by_kw = hnet(input_ids=ids, **kwargs, lam=lam)
        refs = loop_reference(hnet, (), {"input_ids": ids, **kwargs}, lam)
    assert_matches_loop(by_kw, refs)
    torch.testing.assert_close(by_kw.logits, hnet(ids, **kwargs, lam=lam).logits, **TOL)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_explicit_in_dims_equal_default(mode):
    case = BY_NAME["gpt2"]
    args, kwargs = case.inputs(B)
    lam = torch.rand(B)
    torch.manual_seed(0)
    a = make(case, mode)
    torch.manual_seed(0)
    b = make(case, mode, in_dims={0: 0, "attention_mask": 0, "labels": 0})
    with torch.no_grad():
        assert_same_output(b(*args, **kwargs, lam=lam), a(*args, **kwargs, lam=lam))


# ------------------------------------------------------------------------------------------------
# shared keyword arguments and batch-size errors
# ------------------------------------------------------------------------------------------------


FAMILY_MODES = [pytest.param(c, m, id=f"{c.name}-{m}") for c in FAMILIES for m in modes(c) if m != "auto"]


@pytest.mark.parametrize(("case", "mode"), FAMILY_MODES)
def test_shared_kwarg_with_in_dims_none(case, mode):
    args, kwargs = case.inputs(B)
    # (1, L): one set of positions for every sample; not a constant shift, which RoPE (Llama) would not see
    position_ids = (2 * torch.arange(L) + 1)[None]
    lam = torch.rand(B)
    hnet = make(case, mode, in_dims={"position_ids": None})
    with torch.no_grad():
        out = hnet(*args, **kwargs, position_ids=position_ids, lam=lam)
        refs = loop_reference(hnet, args, {**kwargs, "position_ids": position_ids}, lam, shared={"position_ids"})
        default_positions = hnet(*args, **kwargs, lam=lam)
    assert_matches_loop(out, refs)
    assert not torch.allclose(out.logits, default_positions.logits, **TOL)  # the positions were used
    # without in_dims the (1, L) tensor is batched and its batch size (1) is wrong
    with pytest.raises(hl.HyperloomError, match="position_ids"):
        make(case, mode)(*args, **kwargs, position_ids=position_ids, lam=lam)


@pytest.mark.parametrize(("case", "mode"), CASE_MODES)
def test_mismatched_kwarg_batch_names_it(case, mode):
    hnet = make(case, mode)
    args, kwargs = case.inputs(B)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    assert names
    for name in names:
        bad = {**kwargs, name: kwargs[name].narrow(0, 0, B - 1)}
        with pytest.raises(hl.HyperloomError, match=re.escape(name)):
            hnet(*args, **bad, lam=torch.rand(B))
    with pytest.raises(hl.HyperloomError):  # a positional tensor of the wrong batch size
        hnet(args[0].narrow(0, 0, B - 1), **kwargs, lam=torch.rand(B))


@pytest.mark.parametrize(
    ("build", "inputs", "predict"),
    [
        pytest.param(bert, bert_inputs, [nn.Linear], id="bert-sdpa"),
        pytest.param(lambda: bert("eager"), bert_inputs, [nn.Linear], id="bert-eager"),
        pytest.param(lambda: gpt2("sdpa"), causal_inputs, [Conv1D], id="gpt2-sdpa-mask"),
    ],
)
def test_vmap_data_dependent_control_flow_points_to_loop(build, inputs, predict):
    hnet = hl.hypernetize(build(), inputs={"lam": (0.0, 1.0)}, predict=predict, hidden=HIDDEN, per_sample="vmap").eval()
    args, kwargs = inputs(B)
    with pytest.raises(hl.HyperloomError, match=re.escape("per_sample='loop'")) as e:
        hnet(*args, **kwargs, lam=torch.rand(B))
    assert "attn_implementation='eager'" in str(e.value)  # the model's own switch is named too


# ------------------------------------------------------------------------------------------------
# tied parameters, checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("predict", [["lm_head"], "lm_head.weight", "transformer.wte", None], ids=repr)
def test_tied_parameters_cannot_be_predicted(predict):
    with pytest.raises(hl.HyperloomError, match="tied") as info:
        hl.hypernetize(gpt2(), inputs={"lam": (0.0, 1.0)}, predict=predict, hidden=HIDDEN)
    assert "lm_head.weight" in str(info.value) and "transformer.wte.weight" in str(info.value)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_save_load_roundtrip(case, tmp_path):
    torch.manual_seed(0)
    hnet = make(case, "loop")
    with torch.no_grad():  # move away from the initialisation, so that the loaded state is not the default one
        for p in hnet.hypernet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / f"{case.name}.safetensors"
    hl.save_model(hnet, path, config={"family": case.name})

    torch.manual_seed(1)  # another model and hypernetwork initialisation: loading must restore everything
    hnet2 = make(case, "loop")
    args, kwargs = case.inputs(B)
    lam = torch.rand(B)
    with torch.no_grad():
        assert not torch.allclose(hnet2(*args, **kwargs, lam=0.3).logits, hnet(*args, **kwargs, lam=0.3).logits)
        assert hl.load_model(hnet2, path) == {"family": case.name}
        assert_same_output(hnet2(*args, **kwargs, lam=0.3), hnet(*args, **kwargs, lam=0.3))
        assert_same_output(hnet2(*args, **kwargs, lam=lam), hnet(*args, **kwargs, lam=lam))
    for name, t in hnet.generate(lam=0.6).items():
        torch.testing.assert_close(hnet2.generate(lam=0.6)[name], t, rtol=0, atol=0)


def test_per_sample_loss_of_a_sample_with_no_labelled_token_and_the_documented_average():
    # a sample whose labels are all -100 has no token to average over: its per-sample loss is NaN (0/0), as a
    # shared call on that sample alone is; docs/guides/per-sample.md gives the average that equals the batch loss
    hnet = hl.hypernetize(llama(), inputs={"lam": (0.0, 1.0)}, predict=["model.layers.0.mlp.*"], hidden=HIDDEN)
    (ids,), kw = causal_inputs(4)
    labels = kw["labels"].clone()
    labels[2] = -100
    out = hnet(ids, attention_mask=kw["attention_mask"], labels=labels, lam=torch.full((4,), 0.3))
    assert torch.isnan(out.loss[2]) and torch.isfinite(out.loss[[0, 1, 3]]).all()
    n = (labels[:, 1:] != -100).sum(1)  # labelled tokens per sample (causal models predict token t+1)
    batch_loss = (out.loss.nan_to_num() * n).sum() / n.sum()
    shared = hnet(ids, attention_mask=kw["attention_mask"], labels=labels, lam=0.3).loss
    torch.testing.assert_close(batch_loss, shared)
    torch.testing.assert_close(out.loss.nanmean(), out.loss[[0, 1, 3]].mean())


def _t5(attn):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, attn_implementation=attn,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5_per_sample_with_its_attention_bias_predicted():
    # block 0 holds relative_attention_bias, which becomes SDPA's mask: CPU SDPA cannot differentiate through it
    # under vmap (the table said T5 runs under vmap, and the hint spoke of control flow); eager runs
    ids, dec = torch.randint(1, 60, (3, 8)), torch.randint(1, 60, (3, 5))
    lam = torch.tensor([0.1, 0.5, 0.9])
    sdpa = hl.hypernetize(_t5("sdpa"), inputs={"lam": (0.0, 1.0)}, hidden=(8,), predict="decoder.block.0.*")
    with pytest.raises(hl.HyperloomError, match=re.escape("build the model with attn_implementation='eager'")):
        sdpa(input_ids=ids, labels=dec, use_cache=False, lam=lam)
    eager = hl.hypernetize(_t5("eager"), inputs={"lam": (0.0, 1.0)}, hidden=(8,), predict="decoder.block.0.*")
    logits = eager(input_ids=ids, decoder_input_ids=dec, use_cache=False, lam=lam).logits
    for i in range(3):
        one = eager(input_ids=ids[i : i + 1], decoder_input_ids=dec[i : i + 1], use_cache=False, lam=float(lam[i])).logits
        torch.testing.assert_close(logits[i : i + 1], one, atol=1e-5, rtol=1e-5)
