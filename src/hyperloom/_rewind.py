"""Putting module state back: a failed training step undone, a block run in eval mode.

A forward pass changes more than its output: BatchNorm updates its running statistics in place (a NaN input
makes them NaN), a :class:`~hyperloom.SelfTuner` counts its draws in buffers, a regulariser draws from its
own generator (its extra state), and the loss function draws from the global generators. :func:`snapshot`
records all of it before a step; :meth:`Snapshot.restore` puts it back when the step fails, so that the
state a trainer then saves is the state before the step. :func:`eval_mode` runs a block with every module
in eval mode and puts each module's own mode back after it.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._rng import set_rng_state


def _rng_state() -> dict[str, Any]:
    """The global generators' states, CUDA's only once CUDA is initialised (reading them would initialise it)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": []}
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # pragma: no cover - no GPU in CI
        state["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[no-untyped-call]
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and values, NaNs in the same places counting as equal."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return bool(torch.equal(a, b))


def _has_extra_state(m: nn.Module) -> bool:
    return type(m).get_extra_state is not nn.Module.get_extra_state


@dataclass
class Snapshot:
    """What :func:`snapshot` recorded: restore it with :meth:`restore`."""

    rng: dict[str, Any]
    #: (module, buffer name, the buffer object or None, a clone of its value or None) per registered buffer
    buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)
    #: (module, a copy of its extra state) for modules that define ``get_extra_state``
    extra: list[tuple[nn.Module, Any]] = field(default_factory=list)

    def restore(self, root: nn.Module, *, rng: bool = True) -> None:
        """Put the generators, buffers (values, identity, ties, ``None`` entries) and extra states back.

        Buffers registered since the snapshot are removed. A buffer that cannot be written in place (an expanded or
        inference tensor) is left alone when its value did not change, else replaced by the recorded copy.
        ``rng=False`` leaves the generators as they are now.
        """
        if rng:
            set_rng_state(self.rng)
        known = {(id(m), k) for m, k, _, _ in self.buffers}
        replaced: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for m in root.modules():
                for k in [k for k, b in m._buffers.items() if (id(m), k) not in known and not _uninitialized(b)]:
                    del m._buffers[k]  # registered during the step
                    m._non_persistent_buffers_set.discard(k)
            done: set[int] = set()
            for m, k, obj, value in self.buffers:
                if _uninitialized(obj):
                    continue  # a lazy module materialised by the step: there is no uninitialised state to go back to
                m._buffers[k] = replaced.get(id(obj), obj)
                if obj is None or value is None or id(obj) in done:
                    continue
                done.add(id(obj))
                if not _same(obj, value):
                    try:
                        obj.copy_(value)
                    except RuntimeError:  # cannot be written in place
                        replaced[id(obj)] = m._buffers[k] = value
            if replaced:  # a tie seen before the replacement: point it at the copy too
                for m, k, obj, _ in self.buffers:
                    if obj is not None and id(obj) in replaced:
                        m._buffers[k] = replaced[id(obj)]
        for m, state in self.extra:
            m.set_extra_state(state)


def _uninitialized(b: Any) -> bool:
    return isinstance(b, nn.parameter.UninitializedBuffer)


def snapshot(root: nn.Module) -> Snapshot:
    """Record the global generators and every buffer and extra state of ``root``'s modules (one clone per tensor)."""
    snap = Snapshot(_rng_state())
    clones: dict[int, torch.Tensor] = {}
    for m in root.modules():
        for k, b in m._buffers.items():
            if b is None or _uninitialized(b):
                snap.buffers.append((m, k, b, None))
                continue
            if id(b) not in clones:
                clones[id(b)] = b.detach().clone()
            snap.buffers.append((m, k, b, clones[id(b)]))
        if _has_extra_state(m):
            state = m.get_extra_state()
            snap.extra.append((m, state.clone() if isinstance(state, torch.Tensor) else copy.deepcopy(state)))
    return snap


@contextmanager
def eval_mode(root: nn.Module) -> Iterator[None]:
    """``root`` and its submodules in eval mode inside the block, each module's own mode restored after it."""
    modes = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
