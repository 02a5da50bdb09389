"""A small, resumable training loop with a health check on every step.

:class:`Trainer` runs ``loss_fn(model, step) -> (loss, conditioning)``,
checks the loss and the gradients are finite before the optimiser steps,
and checkpoints the whole run (model, optimiser, scheduler, step, RNG states)
every ``every`` steps with :func:`~hyperloom.checkpoint.save_training`. A run
restarted with the same arguments resumes from its last checkpoint and ends
bit-identical to an uninterrupted run, as long as ``loss_fn`` draws its
randomness from torch's, numpy's or Python's global generators (which are
checkpointed) or derives it from ``step``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_training, save_training
from .errors import HyperloomError

LossFn = Callable[[nn.Module, int], tuple[torch.Tensor, Mapping[str, Any]]]


class NonFiniteLossError(HyperloomError):
    """Training produced a non-finite loss or gradient; the message names the step, conditioning and parameters."""

    def __init__(self, message: str, *, step: int, conditioning: Mapping[str, Any], parameters: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.conditioning = dict(conditioning)
        self.parameters = parameters


def _describe(cond: Mapping[str, Any]) -> str:
    parts = []
    for k, v in cond.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            parts.append(f"{k}={v.tolist() if v.numel() <= 8 else f'tensor{tuple(v.shape)}'}")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


class Trainer:
    """Train with checkpoints every ``every`` steps and a stop on non-finite values.

    Args:
        model: The model to train (a :class:`~hyperloom.HyperModel` or any module).
        optimizer: Its optimiser.
        loss_fn: ``loss_fn(model, step) -> (loss, conditioning)``; the conditioning is only reported.
        checkpoint: Path of the run's checkpoint file (``None``: no checkpoints, no resume).
        every: Checkpoint period in steps.
        scheduler: An optional learning-rate scheduler, stepped after each optimiser step.
        config: JSON-able configuration stored in the checkpoint.

    Example:
        >>> import hyperloom as hl, torch
        >>> from torch import nn
        >>> model = hl.hypernetize(nn.Linear(3, 1), inputs={"lam": (0.0, 1.0)})
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> def loss_fn(model, step):
        ...     lam = torch.rand(())
        ...     return ((model(x, lam=lam) - y) ** 2).mean(), {"lam": lam}
        >>> history = Trainer(model, opt, loss_fn).fit(5)
        >>> len(history)
        5

    Raises:
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
    ) -> None:
        if every < 1:
            raise HyperloomError(f"every must be >= 1, got {every}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.every, self.scheduler, self.config = every, scheduler, dict(config or {})
        self.step = 0

    def save(self) -> None:
        """Checkpoint the run now (no-op without a checkpoint path)."""
        if self.checkpoint is not None:
            save_training(
                self.checkpoint,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self.config,
            )

    def resume(self) -> bool:
        """Restore the last checkpoint if there is one; return whether it did."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        info = load_training(self.checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step = info["step"]
        return True

    def _bad_parameters(self) -> list[str]:
        bad = []
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()) or (p.grad is not None and not bool(torch.isfinite(p.grad).all())):
                bad.append(name)
        return bad

    def fit(self, steps: int, *, resume: bool = True, callback: Callable[[int, float], None] | None = None) -> list[float]:
        """Train until ``steps`` steps are done in total; return the losses of the steps run now.

        ``callback(step, loss)`` is called after every step (``step`` counts finished steps).

        Raises:
            NonFiniteLossError: If a loss or gradient is non-finite; the model is not updated by that
                step and the last good state is checkpointed first.
        """
        if resume:
            self.resume()
        losses: list[float] = []
        while self.step < steps:
            loss, cond = self.loss_fn(self.model, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()  # type: ignore[no-untyped-call]
            bad = self._bad_parameters()
            if not math.isfinite(value) or bad:
                self.optimizer.zero_grad(set_to_none=True)
                self.save()
                where = f"; saved the last good state to {self.checkpoint}" if self.checkpoint else ""
                raise NonFiniteLossError(
                    f"Non-finite {'loss ' + repr(value) if not math.isfinite(value) else 'gradient'} at step "
                    f"{self.step} with conditioning {_describe(cond)}; non-finite parameters or gradients: "
                    f"{bad or 'none (the loss itself)'}{where}",
                    step=self.step,
                    conditioning=cond,
                    parameters=bad,
                )
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            losses.append(value)
            self.step += 1
            if self.step % self.every == 0 or self.step == steps:
                self.save()
            if callback is not None:
                callback(self.step, value)
        return losses


__all__ = ["LossFn", "NonFiniteLossError", "Trainer"]
