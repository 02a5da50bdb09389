"""Turning an existing model into a hypernetwork model.

:func:`hypernetize` copies the user's model (the original is never touched),
builds a :class:`~hyperloom.HyperNetwork` for the selected parameters, and
returns a :class:`HyperModel` that runs the copy with generated weights
through :func:`torch.func.functional_call`:

* shared conditioning (a number per input): one weight set for the batch;
* per-sample conditioning (``B`` values per input): a weight set per sample,
  computed in one call with :func:`torch.func.vmap` (or a loop over samples
  for modules that have no batching rule, such as ``nn.GRU`` / ``nn.LSTM``).

Which arguments carry the batch in per-sample mode, and how outputs come
back, is the rule of :mod:`hyperloom.per_sample`.

Buffers in per-sample mode (BatchNorm's running statistics, any buffer a
forward writes): every sample starts from the buffer's value and the buffer
gets the mean of the per-sample results, written into its existing tensor
(the rule of :mod:`hyperloom.buffers`). In shared mode buffers behave exactly
as in the original model.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from ._rewind import eval_mode
from ._rng import rng_state, set_rng_state
from .buffers import BufferState
from .data_input import _per_sample_data_hint
from .encoding import Encoding
from .errors import HyperloomError
from .heads import check_target_memory
from .hypernetwork import HyperNetwork, _is_compiling, init_theta0, value_checks_off
from .inputs import InputLike
from .params import ParamStore
from .per_sample import (
    InDims,
    OutDims,
    check_against_shared,
    plan_arguments,
    rebuild_vmap,
    run_loop,
    run_vmap,
    validate_in_dims,
)
from .recompute import Binding, CallState, Probe, leave, per_sample_culprit, refuse_per_sample, route
from .select import Selector, select_parameters
from .shared_heads import Chunked, Structured
from .types import ParamDict

if TYPE_CHECKING:  # the core never imports lora.py; LoRA.build is called on the object passed in
    from .lora import LoRA, LoRAModel

PerSampleMode = Literal["auto", "vmap", "loop"]

#: Names a conditioning input cannot take (they are arguments of ``HyperModel.forward`` itself).
RESERVED_INPUT_NAMES = frozenset({"self"})
_MAX_CHECKED_LAYOUTS = 256

#: Module types with no ``vmap`` batching rule: per-sample mode loops over samples.
NO_VMAP_MODULES: tuple[type[nn.Module], ...] = (nn.RNNBase,)


def _parametrized_targets(primary: nn.Module, predicted: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """(module, tensor name) for every parametrized tensor one of whose originals is predicted."""
    out: dict[tuple[int, str], tuple[nn.Module, str]] = {}
    for name in predicted:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1].startswith("original"):
            owner = primary.get_submodule(".".join(parts[:-3]))
            out[(id(owner), parts[-2])] = (owner, parts[-2])
    return list(out.values())


def _is_scalar(a: Any) -> bool:
    """A Python number or a 0-d tensor (what conditioning passed by position looks like)."""
    if isinstance(a, torch.Tensor):
        return a.dim() == 0
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _split_name(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return root.get_submodule(mod_name), attr


def _refresh_rnn(module: nn.Module) -> None:
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _remove_param(root: nn.Module, name: str) -> bool:
    """Remove parameter ``name`` from the copy (it is passed in at every call); return its ``requires_grad``.

    Nothing stays behind in its place, so a hypernetized model holds each predicted tensor once
    (in ``theta0``), not twice.
    """
    module, attr = _split_name(root, name)
    p = module._parameters.pop(attr)
    assert p is not None  # selected parameters exist by construction
    _refresh_rnn(module)
    return bool(p.requires_grad)


def _set_placeholder(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Leave a plain (unregistered) tensor attribute where a predicted parameter was.

    ``print(model)``, ``m.bias is None`` checks and ``model.apply(init_fn)`` idioms then see the base value
    ``theta0`` (a detached alias: an in-place init writes ``theta0``) or, with no ``theta0``, a shape-only
    ``meta`` tensor. It is in no ``state_dict`` and no ``parameters()``: the tensor is held once, in ``theta0``.
    """
    module, attr = _split_name(root, name)
    object.__setattr__(module, attr, value)  # not Module.__setattr__: nothing is registered


def _restore_param(root: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    """Exact inverse of :func:`_remove_param`, with a new value."""
    module, attr = _split_name(root, name)
    module.__dict__.pop(attr, None)
    module.register_parameter(attr, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))
    _refresh_rnn(module)


def _refuse_text_generation(model: nn.Module, args: tuple[Any, ...], conditioning: Mapping[str, Any]) -> None:
    """``generate`` returns weights; a call shaped like Hugging Face's ``generate(input_ids, max_new_tokens=...)`` says how."""
    specs: Mapping[str, Any] = model.hypernet.input_set.specs  # type: ignore[union-attr,assignment]
    unknown = [k for k in conditioning if k not in specs]
    if args or unknown:
        given = ([f"{len(args)} positional argument(s)"] if args else []) + ([f"keyword(s) {unknown}"] if unknown else [])
        name = type(model).__name__
        raise HyperloomError(
            f"{name}.generate(**conditioning) returns the generated weights; it got {' and '.join(given)} (declared inputs: "
            f"{list(specs)}). For Hugging Face text generation, materialize one conditioning and generate with it: "
            "hnet.materialize(lam=...).generate(input_ids, ...); hnet.primary.generate(...) would ignore the conditioning"
        )


class HyperModel(nn.Module):
    """A model whose selected parameters are generated by a hypernetwork.

    Usually built with :func:`hypernetize`. Calling it runs the primary
    network with ``theta = theta0 + Delta(gamma)`` (MIP) for the given
    conditioning.

    Args:
        model: The primary network. It is deep-copied; the original is never
            modified. In the copy, predicted parameters become non-persistent
            buffers (they are replaced at every call).
        hypernet: A :class:`HyperNetwork` whose target names are parameter
            names of ``model`` with matching shapes, dtype and device.
        per_sample: ``"vmap"``, ``"loop"`` (a Python loop over samples) or
            ``"auto"`` (``vmap`` unless the model has an RNN module).
        batch_dim: Dimension that holds the samples in every tensor argument
            (positional or keyword) in per-sample mode.
        in_dims: Per-argument exceptions to ``batch_dim``: positional index or
            keyword name -> batch dimension, or ``None`` for an argument shared
            by all samples (see :mod:`hyperloom.per_sample`).
        out_dims: Sample dimension of the output tensors (an int for all, or a
            tuple/list/dict of ints shaped like the output); defaults to
            ``batch_dim``.

    Attributes:
        check_outputs: Compare the first per-sample output of each argument
            layout with a shared call (default ``True``; see
            :mod:`hyperloom.per_sample`).
        in_dims: The validated ``in_dims``, keyed by position and by name.

    Shapes:
        ``forward(*args, **conditioning)``: conditioning values are numbers
        (one weight set for the batch) or tensors of shape ``(B,)`` /
        ``(B, k)`` (one weight set per sample). Keyword arguments that are
        not declared inputs go to the primary network; in per-sample mode
        every tensor argument is split into its ``B`` samples unless
        ``in_dims`` says it is shared.

    Example:
        >>> import hyperloom as hl
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> hnet = hl.hypernetize(net, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)})
        >>> x = torch.randn(5, 4)
        >>> hnet(x, lam=0.3).shape, hnet(x, lam=torch.rand(5)).shape
        (torch.Size([5, 2]), torch.Size([5, 2]))

    Raises:
        HyperloomError: If a target is not a parameter of ``model``, a
            generated tensor's shape, dtype or device differs from the
            parameter's, an input name clashes with an argument of
            ``model.forward`` or is reserved (``self``), or ``in_dims`` is
            malformed.
    """

    def __init__(
        self,
        model: nn.Module,
        hypernet: HyperNetwork,
        *,
        per_sample: PerSampleMode = "auto",
        batch_dim: int = 0,
        in_dims: InDims | None = None,
        out_dims: OutDims | None = None,
    ) -> None:
        super().__init__()
        if per_sample not in ("auto", "vmap", "loop"):
            raise HyperloomError(f"per_sample must be one of 'auto', 'vmap', 'loop', got {per_sample!r}")
        params = dict(model.named_parameters())
        unknown = [k for k in hypernet.shapes if k not in params]
        if unknown:
            raise HyperloomError(
                f"Hypernetwork target(s) {unknown} are not parameters of {type(model).__name__}; its parameters are {list(params)[:12]}"
            )
        reserved = sorted(RESERVED_INPUT_NAMES & set(hypernet.input_set.names))
        if reserved:
            raise HyperloomError(f"Input name(s) {reserved} are reserved (arguments of HyperModel.forward itself); rename the input(s)")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise HyperloomError(f"batch_dim must be an int, got {batch_dim!r}")
        try:
            forward_sig: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):  # builtins without a signature
            forward_sig = None
        self.in_dims = validate_in_dims(in_dims, list(hypernet.input_set.names), forward_sig)
        self._model_kwargs = self._check_signature(model, hypernet)
        self._check_generation(hypernet, params)
        try:
            primary = copy.deepcopy(model)
        except Exception as e:
            raise HyperloomError(f"Could not copy {type(model).__name__} (deepcopy failed: {e})") from e
        self.predicted: tuple[str, ...] = tuple(hypernet.shapes)
        self._requires_grad = {n: _remove_param(primary, n) for n in self.predicted}
        self.primary = primary
        self.hypernet = hypernet
        self._set_placeholders()
        # activation checkpointing: a probe on every module owning a predicted tensor (see hyperloom.recompute)
        self._calls = CallState()
        owners = {mod_name: primary.get_submodule(mod_name) for mod_name in {n.rpartition(".")[0] for n in self.predicted}}
        self._probes = {m: owners[m].register_forward_pre_hook(Probe(self._calls, m)).id for m in owners}
        #: (module, tensor name) of parametrized tensors whose originals are predicted (see _drop_parametrize_cache).
        self._parametrized: list[tuple[nn.Module, str]] = _parametrized_targets(primary, self.predicted)
        if per_sample == "auto":
            per_sample = "loop" if any(isinstance(m, NO_VMAP_MODULES) for m in primary.modules()) else "vmap"
        self.per_sample_mode: str = per_sample
        self.batch_dim = int(batch_dim)
        self.out_dims: OutDims = self.batch_dim if out_dims is None else out_dims
        self._checked_layouts: set[Any] = set()
        #: Compare the first per-sample output of each argument layout with a shared call (see hyperloom.per_sample).
        self.check_outputs = True
        self._all_modules: list[nn.Module] = list(primary.modules())
        self._named_modules: list[tuple[str, nn.Module]] = list(primary.named_modules(remove_duplicate=False))
        self._rnns: list[nn.RNNBase] = [m for m in self._all_modules if isinstance(m, nn.RNNBase)]
        #: Train/eval layouts whose per-sample vmap calls need every buffer batched (see hyperloom.buffers).
        self._batched_buffers: set[tuple[bool, ...]] = set()
        #: Buffers of the primary network fed from a conditioning input: name -> raw column (see hyperloom.dropout).
        self.bound: dict[str, int] = {}

    @staticmethod
    def _check_signature(model: nn.Module, hypernet: HyperNetwork) -> frozenset[str] | None:
        """Refuse input names that clash with ``model.forward``; return its keyword names (None: any)."""
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):  # builtins without a signature
            return None
        clash = [n for n in hypernet.input_set.names if n in sig.parameters]
        if clash:
            raise HyperloomError(
                f"Input name(s) {clash} clash with argument(s) of {type(model).__name__}.forward{sig}; rename the conditioning input(s)"
            )
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            return None
        return frozenset(
            n for n, p in sig.parameters.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )

    @staticmethod
    def _check_generation(hypernet: HyperNetwork, params: Mapping[str, torch.Tensor]) -> None:
        """Dry generation: every produced tensor must match its parameter."""
        was_training = hypernet.training
        try:
            hypernet.eval()
            with torch.no_grad():
                raw = hypernet.input_set.midpoint(dtype=hypernet.dtype, device=hypernet.device)
                theta = hypernet.theta_from_raw(raw)
        finally:
            hypernet.train(was_training)
        for name, t in theta.items():
            p = params[name]
            got = tuple(t.shape[1:])
            if got != tuple(p.shape):
                raise HyperloomError(f"{name}: generated {got}, expected {tuple(p.shape)}")
            if t.dtype != p.dtype:
                raise HyperloomError(f"{name}: generated dtype {t.dtype}, expected {p.dtype}")
            if t.device != p.device:
                raise HyperloomError(f"{name}: generated on {t.device}, the parameter is on {p.device}")

    def _bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Bind a call's tensors for its recomputation (bound buffers are shadowed by an instance attribute)."""
        for n, t in tensors.items():
            _set_placeholder(self.primary, n, t)

    def _unbind(self) -> None:
        """Undo :meth:`_bind`: placeholders back, shadows of bound buffers removed."""
        self._set_placeholders()
        for n in self.bound:
            module, attr = _split_name(self.primary, n)
            module.__dict__.pop(attr, None)

    def _set_placeholders(self) -> None:
        theta0 = self.hypernet.theta0
        for n in self.predicted:
            if theta0 is not None:
                value = theta0[n].detach()
            else:
                shape = self.hypernet.shapes[n]
                value = torch.empty(shape, dtype=self.hypernet.dtype, device="meta")
            _set_placeholder(self.primary, n, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """After unpickling or ``copy.deepcopy``: the placeholders alias the copy's own ``theta0``."""
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._set_placeholders()

    def _apply(self, fn: Any, recurse: bool = True) -> HyperModel:
        """Move and cast as usual, then point the placeholders at the moved ``theta0``."""
        out = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._set_placeholders()
        return out  # type: ignore[no-any-return]

    # -- views ---------------------------------------------------------------------------
    @property
    def theta0(self) -> ParamStore | None:
        """The base values ``theta0`` (MIP's additive output), keyed like ``state_dict``; ``None`` if not additive."""
        return self.hypernet.theta0

    @property
    def inputs(self) -> dict[str, Any]:
        """The declared conditioning inputs (name -> :class:`~hyperloom.Input`)."""
        return dict(self.hypernet.input_set.specs)

    def add_task(self, name: str | None = None, n: int = 1) -> range:
        """Make ``n`` more task ids valid for a :class:`~hyperloom.Task` input; see :meth:`HyperNetwork.add_task`.

        Example:
            >>> import hyperloom as hl
            >>> hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2, max_tasks=3)})
            >>> hnet.add_task(), hnet.inputs["task"].num_tasks
            (range(2, 3), 3)

        Raises:
            HyperloomError: See :meth:`HyperNetwork.add_task`.
        """
        return self.hypernet.add_task(name, n)

    # -- generation ----------------------------------------------------------------------
    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return split_conditioning(self.hypernet, self.primary, self._model_kwargs, kwargs)

    def generate(self, *args: Any, **conditioning: Any) -> ParamDict:
        """The predicted parameters ``theta`` keyed like ``model.state_dict()``.

        Not Hugging Face's text generation: for that, materialize one conditioning and generate with the
        result, ``hnet.materialize(lam=0.5).generate(input_ids, ...)`` (``hnet.primary.generate`` would run
        with ``theta0``, ignoring the conditioning).

        Returns:
            ``{name: shape}`` for shared conditioning, ``{name: (B, *shape)}``
            per sample. Tensors keep their autograd graph.

        Raises:
            HyperloomError: On invalid conditioning, or arguments of a text generation call.
        """
        _refuse_text_generation(self, args, conditioning)
        return self.hypernet(conditioning)

    def delta(self, **conditioning: Any) -> ParamDict:
        """The hypernetwork output ``Delta`` (``theta - theta0`` when additive).

        Raises:
            HyperloomError: On invalid conditioning.
        """
        return self.hypernet.delta(conditioning)

    def materialize(self, **conditioning: Any) -> nn.Module:
        """An ordinary ``nn.Module`` with the weights generated for one conditioning.

        The result is independent of this model (a copy with plain
        parameters), ready for deployment, export or fine-tuning. The
        hypernetwork runs in eval mode for it (a Data encoder's dropout off,
        its running statistics unchanged), whatever the model's mode.

        Example:
            >>> import hyperloom as hl
            >>> net = nn.Linear(3, 2)
            >>> hnet = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)})
            >>> plain = hnet.materialize(lam=0.5)
            >>> x = torch.randn(4, 3)
            >>> torch.allclose(plain(x), hnet(x, lam=0.5))
            True

        Raises:
            HyperloomError: On per-sample conditioning or invalid conditioning.
        """
        with eval_mode(self.hypernet), torch.no_grad():  # an export: no dropout, no running-statistics update
            raw, per_sample = self.hypernet.prepare(conditioning)
            if per_sample:
                raise HyperloomError(
                    "materialize() needs one value per input (shared conditioning), got per-sample values"
                    + _per_sample_data_hint(self.hypernet.input_set.specs)
                )
            theta = self.hypernet.theta_shared(raw)
        plain = copy.deepcopy(self.primary)
        for mod_name, hid in self._probes.items():
            plain.get_submodule(mod_name)._forward_pre_hooks.pop(hid, None)
        for name, value in theta.items():
            _restore_param(plain, name, value, self._requires_grad[name])
        return plain

    # -- forward -------------------------------------------------------------------------
    def _check_devices(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        dev = self.hypernet.device
        for key, a in [*enumerate(args), *kwargs.items()]:
            if isinstance(a, torch.Tensor) and a.device != dev:
                where = f"Positional input {key}" if isinstance(key, int) else f"Keyword argument {key!r}"
                raise HyperloomError(f"{where} is on {a.device} but the model is on {dev}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the primary network with generated weights.

        Args:
            *args: Positional inputs of the primary network.
            **kwargs: Conditioning values by input name; other keyword
                arguments go to the primary network.

        Returns:
            The primary network's output. Per sample: the same structure, with
            tensors stacked along ``out_dims`` (see :mod:`hyperloom.per_sample`).

        Raises:
            HyperloomError: On invalid conditioning, a batched argument whose
                batch differs from the number of per-sample values, inputs on
                another device, or a model that cannot run per sample (with
                the way out).
        """
        if self._parametrized:
            self._drop_parametrize_cache()
        try:
            return self._forward(args, kwargs)
        finally:
            for m in self._rnns:  # functional_call leaves the call's tensors in an RNN's _flat_weights
                m._init_flat_weights()
            if self._parametrized:
                self._drop_parametrize_cache()

    def _drop_parametrize_cache(self) -> None:
        """Forget ``parametrize.cached()`` values computed from generated originals (they change at every call)."""
        cache = getattr(parametrize, "_cache", None)
        if isinstance(cache, dict) and cache:
            # keyed (id(module), tensor name), but a deep copy of a parametrized module keeps the original's id in
            # the key (the property's closure): drop every entry of these tensor names (a cache: it is recomputed)
            names = {t for _, t in self._parametrized}
            for key in [k for k in cache if isinstance(k, tuple) and len(k) == 2 and k[1] in names]:
                cache.pop(key, None)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        cond, rest = self._split(kwargs)
        if len(cond) != len(self.hypernet.input_set.specs):
            self._missing_conditioning(args, cond)
        if not _is_compiling():
            self._check_devices(args, rest)
        raw, per_sample = self.hypernet.prepare(cond)
        if not per_sample:
            theta = {**self.hypernet.theta_shared(raw), **{k: raw[0, c] for k, c in self.bound.items()}}
            if (
                _is_compiling()
                or not torch.is_grad_enabled()
                or torch._C._functorch.maybe_current_level() is not None  # inside a user's vmap/grad/jacfwd: no binding
                or not any(theta[k].requires_grad for k in self.predicted)
            ):
                return functional_call(self.primary, theta, tuple(args), rest, tie_weights=False, strict=False)
            binding = Binding(self.predicted, self._bind, self._unbind)
            binding.extra = {k: theta[k].detach() for k in self.bound}
            entered = leave(binding, theta)  # the binding outlives the call for checkpoint recomputation
            self._calls.mode, self._calls.seen = "shared", False
            try:
                out = functional_call(self.primary, {**theta, **entered}, tuple(args), rest, tie_weights=False, strict=False)
            finally:
                self._calls.mode = None
            return route(binding, out, entered) if self._calls.seen else out
        culprit = per_sample_culprit(self.primary, vmap=self.per_sample_mode == "vmap")  # HF, at any depth
        if culprit is not None:
            raise refuse_per_sample(culprit)
        n = raw.shape[0]
        if n == 0:
            raise HyperloomError("Per-sample conditioning with an empty batch (0 samples)")
        try:
            plan = plan_arguments(args, rest, n=n, batch_dim=self.batch_dim, in_dims=self.in_dims)
        except HyperloomError as e:
            data = [k for k, s in self.hypernet.input_set.specs.items() if getattr(s, "per", None) == "sample" and k in cond]
            if not data:
                raise
            raise HyperloomError(
                f"Data input(s) {data} (per='sample') give {n} per-sample codes, which the call's arguments do not match: {e}"
            ) from None
        theta = {**self.hypernet.theta_from_raw(raw), **{k: raw[:, c] for k, c in self.bound.items()}}
        modes = tuple(m.training for m in self._all_modules)
        batch_all = self.per_sample_mode == "loop" or modes in self._batched_buffers
        state = self._buffer_state(n, batch_all)
        self._calls.mode = "per_sample" if torch.is_grad_enabled() and not _is_compiling() else None
        try:
            out, state = self._run_per_sample(theta, state, plan, n, modes, batch_all)
        finally:
            self._calls.mode = None
        self._check_outputs(theta, plan, out, n)
        state.commit()  # after the check: a call that raises writes no buffer
        return out

    def _run_per_sample(
        self, theta: ParamDict, state: BufferState, plan: Any, n: int, modes: tuple[bool, ...], batch_all: bool
    ) -> tuple[Any, BufferState]:
        """Run a per-sample call (vmap, or the loop); return its output and the buffer state to commit."""
        if self.per_sample_mode == "loop":
            out = run_loop(self.primary, theta, state, plan, self.out_dims, n)
        else:
            try:
                stacked, out_plan = run_vmap(self.primary, theta, state, plan, self.out_dims)
            except HyperloomError as e:
                if batch_all or not state.shared or e.__cause__ is None or isinstance(e.__cause__, HyperloomError):
                    raise
                # a forward that writes per-sample values into a buffer in place fails on the unbatched copy: run
                # again with every buffer batched (nothing was written: the copies are the call's own)
                state = self._buffer_state(n, True)
                stacked, out_plan = run_vmap(self.primary, theta, state, plan, self.out_dims)
                self._batched_buffers.add(modes)
            out = rebuild_vmap(stacked, out_plan)
        return out, state

    def _missing_conditioning(self, args: tuple[Any, ...], cond: Mapping[str, Any]) -> None:
        """Raise for missing conditioning, saying where a positional number went.

        Raises:
            HyperloomError: Always, naming the missing inputs and the keyword form.
        """
        names = list(self.hypernet.input_set.names)
        missing = [k for k in names if k not in cond]
        example = ", ".join(f"{k}=..." for k in missing)
        msg = f"Missing conditioning input(s) {missing}: conditioning is passed by keyword, e.g. hnet(x, {example})"
        numbers = [(i, a) for i, a in enumerate(args) if _is_scalar(a)]
        if numbers:
            shown = ", ".join(f"{i} ({a!r})" for i, a in numbers)
            msg += f"; positional argument(s) {shown} went to the model {type(self.primary).__name__}, not to the hypernetwork"
        raise HyperloomError(msg)

    def _buffer_state(self, n: int, batch_all: bool) -> BufferState:
        """The buffers as per-sample state, less the bound ones (they travel with ``theta``: hyperloom.dropout)."""
        state = BufferState(self.primary, n, batch_all=batch_all, modules=self._named_modules)
        for k in self.bound:
            state.batched.pop(k, None)
            state.shared.pop(k, None)
        return state

    def _check_outputs(self, theta: ParamDict, plan: Any, out: Any, n: int) -> None:
        """Once per argument layout, compare the stacked output shapes with a shared call of the same batch."""
        if not self.check_outputs or value_checks_off() or n < 2 or all(d is None for d in plan.dims):
            return  # a batch of one cannot tell the sample dimension apart; nothing batched: nothing to compare
        layout = (plan.signature, self.per_sample_mode, n, tuple(m.training for m in self._all_modules))
        if layout in self._checked_layouts:
            return
        check_against_shared(theta, plan, out, self._shared_dry_run)
        if len(self._checked_layouts) >= _MAX_CHECKED_LAYOUTS:
            self._checked_layouts.clear()
        self._checked_layouts.add(layout)

    def _shared_dry_run(self, theta: ParamDict, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A shared call that leaves the model and the random streams as they were.

        Copies of the buffers, torch's, Python's and numpy's random states restored; forward hooks do see
        it, and a model that writes into its inputs in place writes once more (``check_outputs = False``
        turns the check off).
        """
        bufs = {k: v.clone() for k, v in self.primary.named_buffers()}
        saved = rng_state()
        try:
            return functional_call(self.primary, {**theta, **bufs}, args, kwargs, tie_weights=False, strict=False)
        finally:
            set_rng_state(saved)

    def extra_repr(self) -> str:
        """What is predicted, from which inputs, and how (``theta0 + Delta`` or ``Delta`` alone)."""
        h = self.hypernet
        inputs = ", ".join(h.input_set.names)
        how = f"theta0 + Delta({inputs})" if h.theta0 is not None else f"Delta({inputs}) (no theta0)"
        shown = [f"{n} {tuple(h.shapes[n])}" for n in self.predicted[:8]]
        if len(self.predicted) > 8:
            shown.append(f"... ({len(self.predicted) - 8} more)")
        return (
            f"predicted={len(self.predicted)} tensors = {how}, encoding={h.encoding.name}: {', '.join(shown)}\n"
            f"per_sample={self.per_sample_mode!r}"
        )


def split_conditioning(
    hypernet: HyperNetwork, primary: nn.Module, model_kwargs: frozenset[str] | None, kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a forward's keyword arguments into ``(conditioning, the primary model's own)``.

    Raises:
        HyperloomError: On a keyword that is neither a declared input nor an argument of
            ``primary.forward`` (when its signature is known: ``model_kwargs`` not ``None``).
    """
    names = hypernet.input_set.specs
    cond = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    if model_kwargs is not None:
        unknown = [k for k in rest if k not in model_kwargs]
        if unknown:
            raise HyperloomError(
                f"Unknown keyword argument(s) {unknown}: neither declared inputs {list(names)} "
                f"nor arguments of {type(primary).__name__}.forward {sorted(model_kwargs)}"
            )
    return cond, rest


def _initial_theta0(name: str, p: torch.Tensor, how: str) -> torch.Tensor:
    """``theta0``'s starting value: the model's own (``"model"``), or MIP's init keeping gains (``"init"``)."""
    # HyperNetwork copies the model's value; init_theta0 keeps normalisation gains and other non-bias scalars
    return p.detach() if how == "model" else init_theta0(name, p)


@overload
def hypernetize(
    model: nn.Module,
    *,
    inputs: Mapping[str, InputLike],
    predict: Selector | Sequence[Selector] | None = None,
    hidden: Sequence[int] = (16, 64, 128),
    activation: str = "leaky_relu",
    norm: str = "none",
    formulation: str = "mip",
    encoding: str | Encoding | None = None,
    additive: bool | None = None,
    init: str = "mip",
    zero_init: bool = False,
    theta0: Literal["model", "init"] = "model",
    head: str | Chunked | Structured = "dense",
    rank: int | None = None,
    per_sample: PerSampleMode = "auto",
    batch_dim: int = 0,
    in_dims: InDims | None = None,
    out_dims: OutDims | None = None,
    lora: None = None,
) -> HyperModel: ...


@overload
def hypernetize(
    model: nn.Module,
    *,
    inputs: Mapping[str, InputLike],
    predict: Selector | Sequence[Selector] | None = None,
    hidden: Sequence[int] = (16, 64, 128),
    activation: str = "leaky_relu",
    norm: str = "none",
    formulation: str = "mip",
    encoding: str | Encoding | None = None,
    additive: bool | None = None,
    init: str = "mip",
    zero_init: bool = False,
    theta0: Literal["model", "init"] = "model",
    head: str | Chunked | Structured = "dense",
    rank: int | None = None,
    per_sample: PerSampleMode = "auto",
    batch_dim: int = 0,
    in_dims: InDims | None = None,
    out_dims: OutDims | None = None,
    lora: LoRA,
) -> LoRAModel: ...


def hypernetize(
    model: nn.Module,
    *,
    inputs: Mapping[str, InputLike],
    predict: Selector | Sequence[Selector] | None = None,
    hidden: Sequence[int] = (16, 64, 128),
    activation: str = "leaky_relu",
    norm: str = "none",
    formulation: str = "mip",
    encoding: str | Encoding | None = None,
    additive: bool | None = None,
    init: str = "mip",
    zero_init: bool = False,
    theta0: Literal["model", "init"] = "model",
    head: str | Chunked | Structured = "dense",
    rank: int | None = None,
    per_sample: PerSampleMode = "auto",
    batch_dim: int = 0,
    in_dims: InDims | None = None,
    out_dims: OutDims | None = None,
    lora: LoRA | None = None,
) -> HyperModel | LoRAModel:
    """Turn an existing model into a hypernetwork model (MIP by default).

    Args:
        model: Any ``nn.Module``; it is copied, never modified.
        inputs: Named conditioning inputs with declared ranges, e.g.
            ``{"lam": (0.0, 1.0)}``, ``{"lr": (1e-4, 1e-1, "log")}`` or
            ``{"z": hl.Input(0, 1, dim=8)}``, or learned task ids
            ``{"task": hl.Task(5), "lam": (0.0, 1.0)}``.
        predict: Which parameters to generate: module types, names, globs or
            compiled regexes (see :func:`~hyperloom.select_parameters`);
            ``None`` predicts every parameter.
        hidden: Hypernetwork trunk widths.
        activation: Trunk activation (``relu``, ``leaky_relu``, ``tanh``,
            ``gelu``, ``elu``, ``silu``).
        norm: Trunk normalisation (``none``, ``batchnorm``, ``layernorm``,
            ``weightnorm``).
        formulation: ``"mip"`` or ``"default"`` (raw input, no ``theta0``).
        encoding: Override the formulation's encoding (``cossin``,
            ``identity``, ``raw``, ``zoneminusz``, ``l2``, ``standardize``).
        additive: Override the formulation's additive output.
        init: ``"mip"`` or ``"torch"`` initialisation of the hypernetwork.
        zero_init: Start with ``Delta = 0`` (the model starts exactly equal to
            the original when additive).
        theta0: ``"model"`` takes ``theta0`` from the model's current
            (possibly pretrained) weights; ``"init"`` re-initialises it:
            Kaiming fan_in for tensors of two or more dimensions, zero for
            biases, and the model's own value for other vectors and scalars
            (normalisation gains stay 1).
        head: ``"dense"`` or ``"lowrank"`` (``rank`` for the latter), or a shared head that does not
            grow with the model: ``"chunked"``, ``"structured"`` or their options
            :class:`~hyperloom.Chunked` / :class:`~hyperloom.Structured` (see :mod:`hyperloom.shared_heads`).
        rank: Rank of the low-rank head.
        per_sample: How per-sample weights run: ``"auto"``, ``"vmap"``, ``"loop"``.
        batch_dim: Sample dimension of every tensor argument in per-sample mode.
        in_dims: Exceptions to ``batch_dim``, per positional index or keyword
            name: a dimension, or ``None`` for an argument shared by all
            samples (see :mod:`hyperloom.per_sample`).
        out_dims: Sample dimension(s) of the outputs (default ``batch_dim``).
        lora: LoRA mode (a :class:`~hyperloom.LoRA`): keep the model's weights, frozen, and generate
            low-rank adapters ``Delta W = (alpha / r) B A`` for the projections selected by
            ``predict`` (or ``LoRA(targets=...)``), applied factorised, never materialised (see
            :mod:`hyperloom.lora`). ``per_sample``, ``in_dims``, ``out_dims`` and ``theta0`` do not apply.

    Returns:
        A :class:`HyperModel`, or a :class:`~hyperloom.LoRAModel` in LoRA mode.

    Example:
        >>> import hyperloom as hl
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> hnet = hl.hypernetize(net, predict=[nn.Conv2d], inputs={"lam": (0.0, 1.0)})
        >>> hnet.predicted
        ('0.weight', '0.bias')
        >>> hnet(torch.randn(2, 1, 8, 8), lam=0.25).shape
        torch.Size([2, 10])

    Raises:
        HyperloomError: With the model's class name as context, on any
            invalid argument (see :class:`HyperNetwork`, :class:`HyperModel`
            and :func:`~hyperloom.select_parameters`).
    """
    if not isinstance(model, nn.Module):
        raise HyperloomError(f"hypernetize expects an nn.Module, got {type(model).__name__}")
    try:
        if theta0 not in ("model", "init"):
            raise HyperloomError(f"theta0 must be 'model' or 'init', got {theta0!r}")
        if lora is not None:
            given = {"per_sample": per_sample != "auto", "in_dims": in_dims is not None, "out_dims": out_dims is not None}
            given["theta0"] = theta0 != "model"
            if any(given.values()):
                raise HyperloomError(
                    f"{[k for k, v in given.items() if v]} do not apply in LoRA mode (the model runs as one call with "
                    "factorised adapters; its weights are the pretrained ones)"
                )
            if not callable(getattr(lora, "build", None)):
                raise HyperloomError(f"lora must be a hyperloom.LoRA, got {type(lora).__name__}")
            return lora.build(
                model,
                inputs=inputs,
                predict=predict,
                batch_dim=batch_dim,
                hidden=hidden,
                activation=activation,
                norm=norm,
                formulation=formulation,
                encoding=encoding,
                additive=additive,
                init=init,
                zero_init=zero_init,
                head=head,
                rank=rank,
            )
        names = select_parameters(model, predict)
        params = dict(model.named_parameters())
        kinds = {(params[n].dtype, params[n].device) for n in names}
        if len(kinds) > 1:
            detail = ", ".join(f"{n}: {params[n].dtype} on {params[n].device}" for n in names)
            raise HyperloomError(f"Predicted parameters must share one dtype and device, got {detail}")
        ref = params[names[0]]
        check_target_memory({n: params[n].shape for n in names}, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            targets = {n: _initial_theta0(n, params[n], theta0) for n in names}
        hypernet = HyperNetwork(
            inputs,
            targets,
            hidden=hidden,
            activation=activation,
            norm=norm,
            formulation=formulation,
            encoding=encoding,
            additive=additive,
            init=init,
            zero_init=zero_init,
            head=head,
            rank=rank,
            dtype=ref.dtype,
            device=ref.device,
        )
        return HyperModel(model, hypernet, per_sample=per_sample, batch_dim=batch_dim, in_dims=in_dims, out_dims=out_dims)
    except HyperloomError as e:
        raise HyperloomError(f"hypernetize({type(model).__name__}): {e}") from None


__all__ = ["NO_VMAP_MODULES", "RESERVED_INPUT_NAMES", "HyperModel", "hypernetize"]
