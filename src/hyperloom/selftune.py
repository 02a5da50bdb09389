"""Tune while training: self-tuning hypernetworks (STN) on unmodified models.

A hypernetwork model conditioned on hyperparameters (a weight-decay
coefficient ``wd``, dropout rates, an augmentation strength) is trained only
*locally* around the current hyperparameter values, and the values follow the
gradient of the validation loss through the hypernetwork's approximation of
the best response ``w*(lambda)`` (Lorraine & Duvenaud 2018; MacKay et al.,
"Self-Tuning Networks", ICLR 2019). One training run; the hyperparameters find
their values (and schedules) on the way.

:class:`SelfTuner` alternates two steps:

* :meth:`SelfTuner.train_step` draws conditioning around the current values
  (``u + sigma * eps`` in each input's normalised ``[0, 1]`` space, per sample
  when ``n`` is given) and steps the model's optimiser on the training loss;
* :meth:`SelfTuner.hyper_step` evaluates the validation loss at the current
  values perturbed by the current scale (reparametrised, STN's Algorithm 1),
  and steps the values and the perturbation scales with Adam on
  ``val_loss - entropy * H[p(eps | sigma)]`` (STN's entropy bonus keeps the
  scale from collapsing); the model's parameters are not touched.

Values live in each input's normalised space (linear, or ``log`` for log
inputs, the space MIP encodes) and are projected back onto ``[0, 1]`` after
every step, so every value the model sees lies inside the declared range.

This module sits above the core (like :mod:`hyperloom.tune`, whose range maps
it shares); the core never imports it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._rewind import eval_mode, snapshot
from .errors import HyperloomError, short_repr
from .hypernetwork import find_hypernetwork
from .inputs import Input, InputSet, _as_dim, _is_bool
from .training import NonFiniteLossError
from .tune import _checked, _exact_ends, _inside

__all__ = ["SelfTuner"]

OnNonFinite = Literal["raise", "skip"]
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: Bounds of the perturbation scale in the normalised space (the range is 1 wide).
SCALE_MIN, SCALE_MAX = 1e-4, 1.0


def _positive(name: str, v: Any, *, zero: bool = False) -> float:
    ok = not _is_bool(v) and isinstance(v, numbers.Real) and math.isfinite(float(v)) and (float(v) >= 0 if zero else float(v) > 0)
    if not ok:
        raise HyperloomError(f"SelfTuner: {name} must be a finite number {'>= 0' if zero else '> 0'}, got {short_repr(v)}")
    return float(v)


class SelfTuner(nn.Module):
    """Tune a hypernetwork model's continuous inputs online, by the validation gradient through its best response.

    Args:
        model: A hypernetwork model (from :func:`~hyperloom.hypernetize`) whose
            inputs are the hyperparameters to tune.
        optimizer: The optimiser of the model's parameters; :meth:`train_step` steps it.
        inputs: Name(s) of the continuous inputs to tune (``None``: every
            :class:`~hyperloom.Input`). Inputs not tuned (a task id, say) are
            not in the conditioning the losses receive: pass them yourself.
        init: Starting values by name (default: each input's midpoint on its
            own scale, the geometric mean for log inputs).
        hyper_lr: Adam's step size for the values and the log perturbation
            scales, in the normalised space (the range is 1 wide).
        perturb: Initial standard deviation of the Gaussian perturbation in the
            normalised space, in ``[1e-4, 1]``; learned per coordinate and kept
            in that interval.
        entropy: Weight ``tau`` of the entropy bonus ``H = sum(log sigma)``.
        on_nonfinite: What a non-finite loss (or gradient) does: ``"raise"``
            (default) raises :class:`~hyperloom.NonFiniteLossError` and leaves
            everything as before the call: the model's parameters and
            optimiser, the tuner's whole state (values, scales, Adam moments,
            counters, history) and torch's random generators (CPU, which the
            draws use, and CUDA), so a run that catches the error and goes on
            draws what a run without the bad step draws (and a retry with the
            same loss replays the same draw). The buffers and extra states the
            loss's forward updated (BatchNorm running statistics in training
            mode, which a NaN input makes NaN) and Python's and numpy's
            generators are put back too. ``"skip"`` skips the step (no
            update of the model, its buffers, the values or the scales) and
            counts it in :attr:`skipped`; its draw counts in :attr:`steps` and
            the generators move on. The values never hold a NaN either way.
        history_size: Rows of :attr:`history` kept in the state. When full,
            every second row is dropped and from then on every second hyper
            step is recorded (the whole trajectory stays, at half resolution).

    Attributes:
        model, optimizer: As given.
        names: The tuned inputs, in declaration order.

    The tuner's state (values, scales, Adam moments, counters, history) is
    all in tensors: ``hl.Trainer(..., extras={"tuner": tuner})`` checkpoints
    and resumes it exactly; the state records the tuned inputs and their ranges, and a state of a
    tuner of other inputs (or ranges, or ``history_size``) is refused with a ``HyperloomError`` naming
    both. Inside a Trainer, the loss function draws the
    training conditioning with :meth:`sample` (the Trainer steps the
    optimiser) and calls :meth:`hyper_step` every few steps.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hyperloom as hl
        >>> _ = torch.manual_seed(0)
        >>> model = hl.hypernetize(nn.Linear(3, 1), inputs={"wd": (1e-4, 1.0, "log")})
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> tuner = hl.SelfTuner(model, opt, init={"wd": 1e-2}, hyper_lr=1e-2)
        >>> x, y, xv, yv = torch.randn(32, 3), torch.randn(32, 1), torch.randn(16, 3), torch.randn(16, 1)
        >>> def train_loss(m, wd):
        ...     return ((m(x, wd=wd) - y) ** 2).mean() + wd * m.generate(wd=wd)["weight"].pow(2).sum()
        >>> for step in range(20):
        ...     _ = tuner.train_step(train_loss)
        ...     if step % 5 == 4:
        ...         _ = tuner.hyper_step(lambda m, wd: ((m(xv, wd=wd) - yv) ** 2).mean())
        >>> len(tuner.history), 1e-4 <= tuner.values["wd"] <= 1.0
        (4, True)

    Raises:
        HyperloomError: On a model that is not a hypernetwork model, an unknown
            input name, a :class:`~hyperloom.Task` (or other non-continuous)
            input named for tuning, invalid ``init`` values, or a
            ``hyper_lr`` / ``perturb`` / ``entropy`` / ``history_size`` out of bounds.
    """

    u: torch.Tensor
    log_scale: torch.Tensor
    adam_m: torch.Tensor
    adam_v: torch.Tensor
    adam_t: torch.Tensor
    counters: torch.Tensor
    history_rows: torch.Tensor
    layout: torch.Tensor
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        inputs: str | Sequence[str] | None = None,
        init: Mapping[str, Any] | None = None,
        hyper_lr: float = 3e-3,
        perturb: float = 0.5,
        entropy: float = 1e-3,
        on_nonfinite: OnNonFinite = "raise",
        history_size: int = 10_000,
    ) -> None:
        super().__init__()
        net = find_hypernetwork(model)
        if net is None or not isinstance(model, nn.Module):
            raise HyperloomError(f"SelfTuner: model must be a hypernetwork model (from hl.hypernetize), got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise HyperloomError(f"SelfTuner: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        specs = net.input_set.specs
        if inputs is None:
            names = [k for k, s in specs.items() if isinstance(s, Input)]
            if not names:
                raise HyperloomError(f"SelfTuner: the model has no continuous input to tune; its inputs are {dict(specs)}")
        else:
            names = [inputs] if isinstance(inputs, str) else list(inputs)
            if not names:
                raise HyperloomError(f"SelfTuner: inputs is empty; name at least one of the declared inputs {list(specs)}")
            unknown = [k for k in names if k not in specs]
            if unknown:
                raise HyperloomError(f"SelfTuner: inputs {unknown} are not declared inputs; declared inputs are {list(specs)}")
            if len(set(names)) != len(names):
                raise HyperloomError(f"SelfTuner: inputs {names} name an input more than once")
        bad = {k: type(specs[k]).__name__ for k in names if not isinstance(specs[k], Input)}
        if bad:
            raise HyperloomError(
                f"SelfTuner: {sorted(bad)} are not continuous inputs ({bad}): only hl.Input ranges have a gradient to follow; "
                "pass a task id or data input yourself in the losses and tune the continuous ones (inputs=[...])"
            )
        names = [k for k in specs if k in names]  # declaration order
        self.specs: dict[str, Input] = {k: specs[k] for k in names}  # type: ignore[misc]
        self.names: tuple[str, ...] = tuple(names)
        if init is not None and not isinstance(init, Mapping):
            raise HyperloomError(f"SelfTuner: init must be a mapping of input name -> starting value, got {short_repr(init)}")
        unknown = [k for k in (init or {}) if k not in self.specs]
        if unknown:
            raise HyperloomError(f"SelfTuner: init names {unknown} are not tuned inputs; the tuned inputs are {list(self.names)}")
        self.hyper_lr = _positive("hyper_lr", hyper_lr)
        p = _positive("perturb", perturb)
        if not SCALE_MIN <= p <= SCALE_MAX:
            raise HyperloomError(f"SelfTuner: perturb must lie in [{SCALE_MIN}, {SCALE_MAX}] (the normalised range is 1 wide), got {p}")
        self.entropy = _positive("entropy", entropy, zero=True)
        if on_nonfinite not in ("raise", "skip"):
            raise HyperloomError(f"SelfTuner: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite: OnNonFinite = on_nonfinite
        size = _as_dim(history_size)
        if size is None or size < 2:
            raise HyperloomError(f"SelfTuner: history_size must be an integer >= 2, got {short_repr(history_size)}")
        # plain attributes, not submodules: the tuner's state_dict holds the tuner's state only
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "optimizer", optimizer)
        self._dtype = net.dtype if net.dtype.is_floating_point else torch.get_default_dtype()
        self._device = net.device
        starts: list[torch.Tensor] = []
        self._slices: dict[str, slice] = {}
        at = 0
        for k, spec in self.specs.items():
            if init is not None and k in init:
                v = _checked(InputSet({k: spec}), k, init[k], what=f"SelfTuner: init[{k!r}]")
            else:
                v = torch.full(() if spec.dim == 1 else (spec.dim,), spec.midpoint(), dtype=torch.float64)
            starts.append(spec.normalize(v).reshape(-1))
            self._slices[k] = slice(at, at + spec.dim)
            at += spec.dim
        u = torch.cat(starts)
        k_ = u.numel()
        self.register_buffer("u", u)
        self.register_buffer("log_scale", torch.full((k_,), math.log(p), dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(2 * k_, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(2 * k_, dtype=torch.float64))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.int64))
        #: train draws, hyper steps, skipped train steps, skipped hyper steps, history rows, history stride
        self.register_buffer("counters", torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.int64))
        self.register_buffer("history_rows", torch.full((int(size), 3 + 2 * k_), math.nan, dtype=torch.float64))
        #: what the state is about (names, sizes, ranges, scales: the normalised values mean nothing without them)
        self.register_buffer("layout", torch.tensor(list(self._layout().encode()), dtype=torch.uint8))
        self._train_checked = False

    def _layout(self) -> str:
        return "; ".join(f"{k}: dim={s.dim}, [{s.low!r}, {s.high!r}], {s.scale}" for k, s in self.specs.items())

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Refuse a state of a tuner of other inputs (or ranges, or history size), naming both, before loading it."""
        where = f" ({prefix.rstrip('.')})" if prefix else ""
        theirs = state_dict.get(prefix + "layout")
        if isinstance(theirs, torch.Tensor) and theirs.dtype == torch.uint8 and theirs.dim() == 1:
            other = bytes(theirs.tolist()).decode(errors="replace")
            if other != self._layout():
                raise HyperloomError(
                    f"SelfTuner.load_state_dict: the state{where} is that of a tuner of other inputs: it tunes {{{other}}}, "
                    f"this tuner tunes {{{self._layout()}}}"
                )
        for k, mine in self._buffers.items():
            t = state_dict.get(prefix + k)
            if mine is not None and k != "layout" and isinstance(t, torch.Tensor) and t.shape != mine.shape:
                hint = " (history_size differs)" if k == "history_rows" else ""
                raise HyperloomError(
                    f"SelfTuner.load_state_dict: {prefix}{k} has shape {tuple(t.shape)}, this tuner's has "
                    f"{tuple(mine.shape)}{hint}; this tuner tunes {{{self._layout()}}}"
                )
        u, ls = state_dict.get(prefix + "u"), state_dict.get(prefix + "log_scale")
        if isinstance(u, torch.Tensor) and u.numel() and not bool(((u >= 0) & (u <= 1)).all()):  # NaN fails too
            raise HyperloomError(
                f"SelfTuner.load_state_dict: {prefix}u holds {short_repr(u)}: the normalised values must lie in [0, 1] "
                "(a corrupted state: the values would hold a NaN or leave their ranges)"
            )
        lo, hi = math.log(SCALE_MIN), math.log(SCALE_MAX)
        if isinstance(ls, torch.Tensor) and ls.numel() and not bool(((ls >= lo - 1e-9) & (ls <= hi + 1e-9)).all()):
            raise HyperloomError(
                f"SelfTuner.load_state_dict: {prefix}log_scale holds {short_repr(ls)}: the log perturbation scales must "
                f"lie in [log {SCALE_MIN}, log {SCALE_MAX}] (a corrupted state)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    # -- views -----------------------------------------------------------------------------------
    def _values_of(self, u: torch.Tensor) -> dict[str, float | list[float]]:
        out: dict[str, float | list[float]] = {}
        for k, spec in self.specs.items():
            uk = u[self._slices[k]].detach().double().cpu()
            v = _exact_ends(spec, spec.denormalize(uk), uk)
            out[k] = float(v[0]) if spec.dim == 1 else [float(x) for x in v]
        return out

    @property
    def values(self) -> dict[str, float | list[float]]:
        """The current values by input name (a float, or a list for a ``dim=k`` input), inside the declared ranges."""
        return self._values_of(self.u)

    @property
    def scales(self) -> dict[str, float | list[float]]:
        """The current perturbation standard deviations in the normalised space, by input name."""
        return self._scales_of(self.log_scale)

    def _scales_of(self, log_scale: torch.Tensor) -> dict[str, float | list[float]]:
        s = log_scale.detach().double().cpu().exp()
        return {k: float(s[sl][0]) if self.specs[k].dim == 1 else [float(x) for x in s[sl]] for k, sl in self._slices.items()}

    @property
    def steps(self) -> int:
        """Training conditionings drawn so far (one per :meth:`train_step`, or per :meth:`sample`)."""
        return int(self.counters[0])

    @property
    def hyper_steps(self) -> int:
        """Hyper steps taken so far (skipped ones not included)."""
        return int(self.counters[1])

    @property
    def skipped(self) -> dict[str, int]:
        """Steps skipped for a non-finite loss or gradient (``on_nonfinite="skip"``): ``{"train": i, "hyper": j}``."""
        return {"train": int(self.counters[2]), "hyper": int(self.counters[3])}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per hyper step: ``step`` (hyper step), ``train_steps``, ``val_loss``, ``values``, ``scales``.

        ``val_loss`` is the validation loss the step was taken on (at the
        perturbed values), ``values`` and ``scales`` those after the step.
        """
        rows = []
        k_ = self.u.numel()
        for r in self.history_rows[: int(self.counters[4])]:
            u, ls = r[3 : 3 + k_], r[3 + k_ :]
            rows.append(
                {
                    "step": int(r[0]),
                    "train_steps": int(r[1]),
                    "val_loss": float(r[2]),
                    "values": self._values_of(u),
                    "scales": self._scales_of(ls),
                }
            )
        return rows

    def extra_repr(self) -> str:
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.values.items())
        return f"{vals}; {self.hyper_steps} hyper steps"

    # -- conditioning ------------------------------------------------------------------------------
    def _check_n(self, n: Any) -> int | None:
        if n is None:
            return None
        nn_ = _as_dim(n)
        if nn_ is None or nn_ < 1:
            raise HyperloomError(f"SelfTuner: n must be None (one shared value) or an integer >= 1 (one value per sample), got {n!r}")
        return nn_

    def _conditioning(self, u: torch.Tensor, n: int | None) -> dict[str, torch.Tensor]:
        """The conditioning at normalised values ``u`` (``(K,)`` or ``(n, K)``): in range, in the model's dtype.

        The value is the clamped one; the gradient is that of the unclamped map (as :func:`hyperloom.tune`
        does: a clamp would pin the search at an end).
        """
        cond: dict[str, torch.Tensor] = {}
        for k, spec in self.specs.items():
            uk = u[..., self._slices[k]]
            ud = uk.detach()
            exact = _exact_ends(spec, spec.denormalize(ud), ud)
            v = _inside(spec, exact, self._dtype)
            if uk.requires_grad:
                free = spec.from_unit(uk).to(self._dtype)
                v = v + (free - free.detach())
            if spec.dim == 1:
                v = v.reshape(()) if n is None else v.reshape(n)
            cond[k] = v.to(self._device)
        return cond

    def sample(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """Draw training conditioning around the current values: ``u + sigma * eps`` projected onto ``[0, 1]``.

        Counts as one training draw (:attr:`steps`). Uses torch's global generator (checkpointed by
        :class:`~hyperloom.Trainer`).

        Args:
            n: ``None`` for one value per input (one weight set for the batch), or ``B`` for one value
                per sample (STN's per-example perturbation).

        Returns:
            ``{name: tensor}`` of shape ``()`` / ``(k,)`` or ``(n,)`` / ``(n, k)``, detached, in the
            model's dtype and on its device, every value inside its declared range.

        Raises:
            HyperloomError: On an ``n`` that is not ``None`` or a positive integer.
        """
        n = self._check_n(n)
        eps = torch.randn((self.u.numel(),) if n is None else (n, self.u.numel()), dtype=torch.float64).to(self.u.device)  # CPU stream
        up = (self.u + self.log_scale.exp() * eps).clamp(0.0, 1.0)
        self.counters[0] += 1
        return self._conditioning(up, n)

    # -- steps -------------------------------------------------------------------------------------
    def _scalar_loss(self, out: Any, what: str, cond: Mapping[str, Any]) -> torch.Tensor:
        at = f"at {'hyper step' if what == 'val_loss' else 'training draw'} {self.hyper_steps if what == 'val_loss' else self.steps}"
        if not isinstance(out, torch.Tensor) or out.numel() != 1 or out.is_complex():
            raise HyperloomError(
                f"SelfTuner: {what} must return a real one-element tensor, got {short_repr(out)} {at} "
                "(a Python float has no gradient: return the tensor)"
            )
        return out.reshape(())

    def _non_finite(self, what: str, value: float, cond: Mapping[str, Any], params: list[str]) -> None:
        kind = "train" if what == "train_loss" else "hyper"
        if self.on_nonfinite == "skip":
            self.counters[2 if kind == "train" else 3] += 1
            return
        step = self.steps if kind == "train" else self.hyper_steps
        desc = ", ".join(f"{k}={v.detach().cpu().tolist() if v.numel() <= 8 else tuple(v.shape)}" for k, v in cond.items())
        raise NonFiniteLossError(
            f"SelfTuner: non-finite {what} ({value!r}) or gradient at {kind} step {step} with conditioning {desc}; "
            f"non-finite gradients: {params or 'none (the loss itself)'}; nothing was updated: the model's parameters, "
            "the optimiser, the model's buffers (e.g. BatchNorm running statistics), the tuner's state and the random "
            "generators are as before the call; on_nonfinite='skip' skips such steps and draws anew instead",
            step=step,
            conditioning=cond,
            parameters=params,
        )

    def train_step(self, train_loss: Callable[..., torch.Tensor], *, n: int | None = None) -> float:
        """One training step of the model at conditioning drawn around the current values.

        Calls ``train_loss(model, **conditioning) -> scalar tensor`` (conditioning from :meth:`sample`),
        back-propagates it and steps the optimiser. The values and scales are not changed.

        Args:
            train_loss: The training loss (regularisers weighted by the conditioning included).
            n: ``None`` for one draw for the batch, ``B`` for one draw per sample.

        Returns:
            The loss value (NaN or an infinity for a skipped step).

        Raises:
            HyperloomError: If ``train_loss`` does not return a one-element tensor with a gradient, or
                (checked on the first step) its value does not depend on the conditioning.
            NonFiniteLossError: On a non-finite loss or gradient with ``on_nonfinite="raise"``.

        A call that raises (before the optimiser step) leaves the tuner's state, the model's buffers and
        the random generators as they were before it (see ``on_nonfinite``).
        """
        saved, before = self._saved(), snapshot(self.model)
        try:
            value, step = self._train_step(train_loss, n)
        except BaseException:
            self._rewind(saved)
            before.restore(self.model)  # the forward's buffer updates (BatchNorm's running statistics) too
            raise
        if step:
            self.optimizer.step()
        else:  # skipped: a NaN input's running statistics must not stay; the generators move on
            before.restore(self.model, rng=False)
        return value

    def _saved(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The counters and torch's generators (CPU, CUDA once initialised) before a step (about 1 us on CPU)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []  # type: ignore[no-untyped-call]
        return self.counters.clone(), torch.get_rng_state(), cuda

    def _rewind(self, saved: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]) -> None:
        """Put the counters and torch's generators back (a raising step: as if it had not been called)."""
        counters, cpu, cuda = saved
        with torch.no_grad():
            self.counters.copy_(counters)
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)

    def _train_step(self, train_loss: Callable[..., torch.Tensor], n: int | None) -> tuple[float, bool]:
        """Everything of :meth:`train_step` before the optimiser step: the loss value, and whether to step."""
        cond = self.sample(n)
        check = not self._train_checked
        if check:  # once: make the conditioning a leaf to see that the loss depends on it
            cond = {k: v.detach().requires_grad_(True) for k, v in cond.items()}
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._scalar_loss(train_loss(self.model, **cond), "train_loss", cond)
        if not loss.requires_grad:
            raise HyperloomError(
                "SelfTuner: train_loss returned a loss without a gradient (computed under torch.no_grad(), detached, "
                "or not from the model's output?)"
            )
        value = float(loss.detach())
        if not math.isfinite(value):
            self._non_finite("train_loss", value, cond, [])
            return value, False
        loss.backward()  # type: ignore[no-untyped-call]
        if check:
            if all(v.grad is None for v in cond.values()):
                raise HyperloomError(
                    f"SelfTuner: train_loss does not depend on the conditioning {list(self.names)} (no gradient path): "
                    "compute it from the model's output at the given values, e.g. model(x, **conditioning)"
                )
            self._train_checked = True
        bad = self._bad_grads()
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._non_finite("train_loss", value, cond, bad)
            return value, False
        return value, True

    def _bad_grads(self) -> list[str]:
        """Names of parameters whose gradient holds a NaN or an infinity.

        Fast path: a sum holding a NaN or an infinity is itself non-finite, so one sum per gradient settles the
        usual case (a plain element-wise check cost ~30% of a small model's step); only a non-finite sum (a NaN,
        an infinity, or an overflow of finite values) is checked element-wise.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params or math.isfinite(float(torch.stack([p.grad.sum() for p in params]).sum())):  # type: ignore[union-attr]
            return []
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names.get(id(p), f"parameter {i}") for i, p in enumerate(params) if not bool(torch.isfinite(p.grad).all())]  # type: ignore[arg-type]

    def hyper_step(self, val_loss: Callable[..., torch.Tensor], *, n: int | None = None) -> float:
        """One step of the values and the perturbation scales on the validation loss.

        Calls ``val_loss(model, **conditioning) -> scalar tensor`` with the model in eval mode (dropout
        off; modes restored after) at the current values perturbed by the current scale
        (``u + sigma * eps``, reparametrised: STN's Algorithm 1), and steps the values and ``log sigma``
        with Adam on ``val_loss - entropy * sum(log sigma)``, through the hypernetwork. The model's
        parameters, their gradients and its buffers are untouched.

        Args:
            val_loss: The validation loss (no regulariser: the hyperparameters act through the weights).
            n: ``None`` for one draw, ``B`` for one per sample.

        Returns:
            The validation loss value.

        Raises:
            HyperloomError: If ``val_loss`` does not return a one-element tensor, or it has no gradient
                path to the tuned inputs.
            NonFiniteLossError: On a non-finite loss or hyper-gradient with ``on_nonfinite="raise"``.

        A call that raises leaves the tuner's state and torch's random generators as they were before it
        (see ``on_nonfinite``).
        """
        n = self._check_n(n)
        if torch.is_inference_mode_enabled():
            raise HyperloomError("SelfTuner.hyper_step needs autograd: call it outside torch.inference_mode()")
        saved = self._saved()
        try:
            value, grad = self._hyper_grad(val_loss, n)
        except BaseException:
            self._rewind(saved)
            raise
        if grad is None:  # skipped
            return value
        with torch.no_grad():
            b1, b2 = _ADAM_BETAS
            self.adam_t += 1
            t = int(self.adam_t)
            self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
            self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step = self.hyper_lr * (self.adam_m / (1 - b1**t)) / ((self.adam_v / (1 - b2**t)).sqrt() + _ADAM_EPS)
            k_ = self.u.numel()
            self.u.sub_(step[:k_]).clamp_(0.0, 1.0)
            self.log_scale.sub_(step[k_:]).clamp_(math.log(SCALE_MIN), math.log(SCALE_MAX))
            self.counters[1] += 1
            self._record(value)
        return value

    def _hyper_grad(self, val_loss: Callable[..., torch.Tensor], n: int | None) -> tuple[float, torch.Tensor | None]:
        """The validation loss and the hyper-gradient of :meth:`hyper_step` (``None`` for a skipped step)."""
        u = self.u.detach().clone().requires_grad_(True)
        ls = self.log_scale.detach().clone().requires_grad_(True)
        eps = torch.randn((u.numel(),) if n is None else (n, u.numel()), dtype=torch.float64).to(u.device)  # CPU stream
        gu = gls = None
        with eval_mode(self.model), torch.enable_grad():
            cond = self._conditioning(u + ls.exp() * eps, n)
            loss = self._scalar_loss(val_loss(self.model, **cond), "val_loss", cond)
            value = float(loss.detach())
            if not math.isfinite(value):
                self._non_finite("val_loss", value, cond, [])
                return value, None
            if loss.requires_grad:
                gu, gls = torch.autograd.grad(loss, [u, ls], allow_unused=True)
        if gu is None:
            raise HyperloomError(
                f"SelfTuner: val_loss does not depend on the conditioning {list(self.names)} (no gradient path): compute it "
                "from the model's output at the given values, e.g. model(x_val, **conditioning), without .item() or .detach()"
            )
        gls = torch.zeros_like(ls) if gls is None else gls
        grad = torch.cat([gu, gls - self.entropy]).detach()  # d/dlog(sigma) of -tau * sum(log sigma) is -tau
        if not bool(torch.isfinite(grad).all()):
            self._non_finite("val_loss", value, cond, [f"d{what}/d{k}" for what in ("value", "scale") for k in self.names])
            return value, None
        return value, grad

    def _record(self, value: float) -> None:
        rows, stride = int(self.counters[4]), int(self.counters[5])
        step = int(self.counters[1])
        if (step - 1) % stride:
            return
        cap = self.history_rows.shape[0]
        if rows == cap:  # full: keep every second row, record every second step from now on
            kept = self.history_rows[0:cap:2].clone()
            self.history_rows.fill_(math.nan)
            self.history_rows[: kept.shape[0]] = kept
            rows, stride = kept.shape[0], stride * 2
            self.counters[5] = stride
            if (step - 1) % stride:
                self.counters[4] = rows
                return
        row = torch.cat([torch.tensor([step, self.steps, value], dtype=torch.float64, device=self.u.device), self.u, self.log_scale])
        self.history_rows[rows] = row
        self.counters[4] = rows + 1

    # -- plot --------------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Plot the trajectories against training steps and save the figure to ``path``.

        One panel per tuned coordinate (the value, with a band of one perturbation scale on each side)
        and one of the validation loss.

        Returns:
            The path written.

        Raises:
            HyperloomError: Without matplotlib (``pip install matplotlib``), or with no hyper step recorded yet.
            CheckpointError: Naming the path, if it cannot be written (written atomically: a file already
                there is kept on failure).
        """
        try:  # a Figure of its own: no pyplot, so the caller's backend and open figures stay as they are
            from matplotlib.figure import Figure
        except ImportError:
            raise HyperloomError("SelfTuner.plot needs matplotlib: pip install matplotlib") from None
        n_rows = int(self.counters[4])
        if n_rows == 0:
            raise HyperloomError("SelfTuner.plot: no hyper step recorded yet (call hyper_step first)")
        h = self.history_rows[:n_rows].cpu()
        k_ = self.u.numel()
        x = h[:, 1].numpy() if bool((h[:, 1] > 0).any()) else h[:, 0].numpy()
        panels = [(k, j) for k in self.names for j in range(self._slices[k].stop - self._slices[k].start)]
        fig = Figure(figsize=(6, 2.2 * (len(panels) + 1)))
        axes = fig.subplots(len(panels) + 1, 1, sharex=True, squeeze=False)
        for ax, (k, j) in zip(axes[:, 0], panels):
            spec, c = self.specs[k], self._slices[k].start + j
            u, s = h[:, 3 + c], h[:, 3 + k_ + c].exp()
            ax.plot(x, spec.denormalize(u).numpy(), color="C0")
            ax.fill_between(x, spec.denormalize(u - s).numpy(), spec.denormalize(u + s).numpy(), color="C0", alpha=0.2, lw=0)
            if spec.scale == "log":
                ax.set_yscale("log")
            ax.set_ylabel(k if spec.dim == 1 else f"{k}[{j}]")
            ax.set_ylim(spec.low, spec.high) if spec.scale == "linear" else None
        axes[-1, 0].plot(x, h[:, 2].numpy(), color="C3")
        axes[-1, 0].set_ylabel("val loss")
        axes[-1, 0].set_xlabel("training step" if bool((h[:, 1] > 0).any()) else "hyper step")
        fig.tight_layout()
        from .fileio import write_figure

        return write_figure(fig, path, where="SelfTuner.plot")
