"""Dropout rates as conditioning inputs: bind an input to the ``p`` of unmodified ``nn.Dropout`` modules.

A hyperparameter that acts outside the weights still has to reach the
network at every call. :func:`bind_dropout` makes a declared input of a
:class:`~hyperloom.HyperModel` the dropout probability of chosen
``nn.Dropout`` modules of its primary network:

* per call: ``model(x, drop=0.3)`` drops with probability 0.3 (and the
  hypernetwork sees ``drop=0.3`` too, so the weights can adapt to it, as in
  Self-Tuning Networks);
* per sample: ``model(x, drop=rates)`` with ``rates`` of shape ``(B,)`` drops
  sample ``i`` with probability ``rates[i]``, under ``torch.func.vmap`` (one
  call, different random masks per sample) or the per-sample loop alike.

The user's model is never touched: the bound modules are replaced by
:class:`BoundDropout` in the hypernetwork model's own copy of it, whose rate
is a non-persistent buffer the model fills from the conditioning at every
call (the ``state_dict`` keys do not change; a model loaded from a checkpoint
is bound again with the same call). As with ``nn.Dropout``, a module in eval
mode is the identity.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import HyperloomError, short_repr
from .inputs import Input, columns
from .model import HyperModel

__all__ = ["BoundDropout", "bind_dropout"]


class BoundDropout(nn.Module):
    """Dropout whose probability is the buffer ``rate``, set by the hypernetwork model at every call.

    Zeroes each element with probability ``rate`` and scales the others by
    ``1 / (1 - rate)`` (``rate = 1`` zeroes everything, with finite
    gradients), like ``nn.Dropout``; a 0-d ``rate`` per call, or per sample
    under ``vmap``. Its random stream is ``torch.rand_like``'s, not
    ``nn.Dropout``'s: the same seed gives other masks than the module it replaces.

    Args:
        p: The starting rate (the replaced module's ``p``), used when called outside a hypernetwork model.
        input: The name of the conditioning input bound to it (for ``repr`` and messages).

    Example:
        >>> import torch
        >>> drop = BoundDropout(0.5, input="drop")
        >>> out = drop(torch.ones(1000))
        >>> sorted(set(out.tolist())), 0.4 < float((out == 0).float().mean()) < 0.6
        ([0.0, 2.0], True)

    Raises:
        HyperloomError: On a ``p`` outside ``[0, 1]``.
    """

    rate: torch.Tensor

    def __init__(self, p: float, *, input: str) -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise HyperloomError(f"BoundDropout: p must lie in [0, 1], got {p}")
        self.input = input
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)

    @property
    def p(self) -> float:
        """The current rate as a number, for code that reads ``module.p`` as ``nn.Dropout`` allows.

        Hugging Face attention passes ``self.dropout.p`` to ``scaled_dot_product_attention``; one rate per call
        (or per sample in the loop) reaches it. Under ``vmap`` a per-sample rate is not a number: a
        :class:`~hyperloom.HyperloomError` says so.
        """
        try:
            return float(self.rate.detach())
        except RuntimeError:
            raise HyperloomError(
                f"BoundDropout (input {self.input!r}): its rate is read as a number (module.p, e.g. an attention "
                "dropout probability passed to scaled_dot_product_attention), which a per-sample rate under vmap is "
                "not; give one rate per call, use per_sample='loop', or bind only dropout modules that are called"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate.to(x.dtype)
        scale = (torch.rand_like(x) < keep).to(x.dtype) / keep.clamp_min(torch.finfo(x.dtype).tiny)
        return x * scale

    def extra_repr(self) -> str:
        return f"input={self.input!r}"


def _targets(model: HyperModel, selector: Any, name: str) -> list[str]:
    """Module names of the primary network matched by ``selector`` (a name or a glob, or a sequence of them)."""
    sels = [selector] if isinstance(selector, str) else selector
    if isinstance(sels, Mapping) or not isinstance(sels, Sequence) or not sels or not all(isinstance(s, str) for s in sels):
        raise HyperloomError(
            f"bind_dropout: bindings[{name!r}] must be a module name or glob, or a non-empty sequence of them, got {short_repr(selector)}"
        )
    modules = dict(model.primary.named_modules())
    dropouts = [k for k, m in modules.items() if isinstance(m, nn.Dropout | BoundDropout)]
    found: list[str] = []
    for s in sels:
        hits = [k for k in modules if k == s or (any(c in s for c in "*?[") and fnmatch.fnmatchcase(k, s))]
        if not hits:
            raise HyperloomError(f"bind_dropout: bindings[{name!r}]: {s!r} matches no module; the dropout modules are {dropouts}")
        for k in hits:
            m = modules[k]
            if not k:
                raise HyperloomError(f"bind_dropout: bindings[{name!r}]: {s!r} names the primary network itself; bind a submodule")
            if isinstance(m, BoundDropout):
                raise HyperloomError(f"bind_dropout: module {k!r} is already bound to input {m.input!r}")
            if not isinstance(m, nn.Dropout):
                raise HyperloomError(
                    f"bind_dropout: bindings[{name!r}]: module {k!r} is a {type(m).__name__}, expected nn.Dropout; "
                    f"the dropout modules are {dropouts}"
                )
            if k not in found:
                found.append(k)
    return found


def bind_dropout(model: HyperModel, bindings: Mapping[str, str | Sequence[str]]) -> HyperModel:
    """Bind conditioning inputs to the dropout probability of ``nn.Dropout`` modules of a hypernetwork model.

    Each bound module drops with the probability its input is given at the
    call: one rate per call (a number) or one per sample (a ``(B,)``
    tensor), per-sample rates under ``vmap`` included. The input stays an
    input of the hypernetwork as well. The hypernetwork model is changed in
    place (its copy of the primary network; the user's model is untouched).

    Args:
        model: A :class:`~hyperloom.HyperModel` (from :func:`~hyperloom.hypernetize`).
        bindings: Input name -> module name(s) of the primary network
            (``model.primary``; exact names or :mod:`fnmatch` globs), each an
            ``nn.Dropout``. The input must be a scalar :class:`~hyperloom.Input`
            whose range lies in ``[0, 1]``.

    Returns:
        ``model`` itself.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hyperloom as hl
        >>> net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 2))
        >>> hnet = hl.bind_dropout(hl.hypernetize(net, predict=[nn.Linear], inputs={"drop": (0.0, 0.9)}), {"drop": "2"})
        >>> hnet.primary[2]
        BoundDropout(input='drop')
        >>> hnet(torch.randn(8, 4), drop=0.2).shape, hnet(torch.randn(8, 4), drop=torch.rand(8) * 0.9).shape
        (torch.Size([8, 2]), torch.Size([8, 2]))

    Raises:
        HyperloomError: On a model that is not a ``HyperModel``, an input that
            is not declared, not a scalar ``Input`` or whose range leaves
            ``[0, 1]``, or a module name that matches nothing, a module that is
            not an ``nn.Dropout`` or is already bound. Nothing is changed then.
    """
    if not isinstance(model, HyperModel):
        raise HyperloomError(f"bind_dropout: model must be a HyperModel (from hl.hypernetize), got {type(model).__name__}")
    if not isinstance(bindings, Mapping) or not bindings:
        raise HyperloomError(
            f"bind_dropout: bindings must be a non-empty mapping of input name -> module name(s), got {short_repr(bindings)}"
        )
    specs = model.hypernet.input_set.specs
    plan: dict[str, tuple[str, int]] = {}
    for name, selector in bindings.items():
        spec = specs.get(name)
        if spec is None:
            raise HyperloomError(f"bind_dropout: {name!r} is not a declared input; declared inputs are {list(specs)}")
        if not isinstance(spec, Input) or spec.dim != 1:
            raise HyperloomError(f"bind_dropout: input {name!r} must be a scalar hl.Input (a dropout probability), got {spec!r}")
        if spec.low < 0.0 or spec.high > 1.0:
            raise HyperloomError(
                f"bind_dropout: input {name!r} has range [{spec.low}, {spec.high}]; a dropout probability needs a range in [0, 1]"
            )
        col = 0
        for k, s in specs.items():
            if k == name:
                break
            col += columns(s)
        for target in _targets(model, selector, name):
            if target in plan:
                raise HyperloomError(f"bind_dropout: module {target!r} is bound to both {plan[target][0]!r} and {name!r}")
            plan[target] = (name, col)
    for target, (name, col) in plan.items():
        parent_name, _, attr = target.rpartition(".")
        parent = model.primary.get_submodule(parent_name)
        old = parent.get_submodule(attr)
        bound = BoundDropout(float(getattr(old, "p", 0.0)), input=name).to(device=model.hypernet.device)
        bound.train(old.training)
        setattr(parent, attr, bound)
        model.bound[f"{target}.rate"] = col
    model._all_modules = list(model.primary.modules())
    return model
