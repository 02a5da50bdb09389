"""The hypernetwork trunk: an MLP with configurable activation, normalisation and widths."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HyperloomError

#: Activation name -> (module factory, Kaiming gain used by the MIP initialisation).
#: GELU, ELU and SiLU have no exact gain; they use ReLU's sqrt(2).
ACTIVATIONS: dict[str, tuple[type[nn.Module], float]] = {
    "relu": (nn.ReLU, math.sqrt(2.0)),
    "leaky_relu": (nn.LeakyReLU, math.sqrt(2.0 / (1 + 0.01**2))),
    "tanh": (nn.Tanh, 5.0 / 3),
    "gelu": (nn.GELU, math.sqrt(2.0)),
    "elu": (nn.ELU, math.sqrt(2.0)),
    "silu": (nn.SiLU, math.sqrt(2.0)),
}

#: Normalisation options inside the trunk.
NORMS = ("none", "batchnorm", "layernorm", "weightnorm")

#: Initialisation schemes.
INITS = ("mip", "torch")


def activation_gain(name: str) -> float:
    """Kaiming gain of a trunk activation.

    Raises:
        HyperloomError: On an unknown activation name.
    """
    if name not in ACTIVATIONS:
        raise HyperloomError(f"Unknown activation {name!r}; valid options are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name][1]


class WeightNormLinear(nn.Module):
    """A linear layer with weight normalisation ``W = g * V / |V|_row``.

    Written out (rather than ``torch.nn.utils.parametrizations.weight_norm``)
    so that the module pickles with ``torch.save``.

    Args:
        in_features: Input size.
        out_features: Output size.

    Example:
        >>> layer = WeightNormLinear(3, 4)
        >>> layer(torch.ones(2, 3)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.v = nn.Parameter(torch.empty(out_features, in_features))
        self.g = nn.Parameter(torch.empty(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        self.reset_g()

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``g * V / |V|``."""
        return self.g.unsqueeze(1) * self.v / self.v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def reset_g(self) -> None:
        """Set ``g`` so that the effective weight equals ``V``."""
        with torch.no_grad():
            self.g.copy_(self.v.norm(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Trunk(nn.Module):
    """MLP ``features -> hidden[0] -> ... -> hidden[-1]``.

    Each layer is linear, then optional normalisation, then the activation.

    Args:
        in_features: Size of the encoded input.
        hidden: Widths of the hidden layers; empty for a linear hypernetwork.
        activation: One of ``relu``, ``leaky_relu``, ``tanh``, ``gelu``,
            ``elu``, ``silu``.
        norm: One of ``none``, ``batchnorm``, ``layernorm``, ``weightnorm``.
        init: ``mip`` (Kaiming normal, ``fan_out``, activation gain, zero
            bias) or ``torch`` (PyTorch's default ``nn.Linear`` init).

    Shapes:
        input ``(N, in_features)`` -> output ``(N, out_features)``.

    Example:
        >>> t = Trunk(2, (16, 32), activation="relu")
        >>> t(torch.rand(5, 2)).shape
        torch.Size([5, 32])

    Raises:
        HyperloomError: On an unknown activation, norm, init or a width < 1.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (16, 64, 128),
        *,
        activation: str = "leaky_relu",
        norm: str = "none",
        init: str = "mip",
    ) -> None:
        super().__init__()
        gain = activation_gain(activation)
        if norm not in NORMS:
            raise HyperloomError(f"Unknown norm {norm!r}; valid options are {list(NORMS)}")
        if init not in INITS:
            raise HyperloomError(f"Unknown init {init!r}; valid options are {list(INITS)}")
        widths = [int(h) for h in hidden]
        if any(h < 1 for h in widths):
            raise HyperloomError(f"hidden widths must be >= 1, got {list(hidden)}")
        self.norm_kind = norm
        layers: list[nn.Module] = []
        prev = in_features
        for width in widths:
            linear: WeightNormLinear | nn.Linear
            w: torch.Tensor
            b: torch.Tensor
            if norm == "weightnorm":
                linear = WeightNormLinear(prev, width)
                w, b = linear.v, linear.bias
            else:
                linear = nn.Linear(prev, width)
                w, b = linear.weight, linear.bias
            if init == "mip":
                with torch.no_grad():
                    w.normal_(0.0, gain / math.sqrt(width))  # Kaiming normal, mode fan_out
                    b.zero_()
                if isinstance(linear, WeightNormLinear):
                    linear.reset_g()
            layers.append(linear)
            if norm == "batchnorm":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layernorm":
                layers.append(nn.LayerNorm(width))
            layers.append(ACTIVATIONS[activation][0]())
            prev = width
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


__all__ = ["ACTIVATIONS", "INITS", "NORMS", "Trunk", "WeightNormLinear", "activation_gain"]
