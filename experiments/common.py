"""Shared experiment plumbing: formulations, seeding, training-curve statistics, result files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

#: The paper's 2x2: (encoding, additive output).
FORMULATIONS: dict[str, dict[str, Any]] = {
    "default": {"encoding": "raw", "additive": False},
    "encoding-only": {"encoding": "cossin", "additive": False},
    "additive-only": {"encoding": "raw", "additive": True},
    "mip": {"encoding": "cossin", "additive": True},
}


def formulation(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``hypernetize`` keywords of a 2x2 variant, with the config's encoding override (ablations) applied."""
    form = dict(FORMULATIONS[variant])
    if cfg.get("encoding"):
        form["encoding"] = cfg["encoding"]
    return form


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(it: Iterable[T], *, total: int | None = None, desc: str = "", leave: bool = False) -> Iterator[T]:
    """A tqdm progress bar on a terminal (or with HYPERLOOM_PROGRESS=1), plain iteration otherwise."""
    show = os.environ.get("HYPERLOOM_PROGRESS") == "1" or sys.stderr.isatty()
    if show:
        try:
            from tqdm.auto import tqdm

            yield from tqdm(it, total=total, desc=desc, leave=leave, dynamic_ncols=True)
            return
        except ImportError:
            pass
    yield from it


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam, SGD with momentum 0.9, or RMSprop; fused / foreach kernels (same maths, 3-5x faster on the
    hypernetwork's large output layer than the default per-tensor loop on CPU)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    raise ValueError(f"Unknown optimizer {name!r}; choose adam, sgd, rmsprop")


def train_loop(
    step_loss: Callable[[int], torch.Tensor],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    gen: torch.Generator,
    desc: str = "",
    checkpoint: Path | None = None,
    every: int = 50,
) -> dict[str, Any]:
    """Run ``steps`` optimiser steps of ``step_loss(step)``; stop at the first non-finite loss.

    With ``checkpoint``, the run (model, optimiser, curves so far, RNG states and the data generator
    ``gen``) is saved every ``every`` steps, and a run restarted after a crash resumes from there and
    ends exactly as an uninterrupted one. Returns the loss curve, the gradient norm per step, the step of
    divergence (or None), the wall time and the final training loss (mean of the last 10% of steps).
    """
    import hyperloom as hl

    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    gnorms: list[float] = []
    diverged_at = None
    start = 0
    if checkpoint is not None and checkpoint.exists():
        info = hl.load_training(checkpoint, model=model, optimizer=opt, generators={"data": gen})
        start, losses, gnorms = info["step"], info["config"]["curve"], info["config"]["grad_norms"]
    t0 = time.perf_counter()
    for step in progress(range(start, steps), total=steps - start, desc=desc):
        if checkpoint is not None and step > start and step % every == 0:
            try:
                hl.save_training(
                    checkpoint,
                    model=model,
                    optimizer=opt,
                    step=step,
                    generators={"data": gen},
                    config={"curve": losses, "grad_norms": gnorms},
                )
            except hl.CheckpointError:
                pass  # non-finite weights are never checkpointed; this step's loss records the divergence
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        losses.append(value)
        gnorms.append(grad_norm(params))
        if not math.isfinite(value):
            diverged_at = step
            break
        opt.step()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "curve": losses,
        "grad_norms": gnorms,
        "diverged_at": diverged_at,
        "wall_s": time.perf_counter() - t0,
        "final_train_loss": sum(tail) / len(tail),
    }


def train_and_evaluate(
    model: torch.nn.Module,
    cfg: dict[str, Any],
    seed: int,
    make_step_loss: Callable[[torch.Generator], Callable[[int], torch.Tensor]],
    evaluate: Callable[[], dict[str, Any]],
    *,
    desc: str = "",
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """The part every task shares: optimiser, seeded data generator, training loop, then evaluation.

    ``make_step_loss(gen)`` returns the task's ``step -> loss`` drawing its data from ``gen``;
    ``evaluate()`` runs only when training did not diverge. Returns one result row's payload.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg["optimizer"], params, cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    res = train_loop(
        make_step_loss(gen),
        model,
        opt,
        cfg["steps"],
        gen=gen,
        desc=desc,
        checkpoint=checkpoint,
        every=cfg.get("checkpoint_every", 50),
    )
    metrics: dict[str, Any] = {k: res[k] for k in ("diverged_at", "wall_s", "final_train_loss")}
    if res["diverged_at"] is None:
        metrics.update(evaluate())
    return {"metrics": metrics, "curve": res["curve"], "grad_norms": res["grad_norms"]}


def grad_norm_by_condition(model: torch.nn.Module, loss_at: Callable[[float], torch.Tensor], values: list[float]) -> list[float]:
    """Gradient norm of ``loss_at(value)`` w.r.t. the trainable parameters, for each conditioning value."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for v in values:
        model.zero_grad(set_to_none=True)
        loss_at(v).backward()
        out.append(grad_norm(params))
    model.zero_grad(set_to_none=True)
    return out


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().pow(2).sum())
    return math.sqrt(total)


def smooth(curve: list[float], window: int = 25) -> list[float]:
    """Trailing moving average (non-finite values propagate as inf)."""
    out, acc, buf = [], 0.0, []
    for v in curve:
        v = v if math.isfinite(v) else math.inf
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf) if math.isfinite(acc) else math.inf)
    return out


def curve_window(n: int) -> int:
    """Moving-average window for a curve of ``n`` steps: 10% of the run, at least 25 steps."""
    return max(25, n // 10)


def steps_to_reach(curve: list[float], target: float, window: int | None = None) -> int | None:
    """First step (1-based) at which the moving average of the loss is <= target; None if never.

    Only full windows count, so the noisy first steps (a single low-loss minibatch) cannot "reach" it.
    """
    window = window or curve_window(len(curve))
    for i, v in enumerate(smooth(curve, window)):
        if i + 1 >= window and v <= target:
            return i + 1
    return None


def config_key(row: dict[str, Any]) -> str:
    """A stable key of a run's identity (task, variant, seed, config) for resuming."""
    ident = {k: row[k] for k in ("task", "variant", "seed", "config")}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class ResultStore:
    """Append-only JSONL of finished runs: one row per run; rows are flushed and fsynced as written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a torn last line from a crash: that run is simply re-run
        self._done = {r["key"] for r in self.rows if "key" in r}

    def done(self, key: str) -> bool:
        return key in self._done

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self._done.add(row["key"])


def median_iqr(values: list[float]) -> tuple[float, float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    return float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75))
