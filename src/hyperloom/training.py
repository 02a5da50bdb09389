"""A small, resumable training loop with a health check on every step.

:class:`Trainer` runs ``loss_fn(model, step) -> (loss, conditioning)``,
checks the loss and the gradients are finite before the optimiser steps and
the parameters and optimiser state are finite after it (a checkpoint never
holds a NaN or an infinity), and checkpoints the whole run (model, optimiser,
scheduler, step, RNG states) every ``every`` steps with :func:`~hyperloom.checkpoint.save_training`. A run
restarted with the same arguments resumes from its last checkpoint and ends
bit-identical to an uninterrupted run, as long as ``loss_fn`` draws its
randomness from torch's, numpy's or Python's global generators (which are
checkpointed) or derives it from ``step``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._rewind import Snapshot, snapshot
from .checkpoint import _all_finite, _config_json, _non_finite_state, load_training, save_training
from .errors import HyperloomError, short_repr

LossFn = Callable[[nn.Module, int], tuple[torch.Tensor, Mapping[str, Any]]]


class NonFiniteLossError(HyperloomError):
    """Training produced a non-finite loss or gradient; the message names the step, conditioning and parameters."""

    def __init__(self, message: str, *, step: int, conditioning: Mapping[str, Any], parameters: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.conditioning = dict(conditioning)
        self.parameters = parameters

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and copy with the keyword-only fields (the default reduction passes only the message)."""
        return _rebuild_non_finite_loss_error, (type(self), str(self), self.step, self.conditioning, self.parameters), self.__dict__


def _rebuild_non_finite_loss_error(
    cls: type[NonFiniteLossError], message: str, step: int, conditioning: Mapping[str, Any], parameters: list[str]
) -> NonFiniteLossError:
    return cls(message, step=step, conditioning=conditioning, parameters=parameters)


def _is_int(x: object) -> bool:
    """Whether ``x`` is an integer (numpy's too), but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _describe(cond: Mapping[str, Any]) -> str:
    parts = []
    for k, v in cond.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            parts.append(f"{k}={v.tolist() if v.numel() <= 8 else f'tensor{tuple(v.shape)}'}")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


class _WithExtras(nn.Module):
    """The model and the ``extras`` of a :class:`Trainer`, checkpointed together."""

    def __init__(self, model: nn.Module, extras: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(dict(extras))


class Trainer:
    """Train with checkpoints every ``every`` steps and a stop on non-finite values.

    Args:
        model: The model to train (a :class:`~hyperloom.HyperModel` or any module).
        optimizer: Its optimiser.
        loss_fn: ``loss_fn(model, step) -> (loss, conditioning)``; the conditioning is only reported.
        checkpoint: Path of the run's checkpoint file (``None``: no checkpoints, no resume).
        every: Checkpoint period in steps (a positive int).
        scheduler: An optional learning-rate scheduler, stepped after each optimiser step
            (``ReduceLROnPlateau`` is given the step's loss as its metric).
        config: JSON-able configuration stored in the checkpoint.
        extras: Other modules whose ``state_dict`` is checkpointed and resumed with the run, by name
            (e.g. ``{"reg": hl.continual.OutputRegularizer(...)}``, whose ``penalty()`` ``loss_fn``
            adds to the loss). The checkpoint then holds the model under ``model.model.*`` and each
            extra under ``model.extras.<name>.*``: resume it with the same ``extras``.
        rewind: Undo a failed step (default): before every step the global random generators and every
            buffer and extra state of the model and the extras are recorded (one copy of each buffer), and
            put back when the step fails, so the state saved on a non-finite loss is the state before that
            step. ``False`` skips the per-step copy (buffers too large to copy every step); a non-finite
            loss then saves nothing (the step's forward may have written its buffers, e.g. NaN running
            statistics), and the last periodic checkpoint stays.

    Example:
        >>> import hyperloom as hl, torch
        >>> from torch import nn
        >>> model = hl.hypernetize(nn.Linear(3, 1), inputs={"lam": (0.0, 1.0)})
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> def loss_fn(model, step):
        ...     lam = torch.rand(())
        ...     return ((model(x, lam=lam) - y) ** 2).mean(), {"lam": lam}
        >>> history = Trainer(model, opt, loss_fn).fit(5)
        >>> len(history)
        5

    Raises:
        HyperloomError: If ``every`` is not a positive int or ``extras`` is not a mapping of modules; from
            :meth:`fit`, if ``loss_fn`` returns
            anything but ``(real scalar tensor loss with a gradient, mapping)``.
        CheckpointError: If ``config`` is not JSON-serialisable.
        NonFiniteLossError: From :meth:`fit`, after checkpointing the last good state.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        every: int = 100,
        scheduler: Any | None = None,
        config: Mapping[str, Any] | None = None,
        extras: Mapping[str, nn.Module] | None = None,
        rewind: bool = True,
    ) -> None:
        if not isinstance(rewind, bool):
            raise HyperloomError(f"rewind must be True or False, got {type(rewind).__name__} {short_repr(rewind)}")
        if not _is_int(every) or every < 1:
            raise HyperloomError(f"every must be a positive int, got {type(every).__name__} {short_repr(every)}")
        if extras is not None and (
            not isinstance(extras, Mapping) or not all(isinstance(k, str) and isinstance(v, nn.Module) for k, v in extras.items())
        ):
            raise HyperloomError(f"extras must be a mapping of names to nn.Module, got {short_repr(extras)}")
        #: What the checkpoint holds: the model alone, or the model and the extras.
        self._checkpointed: nn.Module = _WithExtras(model, extras) if extras else model
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.every, self.scheduler = int(every), scheduler
        self.config = _config_json(self.checkpoint if self.checkpoint is not None else "Trainer", config)
        self.step = 0
        self._saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.rewind = rewind

    def save(self) -> None:
        """Checkpoint the run now (no-op without a checkpoint path).

        Raises:
            CheckpointError: If a parameter or the optimiser state is non-finite, or the path cannot be
                written; the previous checkpoint is kept.
        """
        if self.checkpoint is not None:
            save_training(
                self.checkpoint,
                model=self._checkpointed,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self.config,
            )
            self._saved_step = self.step

    def resume(self) -> bool:
        """Restore the last checkpoint if there is one; return whether it did."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        info = load_training(self.checkpoint, model=self._checkpointed, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step = self._saved_step = info["step"]
        return True

    def _stop(self, before: Snapshot | None) -> tuple[str, BaseException | None]:
        """On a failed step: rewind it and checkpoint that last good state; the message tail and the save error."""
        if before is not None:
            before.restore(self._checkpointed)
            return self._save_last_good()
        if self.checkpoint is None:
            return "", None
        kept = f"; the last checkpoint {self.checkpoint} (step {self._saved_step}) stays" if self._saved_step is not None else ""
        return f"; nothing was saved (rewind=False: the step's buffers may hold its values){kept}", None

    def _bad_parameters(self) -> list[str]:
        params = list(self.model.named_parameters())
        if _all_finite([p for _, p in params] + [p.grad for _, p in params if p.grad is not None]):
            return []
        bad = []
        for name, p in params:
            if not bool(torch.isfinite(p).all()) or (p.grad is not None and not bool(torch.isfinite(p.grad).all())):
                bad.append(name)
        return bad

    def _loss(self) -> tuple[torch.Tensor, Mapping[str, Any]]:
        """Call ``loss_fn`` and check it returned ``(scalar tensor loss with a gradient, mapping)``."""
        out: Any = self.loss_fn(self.model, self.step)
        at = f"at step {self.step}"
        if not isinstance(out, tuple) or len(out) != 2:
            raise HyperloomError(f"loss_fn must return (loss, conditioning), got {type(out).__name__} {at}")
        loss, cond = out
        if not isinstance(loss, torch.Tensor):
            raise HyperloomError(f"loss_fn must return a scalar torch.Tensor loss, got {type(loss).__name__} {short_repr(loss)} {at}")
        if loss.is_complex():
            raise HyperloomError(f"loss_fn must return a real loss, got a tensor of {loss.dtype} {at}")
        if loss.numel() != 1:
            raise HyperloomError(
                f"loss_fn must return a scalar loss, got a tensor of shape {tuple(loss.shape)} {at} (reduce it, e.g. with .mean())"
            )
        if not loss.requires_grad:
            raise HyperloomError(f"loss_fn returned a loss that does not require grad {at} (computed under torch.no_grad() or detached?)")
        if not isinstance(cond, Mapping):
            raise HyperloomError(f"loss_fn must return a mapping as conditioning, got {type(cond).__name__} {at}")
        return loss, cond

    def _save_last_good(self) -> tuple[str, BaseException | None]:
        """Checkpoint the last good state while stopping; return the message tail and the save error, if any."""
        if self.checkpoint is None:
            return "", None
        try:
            self.save()
        except (HyperloomError, OSError) as e:
            return f"; could not save the last good state: {e}", e
        return f"; saved the last good state to {self.checkpoint}", None

    def fit(self, steps: int, *, resume: bool = True, callback: Callable[[int, float], None] | None = None) -> list[float]:
        """Train until ``steps`` steps are done in total; return the losses of the steps run now.

        ``callback(step, loss)`` is called after every step (``step`` counts finished steps). An exception
        raised before the optimiser step (by ``loss_fn``, the backward pass or an interrupt) also puts the
        buffers, extra states and random generators back (with ``rewind=True``), so the run can go on from
        where it was.

        Raises:
            NonFiniteLossError: If a loss or gradient is non-finite, or ``loss_fn`` raises one (e.g. a
                :class:`~hyperloom.SelfTuner`'s ``hyper_step``): the step leaves no trace (the parameters,
                the buffers and extra states of the model and the extras, e.g. BatchNorm's running
                statistics, and the global random generators are put back as they were before it) and that
                last good state is checkpointed (a failure to save is reported in the message and chained;
                with ``rewind=False`` nothing is rewound or saved); or if the
                optimiser step itself made a parameter or the optimiser state non-finite (the last good checkpoint is left untouched).
            HyperloomError: If ``steps`` is not a non-negative int, or ``loss_fn`` does not return
                ``(real scalar tensor loss, mapping)``.
            CheckpointError: If a periodic checkpoint cannot be written, or the checkpoint resumed from is
                bad or does not fit the run (nothing is restored then).
        """
        if not _is_int(steps) or steps < 0:
            raise HyperloomError(f"steps must be a non-negative int, got {type(steps).__name__} {short_repr(steps)}")
        if resume:
            self.resume()
        losses: list[float] = []
        while self.step < steps:
            before = snapshot(self._checkpointed) if self.rewind else None
            try:
                loss, cond = self._loss()
                self.optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                if math.isfinite(value):
                    loss.backward()  # type: ignore[no-untyped-call]
                bad = self._bad_parameters()
            except NonFiniteLossError as e:  # raised inside loss_fn (e.g. by a SelfTuner's hyper_step): stop as below
                self.optimizer.zero_grad(set_to_none=True)
                where, save_error = self._stop(before)
                raise NonFiniteLossError(
                    f"Non-finite values inside loss_fn at step {self.step}{where}: {e}",
                    step=self.step,
                    conditioning=e.conditioning,
                    parameters=e.parameters,
                ) from (save_error or e)
            except BaseException:
                self.optimizer.zero_grad(set_to_none=True)
                if before is not None:
                    before.restore(self._checkpointed)
                raise
            if not math.isfinite(value) or bad:
                self.optimizer.zero_grad(set_to_none=True)
                where, save_error = self._stop(before)
                raise NonFiniteLossError(
                    f"Non-finite {'loss ' + repr(value) if not math.isfinite(value) else 'gradient'} at step "
                    f"{self.step} with conditioning {_describe(cond)}; non-finite parameters or gradients: "
                    f"{bad or 'none (the loss itself)'}{where}",
                    step=self.step,
                    conditioning=cond,
                    parameters=bad,
                ) from save_error
            self.optimizer.step()
            bad, bad_state = _non_finite_state(self.model, self.optimizer)
            if bad or bad_state:  # an overflow in the update itself: the state before it is gone, keep the last checkpoint
                kept = ""
                if self.checkpoint is not None:
                    at = f" (step {self._saved_step})" if self._saved_step is not None else ""
                    kept = f"; the last good checkpoint {self.checkpoint}{at} was left untouched"
                raise NonFiniteLossError(
                    f"Non-finite values after the optimiser step at step {self.step} with conditioning {_describe(cond)} "
                    f"(loss {value!r}); non-finite parameters: {bad}; non-finite optimiser state {bad_state}; "
                    f"the model and optimiser now hold them{kept}",
                    step=self.step,
                    conditioning=cond,
                    parameters=list(dict.fromkeys(bad + list(bad_state))),
                )
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(value)  # it steps on a metric: the loss of this step
            elif self.scheduler is not None:
                self.scheduler.step()
            losses.append(value)
            self.step += 1
            if self.step % self.every == 0 or self.step == steps:
                self.save()
            if callback is not None:
                callback(self.step, value)
        return losses


__all__ = ["LossFn", "NonFiniteLossError", "Trainer"]
