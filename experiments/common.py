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

#: Every variant a study can train: the 2x2, the plain network (no hypernetwork: the task's network
#: trained directly, with the method's init), and the baselines a reviewer asks for.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"plain": True},
    **FORMULATIONS,
    # a stronger default: head rows rescaled so the generated weights start at Kaiming fan-in scale
    "default-hyperfan": {"encoding": "raw", "additive": False, "hyperfan": True},
    # the framework's default init of the hypernetwork (PyTorch's nn.Linear init) instead of MIP's split init
    "default-torchinit": {"encoding": "raw", "additive": False, "init": "torch"},
    # segmentation only: the default fed raw phi in [0, 0.5] (the quick reproduction before the input-mapping fix)
    "default-rawphi": {"encoding": "raw", "additive": False, "raw_input": True},
    # theta0 from PyTorch's default init of the wrapped model (Kaiming-uniform a=sqrt(5), non-zero biases)
    "mip-theta0-model": {"encoding": "cossin", "additive": True, "theta0": "model"},
}

#: The main study's variants (the 2x2 and the plain network).
MAIN_VARIANTS = ("plain", *FORMULATIONS)


def formulation(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``hypernetize`` keywords of a variant, with the config's encoding override (ablations) applied.

    ``theta0`` comes from ``cfg["theta0"]`` (``"init"``: the method's Kaiming fan-in weights and zero
    biases, the reproduction's choice; ``"model"``: the wrapped model's PyTorch default init) unless the
    variant fixes it.
    """
    spec = VARIANTS[variant]
    if spec.get("plain"):
        raise ValueError("the plain variant has no hypernetwork: build it with common.plain_model")
    form = {"encoding": spec["encoding"], "additive": spec["additive"]}
    if cfg.get("encoding"):
        form["encoding"] = cfg["encoding"]
    if spec["additive"]:
        form["theta0"] = spec.get("theta0", cfg.get("theta0", "model"))
    if "init" in spec:
        form["init"] = spec["init"]
    return form


def is_plain(variant: str) -> bool:
    return bool(VARIANTS[variant].get("plain"))


class Plain(torch.nn.Module):
    """The task's network without a hypernetwork: conditioning keywords are accepted and ignored.

    Its weights (those ``predict`` selects) start from the method's init, as MIP's ``theta0`` does, so
    "plain" is exactly ``theta0`` trained on its own.
    """

    def __init__(self, primary: torch.nn.Module, conditioning: tuple[str, ...], predict: list[str] | None = None) -> None:
        import hyperloom as hl

        super().__init__()
        self.primary = primary
        self.conditioning = conditioning
        with torch.no_grad():
            for name, p in primary.named_parameters():
                if predict is None or any(name == s or name.startswith(s + ".") for s in predict):
                    p.copy_(hl.init_theta0(name, p))  # the rule of theta0="init": norm gains keep their value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.primary(*args, **{k: v for k, v in kwargs.items() if k not in self.conditioning})


def shared_head(spec: dict[str, Any]) -> Any:
    """``hl.Chunked`` / ``hl.Structured`` from a JSON-able config entry ``{"kind": "chunked", ...}``."""
    import hyperloom as hl

    opts = {k: v for k, v in spec.items() if k != "kind"}
    return {"chunked": hl.Chunked, "structured": hl.Structured}[spec["kind"]](**opts)


def build_variant(
    variant: str, cfg: dict[str, Any], primary: torch.nn.Module, inputs: dict[str, Any], *, predict: list[str] | None = None
) -> torch.nn.Module:
    """The model of one variant: ``Plain(primary)`` or ``hypernetize(primary, ...)`` with the variant's keywords."""
    import hyperloom as hl

    if is_plain(variant):
        return Plain(primary, tuple(inputs), predict)
    # "dense", "lowrank@<rank>", or a shared head's options as a dict with "kind" (hl.Chunked / hl.Structured)
    spec = cfg.get("head", "dense")
    head, _, rank = ("", "", "") if isinstance(spec, dict) else str(spec).partition("@")
    model = hl.hypernetize(
        primary,
        inputs=inputs,
        predict=predict,
        hidden=tuple(cfg["hidden"]),
        activation=cfg["activation"],
        norm=cfg.get("norm", "none"),
        zero_init=bool(cfg.get("zero_init", False)),
        head=shared_head(spec) if isinstance(spec, dict) else head,
        rank=int(rank) if rank else None,
        **formulation(variant, cfg),
    )
    if VARIANTS[variant].get("hyperfan"):
        hyperfan_in_(model)
    return model


@torch.no_grad()
def hyperfan_in_(model: Any, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Rescale the head's rows so each generated weight tensor starts at Kaiming fan-in scale.

    In the spirit of hyperfan-in (Chang et al., ICLR 2020): the output layer is scaled so that the
    generated weights' second moment, averaged over conditioning drawn from its training distribution
    (``hl.sample``), is ``2 / fan_in`` (He init) for every predicted weight; generated biases start at 0
    (their head rows are zero under MIP's head init). Chang et al. derive the scale from the variance of
    the hypernetwork's last features; here it is measured on ``n`` draws, which also covers the
    encoding and the trunk. Returns the factor applied per tensor.
    """
    import hyperloom as hl

    head = model.hypernet.head
    bias = head.linear.bias
    if type(head).__name__ != "DenseHead" or (bias is not None and bool(bias.abs().sum() > 0)):
        raise ValueError("hyperfan_in_ needs a dense head with a zero bias")
    cond = hl.sample(model, n, generator=torch.Generator().manual_seed(seed))
    delta = model.delta(**cond)
    factors: dict[str, float] = {}
    start = 0
    for name, size in zip(head._block_names, head.block_sizes):
        key = name
        t = delta[key]
        if t.dim() >= 3 and size > 0:  # a weight: (n, out, in, ...)
            fan_in = t[0, 0].numel()
            m2 = float(t.pow(2).mean())
            if m2 > 0:
                c = math.sqrt(2.0 / fan_in / m2)
                head.linear.weight[start : start + size].mul_(c)
                factors[key] = c
        start += size
    return factors


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
    """Adam, SGD with momentum 0.9 (``sgd``; ``sgd0`` / ``sgd99``: momentum 0 / 0.99), or RMSprop; fused /
    foreach kernels (same maths, 3-5x faster on the hypernetwork's large output layer than the default
    per-tensor loop on CPU)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)
    if name in ("sgd0", "sgd99"):  # momentum 0 / 0.99 (the ablation's SGD axis)
        return torch.optim.SGD(params, lr=lr, momentum=0.0 if name == "sgd0" else 0.99, fused=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    raise ValueError(f"Unknown optimizer {name!r}; choose adam, sgd, sgd0, sgd99, rmsprop")


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
    probe: Callable[[], dict[str, Any]] | None = None,
    probe_every: int = 0,
    weights: Callable[[], torch.Tensor] | None = None,
    rel_steps: int = 10,
) -> dict[str, Any]:
    """Run ``steps`` optimiser steps of ``step_loss(step)``; stop at the first non-finite loss.

    With ``weights`` (the generated weights at a fixed conditioning, flattened), the relative change
    ||w_after - w_before|| / ||w_before|| of each of the first ``rel_steps`` updates is recorded
    (``rel_step``): the effective step size, which the same learning rate does not make equal across
    formulations.

    With ``probe``, ``probe()`` is recorded (with its step) before the first update, every
    ``probe_every`` steps and after the last update: the run's trace (e.g. ||Delta||/||theta0||,
    output variation across the conditioning, gradient norms per conditioning value).

    With ``checkpoint``, the run (model, optimiser, curves so far, RNG states and the data generator
    ``gen``) is saved every ``every`` steps, and a run restarted after a crash resumes from there and
    ends exactly as an uninterrupted one. Returns the loss curve, the gradient norm per step, the step of
    divergence (or None), the wall time, the final training loss (mean of the last 10% of steps) and
    the trace.
    """
    import hyperloom as hl

    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    gnorms: list[float] = []
    trace: list[dict[str, Any]] = []
    rel: list[float] = []
    diverged_at = None
    start = 0
    if checkpoint is not None and checkpoint.exists():
        info = hl.load_training(checkpoint, model=model, optimizer=opt, generators={"data": gen})
        start, losses, gnorms = info["step"], info["config"]["curve"], info["config"]["grad_norms"]
        trace = info["config"].get("trace", [])
        rel = info["config"].get("rel_step", [])
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
                    config={"curve": losses, "grad_norms": gnorms, "trace": trace, "rel_step": rel},
                )
            except hl.CheckpointError:
                pass  # non-finite weights are never checkpointed; this step's loss records the divergence
        if probe is not None and probe_every > 0 and step % probe_every == 0 and not any(t["step"] == step for t in trace):
            trace.append({"step": step, **probe()})
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        losses.append(value)
        gnorms.append(grad_norm(params))
        if not math.isfinite(value):
            diverged_at = step
            break
        before = weights() if weights is not None and step < rel_steps else None
        opt.step()
        if before is not None and weights is not None:
            rel.append(float((weights() - before).norm() / before.norm().clamp_min(1e-30)))
    if probe is not None and probe_every > 0 and diverged_at is None and not any(t["step"] == steps for t in trace):
        trace.append({"step": steps, **probe()})
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "curve": losses,
        "grad_norms": gnorms,
        "diverged_at": diverged_at,
        "wall_s": time.perf_counter() - t0,
        "final_train_loss": sum(tail) / len(tail),
        "trace": trace,
        "rel_step": rel,
    }


@torch.no_grad()
def flat_weights(model: torch.nn.Module, cond: dict[str, Any]) -> torch.Tensor:
    """The weights a model computes with: the generated ``theta`` at ``cond`` for a hypernetwork model, the
    parameters for the plain network; flattened and detached.

    The hypernetwork runs in eval mode (its training mode restored after): a probe must neither be refused by
    nor update a normalisation layer inside it (BatchNorm needs a batch of conditioning values while training,
    and would move its running statistics).
    """
    if hasattr(model, "generate"):
        was = model.training
        model.eval()
        try:
            return torch.cat([t.detach().flatten() for t in model.generate(**cond).values()])
        finally:
            model.train(was)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_and_evaluate(
    model: torch.nn.Module,
    cfg: dict[str, Any],
    seed: int,
    make_step_loss: Callable[[torch.Generator], Callable[[int], torch.Tensor]],
    evaluate: Callable[[], dict[str, Any]],
    *,
    desc: str = "",
    checkpoint: Path | None = None,
    probe: Callable[[], dict[str, Any]] | None = None,
    weights: Callable[[], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The part every task shares: optimiser, seeded data generator, training loop, then evaluation.

    ``weights``: see :func:`train_loop`; the mean relative change of the first 10 updates is the metric
    ``rel_step_first10``.

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
        probe=probe,
        probe_every=max(1, cfg["steps"] // cfg["probes"]) if cfg.get("probes") else 0,
        weights=weights,
    )
    metrics: dict[str, Any] = {k: res[k] for k in ("diverged_at", "wall_s", "final_train_loss")}
    if res["rel_step"]:
        metrics["rel_step_first10"] = sum(res["rel_step"]) / len(res["rel_step"])
    if res["diverged_at"] is None:
        metrics.update(evaluate())
    out = {"metrics": metrics, "curve": res["curve"], "grad_norms": res["grad_norms"]}
    if res["trace"]:
        out["trace"] = res["trace"]
    return out


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


def trace_probe(
    model: torch.nn.Module,
    forward_at: Callable[[float], torch.Tensor],
    loss_at: Callable[[float], torch.Tensor],
    cond_at: Callable[[float], dict[str, Any]],
    values: list[float],
) -> dict[str, Any]:
    """One point of a training trace: does the model use its conditioning, and how do its gradients look?

    - ``delta_ratio``: mean over ``values`` of ||Delta(value)|| / ||theta0|| (all predicted tensors
      together); ``None`` without ``theta0`` (no additive output, or no hypernetwork).
    - ``output_variation``: RMS over outputs of the standard deviation across ``values`` of
      ``forward_at(value)`` (a fixed probe batch), relative to the outputs' RMS: 0 when the model ignores
      its conditioning.
    - ``grad_norm_by_gamma``: the gradient norm of ``loss_at(value)`` per value.
    """
    with torch.no_grad():
        outs = torch.stack([forward_at(v).double() for v in values])
        spread = outs.std(0) if len(values) > 1 else torch.zeros_like(outs[0])  # sample std across the values
        variation = float(spread.pow(2).mean().sqrt() / outs.pow(2).mean().sqrt().clamp_min(1e-30))
        ratio = None
        theta0 = getattr(model, "theta0", None)
        if theta0 is not None:
            t0 = math.sqrt(sum(float(t.double().pow(2).sum()) for t in theta0.values()))
            ratios = []
            for v in values:
                delta = model.delta(**cond_at(v))  # type: ignore[operator]
                ratios.append(math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values())) / max(t0, 1e-30))
            ratio = sum(ratios) / len(ratios)
    grads = grad_norm_by_condition(model, loss_at, values)
    return {"delta_ratio": ratio, "output_variation": variation, "grad_norm_by_gamma": grads, "grad_norm_by_gamma_x": list(values)}


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
