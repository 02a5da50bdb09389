"""Generated adapters that stay reachable when checkpointed layers are recomputed during ``backward()``.

LoRA mode applies the adapters generated for one call with forward hooks on the target modules. Activation
(gradient) checkpointing runs parts of the model a second time during ``backward()``, long after the call
returned, so the hooks must still be there then and must use **that call's** factors:

* every call registers its hooks and keeps them while its autograd graph lives: the call is anchored in the
  ``metadata`` of the graph's nodes (its outputs' and the adapters'), and the hooks are removed when the graph
  (and with it the call) is freed, or at once after a call without a graph (``no_grad``, inference);
* a hook acts for the innermost running call of its model; outside any call it acts only while ``backward()``
  executes a node created during its own call (``torch._C._current_autograd_node()``, whose sequence number lies
  in the call's range: the recomputation of one of the call's checkpointed layers), and does nothing otherwise
  (the wrapped model called directly is the base model);
* non-reentrant checkpointing (``use_reentrant=False``, Hugging Face's default) recomputes the saved tensors of
  the original graph: the hooks use the call's own factors, so the recomputed values are those of the forward;
* reentrant checkpointing (``use_reentrant=True``) ran the layer under ``no_grad`` and backpropagates the
  recomputed layer in a nested ``backward()``, in which the call's factors are no inputs: the hooks regenerate
  the factors from the call's conditioning (a fresh graph through the hypernetwork, once per recomputed region,
  the hypernetwork's buffers left untouched), so the nested backward accumulates their gradients into the
  hypernetwork's parameters, exactly as it does for the base model's own parameters.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree

from .errors import HyperloomError
from .types import ParamDict

_METADATA_KEY = "hyperloom.lora_call"
_local = threading.local()


def _active() -> list[Call]:
    stack: list[Call] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def sequence_nr() -> int:
    """The autograd sequence number the next node created on this thread gets."""
    get = getattr(torch._C._autograd, "_get_sequence_nr", None)
    if get is not None:
        return int(get())
    with torch.enable_grad():  # pragma: no cover - older torch: read it from a node made for the purpose
        return int((torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()) + 1  # type: ignore[union-attr]


def _running_node_nr() -> int | None:
    node = torch._C._current_autograd_node()
    return None if node is None else int(node._sequence_nr())


Adapter = Callable[[str, torch.Tensor, ParamDict, "int | None"], torch.Tensor]


class Call:
    """One call of a LoRA model: its factors, conditioning and the range of autograd nodes it created.

    Args:
        owner: The model (what the innermost running call is looked up by).
        factors: The generated factors of this call.
        n: Samples (per-sample conditioning) or ``None``.
        adapter: ``adapter(name, x, factors, n)``: the update for a target's input ``x``.
        regenerate: Generates the factors again from the call's conditioning (a fresh graph).
    """

    def __init__(self, owner: object, factors: ParamDict, n: int | None, adapter: Adapter, regenerate: Callable[[], ParamDict]) -> None:
        self.owner = owner
        self.factors = factors
        self.n = n
        self.adapter = adapter
        self.regenerate = regenerate
        self.grad = torch.is_grad_enabled()
        #: set by the owner when the raw conditioning requires grad: why, in words (empty: it does not)
        self.conditioning_requires_grad = ""
        self.names: dict[int, str] = {}
        self.lo = sequence_nr()
        self.hi: int | None = None  # set when the call returns
        self.no_grad_targets: set[int] = set()  # modules run under no_grad inside a grad call: reentrant regions
        self._regenerated: tuple[int, ParamDict] | None = None
        self._handles: list[Any] = []
        self.fired: set[str] = set()  # the targets whose hook applied the update during the call

    # -- the hooks ---------------------------------------------------------------------------------
    def register(self, modules: dict[str, torch.nn.Module]) -> None:
        """Register this call's forward hook on each target module (removed by :meth:`release`)."""
        ref = weakref.ref(self)
        for name, module in modules.items():
            self.names[id(module)] = name
            self._handles.append(module.register_forward_hook(_Hook(ref, name), with_kwargs=True))
        weakref.finalize(self, _remove, self._handles)

    def release(self) -> None:
        """Remove the hooks now (a call without a graph: nothing recomputes it later)."""
        _remove(self._handles)

    def acts(self) -> bool:
        """Whether the hooks of this call apply now (see the module docstring)."""
        for call in reversed(_active()):
            if call.owner is self.owner:
                return call is self
        nr = _running_node_nr()
        return nr is not None and self.hi is not None and self.lo <= nr < self.hi

    def factors_now(self, module: torch.nn.Module) -> ParamDict:
        """The factors to use for ``module`` now: the call's own, or regenerated in a reentrant recomputation."""
        if self.hi is None:  # the call itself is running
            if self.grad and not torch.is_grad_enabled():
                if self.conditioning_requires_grad:
                    raise HyperloomError(
                        f"LoRA target {self.names.get(id(module), '?')!r} ran under torch.no_grad() inside a call that records "
                        f"gradients (reentrant activation checkpointing), and {self.conditioning_requires_grad}: a reentrant "
                        "recomputation cannot carry gradients back to them; use non-reentrant checkpointing "
                        "(use_reentrant=False, Hugging Face's default) or conditioning that does not require grad"
                    )
                self.no_grad_targets.add(id(module))
            return self.factors
        if id(module) in self.no_grad_targets and torch.is_grad_enabled():
            nr = _running_node_nr()
            assert nr is not None
            if self._regenerated is None or self._regenerated[0] != nr:
                self._regenerated = (nr, self.regenerate())
            return self._regenerated[1]
        return self.factors

    # -- the call itself ---------------------------------------------------------------------------
    def __enter__(self) -> Call:
        _active().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _active()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                break
        self.hi = sequence_nr()

    def anchor(self, out: Any) -> None:
        """Keep this call (and its hooks) alive as long as the graph of ``out`` lives; release it if there is none."""
        anchored = False
        if self.grad:
            for leaf in _pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.grad_fn is not None:
                    _metadata(leaf.grad_fn)[_METADATA_KEY] = self
                    anchored = True
        if not anchored:
            self.release()

    def keep_with(self, t: torch.Tensor) -> None:
        """Anchor the call in the node of an adapter output too (a graph that lives without the call's outputs)."""
        if t.grad_fn is not None:
            _metadata(t.grad_fn)[_METADATA_KEY] = self


def _metadata(node: Any) -> dict[str, Any]:
    """The node's ``metadata`` dict (lives and dies with the node)."""
    meta: dict[str, Any] = node.metadata
    return meta


def _remove(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class _Hook:
    """The forward hook of one call on one target module (a weak reference: the graph keeps the call alive).

    Pickled or deep-copied (with a model whose graph is still alive) it becomes inert, and an inert hook
    removes itself from its module the first time it runs.
    """

    def __init__(self, ref: weakref.ReferenceType[Call] | None, name: str) -> None:
        self.ref, self.name = ref, name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Hook, (None, self.name))

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        call = None if self.ref is None else self.ref()
        if call is None:
            strip_hooks(module, only=self)
            return None
        if not call.acts():
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        call.fired.add(self.name)
        out = output + call.adapter(self.name, x, call.factors_now(module), call.n)
        if call.hi is None and call.grad:
            call.keep_with(out)
        return out


def strip_hooks(root: torch.nn.Module, *, only: _Hook | None = None) -> None:
    """Remove the LoRA call hooks (all, or ``only`` that one) from ``root`` and its submodules (copies of a model)."""
    for m in root.modules():
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(hook, _Hook) and (only is None or hook is only):
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
