"""Domain type aliases used across hyperloom."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch

#: Tensors keyed by ``state_dict`` dotted names, e.g. ``{"conv1.weight": ...}``.
ParamDict = dict[str, torch.Tensor]

#: One conditioning value: a Python number, a sequence of numbers or a tensor.
ConditioningValue = Union[float, int, "list[float]", "tuple[float, ...]", torch.Tensor]

#: Named conditioning inputs, e.g. ``{"lam": 0.3}`` or ``{"lam": torch.rand(32)}``.
Conditioning = Mapping[str, ConditioningValue]

#: A parameter shape.
Shape = tuple[int, ...]

__all__ = ["Conditioning", "ConditioningValue", "ParamDict", "Shape"]
