"""The standalone hypernetwork: named conditioning in, named tensors out.

``HyperNetwork`` is usable without :func:`hyperloom.hypernetize` by anyone
who wires their own model; ``hypernetize`` builds one for you.

    conditioning -> InputSet (range -> [0, 1]) -> encoding -> trunk -> head -> Delta
    theta = theta0 + Delta   (additive output, MIP)   or   theta = Delta   (default)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data_input import Data, DataCode, DataEncoder
from .encoding import Encoding, get_encoding
from .errors import HyperloomError
from .heads import DenseHead, LowRankHead, check_target_memory, is_bias_name
from .inputs import Input, InputLike, InputSet, columns
from .params import ParamStore
from .shared_heads import Chunked, ChunkedHead, Structured, StructuredHead, build_shared_head, head_spec
from .task import Task, TaskEmbedding, _as_int
from .trunk import Trunk, activation_gain
from .types import ParamDict

#: Formulation name -> (encoding, additive).
FORMULATIONS: dict[str, tuple[str, bool]] = {"mip": ("cossin", True), "default": ("raw", False)}


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active (also one inside ``jacfwd``/``hessian``), at any level.

    Under ``vmap`` a tensor's values cannot be read (``bool(t)``, ``.item()``): checks that need them
    are skipped there, as under ``torch.compile`` (see :meth:`HyperNetwork.prepare`).
    """
    if torch._C._functorch.maybe_current_level() is None:
        return False
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        return any(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters())
    except Exception:  # pragma: no cover - a torch without these internals: treat every transform as a vmap
        return True


def value_checks_off() -> bool:
    """Whether checks that read tensor values are skipped: under ``torch.compile`` and under ``torch.func.vmap``."""
    return _is_compiling() or _under_vmap()


def init_theta0(name: str, shape: Sequence[int] | torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """MIP's initialisation of a base value ``theta0``.

    Tensors with two or more dimensions (weights) get Kaiming normal with
    ``fan_in`` (ReLU gain); biases get zero. Given a shape, every vector or
    scalar gets zero. Given the model's own tensor instead (what
    ``hypernetize(..., theta0="init")`` does), its shape, dtype and device are
    used, and a vector or scalar that is not a bias (a normalisation gain or
    shift, a scale) keeps the model's value. ``hypernetize`` takes ``theta0``
    from the wrapped model's own (possibly pretrained) weights by default.

    Example:
        >>> init_theta0("fc.bias", (3,))
        tensor([0., 0., 0.])
        >>> init_theta0("norm.weight", torch.nn.LayerNorm(2).weight)  # a gain keeps its value
        tensor([1., 1.])

    Raises:
        HyperloomError: A weight (two or more dimensions) of an integer or boolean dtype.
    """
    if isinstance(shape, torch.Tensor):
        p = shape.detach()
        if p.dim() < 2 and not is_bias_name(name):
            return p.clone()
        return init_theta0(name, tuple(p.shape), dtype=p.dtype if dtype is None else dtype).to(p.device)
    t = torch.zeros(tuple(shape), dtype=dtype)
    if len(shape) >= 2:
        if not t.is_floating_point():
            raise HyperloomError(f"init_theta0({name!r}): a weight needs a floating-point dtype, got {t.dtype}")
        nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="relu")
    return t


class HyperNetwork(nn.Module):
    """Generate named tensors from named conditioning inputs.

    Args:
        inputs: Mapping ``name -> Input | Task | Data | (low, high) | (low, high, "log")``; a
            :class:`~hyperloom.Task` adds a learned embedding table ``tasks.<name>.weight``
            (see :mod:`hyperloom.task` for how embeddings join the encoded continuous inputs);
            a :class:`~hyperloom.Data` input adds its encoder as ``data.<name>`` (see
            :mod:`hyperloom.data_input`).
        targets: Mapping ``name -> shape`` or ``name -> tensor``. A tensor also
            gives ``theta0``'s initial value; a bare shape uses
            :func:`init_theta0`.
        hidden: Trunk widths (``()`` for a linear hypernetwork).
        activation: Trunk activation: ``relu``, ``leaky_relu``, ``tanh``,
            ``gelu``, ``elu``, ``silu``.
        norm: Trunk normalisation: ``none``, ``batchnorm``, ``layernorm``,
            ``weightnorm``. ``batchnorm`` needs per-sample conditioning with
            at least 2 samples while training.
        formulation: ``"mip"`` (cos|sin encoding + additive output) or
            ``"default"`` (raw input, ``theta = h(gamma)``); the two halves can
            be overridden separately with ``encoding`` and ``additive``.
        encoding: Encoding name or instance (see :mod:`hyperloom.encoding`);
            ``None`` takes the formulation's.
        additive: ``theta = theta0 + Delta`` when true; ``None`` takes the
            formulation's.
        init: ``"mip"`` (Kaiming fan_out trunk, split-init head) or
            ``"torch"`` (PyTorch's default ``nn.Linear`` init).
        zero_init: Zero the head so that ``Delta = 0`` at the start.
        head: ``"dense"``, ``"lowrank"`` (``Delta W = B A``), or a shared head: ``"chunked"`` /
            ``"structured"`` or their options :class:`~hyperloom.Chunked` / :class:`~hyperloom.Structured`
            (one generator for many tensors, see :mod:`hyperloom.shared_heads`).
        rank: Rank of the ``"lowrank"`` head.
        dtype: Dtype of all parameters (default: that of tensor targets, else
            the default dtype).
        device: Device of all parameters (default: that of tensor targets).

    Shapes:
        Shared conditioning (numbers, 0-d tensors) gives ``{name: shape}``;
        per-sample conditioning ``(B,)`` gives ``{name: (B, *shape)}``.

    Example:
        >>> import hyperloom as hl
        >>> h = hl.HyperNetwork({"lam": (0.0, 1.0)}, {"w": (4, 3), "b": (4,)}, hidden=(8,))
        >>> {k: tuple(v.shape) for k, v in h({"lam": 0.5}).items()}
        {'w': (4, 3), 'b': (4,)}
        >>> {k: tuple(v.shape) for k, v in h({"lam": torch.rand(6)}).items()}
        {'w': (6, 4, 3), 'b': (6, 4)}

    Raises:
        HyperloomError: On an unknown option (head included; ``rank`` with another head than
            ``"lowrank"``), an empty target set, targets of mixed dtypes or devices, or a structured
            head over targets of which no two share a shape (see :mod:`hyperloom.shared_heads`).
    """

    _in_lo: torch.Tensor
    _in_inv_span: torch.Tensor
    _in_floor: torch.Tensor
    _in_is_log: torch.Tensor
    _cont_index: torch.Tensor

    def __init__(
        self,
        inputs: Mapping[str, InputLike] | InputSet,
        targets: Mapping[str, Sequence[int] | torch.Tensor],
        *,
        hidden: Sequence[int] = (16, 64, 128),
        activation: str = "leaky_relu",
        norm: str = "none",
        formulation: str = "mip",
        encoding: str | Encoding | None = None,
        additive: bool | None = None,
        init: str = "mip",
        zero_init: bool = False,
        head: str | Chunked | Structured = "dense",
        rank: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        # every constructor argument, for config() (targets and inputs are recorded from what they resolve to)
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__", "inputs", "targets", "dtype", "device")}
        super().__init__()
        self._config_args: dict[str, Any] = args
        if formulation not in FORMULATIONS:
            raise HyperloomError(f"Unknown formulation {formulation!r}; valid options are {sorted(FORMULATIONS)}")
        if not isinstance(targets, Mapping) or len(targets) == 0:
            raise HyperloomError("targets must be a non-empty mapping name -> shape or tensor")
        spec = head_spec(head)
        if not isinstance(spec, str) and rank is not None:
            raise HyperloomError(f"rank={rank!r} applies to head='lowrank' only, got head={spec!r}")
        self.head_options = spec
        if head == "lowrank" and rank is None:
            raise HyperloomError("head='lowrank' needs rank=<int>")
        enc_default, add_default = FORMULATIONS[formulation]
        self.formulation = formulation
        self.additive = add_default if additive is None else bool(additive)
        self.input_set = InputSet(inputs)
        self.encoding = get_encoding(enc_default if encoding is None else encoding)

        values, shapes = self._targets(targets)
        ref = next(iter(values.values()), None)
        dtype = dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
        device = torch.device(device) if device is not None else (ref.device if ref is not None else None)
        check_target_memory(shapes, copies=2 if self.additive else 1, dtype=dtype, device=device)
        bias = not self.additive  # theta0 is the offset: no second trainable offset (see heads.py)

        gain = activation_gain(activation)
        in_features = self._plan_features(dtype, device)
        self.trunk = Trunk(in_features, hidden, activation=activation, norm=norm, init=init)
        self.head: DenseHead | LowRankHead | ChunkedHead | StructuredHead
        if not isinstance(spec, str):
            self.head = build_shared_head(
                spec, self.trunk.out_features, shapes, init=init, gain=gain, zero_init=zero_init, dtype=dtype, device=device
            )
        elif head == "lowrank" and rank is not None:
            self.head = LowRankHead(
                self.trunk.out_features,
                shapes,
                rank=rank,
                init=init,
                gain=gain,
                zero_init=zero_init,
                bias=bias,
                dtype=dtype,
                device=device,
            )
        else:
            self.head = DenseHead(
                self.trunk.out_features, shapes, init=init, gain=gain, zero_init=zero_init, bias=bias, dtype=dtype, device=device
            )
        self.shapes: dict[str, tuple[int, ...]] = dict(shapes)
        self.theta0: ParamStore | None = None
        if self.additive:
            base = {k: values[k] if k in values else init_theta0(k, s, dtype=dtype) for k, s in shapes.items()}
            self.theta0 = ParamStore(base)
        self._map_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._register_input_map(dtype)
        self.to(dtype=dtype, device=device)
        if (
            isinstance(self.head, ChunkedHead | StructuredHead)
            and self.head.options.combine == "concat"
            and not zero_init
            and self.device.type != "meta"
        ):
            was = self.training
            self.eval()  # one row: a batch norm in the trunk uses its (initial) running statistics
            with torch.no_grad():
                self.head.calibrate(self.trunk(self.features(self._calibration_point(dtype, device))))
            self.train(was)

    def _calibration_point(self, dtype: torch.dtype | None, device: torch.device | None) -> torch.Tensor:
        """The raw conditioning a ``"concat"`` shared head is calibrated at.

        Every input's midpoint, a Data input's a unit-norm code (its midpoint, a zero code for shape checks,
        has zero features: the calibration would scale every gain by 0).
        """
        point = self.input_set.midpoint(dtype=dtype, device=device)
        start = 0
        for spec in self.input_set.specs.values():
            k = columns(spec)
            if isinstance(spec, Data):
                point[:, start : start + k] = 1.0 / math.sqrt(k)
            start += k
        return point

    #: :meth:`config` keys (dotted, ``*`` matches any one name) that checkpoints record but do not compare:
    #: initialisation-only options, and state restored with the ``state_dict`` (a Task's ``num_tasks``).
    CONFIG_UNCHECKED: tuple[str, ...] = ("init", "zero_init", "inputs.*.num_tasks")

    def config(self) -> dict[str, Any]:
        """The whole configuration of this hypernetwork, JSON-able: what checkpoints record and check on load.

        Derived generically from the constructor's arguments (every one of them, so an option added later
        is recorded and checked with no change to the checkpoint code), with the values they resolve to:
        ``encoding`` and ``additive`` after the formulation's defaults, ``inputs`` as each declaration's
        fields (``{"kind": "Input", "low": ..., ...}``, ``{"kind": "Task", "num_tasks": ..., ...}``: any
        dataclass input kind is recorded field by field), ``targets`` as their shapes. Placement (``dtype``,
        ``device``) is not configuration. :func:`~hyperloom.save_model`, :func:`~hyperloom.save_training`
        and LoRA directories store it; :func:`~hyperloom.load_model` and :func:`~hyperloom.load_training`
        refuse any difference by field name, except the keys in :attr:`CONFIG_UNCHECKED`.

        Values that are not JSON are recorded by their ``config()`` method when they have one, an
        :class:`~hyperloom.Encoding` by its name, anything else by its type name.

        Example:
            >>> h = HyperNetwork({"lam": (0.0, 1.0)}, {"w": (2, 3)}, hidden=(8,), activation="tanh")
            >>> cfg = h.config()
            >>> cfg["activation"], cfg["hidden"], cfg["encoding"], cfg["targets"]
            ('tanh', [8], 'cossin', {'w': [2, 3]})
            >>> cfg["inputs"]["lam"]["kind"], cfg["inputs"]["lam"]["high"]
            ('Input', 1.0)
        """
        cfg = {k: _config_value(v) for k, v in self._config_args.items()}
        cfg["encoding"] = _config_value(self.encoding)
        cfg["additive"] = self.additive
        cfg["inputs"] = {k: _config_value(spec) for k, spec in self.input_set.specs.items()}
        for k, spec in self.input_set.specs.items():
            if isinstance(spec, Task):  # as files of earlier versions recorded a Task's norm (compared with those files)
                cfg["inputs"][k]["embedding_norm"] = spec.embedding_norm
        cfg["targets"] = {k: list(s) for k, s in self.shapes.items()}
        return cfg

    def _plan_features(self, dtype: torch.dtype, device: torch.device | None) -> int:
        """Build the task tables and the column plan; return the trunk's input size.

        The raw ``(N, K)`` conditioning holds the continuous inputs' coordinates and one column per
        :class:`~hyperloom.Task` (its id). The trunk input is ``[encoding(continuous), e_task1, ...]``.
        """
        self.tasks = nn.ModuleDict()
        self.data = nn.ModuleDict()
        self._task_cols: list[tuple[str, int]] = []
        self._data_cols: list[tuple[str, int, int]] = []
        cont: list[int] = []
        start = 0
        for name, spec in self.input_set.specs.items():
            k = columns(spec)
            if isinstance(spec, Task):
                self.tasks[name] = TaskEmbedding(spec, dtype=dtype, device=device)
                self._task_cols.append((name, start))
            elif isinstance(spec, Data):  # the code (encoded in prepare) is held in the raw columns
                self.data[name] = DataEncoder(name, spec)
                self._data_cols.append((name, start, k))
            else:
                cont += range(start, start + k)
            start += k
        self._num_continuous = len(cont)
        self.register_buffer("_cont_index", torch.tensor(cont, dtype=torch.int64), persistent=False)
        if self._task_cols:
            self.register_load_state_dict_post_hook(_sync_task_counts)  # type: ignore[no-untyped-call]
        n_enc = self.encoding.out_features(len(cont)) if cont else 0
        return n_enc + sum(spec.dim for spec in self.input_set.specs.values() if isinstance(spec, (Task, Data)))

    def add_task(self, name: str | None = None, n: int = 1) -> range:
        """Make ``n`` more task ids valid for the :class:`~hyperloom.Task` input ``name``; return the new ids.

        The ids come from the rows reserved by ``Task(..., max_tasks=...)``: no parameter is
        reallocated, so existing tasks' outputs stay bit-identical and an optimiser built before keeps
        stepping the same table with its state (see :mod:`hyperloom.task`).

        Args:
            name: The Task input (default: the only one).
            n: How many tasks to add (an int ``>= 1``).

        Example:
            >>> import hyperloom as hl
            >>> h = hl.HyperNetwork({"task": hl.Task(1, max_tasks=4)}, {"w": (2,)}, hidden=(4,))
            >>> h.add_task()
            range(1, 2)
            >>> h.input_set.specs["task"].num_tasks
            2

        Raises:
            HyperloomError: On an unknown name (or no or several Task inputs without a name), an ``n``
                that is not an int ``>= 1``, or no room left in ``max_tasks``.
        """
        name = self.task_input(name)
        spec = self.input_set.specs[name]
        assert isinstance(spec, Task)
        k = _as_int(n)
        if k is None or k < 1:
            raise HyperloomError(f"add_task({name!r}): n must be an integer >= 1, got {n!r}")
        old = spec.num_tasks
        if old + k > spec.capacity:
            raise HyperloomError(
                f"add_task({name!r}, n={k}): {name!r} already uses {old} of its max_tasks={spec.capacity} tasks; "
                f"declare hl.Task(..., max_tasks={old + k}) (or more) to reserve room"
            )
        self._set_num_tasks(name, old + k)
        return range(old, old + k)

    def task_input(self, name: str | None = None) -> str:
        """The name of the :class:`~hyperloom.Task` input ``name`` (default: the only one).

        Raises:
            HyperloomError: If ``name`` is not a Task input, or it is ``None`` and there is not exactly one.
        """
        tasks = [k for k, _ in self._task_cols]
        if name is None:
            if len(tasks) != 1:
                raise HyperloomError(
                    f"Name the Task input: the hypernetwork has {len(tasks)} ({tasks}); inputs are {list(self.input_set.names)}"
                )
            return tasks[0]
        if name not in tasks:
            raise HyperloomError(f"{name!r} is not a Task input; Task inputs are {tasks}, inputs are {list(self.input_set.names)}")
        return name

    def task_table(self, name: str | None = None) -> TaskEmbedding:
        """The learned embedding table of the :class:`~hyperloom.Task` input ``name`` (default: the only one).

        Raises:
            HyperloomError: As :meth:`task_input`.
        """
        table = self.tasks[self.task_input(name)]
        assert isinstance(table, TaskEmbedding)
        return table

    def _set_num_tasks(self, name: str, n: int) -> None:
        spec = self.input_set.specs[name]
        assert isinstance(spec, Task)
        self.input_set.specs[name] = Task(n, dim=spec.dim, norm=spec.norm, max_tasks=spec.capacity)
        table = self.task_table(name)
        table.num_tasks = torch.tensor(n, dtype=torch.int64, device=table.num_tasks.device)

    def _register_input_map(self, dtype: torch.dtype) -> None:
        """Per-coordinate constants so that the range mapping is a few vectorised ops (non-persistent buffers).

        The constants are float64 whatever the model's dtype (``_apply`` keeps them so) and the mapping
        runs in at least float32, so a float64 model maps exactly and a half-precision one does not lose
        a log range's low end; a range whose constants do not fit that precision is refused here.
        """
        ct = torch.promote_types(dtype, torch.float32)
        lo, inv, floor, is_log = [], [], [], []
        for name, spec in self.input_set.specs.items():
            if not isinstance(spec, Input):
                continue
            log = spec.scale == "log"
            a, b = (math.log(spec.low), math.log(spec.high)) if log else (spec.low, spec.high)
            span = 1.0 / (b - a) if b - a > 0 else math.inf
            consts = torch.tensor([a, b, b - a, span], dtype=torch.float64).to(ct)
            if not bool(torch.isfinite(consts).all()) or float(consts[2]) <= 0 or float(consts[3]) == 0:
                raise HyperloomError(
                    f"Input {name!r}: the range [{spec.low}, {spec.high}]{' (log)' if log else ''} cannot be mapped to [0, 1] "
                    f"in {ct} (its ends or its span overflow or underflow); rescale the input or use float64"
                )
            lo += [a] * spec.dim
            inv += [span] * spec.dim
            floor += [spec.low if log else 1.0] * spec.dim
            is_log += [log] * spec.dim
        self._has_log = any(is_log)
        f64 = torch.float64
        self.register_buffer("_in_lo", torch.tensor(lo, dtype=f64), persistent=False)
        self.register_buffer("_in_inv_span", torch.tensor(inv, dtype=f64), persistent=False)
        self.register_buffer("_in_floor", torch.tensor(floor, dtype=f64), persistent=False)
        self.register_buffer("_in_is_log", torch.tensor(is_log), persistent=False)

    _MAP_BUFFERS = ("_in_lo", "_in_inv_span", "_in_floor")

    def _apply(self, fn: Any, recurse: bool = True) -> HyperNetwork:
        """Move and cast as usual, but keep the range constants in float64 (only their device follows)."""
        keep = {n: t for n in self._MAP_BUFFERS if (t := self._buffers.get(n)) is not None}
        out = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for n, t in keep.items():
            moved = self._buffers[n]
            assert moved is not None
            self._buffers[n] = t.to(device=moved.device)
        self._map_cache = {}
        return out  # type: ignore[no-any-return]

    def _map_constants(self, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lo, inv_span, floor)`` in the compute dtype ``ct``, converted once per dtype (not at every call)."""
        cached = self._map_cache.get(ct)
        if cached is None:
            floor = self._in_floor.to(ct).clamp_min(torch.finfo(ct).tiny)  # never underflows to 0
            cached = (self._in_lo.to(ct), self._in_inv_span.to(ct), floor)
            self._map_cache[ct] = cached
        return cached

    @staticmethod
    def _targets(
        targets: Mapping[str, Sequence[int] | torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
        values: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, t in targets.items():
            if isinstance(t, torch.Tensor):
                if not t.dtype.is_floating_point:
                    raise HyperloomError(f"Target {name!r} must be a floating tensor, got dtype {t.dtype}")
                values[name] = t
                shapes[name] = tuple(t.shape)
            else:
                try:
                    if isinstance(t, str) or any(isinstance(d, bool) for d in t):
                        raise TypeError
                    shapes[name] = tuple(operator.index(d) for d in t)
                except (TypeError, ValueError):
                    raise HyperloomError(f"Target {name!r}: expected a shape or a tensor, got {t!r}") from None
                if any(d < 0 for d in shapes[name]):
                    raise HyperloomError(f"Target {name!r}: negative size in shape {shapes[name]}")
        kinds = {(v.dtype, v.device) for v in values.values()}
        if len(kinds) > 1:
            detail = ", ".join(f"{k}: {v.dtype} on {v.device}" for k, v in values.items())
            raise HyperloomError(f"All targets must share one dtype and device, got {detail}")
        return values, shapes

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the hypernetwork's parameters."""
        return next(self.head.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the hypernetwork's parameters."""
        return next(self.head.parameters()).device

    def head_config(self) -> dict[str, Any]:
        """The head's kind and options as a JSON-able dict (recorded in checkpoints and checked on load).

        Example:
            >>> import hyperloom as hl
            >>> hl.HyperNetwork({"lam": (0, 1)}, {"w": (4, 3)}, hidden=(4,), head="lowrank", rank=1).head_config()
            {'kind': 'lowrank', 'rank': 1}
        """
        spec = self.head_options
        if not isinstance(spec, str):
            return spec.to_json()
        return {"kind": spec, "rank": self.head.rank} if isinstance(self.head, LowRankHead) else {"kind": spec}

    @property
    def num_outputs(self) -> int:
        """Size of the head's output layer."""
        return self.head.num_outputs

    # -- the functional core ------------------------------------------------------------
    def features(self, raw: torch.Tensor) -> torch.Tensor:
        """Encode raw ``(N, K)`` conditioning values into trunk inputs ``(N, D)`` (branch-free).

        The mapping to ``u`` runs in at least float32 (see :meth:`_register_input_map`). With
        :class:`~hyperloom.Task` inputs the result is ``[encoding(continuous columns), e_task, ...]``.
        """
        if not self._task_cols and not self._data_cols:
            return self._encode(raw)
        dt = self.dtype  # raw may be wider (task ids are kept exact, see raw_dtype)
        parts = [self._encode(raw.index_select(1, self._cont_index)).to(dt)] if self._num_continuous else []
        parts += [self.tasks[name](raw[:, col]).to(dt) for name, col in self._task_cols]
        parts += [raw[:, col : col + k].to(dt) for _, col, k in self._data_cols]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _encode(self, raw: torch.Tensor) -> torch.Tensor:
        """Map the continuous inputs' raw ``(N, k)`` columns to ``u`` and encode them."""
        ct = torch.promote_types(raw.dtype, torch.float32)
        r = raw.to(ct)
        lo, inv, floor = self._map_constants(ct)
        if self._has_log:
            # linear coordinates take log(1) in the unused branch (a log of 0 there would make the gradient NaN)
            t = torch.where(self._in_is_log, torch.where(self._in_is_log, r, 1.0).clamp_min(floor).log(), r)
        else:
            t = r
        u = ((t - lo) * inv).clamp(0.0, 1.0)  # = InputSet.normalize(raw), vectorised
        return self.encoding(raw, u.to(raw.dtype))

    def delta_from_raw(self, raw: torch.Tensor) -> ParamDict:
        """``Delta`` for raw ``(N, K)`` values: ``{name: (N, *shape)}`` (branch-free)."""
        if self.trunk.norm_kind == "batchnorm" and self.training and raw.shape[0] < 2 and not _is_compiling():
            raise HyperloomError(
                "norm='batchnorm' in the hypernetwork needs per-sample conditioning with at least 2 samples "
                f"while training, got {raw.shape[0]} (use per-sample values, eval mode, or another norm)"
            )
        return self.head(self.trunk(self.features(raw)))

    def theta_from_raw(self, raw: torch.Tensor) -> ParamDict:
        """``theta`` for raw ``(N, K)`` values: ``{name: (N, *shape)}`` (branch-free)."""
        delta = self.delta_from_raw(raw)
        if self.theta0 is None:
            return delta
        return {k: t0 + delta[k] for k, t0 in self.theta0.items()}

    def theta_shared(self, raw: torch.Tensor) -> ParamDict:
        """``theta`` for one raw ``(1, K)`` row, without a batch dimension: ``{name: shape}``.

        The same values as ``theta_from_raw(raw)`` indexed at 0, with fewer autograd nodes
        (no per-tensor indexing): the fast path of shared conditioning.
        """
        if self.trunk.norm_kind == "batchnorm" and self.training:
            return {k: v[0] for k, v in self.theta_from_raw(raw).items()}
        delta = self.head(self.trunk(self.features(raw))[0])
        if self.theta0 is None:
            return delta
        return {k: t0 + delta[k] for k, t0 in self.theta0.items()}

    # -- the user-facing shell ----------------------------------------------------------
    @property
    def raw_dtype(self) -> torch.dtype:
        """Dtype of the raw ``(N, K)`` conditioning: the parameters' dtype, at least float32 with Task inputs.

        Task ids travel in the raw tensor as floating values: never in a half-precision dtype, which would
        alias ids (above 256 in bfloat16, 2048 in float16) after a ``.to(torch.bfloat16)`` / ``.half()``.
        """
        return torch.promote_types(self.dtype, torch.float32) if self._task_cols else self.dtype

    def prepare(self, conditioning: Mapping[str, Any], *, batch: int | None = None) -> tuple[torch.Tensor, bool]:
        """Validate conditioning and return ``(raw (N, K), per_sample)``; see :meth:`InputSet.prepare`.

        The value checks (finite, in range, valid task ids) read tensor values, which neither
        ``torch.compile`` nor ``torch.func.vmap`` allows: while either traces or runs (a model called
        inside a user's own ``vmap``, ``jacfwd`` or ``hessian``) they are skipped and every input is
        clamped to its declared range instead; shapes, names and dtypes are still checked.
        ``raw`` is in :attr:`raw_dtype`; values are checked against the parameters' dtype.

        Raises:
            HyperloomError: On invalid conditioning (see :meth:`InputSet.prepare`).
        """
        check = not value_checks_off()
        if self._data_cols:  # data inputs: encoded here, their codes travel with the other inputs' raw values
            conditioning = dict(conditioning)
            for name, _, _ in self._data_cols:
                if name in conditioning and not isinstance(conditioning[name], DataCode):
                    enc = self.data[name]
                    assert isinstance(enc, DataEncoder)
                    conditioning[name] = enc.encode(conditioning[name], dtype=self.dtype, device=self.device, check=check)
        return self.input_set.prepare(
            conditioning,
            batch=batch,
            dtype=self.raw_dtype,
            device=self.device,
            check=check,
            check_dtype=self.dtype,
        )

    def delta(self, conditioning: Mapping[str, Any]) -> ParamDict:
        """The hypernetwork's raw output ``Delta`` (``theta - theta0`` when additive).

        Raises:
            HyperloomError: On invalid conditioning (see :meth:`InputSet.prepare`).
        """
        raw, per_sample = self.prepare(conditioning)
        out = self.delta_from_raw(raw)
        return out if per_sample else {k: v[0] for k, v in out.items()}

    def forward(self, conditioning: Mapping[str, Any]) -> ParamDict:
        """Generate ``theta`` for the given conditioning.

        Args:
            conditioning: Mapping from input name to value.

        Returns:
            ``{name: shape}`` for shared conditioning, ``{name: (B, *shape)}``
            for per-sample conditioning.

        Raises:
            HyperloomError: On invalid conditioning (see :meth:`InputSet.prepare`).
        """
        raw, per_sample = self.prepare(conditioning)
        return self.theta_from_raw(raw) if per_sample else self.theta_shared(raw)

    def extra_repr(self) -> str:
        enc = self.encoding.name
        return f"inputs={list(self.input_set.names)}, encoding={enc}, additive={self.additive}, outputs={self.num_outputs}"


def _config_value(v: Any) -> Any:
    """``v`` as JSON for :meth:`HyperNetwork.config`."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_config_value(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _config_value(x) for k, x in v.items()}
    own = getattr(v, "config", None)
    if callable(own) and not isinstance(v, type):
        return _config_value(own())
    if isinstance(v, Encoding):
        return v.name
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"kind": type(v).__name__, **{f.name: _config_value(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, numbers.Number):
        return _config_value(v.item() if hasattr(v, "item") else float(v))  # type: ignore[arg-type]
    return type(v).__name__


def find_hypernetwork(obj: Any) -> HyperNetwork | None:
    """The :class:`HyperNetwork` inside ``obj``, or ``None``.

    ``obj`` may be a HyperNetwork, a hypernetwork model holding one as ``.hypernet`` (``HyperModel``,
    ``LoRAModel``) or a DistributedDataParallel / DataParallel wrapper of one.
    """
    for o in (obj, getattr(obj, "module", None)):
        if isinstance(o, HyperNetwork):
            return o
        hn = getattr(o, "hypernet", None)
        if isinstance(o, nn.Module) and isinstance(hn, HyperNetwork):
            return hn
    return None


def _sync_task_counts(module: nn.Module, incompatible: Any) -> None:
    """After ``load_state_dict``: make the Task declarations follow the loaded ``num_tasks`` buffers."""
    assert isinstance(module, HyperNetwork)
    for name, _ in module._task_cols:
        spec = module.input_set.specs[name]
        assert isinstance(spec, Task)
        n = int(module.task_table(name).num_tasks)
        if not 1 <= n <= spec.capacity:
            module._set_num_tasks(name, spec.num_tasks)  # keep the declaration and the buffer consistent
            raise HyperloomError(f"tasks.{name}.num_tasks: loaded {n}, expected an integer in [1, max_tasks={spec.capacity}]")
        module._set_num_tasks(name, n)


__all__ = ["FORMULATIONS", "HyperNetwork", "init_theta0"]
