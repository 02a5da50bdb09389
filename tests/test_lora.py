"""LoRA mode: exact start, factorised == materialised, per-sample == loop, PEFT export, round trip, errors.

Hugging Face models come from tiny configs built in code (nothing downloaded).
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import hyperloom as hl

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, L = 100, 8
HIDDEN = (16, 32)
BERT_TARGETS = ["*.attention.self.query", "*.attention.self.value"]
GPT2_TARGETS = ["*.attn.c_attn", "*.mlp.c_fc"]


def bert(dtype: torch.dtype = torch.float32) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


def gpt2(dtype: torch.dtype = torch.float32) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def ids_and_mask(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, VOCAB, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    for i in range(n):
        mask[i, L - (i % 4) :] = 0  # real padding, a different length per sample
    return ids, mask


def make(model: nn.Module, targets: Any, **kw: Any) -> hl.LoRAModel:
    lora_kw = {k: kw.pop(k) for k in ("rank", "alpha", "dropout", "shared_A", "bias", "freeze_base") if k in kw}
    lora = hl.LoRA(**{"rank": 4, "alpha": 8, **lora_kw})
    return hl.hypernetize(model, inputs={"lam": (0.0, 1.0)}, predict=targets, hidden=HIDDEN, lora=lora, **kw).eval()


def perturb(hnet: hl.LoRAModel, scale: float = 0.2) -> None:
    """Move every trainable adapter parameter off its initial value (B != 0), as training would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in hnet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


FAMILIES = [
    pytest.param(bert, BERT_TARGETS, id="bert"),
    pytest.param(gpt2, GPT2_TARGETS, id="gpt2-conv1d"),
]


# ------------------------------------------------------------------------------------------------
# exact start
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "targets"), FAMILIES)
@pytest.mark.parametrize("formulation", ["mip", "default"])
@pytest.mark.parametrize("variant", [{}, {"shared_A": True}, {"bias": True}])
def test_start_equals_pretrained_exactly(build, targets, formulation, variant):
    base = build()
    hnet = make(base, targets, formulation=formulation, **variant)
    ids, mask = ids_and_mask(4)
    ref = base(ids, attention_mask=mask).logits
    assert torch.equal(hnet(ids, attention_mask=mask, lam=0.3).logits, ref)
    assert torch.equal(hnet(ids, attention_mask=mask, lam=torch.rand(4)).logits, ref)
    # the factors are not trivial: A is random, only B (and the bias) start at zero
    f = hnet.generate(lam=0.3)
    name = hnet.targets[0]
    assert f[name + ".lora_A"].abs().sum() > 0
    assert torch.equal(f[name + ".lora_B"], torch.zeros_like(f[name + ".lora_B"]))


def test_original_model_untouched_and_no_hooks_left():
    base = bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    hnet = make(base, BERT_TARGETS)
    perturb(hnet)
    ids, mask = ids_and_mask(3)
    hnet(ids, attention_mask=mask, lam=0.5).logits.sum().backward()
    with pytest.raises(hl.HyperloomError):
        hnet(ids[:2], attention_mask=mask[:2], lam=torch.rand(3))  # fails inside a hook
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())  # the user's model is not frozen; its copy is
    for m in [*base.modules(), *hnet.primary.modules()]:
        assert not m._forward_hooks and not m._forward_pre_hooks


# ------------------------------------------------------------------------------------------------
# factorised == materialised, per-sample == loop
# ------------------------------------------------------------------------------------------------


def materialised(hnet: hl.LoRAModel, args, kwargs, lam: float) -> Any:
    """Reference: W0 + (alpha/r) B A formed densely and run with functional_call."""
    params = dict(hnet.primary.named_parameters())
    merged = {k: params[k] + d if k in params else d for k, d in hnet.delta(lam=lam).items()}
    return functional_call(hnet.primary, merged, args, kwargs)


@pytest.mark.parametrize(("build", "targets"), FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", [{}, {"shared_A": True}, {"bias": True}])
def test_factorised_equals_materialised(build, targets, dtype, variant):
    hnet = make(build(dtype), targets, **variant)
    perturb(hnet)
    ids, mask = ids_and_mask(4)
    got = hnet(ids, attention_mask=mask, lam=0.7).logits
    ref = materialised(hnet, (ids,), {"attention_mask": mask}, 0.7).logits
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert (got - logits(hnet.primary(ids, attention_mask=mask))).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, ref, **tol)
    plain = hnet.materialize(lam=0.7)
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, ref, **tol)


@pytest.mark.parametrize(("build", "targets"), FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", [{}, {"shared_A": True, "bias": True}])
def test_per_sample_equals_loop_of_shared_calls(build, targets, dtype, variant):
    hnet = make(build(dtype), targets, **variant)
    perturb(hnet)
    n = 5
    ids, mask = ids_and_mask(n)
    lam = torch.rand(n, dtype=dtype)
    out = hnet(ids, attention_mask=mask, lam=lam)
    assert isinstance(out, transformers.utils.ModelOutput)
    ref = torch.cat([hnet(ids[i : i + 1], attention_mask=mask[i : i + 1], lam=float(lam[i])).logits for i in range(n)])
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out.logits, ref, **tol)
    # the per-sample update is the materialised one of each sample
    delta = hnet.delta(lam=lam)
    for i in (0, n - 1):
        one = hnet.delta(lam=float(lam[i]))
        for k in delta:
            torch.testing.assert_close(delta[k][i], one[k], **tol)


def test_per_sample_with_batch_dim_one_and_plain_linear():
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    hnet = hl.hypernetize(net, inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, targets=nn.Linear), hidden=HIDDEN, batch_dim=1)
    perturb(hnet)
    x = torch.randn(7, 4, 6)  # (seq, batch, features): the samples lie along dim 1
    lam = torch.rand(4)
    out = hnet(x, lam=lam)
    ref = torch.cat([hnet(x[:, i : i + 1], lam=float(lam[i])) for i in range(4)], dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training_and_on_the_adapter_input():
    net = nn.Linear(16, 8)
    hnet = hl.hypernetize(net, inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, dropout=0.5, targets="weight"), hidden=HIDDEN)
    perturb(hnet)
    x = torch.randn(32, 16)
    hnet.eval()
    ev = hnet(x, lam=0.5)
    torch.testing.assert_close(ev, hnet.materialize(lam=0.5)(x))
    hnet.train()
    torch.manual_seed(3)
    tr = hnet(x, lam=0.5)
    assert not torch.allclose(tr, ev)
    # reference: the base layer sees x, the adapter sees dropout(x) with the same random stream
    f = hnet.generate(lam=0.5)
    torch.manual_seed(3)
    xd = nn.functional.dropout(x, 0.5, training=True)
    ref = net(x) + xd @ f["lora_A"].T @ f["lora_B"].T * hnet.scaling
    torch.testing.assert_close(tr, ref)


@pytest.mark.parametrize("formulation", ["mip", "default"])
def test_gradients_reach_the_hypernetwork_not_the_base(formulation):
    hnet = make(bert(), BERT_TARGETS, formulation=formulation)
    ids, mask = ids_and_mask(4)
    hnet(ids, attention_mask=mask, lam=torch.rand(4)).logits.square().sum().backward()
    assert all(p.grad is None for p in hnet.primary.parameters())
    assert hnet.hypernet.head.linear.weight.grad.abs().sum() > 0  # B = 0 at start, but its rows get a gradient
    assert (hnet.theta0 is not None) == (formulation == "mip")


def test_keyword_only_tensor_arguments_and_labels():
    hnet = make(bert(), BERT_TARGETS)
    perturb(hnet)
    ids, mask = ids_and_mask(4)
    labels = torch.tensor([0, 1, 2, 0])
    out = hnet(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels, lam=torch.rand(4))
    assert out.loss.dim() == 0 and out.logits.shape == (4, 3)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_error_target_not_linear():
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA target 'bert.embeddings.LayerNorm' is a LayerNorm")):
        make(bert(), "bert.embeddings.LayerNorm")


def test_error_multihead_attention_projection_is_never_called():
    enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    msg = "LoRA target 'self_attn.out_proj' belongs to an nn.MultiheadAttention, which uses its weights directly"
    with pytest.raises(hl.HyperloomError, match=re.escape(msg)):
        hl.hypernetize(enc, inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, targets=nn.Linear))
    hnet = hl.hypernetize(enc, inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, targets=["linear1", "linear2"]), hidden=HIDDEN).eval()
    perturb(hnet)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(hnet(x, lam=0.4), hnet.materialize(lam=0.4)(x), rtol=1e-5, atol=1e-6)


def test_error_rank_too_large():
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA target '0': rank 4 must be < min(in, out) = min(4, 16) = 4")):
        hl.hypernetize(nn.Sequential(nn.Linear(4, 16)), inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=4, targets=nn.Linear))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "LoRA rank must be an integer >= 1, got 0"),
        ({"rank": 2.0}, "LoRA rank must be an integer >= 1, got 2.0"),
        ({"alpha": 0}, "LoRA alpha must be a finite number > 0, got 0"),
        ({"dropout": 1.0}, "LoRA dropout must be in [0, 1), got 1.0"),
        ({"bias": 1}, "LoRA bias must be True or False, got 1"),
    ],
)
def test_error_bad_options(kwargs, message):
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        hl.LoRA(**kwargs)


def test_error_targets_twice_or_missing_and_options_that_do_not_apply():
    net = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA targets given twice")):
        hl.hypernetize(net, inputs={"lam": (0, 1)}, predict=nn.Linear, lora=hl.LoRA(rank=2, targets=nn.Linear))
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA needs its target projections")):
        hl.hypernetize(net, inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2))
    with pytest.raises(hl.HyperloomError, match=re.escape("['per_sample', 'in_dims'] do not apply in LoRA mode")):
        hl.hypernetize(net, inputs={"lam": (0, 1)}, predict=nn.Linear, per_sample="loop", in_dims={0: 0}, lora=hl.LoRA(rank=2))
    with pytest.raises(hl.HyperloomError, match=re.escape("zero_init=True without an additive output generates A = 0")):
        hl.hypernetize(net, inputs={"lam": (0, 1)}, predict=nn.Linear, formulation="default", zero_init=True, lora=hl.LoRA(rank=2))


def test_error_per_sample_batch_mismatch_and_unknown_keyword():
    hnet = make(bert(), BERT_TARGETS)
    ids, mask = ids_and_mask(4)
    msg = (
        "LoRA target 'bert.encoder.layer.0.attention.self.query': per-sample mode needs its input to carry the 3 samples along dimension 0"
    )
    with pytest.raises(hl.HyperloomError, match=re.escape(msg)):
        hnet(ids, attention_mask=mask, lam=torch.rand(3))
    small = hl.hypernetize(nn.Linear(8, 8), inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, targets=nn.Linear))
    with pytest.raises(hl.HyperloomError, match=re.escape("Unknown keyword argument(s) ['lamda']: neither declared inputs ['lam']")):
        small(torch.randn(2, 8), lam=0.5, lamda=0.5)


def test_error_mixed_dtypes():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double())
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA targets must share one dtype and device, got torch.float32 on cpu: ['0']")):
        hl.hypernetize(net, inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, targets=nn.Linear))


# ------------------------------------------------------------------------------------------------
# PEFT export and the hypernetwork's own round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations triggered inside peft
@pytest.mark.filterwarnings("ignore:.*invalid shape.*")  # peft's ZeRO-3 heuristic flags lora_B.bias (1-D) on load
@pytest.mark.parametrize(("build", "targets"), FAMILIES)
@pytest.mark.parametrize("variant", [{}, {"bias": True, "shared_A": True}])
def test_to_peft_round_trip(tmp_path, build, targets, variant):
    peft = pytest.importorskip("peft")
    base = build()
    hnet = make(base, targets, **variant)
    perturb(hnet)
    hnet.to_peft(tmp_path / "adapter", lam=0.25)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (build is gpt2)
    peft_model = peft.PeftModel.from_pretrained(build_like(base), tmp_path / "adapter").eval()
    ids, mask = ids_and_mask(3)
    got = peft_model(input_ids=ids, attention_mask=mask).logits
    want = hnet(ids, attention_mask=mask, lam=0.25).logits
    assert (want - base(ids, attention_mask=mask).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def build_like(base: nn.Module) -> nn.Module:
    """A fresh model with the same (pretrained) weights: what a user loads from disk."""
    fresh = type(base)(base.config).eval()
    fresh.load_state_dict(base.state_dict())
    return fresh


def test_to_peft_errors(tmp_path):
    hnet = make(bert(), BERT_TARGETS)
    with pytest.raises(hl.HyperloomError, match=re.escape("to_peft() needs one value per input (shared conditioning)")):
        hnet.to_peft(tmp_path, lam=torch.rand(2))
    hnet.primary.classifier.requires_grad_(True)
    with pytest.raises(
        hl.HyperloomError, match=re.escape("to_peft: base parameters ['classifier.weight', 'classifier.bias'] are trainable")
    ):
        hnet.to_peft(tmp_path, lam=0.5)


@pytest.mark.parametrize("variant", [{"formulation": "mip", "shared_A": True}, {"formulation": "default", "bias": True}])
def test_save_pretrained_round_trip(tmp_path, variant):
    base = gpt2()
    hnet = make(base, GPT2_TARGETS, **variant)
    perturb(hnet)
    hnet.save_pretrained(tmp_path / "hl")
    saved = hl.load_safetensors(tmp_path / "hl" / hl.lora.WEIGHTS_NAME)[0]
    assert not any(k.startswith("primary.") for k in saved)  # the frozen base is not stored
    again = hl.LoRAModel.from_pretrained(tmp_path / "hl", base).eval()
    ids, mask = ids_and_mask(3)
    lam = torch.rand(3)
    assert torch.equal(again(ids, attention_mask=mask, lam=lam).logits, hnet(ids, attention_mask=mask, lam=lam).logits)
    assert again.lora == hnet.lora and again.targets == hnet.targets


def test_save_pretrained_with_trained_base_and_bad_directory(tmp_path):
    base = bert()
    hnet = make(base, BERT_TARGETS)
    hnet.primary.classifier.requires_grad_(True)
    perturb(hnet)  # moves the classifier too
    hnet.save_pretrained(tmp_path / "hl")
    again = hl.LoRAModel.from_pretrained(tmp_path / "hl", base).eval()
    ids, mask = ids_and_mask(2)
    assert torch.equal(again(ids, attention_mask=mask, lam=0.5).logits, hnet(ids, attention_mask=mask, lam=0.5).logits)
    with pytest.raises(hl.HyperloomError, match=re.escape("not a hyperloom LoRA directory")):
        hl.LoRAModel.from_pretrained(tmp_path / "missing", base)


# ------------------------------------------------------------------------------------------------
# a GPT-2-style decoder conditioned on a scalar (synthetic task)
# ------------------------------------------------------------------------------------------------


def test_gpt2_decoder_learns_a_scalar_conditioned_task():
    """Synthetic language: each next token is the previous one plus a shift k in {1, 2, 3} (mod V).

    The conditioning input is the shift, given per sample. The pretrained decoder is random (no real
    pretraining is possible offline for text); LoRA on its attention and MLP input projections has to
    make next-token prediction depend on k. A model that ignored k could at best reach 1/3 accuracy.
    """
    torch.manual_seed(0)
    v = 12
    cfg = transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.lm_head.weight = nn.Parameter(base.lm_head.weight.detach().clone())  # untie, so the head can train with the adapters
    hnet = hl.hypernetize(base, inputs={"k": (1.0, 3.0)}, hidden=(32, 64), lora=hl.LoRA(rank=4, alpha=8, targets=GPT2_TARGETS))
    hnet.primary.lm_head.requires_grad_(True)
    opt = torch.optim.Adam([p for p in hnet.parameters() if p.requires_grad], lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(1, 4, (n,))
        start = torch.randint(0, v, (n, 1))
        seq = (start + k[:, None] * torch.arange(10)) % v
        return seq, k.float()

    def accuracy(seq: torch.Tensor, k: torch.Tensor) -> float:
        with torch.no_grad():
            pred = hnet(seq, k=k).logits[:, 0].argmax(-1)  # the first step: only the conditioning tells the shift
        return float((pred == seq[:, 1]).float().mean())

    seq_t, k_t = batch(96)
    hnet.train()
    for _ in range(150):
        seq, k = batch(32)
        loss = hnet(seq, labels=seq, k=k).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hnet.eval()
    acc = accuracy(seq_t, k_t)
    assert acc > 0.9, acc
    # the conditioning matters: the wrong shift gives wrong predictions
    assert accuracy(seq_t, 1 + (k_t % 3)) < 0.5


# -- regressions found by review ------------------------------------------------------------------------------


def test_root_module_target_round_trips_and_is_refused_by_to_peft(tmp_path):
    torch.manual_seed(0)
    h = hl.hypernetize(nn.Linear(6, 5), inputs={"lam": (0.0, 1.0)}, lora=hl.LoRA(rank=2, targets=nn.Linear), hidden=(8,))
    with torch.no_grad():
        for p in h.hypernet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h.save_pretrained(tmp_path / "h")
    again = hl.LoRAModel.from_pretrained(tmp_path / "h", nn.Linear(6, 5))
    assert torch.equal(again.delta(lam=0.3)["weight"], h.delta(lam=0.3)["weight"])  # the bases differ: compare the updates
    with pytest.raises(hl.HyperloomError, match=re.escape("to_peft: the root module itself is a LoRA target")):
        h.to_peft(tmp_path / "p", lam=0.5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_to_peft_adapts_only_the_exported_modules(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)))

    h = hl.hypernetize(build(), inputs={"lam": (0.0, 1.0)}, lora=hl.LoRA(rank=2, targets=["0.weight"]), hidden=(8,))
    with torch.no_grad():
        for p in h.hypernet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h.to_peft(tmp_path / "p", lam=0.5)
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "p").eval()
    adapted = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == 1 and ".0.lora_A" in adapted[0]
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(pm(x), h(x, lam=0.5), atol=1e-6)


def test_duplicate_or_unknown_targets_are_refused():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA targets ['0'] are given more than once")):
        hl.LoRAModel(net, hl.LoRA(rank=2), inputs={"lam": (0.0, 1.0)}, targets=["0", "0"], hidden=(8,))
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA target '7' is not a submodule of Sequential")):
        hl.LoRAModel(net, hl.LoRA(rank=2), inputs={"lam": (0.0, 1.0)}, targets=["7"], hidden=(8,))


# ------------------------------------------------------------------------------------------------
# LoRA directories: one atomic writer, a failure leaves the old adapter loadable, CheckpointError
# ------------------------------------------------------------------------------------------------


def small_lora(seed: int = 0, inputs: Any = None, **kw: Any) -> hl.LoRAModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lora = hl.LoRA(**{"rank": 2, "alpha": 4.0, "targets": nn.Linear, **kw})
    return hl.hypernetize(net, inputs=inputs or {"lam": (0.0, 1.0)}, lora=lora, hidden=(8,)).eval()


def _fail_at(monkeypatch: Any, name: str, k: int) -> list[int]:
    import errno
    import os

    real, calls = getattr(os, name), [0]

    def fn(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == k:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fn)
    return calls


@pytest.mark.parametrize("what", ["fsync", "replace"])
def test_a_full_disk_mid_save_leaves_the_old_adapter_loadable(tmp_path, monkeypatch, what):
    old = small_lora()
    perturb(old)
    old.save_pretrained(tmp_path / "hl")
    old.to_peft(tmp_path / "peft", lam=0.5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()}
    new = small_lora()
    perturb(new, scale=0.5)
    x = torch.randn(3, 8)
    base = small_lora().primary  # the pretrained model (every small_lora() starts from the same one)
    for k in (1, 2):  # the weights' write, then the config's
        _fail_at(monkeypatch, what, k)
        with pytest.raises(hl.CheckpointError, match=re.escape("cannot write checkpoint (No space left on device")):
            new.save_pretrained(tmp_path / "hl")
        monkeypatch.undo()
        _fail_at(monkeypatch, what, k)
        with pytest.raises(hl.CheckpointError, match=re.escape("cannot write checkpoint (No space left on device")):
            new.to_peft(tmp_path / "peft", lam=0.5)
        monkeypatch.undo()
        again = hl.LoRAModel.from_pretrained(tmp_path / "hl", base).eval()
        assert torch.equal(again(x, lam=0.3), old(x, lam=0.3)), (what, k)
        assert {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()} == before
        assert sorted(p.name for p in (tmp_path / "hl").iterdir()) == [hl.lora.CONFIG_NAME, hl.lora.WEIGHTS_NAME]


def test_bad_directories_are_checkpoint_errors_naming_the_path(tmp_path):
    hnet = small_lora()
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(hl.CheckpointError, match=re.escape(f"{path / hl.lora.WEIGHTS_NAME}: cannot write checkpoint")):
            hnet.save_pretrained(path)
        with pytest.raises(hl.CheckpointError, match=re.escape(f"{path / 'adapter_model.safetensors'}: cannot write checkpoint")):
            hnet.to_peft(path, lam=0.5)
    assert (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------------------------------------------
# from_pretrained trusts only the checksummed config, and validates every field
# ------------------------------------------------------------------------------------------------


def _edit_json(directory: Any, edit: Any) -> None:
    path = directory / hl.lora.CONFIG_NAME
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_an_edited_json_config_is_refused_by_field(tmp_path):
    hnet = small_lora(alpha=16.0)
    perturb(hnet)
    hnet.save_pretrained(tmp_path / "hl")
    _edit_json(tmp_path / "hl", lambda c: c["lora"].update(alpha=36.0))  # loaded silently before, outputs off by 74.6
    msg = "lora.alpha is 36.0, but the checksummed copy in hyperloom_lora.safetensors says 16.0"
    with pytest.raises(hl.CheckpointError, match=re.escape(msg)):
        hl.LoRAModel.from_pretrained(tmp_path / "hl", small_lora().primary)
    _edit_json(tmp_path / "hl", lambda c: c["hypernetwork"].update(activation="tanh", hidden=[8]))
    with pytest.raises(hl.CheckpointError, match=re.escape("lora.alpha is 36.0")):
        hl.LoRAModel.from_pretrained(tmp_path / "hl", small_lora().primary)
    _edit_json(tmp_path / "hl", lambda c: c["lora"].update(alpha=16.0))
    with pytest.raises(hl.CheckpointError, match=re.escape("hypernetwork.activation is 'tanh', but the checksummed copy")):
        hl.LoRAModel.from_pretrained(tmp_path / "hl", small_lora().primary)


def _save_with_config(directory: Any, hnet: hl.LoRAModel, cfg: dict[str, Any]) -> None:
    """A directory whose JSON and checksummed copy both hold ``cfg`` (a consistently written, malformed config)."""
    directory.mkdir(exist_ok=True)
    hl.save_model(hnet._adapter_state(), directory / hl.lora.WEIGHTS_NAME, config=cfg)
    (directory / hl.lora.CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(inputs=None), "inputs must be a JSON object, got None"),
        (lambda c: c.update(hypernetwork="x"), "hypernetwork must be a JSON object, got 'x'"),
        (lambda c: c["hypernetwork"].update(hidden=["x"]), "hypernetwork.hidden[0] must be an integer, got 'x'"),
        (lambda c: c["hypernetwork"].update(activation=[]), "hypernetwork.activation must be one of"),
        (lambda c: c["inputs"]["lam"].update(dim=10**30), "inputs.lam.dim must be in [1, 65536]"),
        (lambda c: c["hypernetwork"].update(hidden=[60000, 60000]), "hypernetwork.hidden: a layer of 60000 x 60000 weights"),
        (lambda c: c["lora"].update(rank=2.5), "lora.rank must be an integer, got 2.5"),
        (lambda c: c["lora"].update(alpha=-1), "lora: LoRA alpha must be a finite number > 0, got -1"),
        (lambda c: c["lora"].pop("targets"), "lora: missing field(s) ['targets']"),
        (lambda c: c["lora"].update(targets=["nope"]), "does not fit the Sequential given: LoRA target 'nope' is not a submodule"),
        (lambda c: c.update(batch_dim=True), "batch_dim must be an integer, got True"),
        (lambda c: c["inputs"]["lam"].update(low=2.0), "inputs.lam: Input range must satisfy low < high"),
        (lambda c: c["hypernetwork"].update(extra=1), "hypernetwork: unknown field(s) ['extra']"),
    ],
)
def test_malformed_config_fields_are_refused_by_name(tmp_path, edit, field):
    hnet = small_lora()
    cfg = hnet.config()
    edit(cfg)
    _save_with_config(tmp_path / "hl", hnet, cfg)
    with pytest.raises(hl.CheckpointError, match=re.escape(field)):
        hl.LoRAModel.from_pretrained(tmp_path / "hl", small_lora().primary)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def test_fuzz_every_outcome_is_a_load_or_a_checkpoint_error(tmp_path):
    """Mutations of a valid config (deletions, type swaps, huge and negative numbers, nulls), written both
    consistently (JSON and checksummed copy) and to the JSON alone: a successful load or a CheckpointError."""
    import copy
    import random

    hnet = small_lora(inputs={"lam": (0.0, 1.0), "task": hl.Task(1, dim=4, max_tasks=3)}, shared_A=True)
    hnet.add_task()
    base = small_lora().primary
    valid = hnet.config()
    values = [None, "x", [], {}, ["x"], -1, 0, 1, 2.5, 10**30, -(10**30), True, 1e308, [10**9], {"a": 1}]
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    mutations = []
    for path in _paths(valid):
        mutations.append((path, "delete"))
        mutations += [(path, v) for v in rng.sample(values, 6)]
    for i, (path, value) in enumerate(mutations):
        cfg = copy.deepcopy(valid)
        parent = cfg
        for k in path[:-1]:
            parent = parent[k]
        if value == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        d = tmp_path / f"m{i}"
        if i % 4 == 3:  # the JSON alone is edited: always refused by the checksummed copy
            hnet.save_pretrained(d)
            (d / hl.lora.CONFIG_NAME).write_text(json.dumps(cfg))
        else:
            _save_with_config(d, hnet, cfg)
        try:
            hl.LoRAModel.from_pretrained(d, base)
            outcomes["loaded"] += 1
        except hl.CheckpointError:
            outcomes["refused"] += 1
        # any other exception type fails the test, naming the mutation
    assert outcomes["refused"] > 0.8 * len(mutations) and len(mutations) > 150, outcomes


# ------------------------------------------------------------------------------------------------
# activation checkpointing done by the model itself: gradients equal those without it
# ------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.q(x)) * self.v(x)


class _CheckpointedNet(nn.Module):
    """A model that checkpoints its own blocks (``mode``: None, "reentrant", "non-reentrant")."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 2)
        self.mode: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.mode == "reentrant") if self.mode and torch.is_grad_enabled() else b(x)
        return self.head(x)


def _grads(hnet: nn.Module, loss_fn: Any) -> dict[str, torch.Tensor]:
    hnet.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {k: p.grad.clone() for k, p in hnet.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=k)
    assert any(bool(g.abs().sum() > 0) for k, g in a.items() if k.startswith("hypernet."))


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("variant", [{}, {"shared_A": True, "bias": True, "freeze_base": False}], ids=["plain", "sharedA-bias-base"])
def test_checkpointing_inside_a_custom_model_gives_the_same_gradients(mode, variant):
    torch.manual_seed(0)
    net = _CheckpointedNet().double()
    lora = hl.LoRA(**{"rank": 2, "alpha": 4.0, "targets": ["*.q", "*.v"], **variant})
    hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, lora=lora, hidden=(8,))
    perturb(hnet)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)  # reentrant checkpointing needs inputs that require grad
    for lam in (0.3, torch.rand(5, dtype=torch.float64)):  # shared and per sample
        hnet.primary.mode = None
        ref = _grads(hnet, lambda lam=lam: hnet(x, lam=lam).pow(2).sum())
        hnet.primary.mode = mode
        got = _grads(hnet, lambda lam=lam: hnet(x, lam=lam).pow(2).sum())
        _assert_same_grads(got, ref)
    # two calls with different conditioning in one backward: each recomputation uses its own call's adapters
    hnet.primary.mode = None
    ref = _grads(hnet, lambda: hnet(x, lam=0.2).sum() + hnet(x, lam=0.9).pow(2).sum())
    hnet.primary.mode = mode
    got = _grads(hnet, lambda: hnet(x, lam=0.2).sum() + hnet(x, lam=0.9).pow(2).sum())
    _assert_same_grads(got, ref)
    for m in hnet.primary.modules():  # the graphs are gone: so are the hooks
        assert not m._forward_hooks


def _gpt2_train() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg).double().train()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_hugging_face_gradient_checkpointing_gives_the_same_gradients(reentrant):
    torch.manual_seed(0)
    hnet = hl.hypernetize(_gpt2_train(), inputs={"t": (0.0, 1.0)}, predict=GPT2_TARGETS, lora=hl.LoRA(rank=4, alpha=8), hidden=(8,))
    hnet.train()
    perturb(hnet)
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    for t in (0.5, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)):
        base = hnet.primary
        # gradient_checkpointing_enable() is a deprecated alias of activation_checkpointing_enable() in transformers 5
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
        ref = _grads(hnet, lambda t=t: hnet(ids, labels=ids, t=t).loss)
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:  # pragma: no cover - transformers 4
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert any(getattr(m, "gradient_checkpointing", False) for m in hnet.primary.modules())
        got = _grads(hnet, lambda t=t: hnet(ids, labels=ids, t=t).loss)
        _assert_same_grads(got, ref)
    with torch.no_grad():
        assert hnet(ids, t=0.5).logits.shape == (3, 6, VOCAB)


def test_saving_copying_and_merging_while_a_graph_is_alive():
    """The hooks that live with a call's graph never leak into copies, pickles or merged models."""
    import copy
    import io

    hnet = small_lora()
    perturb(hnet)
    x = torch.randn(3, 8)
    loss = hnet(x, lam=0.5).sum()  # its graph (and the call's hooks) alive while the model is saved
    buf = io.BytesIO()
    torch.save(hnet, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(hnet)
    plain = hnet.materialize(lam=0.5)
    assert all(not m._forward_hooks for m in plain.modules())
    for other in (loaded, twin):
        assert torch.equal(other(x, lam=0.5), hnet(x, lam=0.5))
        assert torch.equal(other.primary(x), hnet.primary(x))  # the base model, called directly
        assert all(not m._forward_hooks for m in other.primary.modules())  # inert copies removed themselves
    loss.backward()
    del loss
    assert all(not m._forward_hooks for m in hnet.primary.modules())


def test_gradients_to_the_conditioning_through_checkpointed_layers():
    """Non-reentrant: equal to the run without checkpointing; reentrant cannot carry them: refused in the forward."""
    torch.manual_seed(0)
    lora = hl.LoRA(rank=2, targets=["*.q", "*.v"])
    hnet = hl.hypernetize(_CheckpointedNet().double(), inputs={"lam": (0.0, 1.0)}, lora=lora, hidden=(8,))
    perturb(hnet)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode in (None, "non-reentrant"):
        hnet.primary.mode = mode
        lam = torch.full((4,), 0.4, dtype=torch.float64, requires_grad=True)
        hnet(x, lam=lam).pow(2).sum().backward()
        grads[mode] = lam.grad
    torch.testing.assert_close(grads["non-reentrant"], grads[None], rtol=1e-10, atol=0)
    hnet.primary.mode = "reentrant"
    lam = torch.full((4,), 0.4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(hl.HyperloomError, match=re.escape("LoRA target 'blocks.0.q' ran under torch.no_grad() inside a call")):
        hnet(x, lam=lam)
    assert all(not m._forward_hooks for m in hnet.primary.modules())


def test_reentrant_checkpointing_with_a_trainable_data_encoder_names_the_encoder_not_the_values():
    # the data itself did not require grad, but the message said "the conditioning values require grad"
    enc = nn.Linear(6, 4).double()
    hnet = hl.hypernetize(_CheckpointedNet().double(), inputs={"ctx": hl.Data(enc, per="set")}, lora=hl.LoRA(rank=2, targets=["*.q"]))
    hnet.primary.mode = "reentrant"
    x, ctx = torch.randn(4, 8, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(hl.HyperloomError, match=re.escape("the codes of Data input(s) ['ctx'] require grad (their encoder")):
        hnet(x, ctx=ctx)
    enc.requires_grad_(False)  # the way out it names: a frozen encoder
    hnet(x, ctx=ctx).sum().backward()
    assert hnet.hypernet.trunk is not None and any(p.grad is not None for p in hnet.hypernet.parameters())


def test_a_task_conditioned_adapter_round_trips_with_its_tasks(tmp_path):
    """The continual recipe's model in LoRA mode saves and loads with its Task input and the tasks added since."""
    hnet = small_lora(inputs={"task": hl.Task(1, dim=4, max_tasks=4), "lam": (0.0, 1.0)}, shared_A=True)
    assert hnet.add_task(n=2) == range(1, 3)
    perturb(hnet)
    hnet.save_pretrained(tmp_path / "hl")
    again = hl.LoRAModel.from_pretrained(tmp_path / "hl", small_lora().primary).eval()
    assert again.inputs["task"] == hnet.inputs["task"] and again.inputs["task"].num_tasks == 3
    x = torch.randn(3, 8)
    ids = torch.tensor([2, 0, 1])
    assert torch.equal(again(x, task=ids, lam=0.5), hnet(x, task=ids, lam=0.5))
    assert again.add_task() == range(3, 4)
    cfg = hnet.config()
    cfg["inputs"]["task"]["max_tasks"] = 2
    _save_with_config(tmp_path / "bad", hnet, cfg)
    with pytest.raises(hl.CheckpointError, match=re.escape("inputs.task.max_tasks must be in [3, 16777216], got 2")):
        hl.LoRAModel.from_pretrained(tmp_path / "bad", small_lora().primary)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointing_with_a_batchnorm_hypernetwork(mode):
    """A reentrant recomputation regenerates the factors: BatchNorm's running statistics (saved by the call's own
    graph) must not be touched (it crashed: 'modified by an inplace operation'), nor updated twice."""
    torch.manual_seed(0)
    lora = hl.LoRA(rank=2, targets=["*.q", "*.v"])
    hnet = hl.hypernetize(_CheckpointedNet().double(), inputs={"lam": (0.0, 1.0)}, lora=lora, hidden=(8,), norm="batchnorm")
    perturb(hnet)
    hnet.train()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(4, dtype=torch.float64)
    start = {k: v.clone() for k, v in hnet.state_dict().items()}
    runs = []
    for m in (None, mode):
        hnet.load_state_dict(start)
        hnet.primary.mode = m
        grads = _grads(hnet, lambda: hnet(x, lam=lam).pow(2).sum())
        runs.append((grads, {k: b.clone() for k, b in hnet.hypernet.named_buffers()}))
    (ref, ref_buf), (got, got_buf) = runs
    scale = max(float(g.abs().max()) for g in ref.values())
    for k in ref:  # the trunk bias before BatchNorm has a zero gradient up to rounding: compare on the common scale
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-13 * scale, msg=k)
    assert all(torch.equal(got_buf[k], ref_buf[k]) for k in ref_buf)  # running statistics updated once


def test_materialize_and_to_peft_run_a_data_encoder_once(tmp_path):
    """A hl.Data conditioning is encoded once per materialize() / to_peft() call (it ran twice: the per-sample
    check and the generation each ran the encoder, doubling the cost of a large set encoder)."""
    calls = []
    enc = nn.Linear(3, 4)
    enc.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(0)
    lora = hl.LoRA(rank=2, targets=nn.Linear)
    hnet = hl.hypernetize(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)), inputs={"s": hl.Data(enc, per="set")}, lora=lora)
    support = torch.randn(7, 3)
    plain = hnet.materialize(s=support)
    assert len(calls) == 1
    x = torch.randn(3, 5)
    torch.testing.assert_close(plain(x), hnet(x, s=support))
    calls.clear()
    hnet.to_peft(tmp_path / "adapter", s=support)
    assert len(calls) == 1
    with pytest.raises(hl.HyperloomError, match=re.escape("materialize() needs one value per input")):
        hl.hypernetize(nn.Linear(5, 4), inputs={"s": hl.Data(nn.Linear(3, 4), per="sample")}, lora=lora).materialize(s=support)


def test_model_and_training_checkpoints_check_the_lora_options(tmp_path):
    # alpha and dropout were recorded nowhere that load_model/load_training compared: a model built with another
    # alpha loaded silently and answered differently
    def build(**kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        return hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, hidden=(8,), lora=hl.LoRA(**{"rank": 2, "targets": nn.Linear, **kw}))

    a = build(alpha=4.0)
    hl.save_model(a, tmp_path / "m.safetensors")
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    hl.save_training(tmp_path / "t.safetensors", model=a, optimizer=opt, step=1)
    for kw, field in (
        ({"alpha": 8.0}, "lora.alpha: saved 4.0, model 8.0"),
        ({"alpha": 4.0, "dropout": 0.5}, "lora.dropout: saved 0.0, model 0.5"),
    ):
        with pytest.raises(hl.CheckpointError, match=re.escape(f"hypernetwork 'hypernet' {field}")):
            hl.load_model(build(**kw), tmp_path / "m.safetensors")
        b = build(**kw)
        with pytest.raises(hl.CheckpointError, match=re.escape(field)):
            hl.load_training(
                tmp_path / "t.safetensors", model=b, optimizer=torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
            )
    hl.load_model(build(alpha=4.0, freeze_base=False), tmp_path / "m.safetensors")  # freeze_base changes no tensor


class _WeightUsedDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.inp(x)), self.out.weight, self.out.bias)  # self.out is never called


def test_a_target_whose_module_is_never_called_is_said_once():
    # its hook never ran: the forward ignored the conditioning there while materialize() applied the update
    hnet = hl.hypernetize(_WeightUsedDirectly(), inputs={"lam": (0.0, 1.0)}, hidden=(8,), lora=hl.LoRA(rank=2, targets=["inp", "out"]))
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match=re.escape("LoRA targets ['out'] were not called as modules in this forward")):
        hnet(x, lam=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hnet(x, lam=0.3)  # once per model
        called = hl.hypernetize(_WeightUsedDirectly(), inputs={"lam": (0.0, 1.0)}, hidden=(8,), lora=hl.LoRA(rank=2, targets=["inp"]))
        called(x, lam=0.3)  # every target called: nothing to say


class _SeqFirstInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H) outside, (L, B, H) at the target
        return self.head(self.proj(x.transpose(0, 1)).transpose(0, 1).mean(1))


def test_an_ambiguous_per_sample_input_layout_is_said_once_and_batch_dim_fixes_it():
    # L == B at a sequence-first target passed the shape check and mixed the samples silently
    torch.manual_seed(0)
    hnet = hl.hypernetize(_SeqFirstInside(), inputs={"lam": (0.0, 1.0)}, hidden=(8,), lora=hl.LoRA(rank=2, targets=["proj"]))
    perturb(hnet)
    x, lam = torch.randn(3, 3, 8), torch.tensor([0.1, 0.5, 0.9])
    with pytest.warns(
        UserWarning, match=re.escape("has 3 entries along dimension 0 (batch_dim, taken as the samples) and along dimension(s) [1]")
    ):
        hnet(x, lam=lam)
    fixed = hl.hypernetize(_SeqFirstInside(), inputs={"lam": (0.0, 1.0)}, hidden=(8,), lora=hl.LoRA(rank=2, targets=["proj"]), batch_dim=1)
    fixed.load_state_dict(hnet.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (3, 3, 8) stays ambiguous; with batch_dim=1 the answer is right
        out = fixed(x, lam=lam)
    ref = torch.cat([fixed(x[i : i + 1], lam=float(lam[i])) for i in range(3)])
    torch.testing.assert_close(out, ref)
