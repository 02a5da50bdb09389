"""Input encodings: how conditioning values enter the hypernetwork.

Every encoding maps ``raw`` values ``(N, K)`` and their ``[0, 1]``-normalised
form ``u`` ``(N, K)`` to the hypernetwork's input features ``(N, D)``.

=============== ============================ ========== ===============================
name            features                     D          norm
=============== ============================ ========== ===============================
``cossin``      ``[cos(pi u/2), sin(pi u/2)]`` ``2K``   ``sqrt(K)`` for every input (MIP)
``identity``    ``u``                        ``K``      ``|u|``, proportional to ``u``
``raw``         raw values as given           ``K``      proportional to the raw values
``zoneminusz``  ``[u, 1 - u]``               ``2K``     varies (between ``sqrt(K/2)`` and ``sqrt(K)``)
``l2``          ``raw / |raw|`` (``K >= 2``)  ``K``      1
``standardize`` ``(u - 1/2) sqrt(12)``       ``K``      varies, zero-mean
=============== ============================ ========== ===============================

``raw`` is the paper's "default" formulation's input. ``raw`` and ``l2`` read
the raw values, not ``u``: :meth:`InputSet.prepare <hyperloom.InputSet.prepare>`
clamps the raw values of ``out_of_range="clamp"`` inputs to their declared
range, so that they honour the clamp too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import HyperloomError


class Encoding(nn.Module):
    """Base class: subclasses implement :meth:`forward` and :meth:`out_features`.

    Example:
        >>> import hyperloom as hl
        >>> enc = hl.get_encoding("cossin")
        >>> u = torch.tensor([[0.0], [1.0]])
        >>> enc(u, u).norm(dim=1)  # constant norm whatever u is
        tensor([1., 1.])
    """

    name: str = "encoding"

    def out_features(self, k: int) -> int:
        """Number of features produced for ``k`` input coordinates."""
        raise NotImplementedError

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Encode ``(N, K)`` raw values and normalised values into ``(N, D)`` features."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.name


class CosSin(Encoding):
    """MIP's constant-norm encoding ``[cos(pi u / 2), sin(pi u / 2)]``."""

    name = "cossin"

    def out_features(self, k: int) -> int:
        return 2 * k

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = u * (math.pi / 2)
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class Identity(Encoding):
    """The normalised values ``u`` in ``[0, 1]``, unchanged."""

    name = "identity"

    def out_features(self, k: int) -> int:
        return k

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u


class Raw(Encoding):
    """The raw conditioning values as the user gave them (the default formulation).

    Values of ``out_of_range="clamp"`` inputs arrive clamped to their range
    (by :meth:`hyperloom.InputSet.prepare`).
    """

    name = "raw"

    def out_features(self, k: int) -> int:
        return k

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return raw


class ZOneMinusZ(Encoding):
    """``[u, 1 - u]``: injective, but its norm still varies with ``u``."""

    name = "zoneminusz"

    def out_features(self, k: int) -> int:
        return 2 * k

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u, 1 - u], dim=-1)


class L2Normalize(Encoding):
    """``raw / |raw|``: unit norm, but loses the magnitude (needs ``K >= 2``)."""

    name = "l2"

    def out_features(self, k: int) -> int:
        if k < 2:
            raise HyperloomError(f"Encoding 'l2' needs at least 2 input coordinates (it maps every scalar to +-1), got {k}")
        return k

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Standardize(Encoding):
    """Per-coordinate standardisation ``(u - 1/2) * sqrt(12)`` (zero mean, unit variance for uniform ``u``)."""

    name = "standardize"

    def out_features(self, k: int) -> int:
        return k

    def forward(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (u - 0.5) * math.sqrt(12.0)


ENCODINGS: dict[str, type[Encoding]] = {cls.name: cls for cls in (CosSin, Identity, Raw, ZOneMinusZ, L2Normalize, Standardize)}


def get_encoding(encoding: str | Encoding) -> Encoding:
    """Return an :class:`Encoding` from its name or pass an instance through.

    Args:
        encoding: One of ``'cossin'``, ``'identity'``, ``'raw'``,
            ``'zoneminusz'``, ``'l2'``, ``'standardize'``, or an instance.

    Example:
        >>> import hyperloom as hl
        >>> hl.get_encoding("cossin").out_features(3)
        6

    Raises:
        HyperloomError: On an unknown name.
    """
    if isinstance(encoding, Encoding):
        return encoding
    if isinstance(encoding, str) and encoding in ENCODINGS:
        return ENCODINGS[encoding]()
    raise HyperloomError(f"Unknown encoding {encoding!r}; valid options are {sorted(ENCODINGS)}")


__all__ = [
    "ENCODINGS",
    "CosSin",
    "Encoding",
    "Identity",
    "L2Normalize",
    "Raw",
    "Standardize",
    "ZOneMinusZ",
    "get_encoding",
]
