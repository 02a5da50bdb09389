"""Generated weights during activation-checkpoint recomputation.

A :class:`~hyperloom.HyperModel` runs its primary network with the generated weights bound by
:func:`torch.func.functional_call`, which restores the module when the call returns. Activation
checkpointing (``torch.utils.checkpoint``, reentrant or not, Hugging Face's
``gradient_checkpointing_enable()``, a custom model's own ``checkpoint`` calls) re-runs parts of the forward
during ``backward()``: by then the call has returned, and the recomputation would see no weight (or the
placeholder ``theta0``).

The binding therefore lives as long as the call's autograd graph:

* the generated tensors enter the call through :class:`_Leave` (an identity), and when the call used
  checkpointing, its outputs leave through :class:`_Route` (an identity that also depends on the generated
  tensors, so their gradient path exists even when every use of them ran under reentrant checkpointing's
  ``no_grad``);
* in ``backward()``, ``_Route`` runs first (it is the call's last operation) and binds the call's generated
  tensors to the modules again, as detached leaves; every recomputation of this call then uses them;
* reentrant checkpointing accumulates its weight gradients into those leaves; ``_Leave``, which runs after the
  whole primary graph (its autograd sequence number is lower than any primary operation's), adds them to the
  gradient it passes on to the hypernetwork; non-reentrant checkpointing only reads the recomputed values
  (its gradients flow through the original graph);
* when the backward pass ends, the modules get their placeholders back.

Gradients equal those of the same model without checkpointing. Per-sample calls (one weight set per sample)
refuse checkpointing, reentrant or not, with an error that names the module (:func:`per_sample_culprit` before
the call, the probes and :func:`checkpoint_culprit` during it): reentrant checkpointing's autograd function has
no ``vmap`` rule (it cannot even run under :func:`torch.func.vmap`), and no recomputation in ``backward()``
can re-enter ``vmap`` to see one weight set per sample; in a loop over samples (``per_sample="loop"``) each
recomputed region would need its own sample's weights bound, which the single binding of a call cannot give.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import HyperloomError

Bind = Callable[[dict[str, torch.Tensor]], None]


def checkpointing_active() -> bool:
    """Whether the current forward code runs inside activation checkpointing (or under ``no_grad`` / saved-tensor hooks)."""
    return not torch.is_grad_enabled() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class CallState:
    """What a HyperModel call is doing, shared with its :class:`Probe` hooks (copied and pickled with the model)."""

    def __init__(self) -> None:
        #: ``None`` outside a call that could be checkpointed, else ``"shared"`` or ``"per_sample"``.
        self.mode: str | None = None
        #: Whether the current shared call ran checkpointed code.
        self.seen = False


class Probe:
    """Forward pre-hook of the modules owning predicted tensors: notices activation checkpointing in a call.

    Args:
        state: The model's call state.
        name: The module's name in the primary network (named in the error).

    Raises:
        HyperloomError: In a per-sample call (see :func:`refuse_per_sample`).
    """

    def __init__(self, state: CallState, name: str | None = None) -> None:
        self.state = state
        self.name = name

    def __call__(self, module: Any, args: Any) -> None:
        if self.state.mode is not None and checkpointing_active():
            if self.state.mode == "per_sample":
                name = getattr(self, "name", None)  # probes pickled before 0.2 have no name
                where = f"module {name!r} ({type(module).__name__})" if name is not None else type(module).__name__
                raise refuse_per_sample(f"{where}, which owns predicted tensors, ran inside activation checkpointing")
            self.state.seen = True


class Binding:
    """The generated tensors of one call, rebound to the modules for its recomputations.

    Args:
        names: The predicted names, in order.
        bind: Sets the modules' tensors from a ``{name: tensor}`` mapping.
        unbind: Puts the placeholders back.
    """

    def __init__(self, names: Sequence[str], bind: Bind, unbind: Callable[[], None]) -> None:
        self.names = tuple(names)
        self.bind, self.unbind = bind, unbind
        #: The call's generated values, detached (no reference into the autograd graph: no reference cycle
        #: through the nodes' ``ctx``), and whether each one requires grad.
        self.values: tuple[torch.Tensor, ...] = ()
        self.grads: tuple[bool, ...] = ()
        #: Other tensors the call passed to the model (buffers fed from the conditioning), detached.
        self.extra: dict[str, torch.Tensor] = {}
        self.leaves: tuple[torch.Tensor, ...] = ()

    def install(self) -> None:
        """Bind fresh detached leaves of this call's tensors (called by :class:`_Route` at the start of backward)."""
        self.leaves = tuple(v.detach().requires_grad_(g) for v, g in zip(self.values, self.grads))
        self.bind({**self.extra, **dict(zip(self.names, self.leaves))})
        torch.autograd.Variable._execution_engine.queue_callback(self.unbind)


class _Leave(torch.autograd.Function):
    """Identity on the generated tensors; its backward adds what reentrant recomputation accumulated."""

    @staticmethod
    def forward(ctx: Any, binding: Binding, *theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.binding = binding
        ctx.set_materialize_grads(False)  # an unused tensor keeps no gradient (None), as without this node
        return tuple(t.view_as(t) for t in theta)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        b: Binding = ctx.binding
        out: list[torch.Tensor | None] = []
        for g, leaf in zip(grads, b.leaves or (None,) * len(grads)):
            extra = None if leaf is None else leaf.grad
            out.append(g if extra is None else (extra if g is None else g + extra))
        if b.leaves:
            for leaf in b.leaves:
                leaf.grad = None
        return (None, *out)


class _Route(torch.autograd.Function):
    """Identity on the call's outputs; its backward rebinds the call's tensors before any recomputation."""

    @staticmethod
    def forward(ctx: Any, binding: Binding, n_out: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.binding, ctx.n_out = binding, n_out
        ctx.set_materialize_grads(False)
        ctx.n_w = len(tensors) - n_out
        return tuple(t.view_as(t) for t in tensors[:n_out])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.binding.install()
        return (None, None, *grads, *([None] * ctx.n_w))  # the edge to the weights only orders backward


def leave(binding: Binding, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generated tensors as they enter the call (through :class:`_Leave`); pass the result to :func:`route`."""
    values = tuple(theta[n] for n in binding.names)
    binding.values = tuple(v.detach() for v in values)
    binding.grads = tuple(v.requires_grad for v in values)
    out = _Leave.apply(binding, *values)  # type: ignore[no-untyped-call]
    return dict(zip(binding.names, out))


def route(binding: Binding, out: Any, entered: dict[str, torch.Tensor]) -> Any:
    """The call's output with its tensors requiring grad passed through :class:`_Route` (``entered``: from :func:`leave`)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten(out)
    idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not idx:
        return out
    routed = _Route.apply(binding, len(idx), *(flat[i] for i in idx), *(entered[n] for n in binding.names))  # type: ignore[no-untyped-call]
    for i, r in zip(idx, routed):
        flat[i] = r
    return tree_unflatten(flat, spec)


def refuse_per_sample(culprit: str | None = None) -> HyperloomError:
    """The error for activation checkpointing in a per-sample call (``culprit``: which module, and what it does)."""
    where = f" ({culprit})" if culprit else ""
    return HyperloomError(
        "Activation checkpointing (torch.utils.checkpoint, gradient_checkpointing_enable()) cannot run in a per-sample "
        f"call (one weight set per sample){where}: reentrant checkpointing cannot run under torch.func.vmap and no "
        "recomputation in backward() can re-enter it, so neither use_reentrant=True nor use_reentrant=False works per "
        "sample; use shared conditioning (one value per input) with checkpointing, or turn checkpointing off for "
        "per-sample training (Hugging Face: model.gradient_checkpointing_disable() or activation_checkpointing_disable(); "
        "your own torch.utils.checkpoint calls: call the checkpointed function directly)"
    )


def _hf_hook(module: nn.Module) -> bool:
    """Whether ``module`` carries Hugging Face's ``make_inputs_require_grads`` forward hook (``requires_grad_()``)."""
    return any(getattr(h, "__name__", "") == "make_inputs_require_grads" for h in module._forward_hooks.values())


def per_sample_culprit(primary: nn.Module, *, vmap: bool) -> str | None:
    """The module of ``primary`` that makes a per-sample call checkpoint (found before the call), or ``None``.

    Hugging Face's ``gradient_checkpointing_enable()`` (or ``activation_checkpointing_enable()``) sets
    ``gradient_checkpointing = True`` on the layers it checkpoints (in training mode), at any depth of the
    model; for models fed ``input_ids`` it also hooks the input embeddings with ``make_inputs_require_grads``,
    whose ``requires_grad_()`` cannot run under :func:`torch.func.vmap` (in eval mode too).

    Args:
        primary: The primary network.
        vmap: Whether the call runs under ``vmap`` (else a loop over samples, where the hook is harmless).

    Returns:
        A description naming the module, or ``None``.
    """
    modules = list(primary.named_modules())
    for name, m in modules:
        if getattr(m, "gradient_checkpointing", False) is True and m.training:
            return f"module {name or '<root>'!r} ({type(m).__name__}) has Hugging Face gradient checkpointing on, in training mode"
    if vmap:
        for name, m in modules:
            if _hf_hook(m):
                return (
                    f"module {name or '<root>'!r} ({type(m).__name__}) carries Hugging Face's make_inputs_require_grads hook, "
                    "registered by gradient_checkpointing_enable() / activation_checkpointing_enable(), whose requires_grad_() "
                    "cannot run under torch.func.vmap "
                    "(in eval mode, without checkpointing, per_sample='loop' runs it; model.disable_input_require_grads() "
                    "removes it)"
                )
    return None


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def checkpoint_culprit(primary: nn.Module, error: BaseException) -> str | None:
    """If ``error`` was raised inside ``torch.utils.checkpoint`` run by ``primary``, the checkpointed module; else ``None``.

    Reentrant checkpointing fails under :func:`torch.func.vmap` as soon as it starts (its autograd function has no
    ``vmap`` rule), before any probe sees it: the traceback tells where it was called.
    """
    names = {id(m): n for n, m in primary.named_modules()}
    caller: nn.Module | None = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            fn = frame.f_locals.get("function")
            fn = getattr(fn, "func", fn)  # functools.partial (Hugging Face's layers)
            target = getattr(fn, "__self__", fn)  # a bound method (module.__call__, module.forward)
            if isinstance(target, nn.Module) and id(target) in names:
                return f"module {names[id(target)] or '<root>'!r} ({type(target).__name__}) is checkpointed"
            if caller is not None:
                return f"module {names[id(caller)] or '<root>'!r} ({type(caller).__name__}) calls torch.utils.checkpoint"
            return "torch.utils.checkpoint runs inside the model"
        this = frame.f_locals.get("self")
        if isinstance(this, nn.Module) and id(this) in names:
            caller = this
    return None


__all__ = [
    "Binding",
    "CallState",
    "Probe",
    "checkpoint_culprit",
    "checkpointing_active",
    "leave",
    "per_sample_culprit",
    "refuse_per_sample",
    "route",
]
