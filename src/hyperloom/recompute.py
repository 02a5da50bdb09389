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
cannot recompute under ``vmap`` and refuse checkpointing by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

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

    Raises:
        HyperloomError: In a per-sample call (see :func:`refuse_per_sample`).
    """

    def __init__(self, state: CallState) -> None:
        self.state = state

    def __call__(self, module: Any, args: Any) -> None:
        if self.state.mode is not None and checkpointing_active():
            if self.state.mode == "per_sample":
                raise refuse_per_sample()
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


def refuse_per_sample() -> HyperloomError:
    """The error for activation checkpointing in a per-sample call."""
    return HyperloomError(
        "Activation checkpointing (torch.utils.checkpoint, gradient_checkpointing_enable()) cannot run in a per-sample "
        "call (one weight set per sample): the recomputation in backward() cannot re-enter torch.func.vmap; use shared "
        "conditioning (one value per input) with checkpointing, or turn checkpointing off "
        "(model.gradient_checkpointing_disable()) for per-sample training"
    )


__all__ = ["Binding", "CallState", "Probe", "checkpointing_active", "leave", "refuse_per_sample", "route"]
