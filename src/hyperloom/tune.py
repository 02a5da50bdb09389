"""Choosing the conditioning: sample it for training, sweep it or search it by gradient after training.

A hypernetwork conditioned on a hyperparameter (a loss weight ``lam``, a scale
``phi``) is trained once over the whole declared range; the value to use is
chosen afterwards, on validation data, without retraining:

* :func:`sample` draws conditioning values from the declared ranges (uniform,
  log-uniform for log inputs, optionally with extra mass on the end points as
  HyperMorph does for lambda in {0, 1}) — what a training loop feeds the model.
* :func:`sweep` evaluates the trained model on a grid of values and returns a
  :class:`Sweep` (rows, best value per metric, plot, CSV).
* :func:`tune` searches the values by gradient descent through the frozen
  hypernetwork, inside the declared ranges, and returns a :class:`Tuned`.

This module uses the core (:mod:`hyperloom.model`, :mod:`hyperloom.inputs`) and
is never imported by it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .data_input import Data
from .errors import HyperloomError, short_repr
from .hypernetwork import find_hypernetwork
from .inputs import Input, InputSet, _as_dim, _is_bool
from .task import Task

__all__ = ["Sweep", "Tuned", "sample", "sweep", "tune"]

Value = float | int | list[float]


# -- what declares the inputs ----------------------------------------------------------------------------
def _refuse_data(specs: Mapping[str, Any], names: Iterable[str], what: str, why: str) -> None:
    """A clear message for :class:`~hyperloom.Data` inputs, whose values are data: nothing to sample, sweep or tune."""
    data = [k for k in names if isinstance(specs.get(k), Data)]
    if data:
        others = [k for k in specs if not isinstance(specs[k], Data)]
        if not others:
            verb = what.removeprefix("hl.")
            raise HyperloomError(
                f"{what}: {data} {'is a Data input' if len(data) == 1 else 'are Data inputs'} (hl.Data: the value is data read by a "
                f"learned encoder) and the model has no other inputs: nothing to {verb}; pass the data to the model yourself"
            )
        raise HyperloomError(
            f"{what}: {data} {'is a Data input' if len(data) == 1 else 'are Data inputs'} (hl.Data: the value is data read by a "
            f"learned encoder), which cannot be {why}; use {what} on the other inputs {others} and pass the data yourself"
            + (
                " (e.g. hl.sample({k: s for k, s in model.inputs.items() if not isinstance(s, hl.Data)}, n=...))"
                if what == "hl.sample"
                else ""
            )
        )


def _input_set(obj: Any, *, what: str) -> InputSet:
    net = find_hypernetwork(obj)
    if net is not None:
        return net.input_set
    if isinstance(obj, InputSet):
        return obj
    if isinstance(obj, Mapping):
        return InputSet(obj)
    raise HyperloomError(
        f"{what}: expected a hypernetwork model (from hl.hypernetize), a HyperNetwork, an InputSet or a mapping of input "
        f"declarations, got {type(obj).__name__}"
    )


def _model_dtype_device(obj: Any) -> tuple[torch.dtype | None, torch.device | None]:
    net = find_hypernetwork(obj)
    if net is None:
        return None, None
    return net.dtype, net.device


# -- sample ------------------------------------------------------------------------------------------------
def sample(
    model_or_inputs: Any,
    n: int | None = None,
    *,
    generator: torch.Generator | None = None,
    ends: float = 0.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Draw conditioning values from every declared input's range.

    Linear inputs are drawn uniformly on ``[low, high]``, log inputs
    log-uniformly (uniform in ``log``), each coordinate of a ``dim=k`` input
    independently; :class:`~hyperloom.Task` ids uniformly over the valid ids
    (an int64 tensor). With ``ends=p`` each coordinate is, with probability ``p``,
    replaced by one of the range's two end points (each with probability
    ``p / 2``): HyperMorph's oversampling of ``lambda`` in ``{0, 1}``, which
    trains the degenerate ends the uniform draw almost never reaches.

    Args:
        model_or_inputs: A :class:`~hyperloom.HyperModel` (also wrapped in
            DistributedDataParallel), a :class:`~hyperloom.HyperNetwork`, an
            :class:`~hyperloom.InputSet` or a mapping such as
            ``{"lam": (0.0, 1.0)}``.
        n: ``None`` for one shared value per input (shape ``()`` or ``(k,)``:
            one weight set for the batch); an integer ``B`` for one value per
            sample (shape ``(B,)`` or ``(B, k)``).
        generator: A ``torch.Generator`` (on the CPU) for reproducible draws.
            The draws are made in float64 on the CPU, in declaration order.
        ends: Probability in ``[0, 1]`` of drawing an end point.
        dtype: Floating dtype of the result; the model's dtype by default
            (the default dtype for declarations without a model).
        device: Device of the result; the model's device by default.

    Returns:
        ``{name: tensor}`` for every declared input, ready to pass as
        ``model(x, **values)``. Every value lies in its declared range as
        the model checks it: in float64, or the range's ends rounded to ``dtype``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hyperloom as hl
        >>> hnet = hl.hypernetize(nn.Linear(4, 2), inputs={"lam": (0.0, 1.0), "wd": (1e-5, 1e-1, "log")})
        >>> g = torch.Generator().manual_seed(0)
        >>> cond = hl.sample(hnet, n=8, generator=g, ends=0.2)
        >>> {k: tuple(v.shape) for k, v in cond.items()}
        {'lam': (8,), 'wd': (8,)}
        >>> hnet(torch.randn(8, 4), **cond).shape
        torch.Size([8, 2])

    Raises:
        HyperloomError: On an ``n`` that is not a positive integer, ``ends``
            outside ``[0, 1]``, a non-floating ``dtype``, or something that
            declares no inputs.
    """
    specs = _input_set(model_or_inputs, what="hl.sample").specs
    _refuse_data(specs, specs, "hl.sample", "sampled")
    if n is not None:
        nn_ = _as_dim(n)
        if nn_ is None or nn_ < 1:
            raise HyperloomError(f"hl.sample: n must be None (one shared value) or an integer >= 1 (one per sample), got {n!r}")
        n = nn_
    if _is_bool(ends) or not isinstance(ends, numbers.Real) or not 0.0 <= float(ends) <= 1.0:
        raise HyperloomError(f"hl.sample: ends must be a probability in [0, 1], got {ends!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise HyperloomError(f"hl.sample: generator must be a torch.Generator, got {type(generator).__name__}")
    m_dtype, m_device = _model_dtype_device(model_or_inputs)
    dtype = dtype or m_dtype or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HyperloomError(f"hl.sample: dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else m_device
    except (RuntimeError, TypeError) as e:
        raise HyperloomError(f"hl.sample: device {device!r} is not a torch device: {e}") from None
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if isinstance(spec, Task):  # task ids: uniform over the valid ids (``ends`` does not apply)
            out[name] = torch.randint(0, spec.num_tasks, () if n is None else (n,), generator=generator).to(device=device)
            continue
        shape = (() if n is None else (n,)) + (() if spec.dim == 1 else (spec.dim,))
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        if ends > 0:
            at_end = torch.rand(shape, generator=generator, dtype=torch.float64) < ends
            upper = torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5
            u = torch.where(at_end, upper.to(torch.float64), u)
        value = _exact_ends(spec, spec.denormalize(u), u).to(dtype=dtype)
        if not bool(torch.isfinite(value).all()):
            raise HyperloomError(
                f"hl.sample: input {name!r}: the range [{spec.low}, {spec.high}] does not fit in {dtype}; pass dtype=torch.float32"
            )
        out[name] = value.to(device=device)
    return out


def _exact_ends(spec: Input, value: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``low`` / ``high`` exactly where ``u`` is 0 / 1 (``exp(log(x))`` may differ from ``x`` in the last bit)."""
    value = torch.where(u <= 0.0, torch.full_like(value, spec.low), value)
    return torch.where(u >= 1.0, torch.full_like(value, spec.high), value)


# -- progress ---------------------------------------------------------------------------------------------
def _progress(items: Sequence[Any], *, desc: str, show: bool | None) -> Iterator[Any]:
    """A tqdm bar when tqdm is installed, else a plain counter on stderr; shown on a terminal (or when asked)."""
    if show is None:
        show = len(items) > 1 and (os.environ.get("HYPERLOOM_PROGRESS") == "1" or sys.stderr.isatty())
    if not show:
        yield from items
        return
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        total = len(items)
        for i, item in enumerate(items):
            print(f"\r{desc}: {i}/{total}", end="", file=sys.stderr, flush=True)
            yield item
        print(f"\r{desc}: {total}/{total}", file=sys.stderr, flush=True)
        return
    yield from tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


class _Frozen:
    """Context: modules in eval mode (optionally), parameters frozen (optionally); restores modes, flags, grads, buffers."""

    def __init__(self, model: nn.Module, *, eval_mode: bool, freeze: bool) -> None:
        self.model, self.eval_mode, self.freeze = model, eval_mode, freeze

    def __enter__(self) -> _Frozen:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.params = [(p, p.requires_grad, None if p.grad is None else p.grad.detach().clone()) for p in self.model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        if self.eval_mode:
            self.model.eval()
        if self.freeze:
            for p, _, _ in self.params:
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training
        for p, flag, grad in self.params:
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for b, saved in self.buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


def _add_note(e: BaseException, note: str) -> None:
    if hasattr(e, "add_note"):  # Python >= 3.11
        e.add_note(note)


def _metrics(result: Any, where: str) -> dict[str, float]:
    """``evaluate``'s result as ``{name: float}``, or a HyperloomError saying what was wrong."""
    if not isinstance(result, Mapping):
        raise HyperloomError(f"hl.sweep: evaluate returned {type(result).__name__} {where}; expected a mapping of metric name -> number")
    out: dict[str, float] = {}
    for k, v in result.items():
        if not isinstance(k, str):
            raise HyperloomError(f"hl.sweep: evaluate returned a metric name {k!r} {where}; metric names must be strings")
        out[k] = _number(v, f"hl.sweep: metric {k!r} {where}")
    return out


def _number(v: Any, what: str) -> float:
    if _is_bool(v) or isinstance(v, (str, bytes)):
        raise HyperloomError(f"{what} must be a number, got {short_repr(v)}")
    if isinstance(v, (int, float)):
        return float(v)
    numel = getattr(v, "numel", None) or getattr(v, "size", None)
    count = numel() if callable(numel) else numel
    if hasattr(v, "item") and count == 1:
        x = v.item()
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
    raise HyperloomError(f"{what} must be a number or a one-element tensor, got {short_repr(v)}")


# -- sweep -------------------------------------------------------------------------------------------------
def _axis(name: str, spec: Input | Task, points: Any) -> list[Value]:
    """The values of one grid axis: a sequence, or an int = that many points spaced on the input's own scale."""
    if isinstance(spec, Task):
        return _task_axis(name, spec, points)
    if isinstance(points, numbers.Integral) and not _is_bool(points):
        if spec.dim != 1:
            raise HyperloomError(
                f"grid[{name!r}]: an integer spaces points on a scalar input's scale, but {name!r} has dim={spec.dim}; "
                f"give a sequence of {spec.dim}-vectors"
            )
        if points < 1:
            raise HyperloomError(f"grid[{name!r}]: the number of points must be >= 1, got {points}")
        if points == 1:
            return [spec.midpoint()]
        return _spaced(spec, int(points))
    if isinstance(points, torch.Tensor):
        points = list(points.unbind(0)) if points.dim() > 0 else [points]
    if isinstance(points, (str, bytes, Mapping)) or not isinstance(points, Iterable):
        raise HyperloomError(f"grid[{name!r}]: expected a sequence of values or an integer number of points, got {short_repr(points)}")
    values: list[Value] = []
    one = InputSet({name: spec})
    for v in points:
        raw = _checked(one, name, v, what=f"grid[{name!r}]")
        values.append(_as_value(raw))
    if not values:
        raise HyperloomError(f"grid[{name!r}]: no values")
    return values


def _task_axis(name: str, spec: Task, points: Any) -> list[Value]:
    """Task ids of a grid axis: a sequence of valid ids (``range(num_tasks)`` for all)."""
    if isinstance(points, torch.Tensor):
        points = list(points.unbind(0)) if points.dim() > 0 else [points]
    if isinstance(points, (str, bytes, Mapping, numbers.Number)) or not isinstance(points, Iterable):
        raise HyperloomError(
            f"grid[{name!r}]: a Task input takes a sequence of task ids, e.g. range({spec.num_tasks}) for all; got {short_repr(points)}"
        )
    one = InputSet({name: spec})
    ids: list[Value] = []
    for v in points:
        try:
            _, per_sample = one.prepare({name: v}, dtype=torch.float32)
        except HyperloomError as e:
            raise HyperloomError(f"grid[{name!r}]: {e}") from None
        if per_sample:
            raise HyperloomError(f"grid[{name!r}]: each value must be one task id, got {short_repr(v)}")
        ids.append(int(v))
    if not ids:
        raise HyperloomError(f"grid[{name!r}]: no values")
    return ids


def _scalar(spec: Input | Task) -> bool:
    """Whether the input's values are single numbers (a Task id, or an ``Input`` with ``dim=1``)."""
    return isinstance(spec, Task) or spec.dim == 1


def _checked(one: InputSet, name: str, value: Any, *, what: str) -> torch.Tensor:
    """One shared value checked as the model checks it (shape, finite, in range in its own precision).

    Returned as float64 clamped to the declared range (a float32 ``0.1`` accepted at ``high=0.1`` becomes 0.1).
    """
    spec = one.specs[name]
    assert isinstance(spec, Input)  # Task ids take _task_axis / fixed_ids
    if isinstance(value, torch.Tensor):
        value = value.detach()
    try:
        raw, per_sample = one.prepare({name: value}, dtype=torch.float64)
    except HyperloomError as e:
        raise HyperloomError(f"{what}: {e}") from None
    if per_sample:
        shape = "a number" if spec.dim == 1 else f"one {spec.dim}-vector"
        raise HyperloomError(f"{what}: each value must be {shape}, got {short_repr(value)}")
    raw = raw.reshape(()) if spec.dim == 1 else raw.reshape(spec.dim)
    return raw.clamp(spec.low, spec.high)


def _spaced(spec: Input, n: int) -> list[Value]:
    """``n`` points evenly spaced on the input's own scale, end points exact, as little float noise as possible."""
    if spec.scale == "log":
        a, b = math.log10(spec.low), math.log10(spec.high)
        pts = [10.0 ** ((a * (n - 1 - i) + b * i) / (n - 1)) for i in range(n)]
    else:
        pts = [(spec.low * (n - 1 - i) + spec.high * i) / (n - 1) for i in range(n)]
    pts[0], pts[-1] = spec.low, spec.high
    return [min(max(p, spec.low), spec.high) for p in pts]


class Sweep:
    """The result of :func:`sweep`: one row per grid point, conditioning values and metrics.

    Attributes:
        rows: One dict per grid point, in grid order: the conditioning values
            (floats; lists for ``dim=k`` inputs), then the metrics.
        names: The swept input names.
        metrics: The metric names, in the order ``evaluate`` first returned them.
        inputs: The declarations of the swept inputs (for plot scales).
    """

    def __init__(self, rows: list[dict[str, Any]], names: Sequence[str], inputs: Mapping[str, Input | Task]) -> None:
        self.rows = rows
        self.names = tuple(names)
        self.inputs = dict(inputs)
        metrics: list[str] = []
        for r in rows:
            metrics += [k for k in r if k not in self.names and k not in metrics]
        self.metrics = tuple(metrics)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"Sweep({len(self.rows)} points over {list(self.names)}, metrics {list(self.metrics)})"

    def _check_metric(self, metric: str) -> None:
        if metric not in self.metrics:
            raise HyperloomError(f"Sweep: unknown metric {metric!r}; metrics are {list(self.metrics)}")

    def best(self, metric: str, mode: Literal["min", "max"] = "min") -> dict[str, Any]:
        """The row (a copy) with the smallest (``mode="min"``) or largest (``"max"``) value of ``metric``.

        NaN values are skipped; on a tie the first row in grid order wins.

        Raises:
            HyperloomError: On an unknown metric or mode, or when every value
                of the metric is NaN.
        """
        self._check_metric(metric)
        if mode not in ("min", "max"):
            raise HyperloomError(f"Sweep.best: mode must be 'min' or 'max', got {mode!r}")
        rows = [r for r in self.rows if metric in r and not math.isnan(r[metric])]
        if not rows:
            raise HyperloomError(f"Sweep.best: every value of {metric!r} is NaN")
        pick = min if mode == "min" else max
        return dict(pick(rows, key=lambda r: r[metric]))

    def column(self, name: str) -> list[Any]:
        """All values of one input or metric, in grid order (``nan`` where a row lacks the metric)."""
        if name not in self.names and name not in self.metrics:
            raise HyperloomError(f"Sweep: unknown column {name!r}; inputs are {list(self.names)}, metrics {list(self.metrics)}")
        return [r.get(name, math.nan) for r in self.rows]

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the rows to a CSV file (``dim=k`` values as ``;``-joined numbers); returns the path."""
        from .fileio import atomic_write_text

        p = Path(path)
        f = io.StringIO(newline="")
        w = csv.writer(f)
        w.writerow([*self.names, *self.metrics])
        for r in self.rows:
            cells = [";".join(map(repr, r[k])) if isinstance(r[k], list) else repr(r[k]) for k in self.names]
            w.writerow(cells + [repr(r.get(m, math.nan)) for m in self.metrics])
        atomic_write_text(p, f.getvalue())
        return p

    def plot(
        self,
        metric: str | Sequence[str],
        path: str | os.PathLike[str] | None = None,
        *,
        x: str | None = None,
        mark: Literal["min", "max"] | None = None,
        title: str | None = None,
    ) -> Any:
        """Plot metric(s) against one swept input; the other swept inputs (and several metrics) become lines.

        Args:
            metric: A metric name, or several (one line each).
            path: Where to save the figure (PNG, PDF, ... by extension);
                ``None`` to only return it.
            x: The input on the x axis (a scalar input); by default the first
                swept input with more than one value. A log input gets a log axis.
            mark: ``"min"`` or ``"max"``: a dashed vertical line at each line's
                best value of ``x``.
            title: Figure title.

        Returns:
            The ``matplotlib.figure.Figure`` (made without pyplot: no GUI, no
            global state).

        Raises:
            HyperloomError: Without matplotlib (an optional dependency:
                ``pip install matplotlib``), on unknown metrics or inputs, or
                an ``x`` that is a vector input.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise HyperloomError("Sweep.plot needs matplotlib, an optional dependency: pip install matplotlib") from None
        if not isinstance(metric, (str, Sequence)) or not metric:
            raise HyperloomError(f"Sweep.plot: metric must be a metric name or a list of them; metrics are {list(self.metrics)}")
        metrics = [metric] if isinstance(metric, str) else list(metric)
        for m in metrics:
            if not isinstance(m, str):
                raise HyperloomError(f"Sweep.plot: metric names must be strings, got {short_repr(m)}")
            self._check_metric(m)
        if mark not in (None, "min", "max"):
            raise HyperloomError(f"Sweep.plot: mark must be None, 'min' or 'max', got {mark!r}")
        scalar = [n for n in self.names if _scalar(self.inputs[n])]
        if x is None:
            varying = [n for n in scalar if len({r[n] for r in self.rows}) > 1]
            if not (varying or scalar):
                raise HyperloomError("Sweep.plot: no scalar input to put on the x axis")
            x = (varying or scalar)[0]
        elif x not in self.names:
            raise HyperloomError(f"Sweep.plot: x={x!r} is not a swept input; swept inputs are {list(self.names)}")
        elif not _scalar(self.inputs[x]):
            raise HyperloomError(f"Sweep.plot: x={x!r} has dim={self.inputs[x].dim}; the x axis needs a scalar input")
        others = [n for n in self.names if n != x]
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in self.rows:
            groups.setdefault(tuple(_hashable(r[n]) for n in others), []).append(r)
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
        for m in metrics:
            for key, rows in groups.items():
                rows = sorted(rows, key=lambda r: r[x])
                xs, ys = [r[x] for r in rows], [r.get(m, math.nan) for r in rows]
                parts = ([m] if len(metrics) > 1 else []) + [f"{n}={_fmt(v)}" for n, v in zip(others, key) if len(groups) > 1]
                (line,) = ax.plot(xs, ys, marker="o", ms=3, label=", ".join(parts) or m)
                if mark and any(not math.isnan(y) for y in ys):
                    best = Sweep(rows, self.names, self.inputs).best(m, mode=mark)
                    ax.axvline(best[x], ls="--", lw=1, color=line.get_color())
        if getattr(self.inputs[x], "scale", "linear") == "log":
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(metrics[0] if len(metrics) == 1 else "metric")
        if title:
            ax.set_title(title)
        if len(metrics) > 1 or len(groups) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        if path is not None:
            from .fileio import write_figure

            write_figure(fig, path, where="Sweep.plot")
        return fig


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _fmt(v: Any) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")" if isinstance(v, tuple) else f"{v:.3g}"


def sweep(
    model: Any,
    evaluate: Callable[..., Mapping[str, Any]],
    grid: Mapping[str, Any],
    *,
    eval_mode: bool = True,
    no_grad: bool = True,
    progress: bool | None = None,
) -> Sweep:
    """Evaluate a trained model at every point of a grid of conditioning values.

    ``evaluate(model, **conditioning)`` is called once per grid point (the
    Cartesian product of the axes, first axis slowest) and returns metrics.
    Inputs left out of ``grid`` are not passed: fix them inside ``evaluate``.

    Args:
        model: The trained :class:`~hyperloom.HyperModel`.
        evaluate: ``evaluate(model, **conditioning) -> {metric: number}``
            (numbers, or one-element tensors). Several metrics are fine: the
            best value per metric (per class, per structure) comes from
            :meth:`Sweep.best`.
        grid: ``{input name: values}``: a sequence of values (vectors for
            ``dim=k`` inputs), or an integer ``n``: ``n`` points spaced evenly
            on the input's own scale from ``low`` to ``high`` (log-spaced for
            log inputs; ``n = 1`` is the midpoint).
        eval_mode: Put the model in eval mode during the sweep (modes are
            restored afterwards, module by module).
        no_grad: Run ``evaluate`` under ``torch.no_grad()``.
        progress: Show a progress bar (``None``: on a terminal, or with
            ``HYPERLOOM_PROGRESS=1``).

    Returns:
        A :class:`Sweep`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hyperloom as hl
        >>> hnet = hl.hypernetize(nn.Linear(3, 1), inputs={"lam": (0.0, 1.0), "wd": (1e-4, 1e-1, "log")})
        >>> x = torch.randn(16, 3)
        >>> s = hl.sweep(hnet, lambda m, **c: {"out": m(x, **c).mean()}, {"lam": [0.0, 0.5, 1.0], "wd": 4})
        >>> len(s), s.names, s.metrics
        (12, ('lam', 'wd'), ('out',))
        >>> [round(v, 6) for v in sorted(set(s.column("wd")))]
        [0.0001, 0.001, 0.01, 0.1]
        >>> sorted(s.best("out", mode="max")) == ["lam", "out", "wd"]
        True

    Raises:
        HyperloomError: On an empty grid, a name that is not a declared input,
            a value out of range or of the wrong shape (before anything is
            evaluated), or a result of ``evaluate`` that is not a mapping of
            names to numbers, or whose metric names clash with input names.
            An exception raised by ``evaluate`` itself propagates with a note
            naming the grid point.
    """
    specs = _input_set(model, what="hl.sweep").specs
    if not callable(evaluate):
        raise HyperloomError(f"hl.sweep: evaluate must be callable as evaluate(model, **conditioning), got {short_repr(evaluate)}")
    if not isinstance(grid, Mapping) or not grid:
        raise HyperloomError(f"hl.sweep: grid must be a non-empty mapping of input name -> values, got {short_repr(grid)}")
    unknown = [k for k in grid if k not in specs]
    if unknown:
        raise HyperloomError(f"hl.sweep: grid names {unknown} are not declared inputs; declared inputs are {list(specs)}")
    _refuse_data(specs, grid, "hl.sweep", "swept (evaluate receives the grid point: pass the data inside evaluate)")
    swept = {k: s for k, s in specs.items() if k in grid and not isinstance(s, Data)}
    axes = {name: _axis(name, swept[name], points) for name, points in grid.items()}
    points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    rows: list[dict[str, Any]] = []
    target = model if isinstance(model, nn.Module) else None
    with _Frozen(target, eval_mode=eval_mode, freeze=False) if target is not None else contextlib.nullcontext():
        for cond in _progress(points, desc="hl.sweep", show=progress):
            where = "at " + ", ".join(f"{k}={v}" for k, v in cond.items())
            try:
                with torch.no_grad() if no_grad else contextlib.nullcontext():
                    result = evaluate(model, **{k: list(v) if isinstance(v, list) else v for k, v in cond.items()})
            except Exception as e:
                _add_note(e, f"hl.sweep: raised by evaluate {where}")
                raise
            metrics = _metrics(result, where)
            clash = [k for k in metrics if k in axes]
            if clash:
                raise HyperloomError(f"hl.sweep: metric names {clash} clash with swept input names; rename the metrics")
            rows.append({**cond, **metrics})
    return Sweep(rows, list(axes), {k: swept[k] for k in axes})


# -- tune --------------------------------------------------------------------------------------------------
@dataclass
class Tuned:
    """The result of :func:`tune`.

    Attributes:
        values: The best conditioning found (every input: the tuned ones and
            the fixed ones), floats (lists for ``dim=k`` inputs), in float64;
            the model evaluated them rounded to its dtype (moved inwards by
            one step where rounding would leave the range).
        objective: The objective at ``values``.
        history: One dict per evaluation: ``step``, ``objective`` and
            ``values`` (the values of every input).
    """

    values: dict[str, Value]
    objective: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={_fmt(tuple(v)) if isinstance(v, list) else f'{v:.4g}'}" for k, v in self.values.items())
        return f"Tuned({vals}; objective={self.objective:.6g} after {len(self.history) - 1} steps)"


def _inside(spec: Input, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (float64, in range) in ``dtype``, moved one step inwards where rounding put it outside the range.

    The model maps values to [0, 1] with a clamp whose gradient is zero outside; an end point rounded outwards
    (``0.7`` is ``0.70019`` in float16) would pin a gradient search there.
    """
    v = value.to(dtype)
    w = v.double()
    down = torch.nextafter(v, torch.full_like(v, -math.inf))
    up = torch.nextafter(v, torch.full_like(v, math.inf))
    return torch.where(w > spec.high, down, torch.where(w < spec.low, up, v))


def _as_value(t: torch.Tensor) -> Value:
    return float(t) if t.dim() == 0 else [float(v) for v in t]


def tune(
    model: Any,
    objective: Callable[..., torch.Tensor],
    *,
    init: Mapping[str, Any] | None = None,
    steps: int = 100,
    lr: float = 0.05,
    inputs: str | Sequence[str] | None = None,
    eval_mode: bool = True,
) -> Tuned:
    """Search the conditioning that minimises ``objective`` by gradient descent through the frozen model.

    The search runs in each input's normalised ``[0, 1]`` space (the one MIP
    encodes: linear, or ``log`` for log inputs) with Adam and a projection
    back onto ``[0, 1]`` after every step, so every value tried lies inside the
    declared range and the end points can be reached (exactly, where the
    model's dtype represents them; else the nearest value inside). The gradient
    reaches the conditioning through the hypernetwork; the model itself is
    not changed: its parameters, their gradients and ``requires_grad`` flags,
    its buffers and its train/eval modes are exactly as before the call.

    Args:
        model: The trained :class:`~hyperloom.HyperModel`.
        objective: ``objective(model, **conditioning) -> scalar tensor`` to
            minimise (return ``-metric`` to maximise), e.g. a validation loss.
            The conditioning holds 0-d (``(k,)``) tensors in the model's dtype,
            on its device, that carry the gradient.
        init: Starting values (shared: one per input); inputs not given start
            at their midpoint.
        steps: Number of gradient steps (the objective is evaluated
            ``steps + 1`` times).
        lr: Adam's step size in the normalised space (the range is 1 wide).
        inputs: The input(s) to tune; the others stay at their ``init`` value.
            ``None``: all.
        eval_mode: Put the model in eval mode while tuning.

    Returns:
        A :class:`Tuned` holding the best values evaluated and the history.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hyperloom as hl
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> hnet = hl.hypernetize(nn.Linear(2, 1), inputs={"lam": (0.0, 1.0)})
        >>> x = torch.randn(32, 2)
        >>> target = hnet(x, lam=0.8).detach()
        >>> t = hl.tune(hnet, lambda m, lam: (m(x, lam=lam) - target).pow(2).mean(), init={"lam": 0.2}, steps=200)
        >>> abs(t.values["lam"] - 0.8) < 0.02
        True

    Raises:
        HyperloomError: On unknown input names, invalid ``init`` values, a
            ``steps`` or ``lr`` out of bounds, or an objective that is not a
            finite one-element tensor with a gradient path to the tuned inputs.
    """
    specs = _input_set(model, what="hl.tune").specs
    if not isinstance(model, nn.Module):
        raise HyperloomError(f"hl.tune: model must be a hypernetwork model (from hl.hypernetize), got {type(model).__name__}")
    if not callable(objective):
        raise HyperloomError(f"hl.tune: objective must be callable as objective(model, **conditioning), got {short_repr(objective)}")
    n_steps = _as_dim(steps)
    if n_steps is None or n_steps < 0:
        raise HyperloomError(f"hl.tune: steps must be an integer >= 0, got {steps!r}")
    if _is_bool(lr) or not isinstance(lr, numbers.Real) or not (math.isfinite(float(lr)) and float(lr) > 0):
        raise HyperloomError(f"hl.tune: lr must be a finite number > 0, got {lr!r}")
    if torch.is_inference_mode_enabled():
        raise HyperloomError("hl.tune needs autograd: call it outside torch.inference_mode()")
    names = (
        [k for k in specs if not isinstance(specs[k], Data)] if inputs is None else [inputs] if isinstance(inputs, str) else list(inputs)
    )
    if not names and inputs is None:
        _refuse_data(specs, specs, "hl.tune", "tuned by gradient")  # only Data inputs: nothing to tune
    if not names:
        raise HyperloomError(f"hl.tune: inputs is empty; name at least one of the declared inputs {list(specs)}")
    unknown = [k for k in names if k not in specs]
    if unknown:
        raise HyperloomError(f"hl.tune: inputs {unknown} are not declared inputs; declared inputs are {list(specs)}")
    if len(set(names)) != len(names):
        raise HyperloomError(f"hl.tune: inputs {names} name an input more than once")
    _refuse_data(specs, names, "hl.tune", "tuned by gradient (the objective passes the data to the model itself)")
    net_specs = specs
    specs = {k: v for k, v in specs.items() if not isinstance(v, Data)}  # the objective passes the data itself
    tasks = [k for k in names if isinstance(specs[k], Task)]
    if tasks:
        hint = ", ".join(f"{k!r}: range({specs[k].num_tasks})" for k in tasks)  # type: ignore[union-attr]
        raise HyperloomError(
            f"hl.tune: {tasks} are Task inputs (categorical ids): they have no gradient to follow; tune the continuous "
            f"inputs (inputs=...) with the task fixed in init, or sweep the ids: hl.sweep(model, evaluate, {{{hint}}})"
        )
    if init is not None and not isinstance(init, Mapping):
        raise HyperloomError(f"hl.tune: init must be a mapping of input name -> starting value, got {short_repr(init)}")
    init = dict(init or {})
    data = [k for k in init if isinstance(net_specs.get(k), Data)]
    if data:
        raise HyperloomError(
            f"hl.tune: init names Data input(s) {data}: data is not tuned and has no starting value; the objective "
            "passes the data to the model itself (objective(model, **conditioning) calls model(x, d=data, **conditioning))"
        )
    unknown = [k for k in init if k not in specs]
    if unknown:
        raise HyperloomError(f"hl.tune: init names {unknown} are not declared inputs; declared inputs are {list(specs)}")
    m_dtype, m_device = _model_dtype_device(model)
    dtype = m_dtype if m_dtype is not None and m_dtype.is_floating_point else torch.get_default_dtype()
    start: dict[str, torch.Tensor] = {}
    fixed_ids: dict[str, int] = {}
    for name, spec in specs.items():
        if isinstance(spec, Task):
            v = init.get(name, spec.midpoint())
            try:
                InputSet({name: spec}).prepare({name: v}, dtype=torch.float32)
            except HyperloomError as e:
                raise HyperloomError(f"hl.tune: init[{name!r}]: {e}") from None
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                raise HyperloomError(f"hl.tune: init[{name!r}] must be one task id, got {short_repr(v)}")
            fixed_ids[name] = int(v)
        elif name in init:
            start[name] = _checked(InputSet({name: spec}), name, init[name], what=f"hl.tune: init[{name!r}]")
        else:
            start[name] = torch.full(() if spec.dim == 1 else (spec.dim,), spec.midpoint(), dtype=torch.float64)
    cont = {k: v for k, v in specs.items() if isinstance(v, Input)}
    us = {k: cont[k].normalize(start[k]).clone().requires_grad_(True) for k in names}
    opt = torch.optim.Adam(list(us.values()), lr=float(lr))

    def current() -> tuple[dict[str, Any], dict[str, Value]]:
        """The conditioning passed to the objective (model dtype and device) and its float64 values for the record."""
        exact = dict(start)
        for k, u in us.items():
            exact[k] = _exact_ends(cont[k], cont[k].denormalize(u.detach()), u.detach())
        cond: dict[str, Any] = {k: _inside(cont[k], v, dtype).to(m_device) for k, v in exact.items()}
        for k, u in us.items():
            v = cont[k].from_unit(u).to(dtype).to(m_device)  # unclamped: a clamp would pin the search to an end
            cond[k] = cond[k] + (v - v.detach())  # the value in range, the gradient of the unclamped map
        values: dict[str, Value] = {k: _as_value(v) for k, v in exact.items()}
        cond.update(fixed_ids)
        values.update(fixed_ids)
        return {k: cond[k] for k in specs}, {k: values[k] for k in specs}

    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Value]] | None = None
    with _Frozen(model, eval_mode=eval_mode, freeze=True), torch.enable_grad():
        for step in range(n_steps + 1):
            cond, values = current()
            where = "at " + ", ".join(f"{k}={v}" for k, v in values.items())
            out = objective(model, **cond)
            if not isinstance(out, torch.Tensor) or out.numel() != 1 or out.is_complex():
                raise HyperloomError(
                    f"hl.tune: objective must return a real one-element tensor, got {short_repr(out)} {where} "
                    "(a Python float has no gradient: return the tensor)"
                )
            value = float(out.detach())
            if not math.isfinite(value):
                raise HyperloomError(f"hl.tune: objective is {value} at step {step}, {where}")
            history.append({"step": step, "objective": value, "values": values})
            if best is None or value < best[0]:
                best = (value, values)
            if step == n_steps:
                break
            leaves = list(us.values())
            grads = torch.autograd.grad(out.reshape(()), leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)
            if all(g is None for g in grads):
                raise HyperloomError(
                    f"hl.tune: the objective has no gradient with respect to the tuned inputs {names}: compute it from "
                    "the model's output at the given conditioning, without .item() or .detach()"
                )
            for k, u, g in zip(us, leaves, grads):
                g = torch.zeros_like(u) if g is None else g
                if not bool(torch.isfinite(g).all()):
                    raise HyperloomError(
                        f"hl.tune: the gradient with respect to {k!r} is not finite at step {step}, {where} "
                        f"(model dtype {dtype}); use a float32 model or narrow the range"
                    )
                u.grad = g
            opt.step()
            with torch.no_grad():
                for u in leaves:
                    u.clamp_(0.0, 1.0)
    assert best is not None
    return Tuned(values=best[1], objective=best[0], history=history)
