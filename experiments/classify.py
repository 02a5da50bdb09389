"""Task 1: Bayesian-style hypernetwork classifier (the paper's first task), on real images.

The hypernetwork predicts every weight of HyperLight's README ConvNet from a
noise vector gamma ~ U(0, 1)^k, sampled once per minibatch. Metrics: training
loss, test accuracy and its spread across gamma, gradient norms over training
and across gamma bins.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hyperloom as hl

from .common import build_variant, flat_weights, grad_norm, set_seed, trace_probe, train_and_evaluate
from .data import ImageData, load_classification


class ConvNet(nn.Module):
    """HyperLight's README ConvNet (docs/method.md): 1->16 k5, 16->32 k3, pool, 32->64 k3, pool, 64->64 k3, GAP, 64->10."""

    def __init__(self, num_classes: int = 10, width: int = 1, depth: int = 0) -> None:
        super().__init__()
        c1, c2, c3 = 16 * width, 32 * width, 64 * width
        layers: list[nn.Module] = [
            nn.Conv2d(1, c1, 5),
            nn.LeakyReLU(),
            nn.Conv2d(c1, c2, 3),
            nn.LeakyReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3),
            nn.LeakyReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c3, c3, 3),
            nn.LeakyReLU(),
        ]
        for _ in range(depth):  # extra 3x3 layers (padding keeps the size) for the depth ablation
            layers += [nn.Conv2d(c3, c3, 3, padding=1), nn.LeakyReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


DEFAULTS: dict[str, Any] = {
    "k": 2,
    "steps": 300,
    "batch": 64,
    "optimizer": "adam",
    "lr": 1e-3,
    "hidden": [16, 64, 128],
    "activation": "leaky_relu",
    "norm": "none",
    "encoding": None,  # None: the variant's
    "depth": 0,
    "n_eval_gamma": 8,
    "n_test": 2000,
    "per_sample_gamma": False,  # one gamma per minibatch (the paper) or one per sample
    "zero_init": False,
    "head": "dense",  # or "lowrank@<rank>"
    "theta0": "init",  # the method's theta0 init (Kaiming fan-in weights, zero biases); "model": PyTorch's
    "probes": 10,  # trace points over training (||Delta||/||theta0||, output variation, grad norms per gamma)
    # validation images held out of training (the last of the training set, at most a tenth of it): a learning
    # rate is chosen on their accuracy, never on the test set's
    "n_val": 2000,
}
# cfg["gamma_range"] = [lo, hi] (the gamma-range stress test): gamma ~ U(lo, hi)^k, declared as the input's range;
# absent: [0, 1] (absent from DEFAULTS so that the main study's run keys and settings stay those of its rows)

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 300, "n_test": 1000, "n_eval_gamma": 6, "probes": 5, "probe_batch": 64},  # trace at 6 points
    "full": {"steps": 1500, "n_test": 10000, "n_eval_gamma": 8},  # 5x quick
}


def load_data(args: Any) -> ImageData:
    return load_classification(getattr(args, "data", "auto"))


def build(variant: str, cfg: dict[str, Any], num_classes: int) -> nn.Module:
    """The ConvNet of one variant: every weight predicted from gamma ~ U(0, 1)^k (or plain)."""
    cfg = {**DEFAULTS, **cfg}
    lo, hi = gamma_range(cfg)
    net = ConvNet(num_classes, width=cfg.get("width", 1), depth=cfg["depth"])
    return build_variant(variant, cfg, net, {"z": hl.Input(lo, hi, dim=cfg["k"])})


def gamma_range(cfg: dict[str, Any]) -> tuple[float, float]:
    """The range gamma is drawn from (and declared with): ``cfg["gamma_range"]`` or [0, 1]."""
    r = cfg.get("gamma_range")
    return (0.0, 1.0) if r is None else (float(r[0]), float(r[1]))


def draw_gamma(cfg: dict[str, Any], shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """gamma ~ U(lo, hi) in ``shape``; exactly ``torch.rand`` for the default [0, 1] (same draws as before)."""
    lo, hi = gamma_range(cfg)
    z = torch.rand(shape, generator=gen)
    return z if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * z


def theta_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, zs: list[torch.Tensor]) -> list[float] | None:
    """Per gamma: the norm of the loss's gradient w.r.t. the generated weights theta(gamma) only (not the
    hypernetwork's parameters, so no output bias or loss weighting enters); None without a hypernetwork."""
    if not hasattr(model, "materialize"):
        return None
    out = []
    for z in zs:
        net = model.materialize(z=z)
        F.cross_entropy(net(x), y).backward()
        out.append(grad_norm([p for p in net.parameters() if p.grad is not None]))
    return out


def gamma_shape(k: int, batch: int | None = None) -> tuple[int, ...]:
    """Shape of gamma: one value per minibatch (``(k,)``, or ``()`` when k = 1) or one per sample."""
    if batch is not None:
        return (batch, k)
    return (k,) if k > 1 else ()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, cfg: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    model.eval()
    x, y = data.x_test[: cfg["n_test"]], data.y_test[: cfg["n_test"]]
    accs, losses = [], []
    for _ in range(cfg["n_eval_gamma"]):
        z = draw_gamma(cfg, gamma_shape(cfg["k"]), gen)
        logits = torch.cat([model(x[i : i + 500], z=z) for i in range(0, len(x), 500)])
        losses.append(float(F.cross_entropy(logits, y)))
        accs.append(float((logits.argmax(1) == y).float().mean()))
    model.train()
    t = torch.tensor(accs)
    return {
        "test_acc": float(t.mean()),
        "test_acc_std_gamma": float(t.std()) if len(accs) > 1 else 0.0,
        "test_acc_min_gamma": float(t.min()),
        "test_loss": float(torch.tensor(losses).mean()),
    }


def grad_norm_by_gamma(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    bins: int = 5,
    per_sample: bool = False,
    span: tuple[float, float] = (0.0, 1.0),
) -> list[float]:
    """Gradient norm of the loss w.r.t. the hypernetwork parameters, with gamma = (lo + (hi - lo) t) * 1 for t at
    bin centres of [0, 1] (``span = (lo, hi)``, gamma's range).

    ``per_sample`` passes gamma as one row per sample (needed by a BatchNorm trunk while training).
    """
    out = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(bins):
        t = span[0] + (span[1] - span[0]) * (i + 0.5) / bins
        model.zero_grad(set_to_none=True)
        z = torch.full(gamma_shape(k, len(x) if per_sample else None), t)
        F.cross_entropy(model(x, z=z), y).backward()
        out.append(grad_norm(params))
    model.zero_grad(set_to_none=True)
    return out


def run(variant: str, seed: int, data: ImageData, cfg: dict[str, Any], *, desc: str = "", checkpoint: Path | None = None) -> dict[str, Any]:
    """Train one model; return metrics, curves and timings (one result row)."""
    cfg = {**DEFAULTS, **cfg}
    set_seed(seed)
    model = build(variant, cfg, data.num_classes)
    n_val = min(int(cfg.get("n_val") or 0), len(data.y_train) // 10)
    n = len(data.y_train) - n_val  # training draws from the first n images; the rest is validation

    def make_step_loss(gen: torch.Generator) -> Callable[[int], torch.Tensor]:
        def step_loss(step: int) -> torch.Tensor:
            idx = torch.randint(0, n, (cfg["batch"],), generator=gen)
            zshape = gamma_shape(cfg["k"], cfg["batch"] if cfg["per_sample_gamma"] else None)
            z = draw_gamma(cfg, zshape, gen)  # gamma per minibatch (the paper) or per sample
            return F.cross_entropy(model(data.x_train[idx], z=z), data.y_train[idx])

        return step_loss

    def evaluate_all() -> dict[str, Any]:
        metrics = evaluate(model, data, cfg, torch.Generator().manual_seed(10_000 + seed))
        if n_val:
            val = dataclasses.replace(data, x_test=data.x_train[n:], y_test=data.y_train[n:])
            vcfg = {**cfg, "n_test": n_val, "n_eval_gamma": min(4, cfg["n_eval_gamma"])}
            metrics["val_acc"] = evaluate(model, val, vcfg, torch.Generator().manual_seed(15_000 + seed))["test_acc"]
        probe = torch.Generator().manual_seed(20_000 + seed)
        pidx = torch.randint(0, len(data.y_test), (256,), generator=probe)
        metrics["grad_norm_by_gamma"] = grad_norm_by_gamma(
            model, data.x_test[pidx], data.y_test[pidx], cfg["k"], per_sample=cfg["per_sample_gamma"], span=gamma_range(cfg)
        )
        return metrics

    pgen = torch.Generator().manual_seed(60_000 + seed)
    pidx = torch.randint(0, n, (cfg.get("probe_batch", 256),), generator=pgen)
    px, py = data.x_train[pidx], data.y_train[pidx]
    lo, hi = gamma_range(cfg)
    bins = [lo + (hi - lo) * t for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    zshape = gamma_shape(cfg["k"], len(pidx) if cfg["per_sample_gamma"] else None)

    # the validation curve (the trace's "val"): accuracy on the first 500 validation images at 2 gammas, on which
    # the report measures a speed-up on held-out data; its own generator, so training is the same with or without it
    vdata = dataclasses.replace(data, x_test=data.x_train[n : n + 500], y_test=data.y_train[n : n + 500]) if n_val else None
    vcurve = {**cfg, "n_test": 500, "n_eval_gamma": 2}

    def probe() -> dict[str, Any]:
        val = {} if vdata is None else {"val": evaluate(model, vdata, vcurve, torch.Generator().manual_seed(16_000 + seed))["test_acc"]}
        out = val | trace_probe(
            model,
            lambda t: model(px, z=torch.full(zshape, t)),
            lambda t: F.cross_entropy(model(px, z=torch.full(zshape, t)), py),
            lambda t: {"z": torch.full(zshape, t)},
            bins,
        )
        if cfg.get("gamma_range") is not None and not cfg["per_sample_gamma"]:
            out["theta_grad_by_gamma"] = theta_grad_norms(model, px, py, [torch.full(zshape, t) for t in bins])
        return out

    weights = lambda: flat_weights(model, {"z": torch.full(gamma_shape(cfg["k"]), sum(gamma_range(cfg)) / 2)})  # noqa: E731
    out = train_and_evaluate(model, cfg, seed, make_step_loss, evaluate_all, desc=desc, checkpoint=checkpoint, probe=probe, weights=weights)
    if out["metrics"]["diverged_at"] is not None:
        out["metrics"].update({"test_acc": math.nan, "test_acc_std_gamma": math.nan, "test_loss": math.nan})
    return {**out, "data": data.name}
