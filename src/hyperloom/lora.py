r"""Hypernetwork-generated LoRA adapters for pretrained models.

``hl.hypernetize(model, predict=..., inputs=..., lora=hl.LoRA(rank=8, alpha=16))`` keeps the
model's own (pretrained) weights ``W0`` as they are, frozen by default, and adds to each selected
projection a low-rank update generated from the conditioning ``gamma``:

    y = base(x) + (dropout(x) A(gamma)^T B(gamma)^T + b(gamma)) * alpha / r

with ``A: (r, in)``, ``B: (out, r)`` and an optional generated bias ``b: (out,)`` (``bias=True``),
so that ``Delta W = (alpha / r) B A`` has rank ``r``. ``B`` (and ``b``) start at exactly zero, so
the hypernetwork model starts **exactly** equal to the pretrained model. The formulation options
of :func:`~hyperloom.hypernetize` apply to the factors: MIP (default) generates
``A = A0 + Delta_A(E(gamma))`` and ``B = B0 + Delta_B(E(gamma))`` around learned, conditioning-independent
factors ``A0`` (initialised as PEFT does, Kaiming uniform) and ``B0 = 0``; ``formulation="default"``
generates ``A = h_A(gamma)``, ``B = h_B(gamma)`` from the raw input. ``shared_A=True`` learns one
``A`` per projection (no conditioning) and generates only ``B``.

Targets (``LoRA(targets=...)`` or, equivalently, ``predict=``): the same selectors as
:func:`~hyperloom.select_parameters` (module types, exact names, globs such as
``"*.attention.self.query"``, compiled regexes); every parameter they match is mapped to the module
that owns it, and each such module must be an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's
projection, whose weight is stored transposed, ``(in, out)``).

The adapter is never materialised: with shared conditioning (one value per input) it is two
matrix products around the base layer; with per-sample conditioning (``B`` values) the factors
carry a leading sample dimension and the products are batched (``bmm`` over the samples, the
sequence dimensions in between), so memory grows with ``B r (in + out)``, not ``B in out``, and
the model runs as **one** ordinary call (no ``vmap``, so Hugging Face attention masks need no
special form). The inputs of the target modules must carry the samples along ``batch_dim``
(dimension 0 for Hugging Face models); a size other than ``B`` there is refused, but a model that
goes sequence-first internally with a sequence length equal to ``B`` cannot be told apart by shape:
an input with ``B`` entries along another dimension too is warned about once per model (set
``batch_dim`` for such a model).

The target modules are intercepted with forward hooks that each call registers and that live as long
as the call's autograd graph (removed when it is freed, at once after a call without one): the wrapped
copy is an ordinary model between calls (no classes generated at run time, nothing left behind), and
activation (gradient) checkpointing works, reentrant or not, ``torch.utils.checkpoint`` in a custom
model or Hugging Face's ``gradient_checkpointing_enable()``: layers recomputed during ``backward()``
see the adapters of their own call, and the gradients equal those without checkpointing (see
:mod:`hyperloom._recompute`). With reentrant checkpointing the recomputed layers' inputs must require
grad (Hugging Face: ``model.enable_input_require_grads()``), as without a hypernetwork.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._recompute import Call, strip_hooks
from ._rewind import eval_mode
from .data_input import _per_sample_data_hint
from .encoding import Encoding
from .errors import HyperloomError
from .hypernetwork import HyperNetwork
from .inputs import Input, InputLike
from .model import HyperModel, _refuse_text_generation, split_conditioning
from .params import ParamStore
from .select import Selector, select_parameters
from .task import Task
from .types import ParamDict

#: The format tag of :meth:`LoRAModel.save_pretrained` directories.
LORA_FORMAT = "hyperloom.lora/1"
CONFIG_NAME = "hyperloom_lora.json"
WEIGHTS_NAME = "hyperloom_lora.safetensors"

_HYPER_KEYS = ("hidden", "activation", "norm", "formulation", "encoding", "additive", "init", "zero_init", "head", "rank")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (a linear layer with its weight stored ``(in, out)``).

    Checked by name and module so that the core does not import ``transformers``.

    Example:
        >>> is_conv1d(nn.Linear(2, 3))
        False
    """
    cls = type(module)
    return (
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def _features(name: str, module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, transposed)`` of a target module, or a :class:`HyperloomError`."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        w = module.weight
        assert isinstance(w, torch.Tensor)
        return int(w.shape[0]), int(w.shape[1]), True
    raise HyperloomError(
        f"LoRA target {name!r} is a {type(module).__name__}; LoRA adapts nn.Linear and Hugging Face Conv1D modules only "
        "(select the projections, e.g. '*.attention.self.query' or nn.Linear)"
    )


@dataclass(frozen=True)
class LoRA:
    """Options of hypernetwork-generated LoRA adapters (pass as ``hypernetize(..., lora=LoRA(...))``).

    Args:
        rank: The rank ``r`` of every update (``1 <= r < min(in, out)`` of each target).
        alpha: The LoRA scale numerator: updates are multiplied by ``alpha / rank``.
        dropout: Dropout probability on the adapter's input (training mode only), in ``[0, 1)``.
        shared_A: Learn one ``A`` per target (not conditioned) and generate only ``B``.
        bias: Also generate a bias ``b(gamma)`` per target (scaled like the update, as PEFT's ``lora_bias``).
        targets: Which projections: module types, names, globs or regexes (see
            :func:`~hyperloom.select_parameters`); ``None`` takes ``predict=`` of ``hypernetize``.
        freeze_base: Freeze every parameter of the wrapped copy of the model (the pretrained weights);
            unfreeze parts with ``hnet.primary.<module>.requires_grad_(True)``.

    Example:
        >>> import hyperloom as hl
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, lora=hl.LoRA(rank=2, alpha=4, targets=nn.Linear))
        >>> x = torch.randn(5, 8)
        >>> torch.equal(hnet(x, lam=0.3), net(x))  # B = 0 at the start: exactly the pretrained model
        True
        >>> hnet(x, lam=torch.rand(5)).shape  # one adapter per sample, never materialised
        torch.Size([5, 4])

    Raises:
        HyperloomError: On a rank that is not an integer ``>= 1``, a non-positive or non-finite
            ``alpha``, or a dropout outside ``[0, 1)``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    shared_A: bool = False
    bias: bool = False
    targets: Selector | Sequence[Selector] | None = None
    freeze_base: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise HyperloomError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise HyperloomError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise HyperloomError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        for flag in ("shared_A", "bias", "freeze_base"):
            if not isinstance(getattr(self, flag), bool):
                raise HyperloomError(f"LoRA {flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return float(self.alpha) / self.rank

    def build(
        self,
        model: nn.Module,
        *,
        inputs: Mapping[str, InputLike],
        predict: Selector | Sequence[Selector] | None = None,
        batch_dim: int = 0,
        **hyper: Any,
    ) -> LoRAModel:
        """Wrap ``model`` (what ``hypernetize(..., lora=self)`` calls).

        Raises:
            HyperloomError: If targets are given both here and as ``predict``, or neither, and see :class:`LoRAModel`.
        """
        if self.targets is not None and predict is not None:
            raise HyperloomError("LoRA targets given twice: as LoRA(targets=...) and as predict=...; give one of them")
        selectors = self.targets if self.targets is not None else predict
        if selectors is None:
            raise HyperloomError(
                "LoRA needs its target projections: LoRA(targets=...) or predict=... (e.g. ['*.attention.self.query', "
                "'*.attention.self.value'] or nn.Linear)"
            )
        return LoRAModel(model, self, inputs=inputs, targets=resolve_targets(model, selectors), batch_dim=batch_dim, **hyper)

    def to_json(self, targets: Sequence[str]) -> dict[str, Any]:
        """The options as JSON, with the resolved target module names."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "shared_A": self.shared_A,
            "bias": self.bias,
            "targets": list(targets),
            "freeze_base": self.freeze_base,
        }


def resolve_targets(model: nn.Module, selectors: Selector | Sequence[Selector]) -> list[str]:
    """Names of the modules that own the parameters ``selectors`` match (in model order); each must be Linear/Conv1D.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> resolve_targets(net, "*.weight")
        ['0', '2']

    Raises:
        HyperloomError: If a selector matches nothing, a matched module is not an ``nn.Linear`` or ``Conv1D``, or
            is the output projection of an ``nn.MultiheadAttention`` (whose ``forward`` is never called).
    """
    names = select_parameters(model, selectors)
    modules = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    for m in modules:
        _features(m, model.get_submodule(m))
        parent = m.rpartition(".")[0]
        if m and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            raise HyperloomError(
                f"LoRA target {m!r} belongs to an nn.MultiheadAttention, which uses its weights directly "
                "(F.multi_head_attention_forward), never calling the projection's forward: an adapter there would be "
                "silently skipped; predict the attention's weights instead (hypernetize without lora=)"
            )
    return modules


@dataclass(frozen=True)
class _Target:
    name: str
    in_features: int
    out_features: int
    transposed: bool


class LoRAModel(nn.Module):
    """A pretrained model with hypernetwork-generated LoRA adapters (built by ``hypernetize(..., lora=LoRA(...))``).

    Args:
        model: The pretrained model; it is deep-copied (the original is never modified) and the copy's
            parameters are frozen when ``lora.freeze_base``.
        lora: The adapter options.
        inputs: Named conditioning inputs with declared ranges.
        targets: Names of the ``nn.Linear`` / ``Conv1D`` modules to adapt.
        batch_dim: Sample dimension of the target modules' inputs in per-sample mode.
        **hyper: Options of the :class:`~hyperloom.HyperNetwork` (``hidden``, ``activation``, ``norm``,
            ``formulation``, ``encoding``, ``additive``, ``init``, ``zero_init``, ``head``, ``rank``).

    Attributes:
        primary: The copy of the model (base weights ``W0``).
        hypernet: The hypernetwork; its targets are ``"<module>.lora_A"`` ``(r, in)``, ``"<module>.lora_B"``
            ``(out, r)`` and ``"<module>.lora_bias"`` ``(out,)``.
        lora_A: With ``shared_A``: the learned ``A`` per module (a :class:`~hyperloom.ParamStore`), else ``None``.
        targets: The adapted module names.

    Shapes:
        ``forward(*args, **conditioning)``: as :class:`~hyperloom.HyperModel`: numbers give one adapter for
        the batch, ``(B,)`` / ``(B, k)`` tensors one adapter per sample; the inputs of every target module
        must then have ``B`` entries along ``batch_dim``.

    Raises:
        HyperloomError: If a target is not ``nn.Linear`` / ``Conv1D``, ``rank >= min(in, out)`` of a target,
            targets differ in dtype or device, an input name clashes with an argument of ``model.forward``,
            or ``zero_init`` would leave ``A = 0`` (no gradient) with a non-additive formulation.
    """

    def __init__(
        self,
        model: nn.Module,
        lora: LoRA,
        *,
        inputs: Mapping[str, InputLike],
        targets: Sequence[str],
        batch_dim: int = 0,
        **hyper: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(hyper) - set(_HYPER_KEYS))
        if unknown:
            raise HyperloomError(f"Unknown hypernetwork option(s) {unknown} in LoRA mode; valid options are {list(_HYPER_KEYS)}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise HyperloomError(f"batch_dim must be an int, got {batch_dim!r}")
        if not targets:
            raise HyperloomError("LoRA needs at least one target module")
        dup = sorted({t for t in targets if list(targets).count(t) > 1})
        if dup:
            raise HyperloomError(f"LoRA targets {dup} are given more than once; each module takes one adapter")
        for name in targets:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise HyperloomError(f"LoRA target {name!r} is not a submodule of {type(model).__name__}") from None
        self.lora = dataclasses.replace(lora, targets=tuple(targets))  # the resolved module names
        self.batch_dim = int(batch_dim)
        infos: list[_Target] = []
        kinds: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name in targets:
            module = model.get_submodule(name)
            n_in, n_out, transposed = _features(name, module)
            if lora.rank >= min(n_in, n_out):
                raise HyperloomError(
                    f"LoRA target {name!r}: rank {lora.rank} must be < min(in, out) = min({n_in}, {n_out}) = {min(n_in, n_out)} "
                    "(a full-rank update is not low-rank; predict the weight directly instead)"
                )
            w = module.weight
            assert isinstance(w, torch.Tensor)
            kinds.setdefault((w.dtype, w.device), []).append(name)
            infos.append(_Target(name, n_in, n_out, transposed))
        if len(kinds) > 1:
            detail = "; ".join(f"{dt} on {dev}: {names}" for (dt, dev), names in kinds.items())
            raise HyperloomError(f"LoRA targets must share one dtype and device, got {detail}")
        (dtype, device) = next(iter(kinds))
        self._infos = {t.name: t for t in infos}
        self.targets: tuple[str, ...] = tuple(t.name for t in infos)

        r = lora.rank
        init_values: dict[str, torch.Tensor] = {}
        shared: dict[str, torch.Tensor] = {}
        for t in infos:
            a0 = torch.empty(r, t.in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a0, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialisation of lora_A
            if lora.shared_A:
                shared[_key(t.name, "lora_A")] = a0
            else:
                init_values[_key(t.name, "lora_A")] = a0
            init_values[_key(t.name, "lora_B")] = torch.zeros(t.out_features, r, dtype=dtype, device=device)
            if lora.bias:
                init_values[_key(t.name, "lora_bias")] = torch.zeros(t.out_features, dtype=dtype, device=device)
        self.hyper_config: dict[str, Any] = dict(hyper)
        zero_init = bool(hyper.get("zero_init", False))
        hypernet = HyperNetwork(inputs, init_values, dtype=dtype, device=device, **hyper)
        if zero_init and not hypernet.additive and not lora.shared_A:
            raise HyperloomError(
                "zero_init=True without an additive output generates A = 0 and B = 0: no gradient reaches the hypernetwork; "
                "use the MIP formulation, shared_A=True, or zero_init=False (B starts at 0 anyway)"
            )
        _zero_factor_blocks(hypernet, {k for k in init_values if k.rpartition(".")[2] != "lora_A"})
        self.hypernet = hypernet
        self.lora_A: ParamStore | None = ParamStore(shared) if lora.shared_A else None

        self._model_kwargs = HyperModel._check_signature(model, hypernet)
        try:
            primary = copy.deepcopy(model)
        except Exception as e:
            raise HyperloomError(f"Could not copy {type(model).__name__} (deepcopy failed: {e})") from e
        strip_hooks(primary)  # another LoRA model's primary, copied while a graph of it is alive
        if lora.freeze_base:
            primary.requires_grad_(False)
        self.primary = primary
        self._targets_seen = False  # the first call checks that every target module was called
        self._layout_said = False  # an ambiguous per-sample input layout (B, B, ...) is said once

    # -- views ---------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return self.lora.scaling

    @property
    def inputs(self) -> dict[str, Any]:
        """The declared conditioning inputs (name -> :class:`~hyperloom.Input`)."""
        return dict(self.hypernet.input_set.specs)

    @property
    def theta0(self) -> ParamStore | None:
        """The conditioning-independent factors ``A0``, ``B0`` (and bias) of the MIP formulation; ``None`` if not additive."""
        return self.hypernet.theta0

    def add_task(self, name: str | None = None, n: int = 1) -> range:
        """Make ``n`` more task ids valid for a :class:`~hyperloom.Task` input; see :meth:`HyperNetwork.add_task`.

        The same task API as :meth:`HyperModel.add_task <hyperloom.HyperModel.add_task>`: nothing is
        reallocated, so the adapters of earlier tasks stay bit-identical.

        Example:
            >>> import hyperloom as hl
            >>> net = nn.Sequential(nn.Linear(6, 6))
            >>> hnet = hl.hypernetize(net, inputs={"task": hl.Task(1, max_tasks=3)}, lora=hl.LoRA(rank=2, targets=["0"]))
            >>> hnet.add_task(), hnet.inputs["task"].num_tasks
            (range(1, 2), 2)

        Raises:
            HyperloomError: See :meth:`HyperNetwork.add_task`.
        """
        return self.hypernet.add_task(name, n)

    def _split(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return split_conditioning(self.hypernet, self.primary, self._model_kwargs, kwargs)

    # -- generation ----------------------------------------------------------------------
    def _factors(self, cond: Mapping[str, Any]) -> tuple[ParamDict, int | None]:
        raw, per_sample = self.hypernet.prepare(cond)
        if per_sample and int(raw.shape[0]) == 0:
            raise HyperloomError("Per-sample conditioning with an empty batch (0 samples)")
        return self._generate(raw, per_sample), (int(raw.shape[0]) if per_sample else None)

    def _generate(self, raw: torch.Tensor, per_sample: bool) -> ParamDict:
        factors = self.hypernet.theta_from_raw(raw) if per_sample else self.hypernet.theta_shared(raw)
        if self.lora_A is not None:
            factors = {**factors, **dict(self.lora_A.items())}
        return factors

    def _regenerate(self, raw: torch.Tensor, per_sample: bool) -> ParamDict:
        """The factors again, for a reentrant recomputation; the hypernetwork's buffers (BatchNorm) are left as they were.

        The buffers are swapped for copies while the hypernetwork runs, so the originals are not even touched in
        place (the call's own graph may hold them: BatchNorm saves its running statistics for backward).
        """
        swapped = [(m, k, b) for m in self.hypernet.modules() for k, b in m._buffers.items() if b is not None]
        for m, k, b in swapped:
            m._buffers[k] = b.clone()
        try:
            with torch.enable_grad():
                return self._generate(raw, per_sample)
        finally:
            for m, k, b in swapped:
                m._buffers[k] = b

    def generate(self, *args: Any, **conditioning: Any) -> ParamDict:
        """The adapter factors: ``"<module>.lora_A"`` ``(r, in)``, ``"<module>.lora_B"`` ``(out, r)`` (and ``.lora_bias``).

        Per-sample conditioning gives generated factors a leading ``(B,)`` (a shared ``A`` keeps its shape).
        The LoRA scale ``alpha / r`` is not applied. Not Hugging Face's text generation: use
        ``hnet.materialize(lam=0.5).generate(input_ids, ...)`` (``hnet.primary.generate`` is the bare base model).

        Raises:
            HyperloomError: On invalid conditioning, or arguments of a text generation call.
        """
        _refuse_text_generation(self, args, conditioning)
        return self._factors(conditioning)[0]

    def delta(self, **conditioning: Any) -> ParamDict:
        """The materialised updates, keyed like the base model's ``state_dict``: ``"<module>.weight"`` and ``.bias``.

        ``(alpha / r) B A`` in the module's own layout (``(out, in)``; ``(in, out)`` for ``Conv1D``), with a
        leading ``(B,)`` per sample: a reference for the factorised path, and what :meth:`materialize` adds.

        Example:
            >>> import hyperloom as hl
            >>> hnet = hl.hypernetize(nn.Linear(6, 5), inputs={"lam": (0, 1)}, lora=hl.LoRA(rank=2, targets=nn.Linear))
            >>> hnet.delta(lam=0.5)["weight"].abs().max().item()  # B = 0 at the start
            0.0

        Raises:
            HyperloomError: On invalid conditioning.
        """
        return self._delta_from(self._factors(conditioning)[0])

    def _delta_from(self, factors: ParamDict) -> ParamDict:
        """:meth:`delta` from generated factors."""
        out: ParamDict = {}
        for name, t in self._infos.items():
            a, b = factors[_key(name, "lora_A")], factors[_key(name, "lora_B")]
            dw = torch.matmul(b, a) * self.scaling
            if t.transposed:
                dw = dw.transpose(-1, -2)
            prefix = name + "." if name else ""
            out[prefix + "weight"] = dw
            if self.lora.bias:
                out[prefix + "bias"] = factors[_key(name, "lora_bias")] * self.scaling
        return out

    def _why_conditioning_requires_grad(self) -> str:
        """Why the raw conditioning requires grad, in words: a Data input's trainable encoder, or the values."""
        data = [name for name, enc in self.hypernet.data.items() if any(p.requires_grad for p in enc.parameters())]
        if not data:
            return "the conditioning values require grad"
        return (
            f"the codes of Data input(s) {data} require grad (their encoder or attention pool has trainable parameters; "
            "freeze them with requires_grad_(False) to train only the hypernetwork here)"
        )

    def _shared_factors(self, conditioning: Mapping[str, Any], what: str) -> ParamDict:
        """The factors for one shared conditioning, without gradients.

        The conditioning, a data input's encoder included, runs once, with the hypernetwork in eval mode (an
        export is deterministic and leaves running statistics alone); per-sample conditioning is refused naming
        ``what``.
        """
        with eval_mode(self.hypernet), torch.no_grad():  # an export: no dropout, no running-statistics update
            factors, n = self._factors(conditioning)
        if n is not None:
            raise HyperloomError(
                f"{what} needs one value per input (shared conditioning), got per-sample values"
                + _per_sample_data_hint(self.hypernet.input_set.specs)
            )
        return factors

    def materialize(self, **conditioning: Any) -> nn.Module:
        """An ordinary model with the update merged into the weights for one conditioning (``W0 + (alpha/r) B A``).

        Raises:
            HyperloomError: On per-sample or invalid conditioning.
        """
        with torch.no_grad():
            delta = self._delta_from(self._shared_factors(conditioning, "materialize()"))
        plain = copy.deepcopy(self.primary)
        strip_hooks(plain)  # the hooks of calls whose graphs are alive are no part of an ordinary model
        with torch.no_grad():
            for key, d in delta.items():
                mod_name, _, attr = key.rpartition(".")
                module = plain.get_submodule(mod_name)
                current = getattr(module, attr, None)
                if isinstance(current, torch.Tensor):
                    current.add_(d.to(current.dtype))
                else:  # a generated bias on a layer built without one
                    module.register_parameter(attr, nn.Parameter(d.detach().clone(), requires_grad=not self.lora.freeze_base))
        return plain

    # -- forward -------------------------------------------------------------------------
    def _adapter(self, name: str, x: torch.Tensor, factors: ParamDict, n: int | None) -> torch.Tensor:
        """The factorised update ``(dropout(x) A^T B^T + b) * alpha / r`` for input ``x``: ``(*, in) -> (*, out)``."""
        t = self._infos[name]
        if x.dim() == 0 or x.shape[-1] != t.in_features:
            raise HyperloomError(f"LoRA target {name!r}: input of shape {tuple(x.shape)}, expected (..., {t.in_features})")
        a, b = factors[_key(name, "lora_A")], factors[_key(name, "lora_B")]
        p = self.lora.dropout
        if p > 0:
            x = F.dropout(x, p, training=self.training)
        if n is None:
            d = F.linear(F.linear(x, a), b, factors.get(_key(name, "lora_bias")))
            return d * self.scaling
        bd = self.batch_dim + x.dim() if self.batch_dim < 0 else self.batch_dim
        if not 0 <= bd < x.dim() - 1 or x.shape[bd] != n:
            msg = (
                f"LoRA target {name!r}: per-sample mode needs its input to carry the {n} samples along dimension "
                f"{self.batch_dim}, got an input of shape {tuple(x.shape)}"
            )
            data = [k for k, s in self.hypernet.input_set.specs.items() if getattr(s, "per", None) == "sample"]
            if data:  # the sample count came from the data: name the input(s), as HyperModel does
                msg = f"Data input(s) {data} (per='sample') give {n} per-sample codes, which the call's arguments do not match: {msg}"
            raise HyperloomError(msg)
        if n > 1 and not getattr(self, "_layout_said", False):
            also = [d for d in range(x.dim() - 1) if d != bd and x.shape[d] == n]
            if also:  # (B, B, H): a sequence-first input with L == B would pass the check above and mix samples
                self._layout_said = True
                warnings.warn(
                    f"LoRA target {name!r}: its per-sample input of shape {tuple(x.shape)} has {n} entries along "
                    f"dimension {bd} (batch_dim, taken as the samples) and along dimension(s) {also} too; if the model "
                    "goes sequence-first inside (e.g. nn.Transformer layers with batch_first=False) set batch_dim to "
                    "the samples' dimension, or the samples mix silently (said once per model)",
                    stacklevel=2,
                )
        xb = x.movedim(bd, 0) if bd != 0 else x
        flat = xb.reshape(n, -1, t.in_features)
        xa = torch.matmul(flat, a.transpose(-1, -2))  # (n, S, r): a is (n, r, in), or (r, in) when shared
        d = torch.bmm(xa, b.transpose(1, 2))  # (n, S, out)
        bias = factors.get(_key(name, "lora_bias"))
        if bias is not None:
            d = d + bias.unsqueeze(1)
        d = (d * self.scaling).reshape(*xb.shape[:-1], t.out_features)
        return d.movedim(0, bd) if bd != 0 else d

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model with the adapters generated for the conditioning.

        Args:
            *args: Positional inputs of the model.
            **kwargs: Conditioning values by input name; other keyword arguments go to the model.

        Returns:
            The model's output, whatever its structure (one call of the model). Activation checkpointing
            inside the model works: the adapters of this call stay reachable while its graph lives.

        Raises:
            HyperloomError: On invalid conditioning, an unknown keyword argument, (per sample) a target
                module whose input does not carry the samples along ``batch_dim``, or a target run under
                ``no_grad`` inside a call that records gradients (reentrant checkpointing) while the
                conditioning values require grad (a reentrant recomputation cannot reach them).
        """
        cond, rest = self._split(kwargs)
        raw, per_sample = self.hypernet.prepare(cond)
        if per_sample and int(raw.shape[0]) == 0:
            raise HyperloomError("Per-sample conditioning with an empty batch (0 samples)")
        factors = self._generate(raw, per_sample)
        raw_requires_grad = raw.requires_grad
        raw = raw.detach()
        call = Call(
            self,
            factors,
            int(raw.shape[0]) if per_sample else None,
            self._adapter,
            lambda: self._regenerate(raw, per_sample),
        )
        call.conditioning_requires_grad = self._why_conditioning_requires_grad() if raw_requires_grad else ""
        call.register({name: self.primary.get_submodule(name) for name in self.targets})
        try:
            with call:
                out = self.primary(*args, **rest)
        except BaseException:
            call.release()
            raise
        if not self._targets_seen:
            self._targets_seen = True
            idle = [t for t in self.targets if t not in call.fired]
            if idle:  # e.g. F.linear(h, module.weight): the hook never runs, the update never applies
                warnings.warn(
                    f"LoRA targets {idle} were not called as modules in this forward: their update does not apply "
                    "there (materialize() and to_peft() do apply it). If the model uses their weights directly (e.g. "
                    "F.linear(h, layer.weight)), target modules that it calls; if they are only skipped in this call "
                    "(a branch not taken), ignore this (said once per model)",
                    stacklevel=2,
                )
        call.anchor(out)  # the hooks live as long as the graph: checkpointed layers recomputed in backward() need them
        return out

    # -- export and round trip -----------------------------------------------------------
    def to_peft(self, path: str | os.PathLike[str], **conditioning: Any) -> None:
        """Write a standard PEFT LoRA adapter directory for one conditioning value.

        ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft`` writes them (keys
        ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` / ``lora_B.bias``, ``fan_in_fan_out``
        set when the targets are GPT-2 ``Conv1D``), so ``peft.PeftModel.from_pretrained(base, path)`` gives the
        outputs of this model at that conditioning. ``peft`` itself is not needed to write it.

        Raises:
            HyperloomError: On per-sample or invalid conditioning, targets mixing ``nn.Linear`` and ``Conv1D``
                (one ``fan_in_fan_out`` flag per adapter), or base parameters that were unfrozen (trained base
                weights are not part of an adapter).
        """
        factors = self._shared_factors(conditioning, "to_peft()")
        transposed = {t.transposed for t in self._infos.values()}
        if len(transposed) > 1:
            conv = [t.name for t in self._infos.values() if t.transposed]
            raise HyperloomError(f"to_peft: targets mix nn.Linear and Conv1D ({conv}); PEFT has one fan_in_fan_out flag per adapter")
        if "" in self.targets:
            raise HyperloomError("to_peft: the root module itself is a LoRA target; PEFT can only wrap submodules")
        trained = [k for k, p in self.primary.named_parameters() if p.requires_grad]
        if trained:
            raise HyperloomError(f"to_peft: base parameters {trained[:8]} are trainable; an adapter holds only the LoRA factors")
        tensors: dict[str, torch.Tensor] = {}
        for name in self.targets:
            key = _key("base_model.model", name)
            tensors[key + ".lora_A.weight"] = factors[_key(name, "lora_A")].detach().contiguous()
            tensors[key + ".lora_B.weight"] = factors[_key(name, "lora_B")].detach().contiguous()
            if self.lora.bias:
                tensors[key + ".lora_B.bias"] = factors[_key(name, "lora_bias")].detach().contiguous()
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "r": self.lora.rank,
            "lora_alpha": self.lora.alpha,
            "lora_dropout": self.lora.dropout,
            # one string: PEFT full-matches it (a list would match by suffix and adapt other modules too)
            "target_modules": "^(?:" + "|".join(re.escape(t) for t in sorted(self.targets)) + ")$",
            "fan_in_fan_out": transposed == {True},
            "bias": "none",
            "lora_bias": self.lora.bias,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
        }
        from .fileio import _as_path, atomic_write_files, safetensors_bytes

        out = _as_path(path)
        weights = out / "adapter_model.safetensors"
        # the weights first, the config (what makes the directory an adapter) last, both or neither
        atomic_write_files(
            {
                weights: [safetensors_bytes(tensors, weights, metadata={"format": "pt"})],
                out / "adapter_config.json": [(json.dumps(config, indent=2) + "\n").encode()],
            }
        )

    def _adapter_state(self) -> nn.Module:
        """A container of the trained parts (hypernetwork, shared ``A``), for saving without the frozen base."""
        box = nn.Module()
        box.hypernet = self.hypernet
        if self.lora_A is not None:
            box.lora_A = self.lora_A
        return box

    def config(self) -> dict[str, Any]:
        """Everything :meth:`from_pretrained` needs to rebuild this model around the base model (JSON-able).

        Raises:
            HyperloomError: On a conditioning input that is not an :class:`~hyperloom.Input` declaration.
        """
        hyper = {k: v for k, v in self.hyper_config.items() if k != "zero_init"}
        if isinstance(hyper.get("encoding"), Encoding):
            hyper["encoding"] = hyper["encoding"].name
        if "hidden" in hyper:
            hyper["hidden"] = list(hyper["hidden"])
        if hasattr(hyper.get("head"), "to_json"):  # hl.Chunked / hl.Structured options
            hyper["head"] = hyper["head"].to_json()
        return {
            "format": LORA_FORMAT,
            "lora": self.lora.to_json(self.targets),
            "inputs": {k: _input_json(k, v) for k, v in self.inputs.items()},
            "hypernetwork": hyper,
            "batch_dim": self.batch_dim,
            "base_class": type(self.primary).__name__,
            "include_base": any(p.requires_grad for p in self.primary.parameters()),
        }

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save the hypernetwork (config JSON + safetensors) into directory ``path``; reload with :meth:`from_pretrained`.

        Only the trained parts are stored (the hypernetwork and a shared ``A``), unless base parameters were
        unfrozen: then the whole model is. Written with :func:`~hyperloom.save_model` (checksummed).

        Raises:
            HyperloomError: If the directory cannot be written (a :class:`~hyperloom.CheckpointError`), or see :meth:`config`.
        """
        from .checkpoint import model_bytes
        from .fileio import _as_path, atomic_write_files

        cfg = self.config()
        out = _as_path(path)
        weights = out / WEIGHTS_NAME
        blob = model_bytes(self if cfg["include_base"] else self._adapter_state(), weights, config=cfg)
        # the weights first, the config last: a failure at any point leaves the old directory loadable
        atomic_write_files({weights: [blob], out / CONFIG_NAME: [(json.dumps(cfg, indent=2) + "\n").encode()]})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], model: nn.Module) -> LoRAModel:
        """Rebuild a model saved by :meth:`save_pretrained` around the pretrained ``model`` (which is copied, not modified).

        The JSON config is trusted only where it equals the checksummed copy that :meth:`save_pretrained`
        stores in the weights file, and every field is validated (type and range) before anything is built.

        Raises:
            CheckpointError: On a missing or malformed directory; a JSON config that differs from the
                checksummed copy (naming the field and both values: an edited ``alpha`` would silently
                rescale every update); a field of the wrong type or out of range (naming it); a config that
                does not fit ``model`` (targets that are not its modules, a rank too large); or weights that
                do not fit (see :func:`~hyperloom.load_model`).
        """
        from ._lora_config import read_config
        from .checkpoint import load_model
        from .fileio import CheckpointError, _as_path

        src = _as_path(path)
        cfg = read_config(src, CONFIG_NAME, WEIGHTS_NAME, LORA_FORMAT, _HYPER_KEYS)
        where = src / CONFIG_NAME
        try:
            lora = LoRA(**cfg.lora)
        except HyperloomError as e:
            raise CheckpointError(f"{where}: lora: {e}") from None
        try:  # resolved names, not selectors
            hnet = cls(model, lora, inputs=cfg.inputs, targets=cfg.targets, batch_dim=cfg.batch_dim, **cfg.hyper)
        except HyperloomError as e:
            raise CheckpointError(f"{where}: the config does not fit the {type(model).__name__} given: {e}") from None
        load_model(hnet if cfg.include_base else hnet._adapter_state(), src / WEIGHTS_NAME)
        return hnet

    def extra_repr(self) -> str:
        lo = self.lora
        return f"targets={len(self.targets)} modules, rank={lo.rank}, alpha={lo.alpha}, shared_A={lo.shared_A}, bias={lo.bias}"


def _input_json(name: str, spec: Any) -> dict[str, Any]:
    """An :class:`~hyperloom.Input` or :class:`~hyperloom.Task` declaration as JSON; other kinds are refused (they cannot be rebuilt)."""
    if isinstance(spec, Task):  # num_tasks as it is now (add_task): restored with the state too
        return {"kind": "Task", **dataclasses.asdict(spec)}
    if not isinstance(spec, Input):
        raise HyperloomError(
            f"save_pretrained: input {name!r} is an hl.{type(spec).__name__} input; only hl.Input and hl.Task declarations can be saved as "
            "JSON. Save the model with hl.save_model(model, path) and restore it with hl.load_model(model, path) into a model "
            "built by the same hl.hypernetize call"
        )
    return dataclasses.asdict(spec)


def _key(module: str, leaf: str) -> str:
    """The dotted name of ``leaf`` in ``module`` (``leaf`` alone for the root module ``""``)."""
    return f"{module}.{leaf}" if module else leaf


def _zero_factor_blocks(hypernet: HyperNetwork, names: set[str]) -> None:
    """Zero the head rows that generate ``B`` and the bias, so ``Delta W = 0`` exactly at the start."""
    head = hypernet.head
    head._zero_blocks({b for b in head._block_names if b.split("#")[0] in names and not b.endswith("#A")})


__all__ = ["CONFIG_NAME", "LORA_FORMAT", "WEIGHTS_NAME", "LoRA", "LoRAModel", "is_conv1d", "resolve_targets"]
