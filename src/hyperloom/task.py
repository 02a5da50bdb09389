"""Learned categorical inputs: task ids mapped to trainable embeddings.

``hl.Task(num_tasks, dim=8)`` declares a conditioning input whose value is a
task id, an ``int`` in ``[0, num_tasks)``: one id for the whole batch, or an
integer tensor of ``B`` ids (any mix of tasks in one batch, one weight set
per sample). Each id selects a row of a learned embedding table, a trainable
parameter of the :class:`~hyperloom.HyperNetwork` named
``tasks.<input name>.weight`` in its ``state_dict`` (saved and loaded with it).

**Magnitude invariance** (MIP applied to a learned input). A learned
embedding's magnitude is free to drift, and with a positively homogeneous
hypernetwork the generated weights scale with it. ``norm="unit"`` (the
default) divides every looked-up embedding by its norm in the forward, so
the hypernetwork always sees a point on the unit sphere; ``norm=None`` is the
plain embedding (the ablation). The unit sphere, not a sphere of radius
``sqrt(dim)``: MIP's cos|sin encoding gives every continuous coordinate a
feature block of norm 1, so a unit-norm task block weighs as much as one
continuous coordinate, and the trunk's first layer (initialised for inputs of
norm ~1) sees the same input norm whatever the task dimension. Both variants
start from the same table (rows ``N(0, 1/dim)``, norm ~1), so the ablation
isolates the drift.

**Combination with continuous inputs.** The hypernetwork's trunk input is the
concatenation ``[E(gamma), e_task1, e_task2, ...]``: the encoding of the
continuous inputs (cos|sin under MIP, ``2k`` features of norm ``sqrt(k)``)
followed by each task's embedding (``dim`` features each, norm 1 when
``norm="unit"``), so the whole input has the constant norm
``sqrt(k + number of Task inputs)`` under MIP.

**Adding tasks after training started** (continual learning). The table is
allocated once with ``max_tasks`` rows (default: ``num_tasks``); only the
first ``num_tasks`` ids are valid. ``hnet.add_task("task")`` makes the next
reserved row valid. Nothing is reallocated, so the existing embeddings and
outputs stay bit-identical and an optimiser built before (Adam included)
keeps stepping the same parameter with its state. Reserved rows receive
exactly zero gradient until they are used (Adam leaves them untouched; a
weight decay shrinks them, which ``norm="unit"`` divides out). The number of
valid tasks is state (the buffer ``tasks.<name>.num_tasks``), restored by
``load_state_dict`` and the checkpoint functions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .errors import HyperloomError, short_repr

#: ``Task(norm=...)``: ``"unit"`` (constant norm, MIP) or ``None`` (plain embedding).
TaskNorm = Literal["unit"] | None


def _as_int(x: Any) -> int | None:
    """``x`` as an ``int`` (NumPy integers too), or ``None`` for a bool, a float, a tensor or a non-number."""
    if isinstance(x, (bool, torch.Tensor)) or getattr(getattr(x, "dtype", None), "kind", None) == "b":
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


@dataclass(frozen=True)
class Task:
    """Declaration of a task-id input with a learned embedding table.

    Args:
        num_tasks: Number of valid task ids (``0 .. num_tasks - 1``), an int ``>= 1``.
        dim: Size of each task's embedding.
        norm: ``"unit"`` (default, MIP): embeddings are divided by their norm
            in the forward (constant norm 1); ``None``: the plain embedding.
        max_tasks: Rows allocated in the table (default ``num_tasks``): room
            for :meth:`HyperNetwork.add_task <hyperloom.HyperNetwork.add_task>`
            without reallocating parameters.

    Example:
        >>> import torch, hyperloom as hl
        >>> hnet = hl.HyperNetwork({"task": hl.Task(3, dim=4), "lam": (0.0, 1.0)}, {"w": (2, 2)}, hidden=(8,))
        >>> tuple(hnet({"task": 2, "lam": 0.5})["w"].shape)
        (2, 2)
        >>> tuple(hnet({"task": torch.tensor([0, 2, 1]), "lam": 0.5})["w"].shape)  # per-sample tasks
        (3, 2, 2)

    Raises:
        HyperloomError: On a ``num_tasks``, ``dim`` or ``max_tasks`` that is
            not an integer ``>= 1`` (``max_tasks >= num_tasks``), or an unknown ``norm``.
    """

    num_tasks: int
    dim: int = 8
    norm: TaskNorm = "unit"
    max_tasks: int | None = None

    def __post_init__(self) -> None:
        n = _as_int(self.num_tasks)
        if n is None or n < 1:
            raise HyperloomError(f"Task num_tasks must be an integer >= 1, got {short_repr(self.num_tasks)}")
        d = _as_int(self.dim)
        if d is None or d < 1:
            raise HyperloomError(f"Task dim must be an integer >= 1, got {short_repr(self.dim)}")
        cap = n if self.max_tasks is None else _as_int(self.max_tasks)
        if cap is None or cap < n:
            raise HyperloomError(f"Task max_tasks must be an integer >= num_tasks={n}, got {short_repr(self.max_tasks)}")
        if self.norm not in ("unit", None):
            raise HyperloomError(f"Task norm must be one of 'unit', None, got {short_repr(self.norm)}")
        object.__setattr__(self, "num_tasks", n)
        object.__setattr__(self, "dim", d)
        object.__setattr__(self, "max_tasks", cap)

    @property
    def capacity(self) -> int:
        """Rows of the embedding table (``max_tasks``)."""
        assert self.max_tasks is not None  # set in __post_init__
        return self.max_tasks

    @property
    def embedding_norm(self) -> str:
        """``norm`` as a string (``"unit"`` or ``"none"``), as checkpoints record and compare it."""
        return "none" if self.norm is None else str(self.norm)

    def midpoint(self) -> int:
        """The id used where an input needs a representative value (task 0)."""
        return 0


class TaskEmbedding(nn.Module):
    """The learned table of one :class:`Task` input: ids in, embeddings out.

    Attributes:
        weight: ``(max_tasks, dim)`` trainable table (rows ``N(0, 1/dim)`` at first).
        num_tasks: 0-d int64 buffer, the number of valid ids (state, saved).

    Args:
        spec: The declaration.
        dtype: Dtype of the table.
        device: Device of the table.

    Example:
        >>> import hyperloom as hl
        >>> table = TaskEmbedding(hl.Task(2, dim=3))
        >>> table(torch.tensor([0.0, 1.0])).norm(dim=1).detach().round(decimals=5)
        tensor([1., 1.])

    Raises:
        HyperloomError: If ``max_tasks`` ids cannot be held exactly in ``dtype``
            promoted to at least float32 (ids travel with the other inputs as
            floating values, never in half precision).
    """

    num_tasks: torch.Tensor

    def __init__(self, spec: Task, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        id_dtype = torch.promote_types(dtype, torch.float32)  # ids travel at least in float32 (HyperNetwork.raw_dtype)
        exact = 2.0 / torch.finfo(id_dtype).eps  # every integer up to 2^(mantissa bits + 1) is exact
        if spec.capacity > exact:
            raise HyperloomError(f"Task: max_tasks={spec.capacity} ids cannot be held exactly in {id_dtype} (at most {int(exact)})")
        table = torch.randn(spec.capacity, spec.dim, dtype=torch.float32) / math.sqrt(spec.dim)
        self.weight = nn.Parameter(table.to(dtype=dtype, device=device))
        self.register_buffer("num_tasks", torch.tensor(spec.num_tasks, dtype=torch.int64, device=device))
        self.norm: TaskNorm = spec.norm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, dim)`` of ``(N,)`` ids held as floating values (already validated; branch-free)."""
        e = self.weight[ids.long()]
        if self.norm == "unit":
            e = e / e.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        return e

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # another max_tasks or dim: refused by name before torch's raw size mismatch (and before the Task
        # declaration follows the loaded num_tasks)
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.shape != self.weight.shape:
            raise HyperloomError(
                f"{prefix}weight: the state's task table has shape {tuple(w.shape)} (max_tasks={w.shape[0]}, dim="
                f"{w.shape[-1] if w.dim() else '?'}), this model's {tuple(self.weight.shape)} (max_tasks={self.weight.shape[0]}, "
                f"dim={self.weight.shape[1]}): declare the Task input as the saved model did"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[no-untyped-call]

    def extra_repr(self) -> str:
        return f"max_tasks={self.weight.shape[0]}, dim={self.weight.shape[1]}, norm={self.norm!r}"


class _TaskPending:
    """The range check of one tensor of task ids, as a 0-d ``bad`` flag; the message is built only when it is set."""

    def __init__(self, src: torch.Tensor, spec: Task) -> None:
        self.src = src
        self.bad = ((src < 0) | (src >= spec.num_tasks)).any()

    def problem(self, name: str, spec: Task, dtype: torch.dtype) -> str | None:
        bad = (self.src < 0) | (self.src >= spec.num_tasks)
        if not bool(bad.any()):
            return None
        i = int(bad.reshape(-1).nonzero()[0])
        return _range_message(name, spec, int(self.src.reshape(-1)[i]), f" at sample {i}" if self.src.dim() else "")


def _range_message(name: str, spec: Task, value: int, where: str = "") -> str:
    return (
        f"Task input {name!r}: id {value}{where} is out of range; valid ids are 0..{spec.num_tasks - 1} "
        f"({spec.num_tasks} task{'s' if spec.num_tasks != 1 else ''})"
    )


_ID_DTYPES = tuple(
    d
    for d in (getattr(torch, n, None) for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"))
    if d is not None
)


def task_ids(name: str, spec: Task, value: Any, *, device: torch.device | None) -> tuple[torch.Tensor | int, int | None]:
    """Validate the type and shape of task ids; return ``(ids, n)``.

    ``ids`` is a Python ``int`` (checked here) or an integer tensor of shape
    ``()`` or ``(n,)``; ``n`` is ``None`` when the id is shared by the batch.

    Raises:
        HyperloomError: On a bool, a float or a non-integer tensor, a tensor
            on another device, a wrong shape, or a Python id out of range.
    """
    expected = f"an int id in [0, {spec.num_tasks - 1}] or an integer tensor of ids of shape (B,)"
    if (
        isinstance(value, bool)
        or getattr(getattr(value, "dtype", None), "kind", None) == "b"
        or getattr(value, "dtype", None) is torch.bool
    ):
        raise HyperloomError(f"Task input {name!r}: expected {expected}, got bool {short_repr(value)}")
    i = _as_int(value)
    if i is not None:
        if not 0 <= i < spec.num_tasks:
            raise HyperloomError(_range_message(name, spec, i))
        return i, None
    if isinstance(value, float) or (not isinstance(value, torch.Tensor) and getattr(getattr(value, "dtype", None), "kind", None) == "f"):
        raise HyperloomError(f"Task input {name!r}: expected {expected}, got the non-integer {type(value).__name__} {short_repr(value)}")
    if isinstance(value, torch.Tensor):
        t = value
        if device is not None and t.device != device:
            raise HyperloomError(f"Conditioning input {name!r} is on {t.device} but the hypernetwork is on {device}")
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise HyperloomError(f"Task input {name!r}: expected {expected}, got {type(value).__name__} {short_repr(value)}") from None
    if t.dtype not in _ID_DTYPES:
        raise HyperloomError(f"Task input {name!r}: expected {expected}, got a tensor of non-integer dtype {t.dtype}")
    if t.dim() > 1:
        raise HyperloomError(f"Task input {name!r}: expected {expected}, got shape {tuple(t.shape)}")
    if t.dtype == getattr(torch, "uint64", None):
        raise HyperloomError(f"Task input {name!r}: expected {expected}, got a tensor of dtype {t.dtype}; pass int64 ids")
    if t.dtype != torch.int64:
        # as int64 (lossless up to uint32): torch compares wide unsigned ids only partly, and a narrow dtype would
        # wrap num_tasks in the range check (200 is -56 in int8: every id refused)
        t = t.to(torch.int64)
    return t, (None if t.dim() == 0 else int(t.shape[0]))


__all__ = ["Task", "TaskEmbedding", "TaskNorm", "task_ids"]
