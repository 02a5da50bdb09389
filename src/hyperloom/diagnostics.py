"""Diagnostics: measuring magnitude proportionality and gradient statistics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .data_input import Data
from .errors import HyperloomError, short_repr
from .hypernetwork import HyperNetwork, find_hypernetwork
from .model import HyperModel
from .task import Task


def theta_norms(
    model: HyperModel | HyperNetwork | Any,
    name: str,
    values: Sequence[float],
    *,
    delta: bool = False,
    **others: Any,
) -> list[float]:
    """Norm of all generated tensors (concatenated) as one input varies.

    With the default formulation and a positively homogeneous trunk
    (ReLU-family, zero biases) the norm is exactly proportional to the raw
    input; with MIP it is nearly constant. This is the paper's central
    observation, measured.

    Args:
        model: A :class:`HyperModel`, a :class:`~hyperloom.LoRAModel` (the norms of its generated
            adapter factors) or a :class:`HyperNetwork` (or a DDP wrapper of one).
        name: The input to vary.
        values: Values of that input.
        delta: Measure ``Delta`` instead of ``theta``.
        **others: Values for the other inputs (default: their midpoints; task 0 for a
            :class:`~hyperloom.Task` input). A :class:`~hyperloom.Data` input has no default: pass its data.

    Returns:
        ``|theta(value)|`` for each value.

    Example:
        >>> import hyperloom as hl
        >>> h = hl.HyperNetwork({"g": (0.0, 4.0)}, {"w": (8, 8)}, formulation="default", activation="relu")
        >>> n = hl.theta_norms(h, "g", [1.0, 2.0, 4.0])
        >>> [round(v / n[0], 4) for v in n]
        [1.0, 2.0, 4.0]

    Raises:
        HyperloomError: If ``model`` holds no hypernetwork, ``name`` or a key of ``others`` is not a declared
            input, ``name`` is also given in ``others``, ``values`` is not a sequence, or the data of a
            :class:`~hyperloom.Data` input (other than ``name``) is not given.
    """
    hnet = find_hypernetwork(model)
    if hnet is None:
        raise HyperloomError(f"hl.theta_norms expects a HyperModel, a LoRAModel or a HyperNetwork, got {type(model).__name__}")
    specs = hnet.input_set.specs
    if name not in specs:
        raise HyperloomError(f"Unknown input {name!r}; declared inputs are {list(specs)}")
    unknown = [k for k in others if k not in specs]
    if unknown:  # a typo would silently measure at the midpoint instead
        raise HyperloomError(f"hl.theta_norms: unknown input(s) {unknown}; declared inputs are {list(specs)}")
    if name in others:
        raise HyperloomError(f"hl.theta_norms: {name!r} is the input varied (its values are `values`): do not also pass {name}=")
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise HyperloomError(f"hl.theta_norms: values must be a sequence of values of {name!r}, got {short_repr(values)}")
    cond: dict[str, Any] = {}
    for k, spec in specs.items():
        if isinstance(spec, Task):  # one id, whatever the embedding's width
            cond[k] = others.get(k, spec.midpoint())
            continue
        if isinstance(spec, Data):  # data has no midpoint: the caller passes it (or it is the input varied)
            if k not in others and k != name:
                raise HyperloomError(f"hl.theta_norms: {k!r} is a Data input: pass its data ({k}=...)")
            cond[k] = others.get(k)
            continue
        mid = spec.midpoint()
        cond[k] = others.get(k, mid if spec.dim == 1 else [mid] * spec.dim)
    norms = []
    with torch.no_grad():
        for v in values:
            cond[name] = v
            out = hnet.delta(cond) if delta else hnet(cond)
            norms.append(float(torch.cat([t.reshape(-1) for t in out.values()]).norm()))
    return norms


__all__ = ["theta_norms"]
