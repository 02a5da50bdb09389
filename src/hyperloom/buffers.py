"""Buffers in per-sample calls: one rule for every buffer a forward writes.

In a per-sample call (one weight set per sample, see :mod:`hyperloom.per_sample`) every buffer of the
primary network is functional state, carried into the call and out of it:

* **in**: every sample starts from the buffer's current value (a copy: nothing the call does touches the
  module's tensors while it runs);
* **out**: a buffer the forward wrote, in place (``self.running_mean.mul_(...)``, BatchNorm's running
  statistics) or by reassignment (``self.ema = 0.9 * self.ema + 0.1 * x.mean()``), gets the *mean over the
  samples* of the per-sample results (each sample being a batch of one); a non-floating buffer (a counter
  such as ``num_batches_tracked``, a flag) gets the value every sample agrees on, and a
  :class:`~hyperloom.HyperloomError` names it if they disagree;
* the result is written **into the module's existing buffer tensor, in place** (like BatchNorm's own update:
  autograd's version counter is not bumped), after the call succeeded and its output checks passed. Buffer
  identities never change, so code holding a buffer (``hl.tune(eval_mode=False)`` restoring it, an
  optimiser, a hook) stays valid; no tensor created inside ``torch.func.vmap`` is left in the module; under
  ``torch.inference_mode()`` no inference tensor is left in the model.

A call that raises writes nothing. A written buffer must keep its shape (a forward that stores
``self.cache = x`` refuses by name); a buffer registered during a per-sample forward is refused by name (it
would hold per-sample tensors); plain tensor *attributes* (not buffers) that a forward sets are not state:
after a ``vmap`` call they get back the value they had before (``nn.utils.weight_norm`` recomputes its
``weight`` attribute at every call this way), or are removed.

Under ``vmap``, buffers start unbatched (one copy shared by the samples) except the running statistics of
BatchNorm layers in training mode, which get one copy per sample. A forward that writes a per-sample value
in place into another buffer fails under ``vmap`` on the unbatched copy; the call is then run again with
every buffer batched (and that layout is remembered), so such a model works too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import HyperloomError


def _is_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor created inside ``torch.func.vmap`` (dead once the call returned)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _split(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return root.get_submodule(mod_name), attr


def _bn_stats(modules: Iterable[nn.Module]) -> set[int]:
    """Ids of the running statistics of BatchNorm / InstanceNorm layers in training mode.

    Their kernel writes them in place per sample, without bumping autograd's version counter, so they count
    as written at every training call.
    """
    out: set[int] = set()
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            for b in (m.running_mean, m.running_var):
                if isinstance(b, torch.Tensor):
                    out.add(id(b))
    return out


class BufferState:
    """The buffers of ``primary`` as per-sample state for one call of ``n`` samples (see the module docstring).

    Args:
        primary: The primary network.
        n: Number of samples.
        batch_all: Give every buffer one copy per sample (the loop, and models that write per-sample values
            into buffers in place); otherwise only BatchNorm's running statistics in training mode.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> state = BufferState(bn, 3, batch_all=False)
        >>> sorted(state.batched), sorted(state.shared)
        (['running_mean', 'running_var'], ['num_batches_tracked'])
        >>> state.batched["running_mean"].add_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))[0].tolist()
        [0.0, 0.0]
        >>> state.commit(); bn.running_mean.tolist()  # the mean over samples, written in place
        [1.0, 1.0]

    Raises:
        HyperloomError: From :meth:`commit` and :meth:`restore_attributes` (see the module docstring).
    """

    def __init__(self, primary: nn.Module, n: int, *, batch_all: bool, modules: list[tuple[str, nn.Module]] | None = None) -> None:
        self.primary, self.n, self.batch_all = primary, n, batch_all
        #: ``primary.named_modules(remove_duplicate=False)``, computed once by the caller when given.
        self.modules = list(primary.named_modules(remove_duplicate=False)) if modules is None else modules
        self.module_buffers: dict[str, torch.Tensor] = {
            (f"{mname}.{k}" if mname else k): b for mname, m in self.modules for k, b in m._buffers.items() if b is not None
        }
        bn = _bn_stats(m for _, m in self.modules)
        self._always: set[str] = set()
        copies: dict[int, torch.Tensor] = {}  # tied buffers (one tensor, several names) share one copy
        #: name -> (n, *shape) copy, split across samples (dim 0).
        self.batched: dict[str, torch.Tensor] = {}
        #: name -> unbatched copy, shared by the samples.
        self.shared: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, buf in self.module_buffers.items():
                per_sample = batch_all or id(buf) in bn
                c = copies.get(id(buf))
                if c is None:
                    c = buf.detach().unsqueeze(0).expand(n, *buf.shape).clone() if per_sample else buf.detach().clone()
                    copies[id(buf)] = c
                (self.batched if per_sample else self.shared)[name] = c
                if id(buf) in bn:
                    self._always.add(name)
        # inference tensors (copies made under torch.inference_mode()) have no version counter: compared by value
        self._versions = {id(c): None if c.is_inference() else c._version for c in copies.values()}
        #: name -> per-sample results (m, *shape), m = n or 1 (the same value for every sample).
        self.results: dict[str, torch.Tensor] = {}
        self._n_buffers: dict[int, int] = {}
        self._attrs = self._tensor_attributes()

    # -- the call ------------------------------------------------------------------------
    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """The state of sample ``i`` for a loop (views of the per-sample copies)."""
        out = {k: v[i] for k, v in self.batched.items()}
        out.update(self.shared)
        return out

    def after_sample(self, i: int, given: dict[str, torch.Tensor], used: dict[str, torch.Tensor]) -> None:
        """Record sample ``i``'s reassigned buffers (``used``: the dict ``functional_call`` updated)."""
        with torch.no_grad():
            for k, t in given.items():
                new = used.get(k, t)
                if new is not t:
                    self._reassigned(k, new)
                    row = self.batched.get(k)
                    if row is not None and tuple(new.shape) == tuple(row.shape[1:]):
                        row[i].copy_(new.detach())
                    else:
                        self.results[k] = new.detach().unsqueeze(0)  # refused at commit (shape) or shared

    def reassigned_in_vmap(self, given: dict[str, torch.Tensor], used: dict[str, torch.Tensor]) -> list[str]:
        """Inside the vmapped function: the names of buffers the forward reassigned."""
        return [k for k, t in given.items() if used.get(k, t) is not t]

    def after_vmap(self, reassigned: dict[str, torch.Tensor]) -> None:
        """Record the reassigned buffers' stacked ``(n, *shape)`` values returned by ``vmap``."""
        for k, v in reassigned.items():
            self._reassigned(k, v)
            self.results[k] = v.detach()

    def _reassigned(self, name: str, new: torch.Tensor) -> None:
        buf = self.module_buffers[name]
        if not isinstance(new, torch.Tensor):
            raise HyperloomError(
                f"Buffer {name!r}: the forward replaced it with a {type(new).__name__} in a per-sample call; a buffer the "
                "forward writes must stay a tensor of the same shape"
            )
        if buf.dtype.is_floating_point != new.dtype.is_floating_point or (not buf.dtype.is_floating_point and buf.dtype != new.dtype):
            raise HyperloomError(
                f"Buffer {name!r}: the forward reassigned it with dtype {new.dtype} in a per-sample call, expected {buf.dtype}"
            )

    # -- after the call ------------------------------------------------------------------
    def _written(self) -> dict[str, torch.Tensor]:
        """Map each buffer the call wrote to its per-sample results."""
        out = dict(self.results)
        for k, c in {**self.batched, **self.shared}.items():
            if k in out:
                continue
            v0 = self._versions[id(c)]
            if v0 is not None and c._version != v0:
                changed = True
            elif torch.compiler.is_compiling() or (v0 is not None and not self.batch_all):
                # traced: no values to compare; vmap with shared copies: it refuses writes through .data
                changed = False
            else:  # an inference tensor (no version), or (the loop) a write through .data, which leaves the version as it was
                changed = not torch.equal(c, self.module_buffers[k].expand_as(c))
            if k in self._always or changed:
                out[k] = c if k in self.batched else c.unsqueeze(0)
        return out

    def restore_attributes(self) -> None:
        """Undo what a ``vmap`` call left in modules outside the state: attributes holding tensors of the call.

        Raises:
            HyperloomError: Naming a buffer the forward registered during the call (it is removed first).
        """
        if torch.compiler.is_compiling():
            return  # a compiled call keeps no functorch tensor in modules (traced, not run eagerly)
        added: list[str] = []
        for mname, m in self.modules:
            if len(m._buffers) != self._n_buffers.get(id(m), 0):
                prefix = mname + "." if mname else ""
                for k, v in list(m._buffers.items()):
                    if prefix + k not in self.module_buffers and isinstance(v, torch.Tensor) and _is_wrapped(v):
                        del m._buffers[k]
                        added.append(prefix + k)
            for k in [k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor) and _is_wrapped(v)]:
                old = self._attrs.get((id(m), k))
                if old is None:
                    delattr(m, k)
                else:
                    object.__setattr__(m, k, old)
        if added:
            raise HyperloomError(
                f"Buffer(s) {added} were registered during a per-sample forward: per-sample mode carries the buffers a "
                "model has before the call (register them in __init__)"
            )

    def _tensor_attributes(self) -> dict[tuple[int, str], torch.Tensor]:
        if torch.compiler.is_compiling():
            return {}
        self._n_buffers = {id(m): len(m._buffers) for _, m in self.modules}
        return {(id(m), k): v for _, m in self.modules for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}

    def commit(self) -> None:
        """Check every written buffer, then write each one's combined value into the module's tensor in place.

        Raises:
            HyperloomError: Naming a buffer whose per-sample result changed shape, or a non-floating buffer
                whose samples disagree; nothing is written then.
        """
        written = self._written()
        final: dict[str, torch.Tensor] = {}
        for k, res in written.items():
            buf = self.module_buffers[k]
            if tuple(res.shape[1:]) != tuple(buf.shape):
                raise HyperloomError(
                    f"Buffer {k!r}: a per-sample forward wrote a value of shape {tuple(res.shape[1:])} into it, expected "
                    f"{tuple(buf.shape)}: per-sample mode keeps every buffer's shape (it writes the mean over samples into "
                    "the existing tensor); keep per-call values out of buffers, or use shared conditioning"
                )
            if buf.dtype.is_floating_point:
                final[k] = res.mean(0, dtype=torch.promote_types(res.dtype, torch.float32))
            else:
                if res.shape[0] > 1 and not bool((res == res[:1]).all()):
                    raise HyperloomError(
                        f"Buffer {k!r} ({buf.dtype}): the samples of a per-sample call wrote different values into it; a "
                        "non-floating buffer must come out the same for every sample (a counter, a flag)"
                    )
                final[k] = res[0]
        with torch.no_grad():
            for k, v in final.items():
                buf = self.module_buffers[k]
                buf.data.copy_(v)  # in place, without bumping the version counter (as BatchNorm's own update)


__all__ = ["BufferState"]
