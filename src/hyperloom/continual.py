"""Continual learning with a task-conditioned hypernetwork (von Oswald et al., ICLR 2020).

One hypernetwork generates the weights of every task from a learned task
embedding (a :class:`~hyperloom.Task` input). After finishing a task, the
generated weights of every task learned so far are snapshotted; while the
next task is learned, :class:`OutputRegularizer` adds

    beta * mean_k || theta(e_k) - theta*_k ||^2

over the earlier tasks ``k`` (all, or a random subset per step), so the
hypernetwork keeps producing the old tasks' weights while it learns the new
one. This is the output regulariser without von Oswald's look-ahead term.

Everything else that determines what a task's weights are is protected too:
every trainable parameter of the model outside the hypernetwork (the shared
``lora_A`` of ``LoRA(shared_A=True)``, unfrozen base weights of a
:class:`~hyperloom.LoRAModel`, trainable parameters a
:class:`~hyperloom.HyperModel` does not predict) is snapshotted with the
generated weights and penalised as ``beta * ||phi - phi*||^2``: these
parameters are shared by all tasks, so changing them changes every earlier
task's weights even when the hypernetwork's outputs stay put.

This module imports the core and is never imported by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import HyperloomError, short_repr
from .hypernetwork import HyperNetwork, find_hypernetwork
from .task import _as_int


class OutputRegularizer(nn.Module):
    """Keep the weights generated for earlier tasks where they were.

    The snapshots live in a fixed-size buffer with one row per task the
    :class:`~hyperloom.Task` input can hold (``max_tasks``), so the
    regulariser's ``state_dict`` has the same keys and shapes at every stage
    of a run and checkpoints like any module: ``targets`` (``(max_tasks, P)``,
    the flattened predicted parameters), ``num_snapshots`` and the state of
    its random generator (``_extra_state``). Pass it to
    :class:`hl.Trainer(..., extras={"reg": reg}) <hyperloom.Trainer>` to
    checkpoint it with the run.

    Args:
        model: A :class:`~hyperloom.HyperModel`, :class:`~hyperloom.LoRAModel` or :class:`~hyperloom.HyperNetwork`
            with a :class:`~hyperloom.Task` input. It is referenced, not registered:
            the regulariser's ``state_dict`` holds only its own state. Its parameters
            outside the hypernetwork that require grad now (a shared ``lora_A``,
            unfrozen base weights) are protected as well (buffer ``shared_targets``);
            freeze or unfreeze parameters before building the regulariser.
        beta: Weight of the penalty (a finite number ``>= 0``).
        num_sampled: Earlier tasks per :meth:`penalty` call: ``None`` (all) or
            an int ``>= 1`` (a random subset without replacement, drawn from the
            regulariser's own ``torch.Generator``).
        task: Name of the Task input (default: the only one).
        conditioning: Values of the other inputs at which weights are
            snapshotted and compared (required for each non-task input).
        seed: Seed of the generator that draws the subsets.

    Example:
        >>> import torch, hyperloom as hl
        >>> from torch import nn
        >>> model = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(1, max_tasks=2)}, hidden=(8,))
        >>> reg = hl.continual.OutputRegularizer(model, beta=0.01)
        >>> float(reg.penalty())  # nothing snapshotted yet
        0.0
        >>> reg.snapshot()  # task 0 is done: keep its weights
        >>> new_task = model.add_task()
        >>> float(reg.penalty().detach())  # zero right after the snapshot
        0.0

    Raises:
        HyperloomError: On a model without the Task input, a bad ``beta``,
            ``num_sampled`` or ``seed``, or missing, unknown or invalid (out of
            range, wrong type) ``conditioning``.
    """

    targets: torch.Tensor
    shared_targets: torch.Tensor
    num_snapshots: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.01,
        num_sampled: int | None = None,
        task: str | None = None,
        conditioning: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        hnet = find_hypernetwork(model)
        if hnet is None:
            raise HyperloomError(
                f"OutputRegularizer: expected a hypernetwork model (HyperModel, LoRAModel) or a HyperNetwork, got {type(model).__name__}"
            )
        self.task = hnet.task_input(task)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise HyperloomError(f"OutputRegularizer: beta must be a finite number >= 0, got {short_repr(beta)}")
        k = None if num_sampled is None else _as_int(num_sampled)
        if num_sampled is not None and (k is None or k < 1):
            raise HyperloomError(f"OutputRegularizer: num_sampled must be None or an integer >= 1, got {short_repr(num_sampled)}")
        s = _as_int(seed)
        if s is None:
            raise HyperloomError(f"OutputRegularizer: seed must be an integer, got {short_repr(seed)}")
        others = [n for n in hnet.input_set.names if n != self.task]
        given = dict(conditioning or {})
        missing = [n for n in others if n not in given]
        unknown = [n for n in given if n not in others]
        if missing or unknown:
            raise HyperloomError(
                f"OutputRegularizer: conditioning must give a value for every non-task input {others}; missing {missing}, unknown {unknown}"
            )
        try:  # invalid values are refused now, not at the first snapshot()
            _, per_sample = hnet.prepare({self.task: 0, **given})
        except HyperloomError as e:
            raise HyperloomError(f"OutputRegularizer: conditioning {short_repr(given)}: {e}") from None
        if per_sample:  # one row per task is stored: per-sample values would pair task k with the k-th value
            shapes = {k: tuple(v.shape) for k, v in given.items() if isinstance(v, torch.Tensor)}
            raise HyperloomError(
                f"OutputRegularizer: conditioning must be shared (one value per input, the same for every task), got "
                f"per-sample values: shapes {shapes}"
            )
        object.__setattr__(self, "_hnet", hnet)  # a reference, not a submodule (its state is the model's)
        object.__setattr__(self, "_model", model)
        self.beta = float(beta)
        self.num_sampled = k
        self.conditioning = given
        self.names = tuple(hnet.shapes)
        total = sum(math.prod(s) for s in hnet.shapes.values())
        capacity = hnet.input_set.specs[self.task].capacity  # type: ignore[union-attr]
        self.register_buffer("targets", torch.zeros(capacity, total, dtype=hnet.dtype, device=hnet.device))
        shared = self._shared_params()
        self.shared_names = tuple(shared)
        n_shared = sum(p.numel() for p in shared.values())
        self.register_buffer("shared_targets", torch.zeros(n_shared, dtype=self._shared_dtype(shared), device=hnet.device))
        self.register_buffer("num_snapshots", torch.zeros((), dtype=torch.int64, device=hnet.device))
        self.generator = torch.Generator().manual_seed(s)

    @property
    def hypernet(self) -> HyperNetwork:
        """The hypernetwork whose outputs are regularised."""
        hnet: HyperNetwork = self.__dict__["_hnet"]
        return hnet

    def _shared_params(self) -> dict[str, nn.Parameter]:
        """The model's parameters outside the hypernetwork that require grad: shared by every task's weights."""
        model, hnet = self.__dict__["_model"], self.hypernet
        if model is hnet:
            return {}
        own = {id(p) for p in hnet.parameters()}
        return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in own}

    def _shared_dtype(self, shared: Mapping[str, torch.Tensor]) -> torch.dtype:
        dtype = self.hypernet.dtype
        for p in shared.values():
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _check_shared(self) -> dict[str, nn.Parameter]:
        """The protected shared parameters now; refuse parameters unfrozen since construction (unprotected)."""
        params = dict(self.__dict__["_model"].named_parameters())
        new = sorted(n for n in self._shared_params() if n not in self.shared_names)
        gone = sorted(n for n in self.shared_names if n not in params)
        if new or gone:
            raise HyperloomError(
                f"OutputRegularizer: parameters {new or gone} of the model {'require grad now' if new else 'are gone'} but "
                f"{'were not' if new else 'were'} trainable when the regulariser was built: they determine every task's "
                "weights and it cannot protect them; build the regulariser again after freezing/unfreezing"
            )
        return {n: params[n] for n in self.shared_names}

    def _flat_shared(self) -> torch.Tensor:
        """The protected shared parameters, flattened: ``(S,)``."""
        shared = self._check_shared()
        if not shared:
            return self.shared_targets[:0]
        dt = self.shared_targets.dtype
        return torch.cat([p.reshape(-1).to(device=self.shared_targets.device, dtype=dt) for p in shared.values()])

    def _follow(self) -> None:
        """Move the snapshots to the hypernetwork's dtype and device (after ``model.double()`` or ``.to(device)``)."""
        hnet = self.hypernet
        if self.targets.dtype != hnet.dtype or self.targets.device != hnet.device:
            self.targets = self.targets.to(dtype=hnet.dtype, device=hnet.device)
            self.num_snapshots = self.num_snapshots.to(device=hnet.device)
        dtype = self._shared_dtype(self._check_shared())
        if self.shared_targets.dtype != dtype or self.shared_targets.device != hnet.device:
            self.shared_targets = self.shared_targets.to(dtype=dtype, device=hnet.device)

    def _flat_theta(self, ids: torch.Tensor) -> torch.Tensor:
        """Generated weights of tasks ``ids``, flattened: ``(len(ids), P)``."""
        raw, _ = self.hypernet.prepare({self.task: ids, **self.conditioning})
        theta = self.hypernet.theta_from_raw(raw)
        return torch.cat([theta[n].reshape(len(ids), -1) for n in self.names], dim=1)

    def snapshot(self, num_tasks: int | None = None) -> None:
        """Store the weights generated now for tasks ``0 .. num_tasks - 1`` (detached) as targets.

        Call it after finishing a task. The hypernetwork runs in its current
        train/eval mode, as it will in :meth:`penalty`.

        Args:
            num_tasks: The tasks learned so far (default: the Task input's
                current ``num_tasks``, right when tasks are added with
                ``add_task`` as they come; pass it when all tasks were declared
                up front).

        Raises:
            HyperloomError: If ``num_tasks`` is not an int in ``[1, num_tasks of the Task input]``.
        """
        valid = self.hypernet.input_set.specs[self.task].num_tasks  # type: ignore[union-attr]
        n = valid if num_tasks is None else _as_int(num_tasks)
        if n is None or not 1 <= n <= valid:
            raise HyperloomError(
                f"snapshot: num_tasks must be an integer in [1, {valid}] (the valid ids of {self.task!r}), got {num_tasks!r}"
            )
        self._follow()
        with torch.no_grad():
            flat = self._flat_theta(torch.arange(n, device=self.targets.device))
            self.targets[:n] = flat.to(self.targets.dtype)
            self.targets[n:] = 0
            self.shared_targets.copy_(self._flat_shared())
        self.num_snapshots = torch.tensor(n, dtype=torch.int64, device=self.num_snapshots.device)

    def sample(self) -> torch.Tensor:
        """The snapshotted task ids the next :meth:`penalty` compares (all, or a random subset, sorted)."""
        k = int(self.num_snapshots)
        if self.num_sampled is None or self.num_sampled >= k:
            return torch.arange(k, device=self.targets.device)
        ids = torch.randperm(k, generator=self.generator)[: self.num_sampled].sort().values
        return ids.to(self.targets.device)

    def penalty(self) -> torch.Tensor:
        """``beta * (mean_k ||theta(e_k) - theta*_k||^2 + ||phi - phi*||^2)`` over the sampled earlier tasks (0-d).

        ``phi`` are the protected parameters outside the hypernetwork (a shared
        ``lora_A``, unfrozen base weights; none for most models). Zero
        (exactly, with all tasks) right after :meth:`snapshot` and zero before
        any snapshot. Its gradient reaches the hypernetwork's parameters (trunk,
        head, task table, a trainable ``theta0``) and ``phi``, never the snapshots.

        Raises:
            HyperloomError: If parameters outside the hypernetwork were unfrozen after the
                regulariser was built (it cannot protect them), or more tasks were snapshotted than
                the model now has (a state loaded into a model with fewer tasks).
        """
        self._follow()
        valid = self.hypernet.input_set.specs[self.task].num_tasks  # type: ignore[union-attr]
        if int(self.num_snapshots) > valid:  # e.g. a state loaded into a model that has fewer tasks
            raise HyperloomError(
                f"OutputRegularizer.penalty: {int(self.num_snapshots)} tasks were snapshotted but the model's "
                f"{self.task!r} has {valid} valid task(s): load the model's state (or add_task) first"
            )
        ids = self.sample()
        if len(ids) == 0:
            return torch.zeros((), dtype=self.targets.dtype, device=self.targets.device)
        diff = self._flat_theta(ids) - self.targets[ids]
        out = diff.pow(2).sum(dim=1).mean()
        if self.shared_names:
            out = out + (self._flat_shared() - self.shared_targets).pow(2).sum().to(out.dtype)
        return self.beta * out

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # states saved before shared parameters were protected: none were (an empty buffer) for most models
        key = prefix + "shared_targets"
        if key not in state_dict and self.shared_targets.numel() == 0:
            state_dict[key] = self.shared_targets
        # a state of another model refused by name before torch's raw size mismatch (and before anything is loaded)
        capacity = self.targets.shape[0]
        for k, what in (("targets", "(max_tasks, generated values)"), ("shared_targets", "(protected shared values,)")):
            t, mine = state_dict.get(prefix + k), getattr(self, k)
            if isinstance(t, torch.Tensor) and t.shape != mine.shape:
                raise HyperloomError(
                    f"OutputRegularizer.load_state_dict: {prefix}{k} has shape {tuple(t.shape)}, this regulariser's is "
                    f"{tuple(mine.shape)} {what}: the state is that of a regulariser of another model (max_tasks or "
                    "generated tensors differ)"
                )
        n = state_dict.get(prefix + "num_snapshots")
        if isinstance(n, torch.Tensor) and (n.numel() != 1 or not 0 <= int(n) <= capacity):
            raise HyperloomError(
                f"OutputRegularizer.load_state_dict: {prefix}num_snapshots is {short_repr(n)}, expected an integer in "
                f"[0, {capacity}] (max_tasks)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[no-untyped-call]

    def get_extra_state(self) -> torch.Tensor:
        """The subset generator's state, saved with the ``state_dict``."""
        return self.generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        """Restore the subset generator's state.

        Raises:
            HyperloomError: If ``state`` is not a generator state.
        """
        own = self.generator.get_state()
        if not isinstance(state, torch.Tensor) or state.dtype != own.dtype or state.shape != own.shape:
            raise HyperloomError(f"OutputRegularizer: _extra_state must be a generator state {tuple(own.shape)} of {own.dtype}")
        self.generator.set_state(state.cpu())

    def extra_repr(self) -> str:
        return f"task={self.task!r}, beta={self.beta}, num_sampled={self.num_sampled}, snapshots={int(self.num_snapshots)}"


__all__ = ["OutputRegularizer"]
