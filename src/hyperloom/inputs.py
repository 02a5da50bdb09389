"""Conditioning inputs: declared ranges, validation and mapping to [0, 1].

A hypernetwork is conditioned on named inputs (a loss weight ``lam``, a scale
``phi``, a noise vector ``z``). Each input declares its range; MIP maps the
range to [0, 1] (through ``log`` for log ranges) before encoding it.

Validation (unknown or missing names, shapes, non-finite values, values out of
range) runs eagerly, before any tensor work, in :meth:`InputSet.prepare`. The
range check compares each value in its own precision: a Python number exactly,
a tensor (or NumPy value) against the declared endpoints rounded to its dtype,
so ``torch.tensor(0.1, dtype=torch.bfloat16)`` is inside ``(0.0, 0.1)``. The
mapping itself (:meth:`Input.normalize`) is branch-free and always clamps, so
it is safe under ``torch.func.vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import functools
import keyword
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from .data_input import Data, DataCode
from .errors import HyperloomError
from .task import Task, _TaskPending, task_ids

Scale = Literal["linear", "log"]
OutOfRange = Literal["raise", "clamp"]

#: What ``inputs=`` accepts for one input: an :class:`Input`, ``(low, high)``
#: or ``(low, high, "log")``.
InputLike = Union["Input", Task, Data, tuple[float, float], tuple[float, float, str]]

#: A declared input: a continuous :class:`Input`, a learned :class:`~hyperloom.Task` or a :class:`~hyperloom.Data` input.
InputSpec = Union["Input", Task, Data]


@dataclass(frozen=True)
class Input:
    """Declaration of one named conditioning input.

    Args:
        low: Smallest allowed value.
        high: Largest allowed value (``low < high``).
        scale: ``"linear"`` maps ``[low, high]`` to ``[0, 1]`` linearly;
            ``"log"`` maps ``log(value)`` linearly (requires ``low > 0``).
        dim: Number of coordinates of the input (1 for a scalar such as a loss
            weight, ``k`` for a ``k``-dimensional noise vector); an integer
            (``bool`` and ``float`` are refused).
        out_of_range: ``"raise"`` (default) raises :class:`HyperloomError` on
            a value outside ``[low, high]``; ``"clamp"`` clamps it silently
            (the raw values too, as the ``raw`` and ``l2`` encodings see them).

    Example:
        >>> import hyperloom as hl
        >>> spec = hl.Input(1e-3, 1.0, scale="log")
        >>> float(spec.normalize(torch.tensor(1e-3))), float(spec.normalize(torch.tensor(1.0)))
        (0.0, 1.0)

    Raises:
        HyperloomError: On a non-numeric, empty or non-finite range,
            ``low <= 0`` with a log scale, a ``dim`` that is not an integer
            ``>= 1`` or an unknown option.
    """

    low: float
    high: float
    scale: Scale = "linear"
    dim: int = 1
    out_of_range: OutOfRange = "raise"

    def __post_init__(self) -> None:
        for v in (self.low, self.high):
            if _is_bool(v) or isinstance(v, (str, bytes)):
                raise HyperloomError(f"Input range must be real numbers, got low={self.low!r}, high={self.high!r}")
        try:
            low, high = float(self.low), float(self.high)
        except OverflowError:
            low = high = math.inf
        except (TypeError, ValueError):
            raise HyperloomError(f"Input range must be real numbers, got low={self.low!r}, high={self.high!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise HyperloomError(f"Input range must be finite, got low={self.low}, high={self.high}")
        if not low < high:
            raise HyperloomError(f"Input range must satisfy low < high, got low={self.low}, high={self.high}")
        if self.scale not in ("linear", "log"):
            raise HyperloomError(f"Input scale must be one of 'linear', 'log', got {self.scale!r}")
        if self.scale == "log" and low <= 0:
            raise HyperloomError(f"A log-scale input needs low > 0, got low={self.low}")
        dim = _as_dim(self.dim)
        if dim is None or dim < 1:
            raise HyperloomError(f"Input dim must be an integer >= 1, got {self.dim!r}")
        if self.out_of_range not in ("raise", "clamp"):
            raise HyperloomError(f"out_of_range must be one of 'raise', 'clamp', got {self.out_of_range!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "dim", dim)

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

    def denormalize(self, u: torch.Tensor) -> torch.Tensor:
        """Map ``u`` from ``[0, 1]`` back to ``[low, high]`` on the input's own scale (the inverse of :meth:`normalize`).

        ``u`` is clamped to ``[0, 1]`` and the result to ``[low, high]``; the
        result is in ``u``'s dtype, at least float32 (a half-precision ``u``
        may not hold the range).

        Example:
            >>> import hyperloom as hl
            >>> spec = hl.Input(1e-3, 1e1, scale="log")
            >>> [round(v, 6) for v in spec.denormalize(torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64)).tolist()]
            [0.001, 1.0, 10.0]
        """
        u = u.to(torch.promote_types(u.dtype, torch.float32)).clamp(0.0, 1.0)  # a half-precision u may not hold the range
        return self.from_unit(u).clamp(self.low, self.high)

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize` without any clamp (differentiable everywhere, also at the ends).

        Example:
            >>> import hyperloom as hl
            >>> float(hl.Input(0.0, 4.0).from_unit(torch.tensor(0.25)))
            1.0
        """
        if self.scale == "log":
            lo, hi = math.log(self.low), math.log(self.high)
            return torch.exp(lo + u * (hi - lo))
        return self.low + u * (self.high - self.low)

    def midpoint(self) -> float:
        """The value that :meth:`normalize` maps to 0.5."""
        if self.scale == "log":
            return math.sqrt(self.low * self.high)
        return 0.5 * (self.low + self.high)


def _is_bool(value: Any) -> bool:
    """``bool``, ``numpy.bool_`` (by duck typing: the core does not import NumPy) or a bool array/tensor."""
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is torch.bool or getattr(dtype, "kind", None) == "b"


def _as_dim(dim: Any) -> int | None:
    """``dim`` as an ``int`` (NumPy integers too), or ``None`` for a bool, a float or a non-number."""
    if _is_bool(dim):
        return None
    try:
        return operator.index(dim)
    except TypeError:
        return None


def _as_input(name: str, spec: Any) -> InputSpec:
    if isinstance(spec, (Input, Task, Data)):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        if len(spec) == 3:
            return Input(spec[0], spec[1], scale=spec[2])
        return Input(spec[0], spec[1])
    raise HyperloomError(
        f"inputs[{name!r}]: expected hl.Input(low, high, ...), hl.Task(num_tasks, ...), hl.Data(encoder, ...), "
        "(low, high) or (low, high, 'log'), "
        f"got {spec!r}"
    )


def columns(spec: InputSpec) -> int:
    """Columns of ``spec`` in the raw ``(N, K)`` conditioning: ``dim`` (an :class:`Input`; a Data input's code), 1 (a Task's id)."""
    return 1 if isinstance(spec, Task) else spec.dim


class InputSet:
    """An ordered set of named :class:`Input` declarations.

    Converts user conditioning (numbers or tensors, per batch or per sample)
    into one ``(N, K)`` tensor of raw values, ``K`` being the total number of
    coordinates, after validating it.

    Args:
        inputs: Mapping from input name (a Python identifier, not a keyword)
            to an :class:`Input`, a :class:`~hyperloom.Task` or a ``(low, high[, scale])`` tuple.

    Example:
        >>> import hyperloom as hl
        >>> s = hl.InputSet({"lam": (0.0, 1.0), "z": hl.Input(0, 1, dim=2)})
        >>> raw, per_sample = s.prepare({"lam": 0.5, "z": [0.1, 0.2]}, dtype=torch.float32)
        >>> tuple(raw.shape), per_sample
        ((1, 3), False)

    Raises:
        HyperloomError: On an empty mapping, a name that is not an identifier
            or is a keyword, or a malformed declaration.
    """

    def __init__(self, inputs: Mapping[str, InputLike] | InputSet) -> None:
        if isinstance(inputs, InputSet):
            self.specs: dict[str, InputSpec] = dict(inputs.specs)
            return
        if not isinstance(inputs, Mapping) or len(inputs) == 0:
            raise HyperloomError(f"inputs must be a non-empty mapping such as {{'lam': (0.0, 1.0)}}, got {inputs!r}")
        specs: dict[str, InputSpec] = {}
        for name, spec in inputs.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise HyperloomError(f"Input names must be Python identifiers, got {name!r}")
            if keyword.iskeyword(name):
                raise HyperloomError(
                    f"Input name {name!r} is a Python keyword and cannot be passed as a keyword argument; use e.g. '{name}_'"
                )
            specs[name] = _as_input(name, spec)
        self.specs = specs

    @property
    def names(self) -> tuple[str, ...]:
        """Input names in declaration order."""
        return tuple(self.specs)

    @property
    def total_dim(self) -> int:
        """Total number of raw columns ``K`` over all inputs (a :class:`~hyperloom.Task` takes one: its id)."""
        return sum(columns(s) for s in self.specs.values())

    def __repr__(self) -> str:
        return f"InputSet({self.specs!r})"

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map an ``(N, K)`` tensor of raw values to ``[0, 1]`` column-wise (branch-free); task ids pass unchanged."""
        cols = []
        start = 0
        for spec in self.specs.values():
            k = columns(spec)
            block = raw[:, start : start + k]
            cols.append(spec.normalize(block) if isinstance(spec, Input) else block)
            start += k
        return torch.cat(cols, dim=1)

    def midpoint(self, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """A ``(1, K)`` tensor holding every input's :meth:`Input.midpoint`."""
        vals = [float(s.midpoint()) for s in self.specs.values() for _ in range(columns(s))]
        return torch.tensor([vals], dtype=dtype, device=device)

    def prepare(
        self,
        values: Mapping[str, Any],
        *,
        batch: int | None = None,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        check: bool = True,
        check_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Validate conditioning values and stack them into raw ``(N, K)`` form.

        A scalar input given as a number or a 0-d tensor (a ``dim=k`` input as
        shape ``(k,)``) is *shared*: one weight set for the whole batch. Given
        as shape ``(B,)`` (``(B, k)``) it is *per sample*. Shared inputs are
        broadcast when other inputs are per sample. A :class:`~hyperloom.Task`
        input takes an ``int`` id (shared) or an integer tensor of ``B`` ids
        (per sample); its column holds the id as a floating value.

        Args:
            values: Mapping from input name to value.
            batch: The batch size the values must match when per sample, or
                ``None`` to accept any.
            dtype: Floating dtype of the result.
            device: Device the tensors must already be on (CPU numbers are
                moved; tensors on another device are an error).
            check: Run the value checks (finite, in range). Skipped while
                ``torch.compile`` traces; then every input's raw values are
                clamped to its range instead (so every encoding, ``raw``
                included, sees an in-range value). A value is in range when it lies in
                ``[low, high]`` in its own precision: Python numbers exactly,
                tensors and NumPy values against the endpoints rounded
                outwards to their dtype.
            check_dtype: The dtype whose overflow the value checks guard against
                (default ``dtype``): the hypernetwork's, when ``dtype`` is wider
                to hold task ids exactly.

        Returns:
            ``(raw, per_sample)``: raw values of shape ``(N, K)`` with ``N = 1``
            when shared, and whether they are per sample. The columns of
            ``out_of_range="clamp"`` inputs are clamped to ``[low, high]``
            (always, with or without ``check``); without ``check``, those of
            every input.

        Raises:
            HyperloomError: On conditioning that is not a mapping; naming the
                input, on unknown or missing names, a wrong shape or batch size, a tensor on the wrong device, a
                non-numeric dtype, non-finite values or values out of range.
        """
        if not isinstance(values, Mapping):
            example = ", ".join(f"{k!r}: ..." for k in self.specs)
            raise HyperloomError(
                f"Conditioning must be a mapping from input name to value, e.g. {{{example}}} (a HyperNetwork is called as "
                f"hnet({{{example}}}), a HyperModel as hnet(x, {', '.join(f'{k}=...' for k in self.specs)})); "
                f"got {type(values).__name__} {values!r:.60}"
            )
        unknown = [k for k in values if k not in self.specs]
        if unknown:
            raise HyperloomError(f"Unknown conditioning input(s) {unknown}; declared inputs are {list(self.specs)}")
        missing = [k for k in self.specs if k not in values]
        if missing:
            raise HyperloomError(f"Missing conditioning input(s) {missing}; declared inputs are {list(self.specs)}")
        dev = torch.device(device) if device is not None else None
        cdt = dtype if check_dtype is None else check_dtype
        cols: list[torch.Tensor] = []
        pending: list[tuple[str, InputSpec, str | _Pending | _TaskPending]] = []
        per_sample_n: int | None = None
        per_sample_from: str | None = None
        for name, spec in self.specs.items():
            value = values[name]
            if isinstance(spec, Task):
                ids, n_ids = task_ids(name, spec, value, device=dev)
                if n_ids is not None:
                    if per_sample_n is not None and n_ids != per_sample_n:
                        raise HyperloomError(
                            f"Conditioning input {name!r} has {n_ids} per-sample values but {per_sample_from!r} has {per_sample_n}"
                        )
                    if batch is not None and n_ids != batch:
                        raise HyperloomError(f"Conditioning input {name!r} has {n_ids} per-sample values but the batch has {batch} samples")
                    per_sample_n, per_sample_from = n_ids, name
                if isinstance(ids, int):
                    cols.append(torch.full((1, 1), ids, dtype=dtype, device=dev))
                    continue
                if check and ids.numel() > 0 and ids.device.type != "meta":
                    pending.append((name, spec, _TaskPending(ids.detach(), spec)))
                cols.append(ids.reshape(-1, 1).to(device=dev, dtype=dtype))
                continue
            if isinstance(spec, Data):
                if not isinstance(value, DataCode):
                    raise HyperloomError(
                        f"Data input {name!r} is encoded by its HyperNetwork's encoder: call the hypernetwork (or the model), "
                        "not InputSet.prepare, with the data"
                    )
                if value.per_sample:
                    n = value.code.shape[0]
                    if per_sample_n is not None and n != per_sample_n:
                        raise HyperloomError(
                            f"Data input {name!r} holds {n} samples (per='sample') "
                            f"but {per_sample_from!r} has {per_sample_n} per-sample values"
                        )
                    if batch is not None and n != batch:
                        raise HyperloomError(f"Data input {name!r} holds {n} samples (per='sample') but the batch has {batch} samples")
                    per_sample_n, per_sample_from = n, name
                cols.append(value.code.to(device=dev, dtype=dtype))
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            src = None if number else self._to_tensor(name, value, device=dev)
            shared_shape: tuple[int, ...] = () if spec.dim == 1 else (spec.dim,)
            shape = () if src is None else tuple(src.shape)
            if shape == shared_shape:
                n = 1
            elif len(shape) == len(shared_shape) + 1 and shape[1:] == shared_shape:
                n = shape[0]
                if per_sample_n is not None and n != per_sample_n:
                    raise HyperloomError(
                        f"Conditioning input {name!r} has {n} per-sample values but {per_sample_from!r} has {per_sample_n}"
                    )
                if batch is not None and n != batch:
                    raise HyperloomError(f"Conditioning input {name!r} has {n} per-sample values but the batch has {batch} samples")
                per_sample_n, per_sample_from = n, name
            else:
                b = "B" if batch is None else str(batch)
                if spec.dim == 1:
                    expected = f"a number, a 0-d tensor or shape ({b},) with one value per sample"
                else:
                    expected = f"shape ({spec.dim},) or ({b}, {spec.dim}) with one row per sample"
                raise HyperloomError(f"Conditioning input {name!r}: expected {expected}, got shape {shape}")
            if src is None:  # a Python number: checked exactly, in Python, without tensor work
                x = _to_float(value)
                if check and (msg := _number_problem(name, spec, value, x, cdt)):
                    pending.append((name, spec, msg))
                cols.append(torch.as_tensor(x, dtype=dtype, device=dev).reshape(1, 1))
                continue
            src = src.reshape(n, spec.dim)
            col = src.to(device=dev, dtype=dtype)
            if check and src.numel() > 0 and src.device.type != "meta":
                pending.append((name, spec, _Pending(src.detach(), col.detach().to(cdt), spec, cdt)))
            cols.append(col)
        if pending:
            self._raise_first(pending, cdt)
        if per_sample_n is not None:
            cols = [c.expand(per_sample_n, -1) if c.shape[0] == 1 and per_sample_n != 1 else c for c in cols]
        raw = torch.cat(cols, dim=1)
        if not check or any(isinstance(s, Input) and s.out_of_range == "clamp" for s in self.specs.values()):
            raw = self._clamp(raw, every=not check)
        return raw, per_sample_n is not None

    def _clamp(self, raw: torch.Tensor, *, every: bool = False) -> torch.Tensor:
        """Clamp the columns of ``out_of_range='clamp'`` inputs (all inputs when ``every``: checks skipped) to their range."""
        lo: list[float] = []
        hi: list[float] = []
        for spec in self.specs.values():
            if isinstance(spec, Task):  # ids: valid ids when checks are skipped
                lo.append(0.0 if every else -math.inf)
                hi.append(spec.num_tasks - 1.0 if every else math.inf)
                continue
            if isinstance(spec, Data):  # codes: never clamped
                lo += [-math.inf] * spec.dim
                hi += [math.inf] * spec.dim
                continue
            clamp = every or spec.out_of_range == "clamp"
            lo += [spec.low if clamp else -math.inf] * spec.dim
            hi += [spec.high if clamp else math.inf] * spec.dim
        lo_t = torch.tensor(lo, dtype=raw.dtype, device=raw.device)
        hi_t = torch.tensor(hi, dtype=raw.dtype, device=raw.device)
        return torch.clamp(raw, lo_t, hi_t)

    @staticmethod
    def _raise_first(pending: list[tuple[str, InputSpec, str | _Pending | _TaskPending]], dtype: torch.dtype) -> None:
        """Raise for the first input (in declaration order) whose values fail the checks, with one sync per device."""
        checks = [p for _, _, p in pending if not isinstance(p, str)]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for c in checks:
            by_device.setdefault(c.bad.device, []).append(c.bad)
        any_bad = any(bool(torch.stack(flags).any()) for flags in by_device.values())
        if not any_bad and len(checks) == len(pending):
            return
        for name, spec, p in pending:
            if isinstance(p, str):
                msg: str | None = p
            elif isinstance(p, _TaskPending):
                assert isinstance(spec, Task)
                msg = p.problem(name, spec, dtype)
            else:
                assert isinstance(spec, Input)
                msg = p.problem(name, spec, dtype)
            if msg:
                raise HyperloomError(msg)

    @staticmethod
    def _to_tensor(name: str, value: Any, *, device: torch.device | None) -> torch.Tensor:
        """``value`` as a tensor in its own precision (Python numbers and lists as float64, exactly)."""
        if isinstance(value, torch.Tensor):
            if device is not None and value.device != device:
                raise HyperloomError(f"Conditioning input {name!r} is on {value.device} but the hypernetwork is on {device}")
            t = value
        else:
            if _is_bool(value) and type(value).__name__ in ("bool", "bool_"):  # bool or numpy.bool_
                raise HyperloomError(f"Conditioning input {name!r} must be a number or tensor, got bool {value!r}")
            try:
                t = torch.as_tensor(value)  # a NumPy value keeps its dtype
                if not hasattr(value, "dtype") and t.dtype.is_floating_point and t.dtype != torch.float64:
                    t = torch.as_tensor(value, dtype=torch.float64)  # Python floats, exactly
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise HyperloomError(
                    f"Conditioning input {name!r} must be a number, a sequence of numbers or a tensor, got {type(value).__name__}: {e}"
                ) from None
        if t.dtype is torch.bool:
            raise HyperloomError(f"Conditioning input {name!r} must be real numbers, got bools (dtype {t.dtype})")
        if t.dtype.is_complex or not (t.dtype.is_floating_point or t.dtype in _INT_DTYPES):
            raise HyperloomError(f"Conditioning input {name!r} must be real numbers, got dtype {t.dtype}")
        return t


def _to_float(value: int | float) -> float:
    """A Python number as a float; integers too large for a float become +-inf (clamped or refused later)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _number_problem(name: str, spec: Input, value: int | float, x: float, dtype: torch.dtype) -> str | None:
    """What is wrong with a Python number given for ``name``, if anything (compared exactly, in Python)."""
    if not math.isfinite(x) and isinstance(value, float):
        return f"Conditioning input {name!r} has a non-finite value {value} at sample 0"
    # compared after rounding to a float, as the declared endpoints were: Input(0, 10**23) accepts 10**23
    if spec.out_of_range == "raise" and not spec.low <= x <= spec.high:
        return (
            f"Conditioning input {name!r} out of its declared range [{spec.low}, {spec.high}]: "
            f"got values in [{value}, {value}] (declare out_of_range='clamp' to clamp instead)"
        )
    if _overflows(spec, dtype) and not math.isfinite(torch.tensor(x, dtype=dtype).item()):
        return _overflow_message(name, spec, value, dtype)
    return None


class _Pending:
    """The value checks of one tensor input, as a 0-d ``bad`` flag; the message is only built when it is set."""

    def __init__(self, src: torch.Tensor, col: torch.Tensor, spec: Input, dtype: torch.dtype) -> None:
        self.src, self.col = src, col
        self.w = w = _comparable(src)
        self.lo, self.hi = lo, hi = _bounds_in(spec.low, spec.high, src.dtype)
        if spec.out_of_range == "clamp":
            ok = torch.isfinite(w)
        elif math.isfinite(lo) and math.isfinite(hi):
            ok = (w >= lo) & (w <= hi)  # fails on nan and +-inf too
        else:
            ok = torch.isfinite(w) & (w >= lo) & (w <= hi)
        self.overflows = _overflows(spec, dtype)
        if self.overflows:
            ok = ok & torch.isfinite(col)
        self.bad = ~ok.all()

    def problem(self, name: str, spec: Input, dtype: torch.dtype) -> str | None:
        finite = torch.isfinite(self.w)
        if not bool(finite.all()):
            i, j = (~finite).nonzero()[0].tolist()
            return f"Conditioning input {name!r} has a non-finite value {self.src[i, j].item()} at sample {i}" + (
                f", coordinate {j}" if spec.dim > 1 else ""
            )
        if spec.out_of_range == "raise":
            lo, hi = float(self.w.min()), float(self.w.max())
            if lo < self.lo or hi > self.hi:
                return (
                    f"Conditioning input {name!r} out of its declared range [{spec.low}, {spec.high}]: "
                    f"got values in [{lo}, {hi}] (declare out_of_range='clamp' to clamp instead)"
                )
        overflow = ~torch.isfinite(self.col)
        if self.overflows and bool(overflow.any()):
            i, j = overflow.nonzero()[0].tolist()
            return _overflow_message(name, spec, self.src[i, j].item(), dtype)
        return None


def _comparable(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype that compares exactly with Python floats (integers and 8-bit floats are widened)."""
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return t
    if t.dtype.is_floating_point:
        return t.float()
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


@functools.lru_cache(maxsize=512)
def _bounds_in(low: float, high: float, dtype: torch.dtype) -> tuple[float, float]:
    """The declared ``[low, high]`` widened to the nearest values of ``dtype`` outside it.

    A value given in ``dtype`` is a rounding of the value the user meant, and
    any rounding of ``low`` (``high``) is at least ``floor(low)`` (at most
    ``ceil(high)``) in ``dtype``: those are the bounds to compare against, so
    every endpoint is accepted and nothing a whole step of ``dtype`` outside.
    Integer dtypes are exact: the declared bounds.
    """
    if not dtype.is_floating_point:
        return low, high
    lo = torch.tensor(low, dtype=torch.float64).to(dtype)
    hi = torch.tensor(high, dtype=torch.float64).to(dtype)
    try:
        if float(lo) > low:
            lo = torch.nextafter(lo, torch.tensor(-math.inf, dtype=dtype))
        if float(hi) < high:
            hi = torch.nextafter(hi, torch.tensor(math.inf, dtype=dtype))
    except (RuntimeError, NotImplementedError):  # pragma: no cover - dtypes without nextafter (8-bit floats)
        pass
    return min(float(lo), low), max(float(hi), high)


def _overflows(spec: Input, dtype: torch.dtype) -> bool:
    """Whether the declared range reaches past the largest finite value of ``dtype``."""
    return dtype.is_floating_point and max(abs(spec.low), abs(spec.high)) > torch.finfo(dtype).max


def _overflow_message(name: str, spec: Input, value: Any, dtype: torch.dtype) -> str:
    return (
        f"Conditioning input {name!r} value {value} overflows {dtype} (largest finite value {torch.finfo(dtype).max}); "
        f"its declared range [{spec.low}, {spec.high}] does not fit the hypernetwork's dtype"
    )


_INT_DTYPES = tuple(
    d
    for d in (getattr(torch, n, None) for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"))
    if d is not None
)

__all__ = ["Input", "InputLike", "InputSet", "InputSpec", "columns"]
