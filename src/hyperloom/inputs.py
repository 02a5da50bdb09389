"""Conditioning inputs: declared ranges, validation and mapping to [0, 1].

A hypernetwork is conditioned on named inputs (a loss weight ``lam``, a scale
``phi``, a noise vector ``z``). Each input declares its range; MIP maps the
range to [0, 1] (through ``log`` for log ranges) before encoding it.

Validation (unknown or missing names, shapes, non-finite values, values out of
range) runs eagerly, before any tensor work, in :meth:`InputSet.prepare`. The
mapping itself (:meth:`Input.normalize`) is branch-free and always clamps, so
it is safe under ``torch.func.vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from .errors import HyperloomError

Scale = Literal["linear", "log"]
OutOfRange = Literal["raise", "clamp"]

#: What ``inputs=`` accepts for one input: an :class:`Input`, ``(low, high)``
#: or ``(low, high, "log")``.
InputLike = Union["Input", tuple[float, float], tuple[float, float, str]]


@dataclass(frozen=True)
class Input:
    """Declaration of one named conditioning input.

    Args:
        low: Smallest allowed value.
        high: Largest allowed value (``low < high``).
        scale: ``"linear"`` maps ``[low, high]`` to ``[0, 1]`` linearly;
            ``"log"`` maps ``log(value)`` linearly (requires ``low > 0``).
        dim: Number of coordinates of the input (1 for a scalar such as a loss
            weight, ``k`` for a ``k``-dimensional noise vector).
        out_of_range: ``"raise"`` (default) raises :class:`HyperloomError` on
            a value outside ``[low, high]``; ``"clamp"`` clamps it silently.

    Example:
        >>> import hyperloom as hl
        >>> spec = hl.Input(1e-3, 1.0, scale="log")
        >>> float(spec.normalize(torch.tensor(1e-3))), float(spec.normalize(torch.tensor(1.0)))
        (0.0, 1.0)

    Raises:
        HyperloomError: On an empty or non-finite range, ``low <= 0`` with a
            log scale, ``dim < 1`` or an unknown option.
    """

    low: float
    high: float
    scale: Scale = "linear"
    dim: int = 1
    out_of_range: OutOfRange = "raise"

    def __post_init__(self) -> None:
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise HyperloomError(f"Input range must be finite, got low={self.low}, high={self.high}")
        if not low < high:
            raise HyperloomError(f"Input range must satisfy low < high, got low={self.low}, high={self.high}")
        if self.scale not in ("linear", "log"):
            raise HyperloomError(f"Input scale must be one of 'linear', 'log', got {self.scale!r}")
        if self.scale == "log" and low <= 0:
            raise HyperloomError(f"A log-scale input needs low > 0, got low={self.low}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise HyperloomError(f"Input dim must be an integer >= 1, got {self.dim!r}")
        if self.out_of_range not in ("raise", "clamp"):
            raise HyperloomError(f"out_of_range must be one of 'raise', 'clamp', got {self.out_of_range!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def normalize(self, value: torch.Tensor) -> torch.Tensor:
        """Map values from ``[low, high]`` to ``[0, 1]`` (clamped, branch-free).

        Args:
            value: Tensor of any shape holding raw input values.

        Returns:
            Tensor of the same shape with values in ``[0, 1]``.
        """
        if self.scale == "log":
            lo, hi = math.log(self.low), math.log(self.high)
            u = (torch.log(value.clamp_min(self.low)) - lo) / (hi - lo)
        else:
            u = (value - self.low) / (self.high - self.low)
        return u.clamp(0.0, 1.0)

    def midpoint(self) -> float:
        """The value that :meth:`normalize` maps to 0.5."""
        if self.scale == "log":
            return math.sqrt(self.low * self.high)
        return 0.5 * (self.low + self.high)


def _as_input(name: str, spec: Any) -> Input:
    if isinstance(spec, Input):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        if len(spec) == 3:
            return Input(spec[0], spec[1], scale=spec[2])
        return Input(spec[0], spec[1])
    raise HyperloomError(f"inputs[{name!r}]: expected hl.Input(low, high, ...), (low, high) or (low, high, 'log'), got {spec!r}")


class InputSet:
    """An ordered set of named :class:`Input` declarations.

    Converts user conditioning (numbers or tensors, per batch or per sample)
    into one ``(N, K)`` tensor of raw values, ``K`` being the total number of
    coordinates, after validating it.

    Args:
        inputs: Mapping from input name (a Python identifier) to an
            :class:`Input` or a ``(low, high[, scale])`` tuple.

    Example:
        >>> import hyperloom as hl
        >>> s = hl.InputSet({"lam": (0.0, 1.0), "z": hl.Input(0, 1, dim=2)})
        >>> raw, per_sample = s.prepare({"lam": 0.5, "z": [0.1, 0.2]}, dtype=torch.float32)
        >>> tuple(raw.shape), per_sample
        ((1, 3), False)

    Raises:
        HyperloomError: On an empty mapping, a name that is not an identifier
            or a malformed declaration.
    """

    def __init__(self, inputs: Mapping[str, InputLike] | InputSet) -> None:
        if isinstance(inputs, InputSet):
            self.specs: dict[str, Input] = dict(inputs.specs)
            return
        if not isinstance(inputs, Mapping) or len(inputs) == 0:
            raise HyperloomError(f"inputs must be a non-empty mapping such as {{'lam': (0.0, 1.0)}}, got {inputs!r}")
        specs: dict[str, Input] = {}
        for name, spec in inputs.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise HyperloomError(f"Input names must be Python identifiers, got {name!r}")
            specs[name] = _as_input(name, spec)
        self.specs = specs

    @property
    def names(self) -> tuple[str, ...]:
        """Input names in declaration order."""
        return tuple(self.specs)

    @property
    def total_dim(self) -> int:
        """Total number of coordinates ``K`` over all inputs."""
        return sum(s.dim for s in self.specs.values())

    def __repr__(self) -> str:
        return f"InputSet({self.specs!r})"

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map an ``(N, K)`` tensor of raw values to ``[0, 1]`` column-wise (branch-free)."""
        cols = []
        start = 0
        for spec in self.specs.values():
            cols.append(spec.normalize(raw[:, start : start + spec.dim]))
            start += spec.dim
        return torch.cat(cols, dim=1)

    def midpoint(self, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """A ``(1, K)`` tensor holding every input's :meth:`Input.midpoint`."""
        vals = [s.midpoint() for s in self.specs.values() for _ in range(s.dim)]
        return torch.tensor([vals], dtype=dtype, device=device)

    def prepare(
        self,
        values: Mapping[str, Any],
        *,
        batch: int | None = None,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, bool]:
        """Validate conditioning values and stack them into raw ``(N, K)`` form.

        A scalar input given as a number or a 0-d tensor (a ``dim=k`` input as
        shape ``(k,)``) is *shared*: one weight set for the whole batch. Given
        as shape ``(B,)`` (``(B, k)``) it is *per sample*. Shared inputs are
        broadcast when other inputs are per sample.

        Args:
            values: Mapping from input name to value.
            batch: The batch size the values must match when per sample, or
                ``None`` to accept any.
            dtype: Floating dtype of the result.
            device: Device the tensors must already be on (CPU numbers are
                moved; tensors on another device are an error).
            check: Run the value checks (finite, in range). Skipped while
                ``torch.compile`` traces, where out-of-range values are clamped.

        Returns:
            ``(raw, per_sample)``: raw values of shape ``(N, K)`` with ``N = 1``
            when shared, and whether they are per sample.

        Raises:
            HyperloomError: Naming the input, on unknown or missing names, a
                wrong shape or batch size, a tensor on the wrong device, a
                non-numeric dtype, non-finite values or values out of range.
        """
        unknown = [k for k in values if k not in self.specs]
        if unknown:
            raise HyperloomError(f"Unknown conditioning input(s) {unknown}; declared inputs are {list(self.specs)}")
        missing = [k for k in self.specs if k not in values]
        if missing:
            raise HyperloomError(f"Missing conditioning input(s) {missing}; declared inputs are {list(self.specs)}")
        dev = torch.device(device) if device is not None else None
        cols: list[torch.Tensor] = []
        per_sample_n: int | None = None
        per_sample_from: str | None = None
        for name, spec in self.specs.items():
            v = self._to_tensor(name, values[name], dtype=dtype, device=dev)
            shared_shape: tuple[int, ...] = () if spec.dim == 1 else (spec.dim,)
            if tuple(v.shape) == shared_shape:
                cols.append(v.reshape(1, spec.dim))
                continue
            if v.dim() == len(shared_shape) + 1 and tuple(v.shape[1:]) == shared_shape:
                n = v.shape[0]
                if per_sample_n is not None and n != per_sample_n:
                    raise HyperloomError(
                        f"Conditioning input {name!r} has {n} per-sample values but {per_sample_from!r} has {per_sample_n}"
                    )
                if batch is not None and n != batch:
                    raise HyperloomError(f"Conditioning input {name!r} has {n} per-sample values but the batch has {batch} samples")
                per_sample_n, per_sample_from = n, name
                cols.append(v.reshape(n, spec.dim))
                continue
            b = "B" if batch is None else str(batch)
            expected = "a scalar or shape (B,)" if spec.dim == 1 else f"shape ({spec.dim},) or (B, {spec.dim})"
            raise HyperloomError(f"Conditioning input {name!r}: expected {expected} with B = {b}, got shape {tuple(v.shape)}")
        if per_sample_n is not None:
            cols = [c.expand(per_sample_n, -1) if c.shape[0] == 1 and per_sample_n != 1 else c for c in cols]
        raw = torch.cat(cols, dim=1)
        if check:
            self._check_values(raw)
        return raw, per_sample_n is not None

    @staticmethod
    def _to_tensor(name: str, value: Any, *, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if device is not None and value.device != device:
                raise HyperloomError(f"Conditioning input {name!r} is on {value.device} but the hypernetwork is on {device}")
            if value.dtype.is_complex or not (value.dtype.is_floating_point or value.dtype in _INT_DTYPES):
                raise HyperloomError(f"Conditioning input {name!r} must be real numbers, got dtype {value.dtype}")
            return value.to(dtype)
        if isinstance(value, bool):
            raise HyperloomError(f"Conditioning input {name!r} must be a number or tensor, got bool {value!r}")
        try:
            return torch.as_tensor(value, dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise HyperloomError(
                f"Conditioning input {name!r} must be a number, a sequence of numbers or a tensor, got {type(value).__name__}: {e}"
            ) from None

    def _check_values(self, raw: torch.Tensor) -> None:
        raw = raw.detach()
        if raw.numel() == 0:
            return
        start = 0
        for name, spec in self.specs.items():
            block = raw[:, start : start + spec.dim]
            start += spec.dim
            finite = torch.isfinite(block)
            if not bool(finite.all()):
                idx = (~finite).nonzero()[0].tolist()
                raise HyperloomError(
                    f"Conditioning input {name!r} has a non-finite value {block[idx[0], idx[1]].item()} "
                    f"at sample {idx[0]}" + (f", coordinate {idx[1]}" if spec.dim > 1 else "")
                )
            if spec.out_of_range == "raise":
                lo, hi = float(block.min()), float(block.max())
                if lo < spec.low or hi > spec.high:
                    raise HyperloomError(
                        f"Conditioning input {name!r} out of its declared range [{spec.low}, {spec.high}]: "
                        f"got values in [{lo}, {hi}] (declare out_of_range='clamp' to clamp instead)"
                    )


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

__all__ = ["Input", "InputLike", "InputSet"]
