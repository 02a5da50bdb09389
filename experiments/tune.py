"""Tune after training: choose the hyperparameter with hl.sweep / hl.tune, and measure the amortization gap.

Two tasks:

* ``ridge`` — ridge regression on the diabetes data (scikit-learn, 442 x 10),
  conditioned on ``lam`` in [1e-3, 1e2] (log). The exact solution path
  ``w*(lam) = (X'X/n + lam I)^-1 X'y/n`` is known, so the amortization gap is
  measured in weight space (relative error of the generated weights) and in
  excess training objective.
* ``register`` — the paper's task 2 (HyperMorph-style registration of MNI152
  slices), conditioned on ``lam`` in [0, 1], trained with ``hl.sample(...,
  ends=0.2)`` (HyperMorph's oversampling of the ends). The held-out slices are
  split by block into validation slices (choose lambda) and test slices (confirm).

Per seed: the hypernetwork (default and MIP formulation) trained for S steps;
ordinary (non-hyper) models trained at fixed lambda for S steps and for S/5
steps (the hypernetwork's budget per lambda when 5 values are of interest).
After training: ``hl.sweep`` over lambda on validation data (lambda* by the
metric, per tissue class too), ``hl.tune`` from 3 starting points on a
differentiable validation loss, and the test metric at each lambda*.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hyperloom as hl

from .brain import LABEL_NAMES, BrainSlices, dice_per_class, load_brain_slices, one_hot, warp
from .common import ResultStore, config_key, formulation, make_optimizer, set_seed, train_loop
from .register import RegUNet, folding_fraction, make_pairs, smoothness

VARIANTS = ("default", "mip")
CLASSES = [n.replace(" matter", "").replace(" ", "_").lower() for n in LABEL_NAMES[1:]]  # csf, grey, white

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "ridge": {"steps": 2000, "seeds": 3},
        "register": {"steps": 200, "seeds": 3},
    },
    "full": {
        "ridge": {"steps": 6000, "seeds": 5},
        "register": {"steps": 1000, "seeds": 3},
    },
}

RIDGE: dict[str, Any] = {
    "lr": 1e-2,
    "hidden": [16, 64, 128],
    "activation": "leaky_relu",
    "range": [1e-3, 1e2],
    "fixed": [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2],
    "sweep_points": 41,
    "tune_starts": [1e-2, 1.0, 30.0],
    "tune_steps": 150,
    "ends": 0.0,
}

REGISTER: dict[str, Any] = {
    "lr": 1e-3,
    "batch": 8,
    "hidden": [16, 64, 128],
    "activation": "leaky_relu",
    "warp_strength": 0.04,
    "image_sigma": 0.1,
    "fixed": [0.1, 0.3, 0.5, 0.7, 0.9],
    "n_val": 16,
    "n_test": 32,
    "sweep_points": 11,
    "tune_starts": [0.1, 0.5, 0.9],
    "tune_steps": 15,
    "tune_lr": 0.1,
    "ends": 0.2,
}


# -- ridge regression ----------------------------------------------------------------------------------------
def ridge_data() -> dict[str, torch.Tensor]:
    """Diabetes data, standardised with training statistics; a fixed 300 / 71 / 71 split."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = torch.tensor(x[perm], dtype=torch.float64), torch.tensor(y[perm], dtype=torch.float64)
    tr, va = slice(0, 300), slice(300, 371)
    mu, sd = x[tr].mean(0), x[tr].std(0)
    ym, ys = y[tr].mean(), y[tr].std()
    x, y = (x - mu) / sd, (y - ym) / ys
    return {
        "x_train": x[tr],
        "y_train": y[tr],
        "x_val": x[va],
        "y_val": y[va],
        "x_test": x[371:],
        "y_test": y[371:],
    }


def ridge_exact(d: dict[str, torch.Tensor], lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimiser of mean((Xw + b - y)^2) + lam |w|^2 (float64): ``(w, b)``."""
    x, y = d["x_train"], d["y_train"]
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    n, k = x.shape
    w = torch.linalg.solve(xc.T @ xc / n + lam * torch.eye(k, dtype=x.dtype), xc.T @ yc / n)
    return w, ym - xm @ w


def ridge_objective(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: Any) -> torch.Tensor:
    return (x @ w + b - y).pow(2).mean() + lam * w.pow(2).sum()


def _linear_wb(model: nn.Module, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, b)`` of the primary linear layer: generated for ``cond`` (hypernetwork) or its own parameters."""
    if isinstance(model, hl.HyperModel):
        theta = model.generate(**cond)
        return theta["weight"].reshape(-1).double(), theta["bias"].reshape(()).double()
    assert isinstance(model, nn.Linear)
    return model.weight.reshape(-1).double(), model.bias.reshape(()).double()


def _ridge_row(d: dict[str, torch.Tensor], model: nn.Module, at: float, **cond: Any) -> dict[str, float]:
    with torch.no_grad():
        w, b = _linear_wb(model, **cond)
        we, be = ridge_exact(d, at)
        obj = float(ridge_objective(w, b, d["x_train"], d["y_train"], at))
        obj_exact = float(ridge_objective(we, be, d["x_train"], d["y_train"], at))
        return {
            "lam": at,
            "w_rel_err": float((w - we).norm() / we.norm()),
            "excess_objective": obj - obj_exact,
            "val_mse": float((d["x_val"] @ w + b - d["y_val"]).pow(2).mean()),
            "test_mse": float((d["x_test"] @ w + b - d["y_test"]).pow(2).mean()),
        }


def ridge_run(kind: str, seed: int, cfg: dict[str, Any], *, checkpoint: Path | None = None) -> dict[str, Any]:
    """One ridge run: ``kind`` is ``hyper:<variant>`` or ``fixed:<lam>:<steps>``."""
    d = ridge_data()
    x, y = d["x_train"].float(), d["y_train"].float()
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = cfg["range"]
    if kind.startswith("hyper:"):
        variant = kind.split(":")[1]
        model: nn.Module = hl.hypernetize(
            nn.Linear(x.shape[1], 1),
            inputs={"lam": (lo, hi, "log")},
            hidden=tuple(cfg["hidden"]),
            activation=cfg["activation"],
            **formulation(variant, {}),
        )
        steps = cfg["steps"]

        def step_loss(step: int) -> torch.Tensor:
            lam = hl.sample(model, generator=gen, ends=cfg["ends"])["lam"]
            theta = model.generate(lam=lam)
            return ridge_objective(theta["weight"].reshape(-1), theta["bias"].reshape(()), x, y, lam)
    else:
        _, lam_s, steps_s = kind.split(":")
        lam_f, steps = float(lam_s), int(steps_s)
        model = nn.Linear(x.shape[1], 1)

        def step_loss(step: int) -> torch.Tensor:
            return ridge_objective(model.weight.reshape(-1), model.bias.reshape(()), x, y, lam_f)

    opt = make_optimizer("adam", [p for p in model.parameters() if p.requires_grad], cfg["lr"])
    res = train_loop(step_loss, model, opt, steps, gen=gen, checkpoint=checkpoint, every=500)
    out: dict[str, Any] = {"wall_s": res["wall_s"], "steps": steps, "diverged_at": res["diverged_at"]}
    if not isinstance(model, hl.HyperModel):
        out["at"] = [_ridge_row(d, model, lam_f)]
        return out
    out["at"] = [_ridge_row(d, model, lam, lam=lam) for lam in cfg["fixed"]]
    xv, yv = d["x_val"].float(), d["y_val"].float()

    def val_mse(m: hl.HyperModel, lam: Any) -> torch.Tensor:
        return (m(xv, lam=lam).squeeze(-1) - yv).pow(2).mean()

    sw = hl.sweep(model, lambda m, lam: {"val_mse": val_mse(m, lam)}, {"lam": cfg["sweep_points"]})
    out["sweep"] = sw.rows
    best = sw.best("val_mse")
    out["sweep_best"] = _ridge_row(d, model, best["lam"], lam=best["lam"])
    out["tune"] = []
    for start in cfg["tune_starts"]:
        t = hl.tune(model, val_mse, init={"lam": start}, steps=cfg["tune_steps"], lr=0.05)
        out["tune"].append({"start": start, **_ridge_row(d, model, float(t.values["lam"]), lam=t.values["lam"])})
    return out


def ridge_reference(cfg: dict[str, Any]) -> dict[str, Any]:
    """The exact path: lambda* minimising validation MSE on a fine log grid, and its test MSE."""
    d = ridge_data()
    lo, hi = cfg["range"]
    grid = np.logspace(math.log10(lo), math.log10(hi), 401)
    vals = []
    for lam in grid:
        w, b = ridge_exact(d, float(lam))
        vals.append(float((d["x_val"] @ w + b - d["y_val"]).pow(2).mean()))
    i = int(np.argmin(vals))
    w, b = ridge_exact(d, float(grid[i]))
    return {
        "lam_star": float(grid[i]),
        "val_mse": vals[i],
        "test_mse": float((d["x_test"] @ w + b - d["y_test"]).pow(2).mean()),
        "path_x": grid[::8].tolist(),
        "path_val_mse": vals[::8],
    }


# -- registration ------------------------------------------------------------------------------------------
def register_data() -> tuple[BrainSlices, BrainSlices]:
    """(train + validation slices, train + test slices): the held-out test-subject slices in blocks of 4, alternately."""
    d = load_brain_slices(64)
    block = torch.arange(len(d.x_test)) // 4
    val, test = block % 2 == 0, block % 2 == 1
    zt = d.z_test

    def mk(m: torch.Tensor) -> BrainSlices:
        return dataclasses.replace(d, x_test=d.x_test[m], y_test=d.y_test[m], z_test=None if zt is None else zt[m])

    return mk(val), mk(test)


def _pairs(data: BrainSlices, n: int, seed: int, warp_strength: float) -> tuple[torch.Tensor, ...]:
    return make_pairs(data, n, torch.Generator().manual_seed(seed), test=True, warp_strength=warp_strength)


def _reg_objective(disp: torch.Tensor, mov: torch.Tensor, fix: torch.Tensor, lam: Any, sigma: float) -> torch.Tensor:
    return (1 - lam) * F.mse_loss(warp(mov, disp), fix) / sigma**2 + lam * smoothness(disp)


def _soft_dice_loss(disp: torch.Tensor, ym: torch.Tensor, yf: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice of the warped one-hot moving labels (differentiable in the displacement)."""
    p = warp(one_hot(ym), disp)[:, 1:]
    q = one_hot(yf)[:, 1:]
    inter = (p * q).sum((0, 2, 3))
    return 1 - (2 * inter / (p.sum((0, 2, 3)) + q.sum((0, 2, 3))).clamp_min(1e-6)).mean()


def _reg_metrics(disp: torch.Tensor, pairs: tuple[torch.Tensor, ...], lam: float, sigma: float) -> dict[str, float]:
    mov, fix, ym, yf = pairs
    dice = dice_per_class(warp(one_hot(ym), disp).argmax(1), yf)
    out = {"dice": float(dice.mean()), "folding_pct": 100 * float(folding_fraction(disp).mean())}
    out.update({f"dice_{c}": float(v) for c, v in zip(CLASSES, dice)})
    out["loss"] = float(_reg_objective(disp, mov, fix, lam, sigma))
    return out


def register_run(kind: str, seed: int, cfg: dict[str, Any], *, checkpoint: Path | None = None) -> dict[str, Any]:
    """One registration run: ``kind`` is ``hyper:<variant>`` or ``fixed:<lam>:<steps>``."""
    val, test = register_data()
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sigma = cfg["image_sigma"]
    if kind.startswith("hyper:"):
        variant = kind.split(":")[1]
        model: nn.Module = hl.hypernetize(
            RegUNet(),
            inputs={"lam": (0.0, 1.0)},
            predict=["down", "bottom", "up"],
            hidden=tuple(cfg["hidden"]),
            activation=cfg["activation"],
            **formulation(variant, {}),
        )
        steps = cfg["steps"]

        def step_loss(step: int) -> torch.Tensor:
            mov, fix, _, _ = make_pairs(val, cfg["batch"], gen, test=False, warp_strength=cfg["warp_strength"])
            lam = hl.sample(model, generator=gen, ends=cfg["ends"])["lam"]
            return _reg_objective(model(mov, fix, lam=lam), mov, fix, lam, sigma)
    else:
        _, lam_s, steps_s = kind.split(":")
        lam_f, steps = float(lam_s), int(steps_s)
        model = RegUNet()

        def step_loss(step: int) -> torch.Tensor:
            mov, fix, _, _ = make_pairs(val, cfg["batch"], gen, test=False, warp_strength=cfg["warp_strength"])
            return _reg_objective(model(mov, fix), mov, fix, lam_f, sigma)

    opt = make_optimizer("adam", [p for p in model.parameters() if p.requires_grad], cfg["lr"])
    res = train_loop(step_loss, model, opt, steps, gen=gen, checkpoint=checkpoint, every=50)
    out: dict[str, Any] = {"wall_s": res["wall_s"], "steps": steps, "diverged_at": res["diverged_at"], "curve": res["curve"]}
    if res["diverged_at"] is not None:
        return out
    model.eval()
    val_pairs = _pairs(val, cfg["n_val"], 30_000 + seed, cfg["warp_strength"])
    test_pairs = _pairs(test, cfg["n_test"], 40_000 + seed, cfg["warp_strength"])
    with torch.no_grad():
        if not isinstance(model, hl.HyperModel):
            out["at"] = [{"lam": lam_f, **_reg_metrics(model(*test_pairs[:2]), test_pairs, lam_f, sigma)}]
            return out
        out["at"] = [{"lam": lam, **_reg_metrics(model(*test_pairs[:2], lam=lam), test_pairs, lam, sigma)} for lam in cfg["fixed"]]

    def on_val(m: hl.HyperModel, lam: float) -> dict[str, float]:
        return _reg_metrics(m(*val_pairs[:2], lam=lam), val_pairs, lam, sigma)

    sw = hl.sweep(model, on_val, {"lam": cfg["sweep_points"]})
    out["sweep"] = sw.rows

    def confirm(lam: float) -> dict[str, float]:
        with torch.no_grad():
            return {"lam": lam, **_reg_metrics(model(*test_pairs[:2], lam=lam), test_pairs, lam, sigma)}

    out["sweep_best"] = {m: confirm(sw.best(m, mode="max")["lam"]) for m in ["dice"] + [f"dice_{c}" for c in CLASSES]}
    with torch.no_grad():
        out["test_sweep"] = [confirm(r["lam"]) for r in sw.rows]  # the oracle: lambda chosen on the test pairs themselves
    mov, fix, ym, yf = val_pairs
    out["tune"] = []
    for start in cfg["tune_starts"]:
        t = hl.tune(
            model,
            lambda m, lam: _soft_dice_loss(m(mov, fix, lam=lam), ym, yf),
            init={"lam": start},
            steps=cfg["tune_steps"],
            lr=cfg["tune_lr"],
        )
        out["tune"].append({"start": start, "objective": t.objective, **confirm(float(t.values["lam"]))})
    return out


# -- the command -------------------------------------------------------------------------------------------
TASKS = {"ridge": (RIDGE, ridge_run), "register": (REGISTER, register_run)}


def runs_for(task: str, cfg: dict[str, Any]) -> list[str]:
    steps = cfg["steps"]
    kinds = [f"hyper:{v}" for v in VARIANTS]
    for lam in cfg["fixed"]:
        kinds += [f"fixed:{lam}:{steps}", f"fixed:{lam}:{max(1, steps // 5)}"]
    return kinds


def run_all(
    size: str,
    out: Path,
    *,
    tasks: list[str],
    seeds: int | None = None,
    steps: int | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> ResultStore:
    """Train and evaluate every (task, kind, seed) not yet in ``out/results.jsonl``; a killed run resumes.

    ``overrides`` maps a task to config entries replacing the defaults (the tests shrink the runs with it).
    """
    store = ResultStore(out / "results.jsonl")
    for task in tasks:
        base, fn = TASKS[task]
        cfg = {**base, **SIZES[size][task], **(overrides or {}).get(task, {})}
        if steps:
            cfg["steps"] = steps
        n_seeds = seeds or cfg.pop("seeds")
        cfg.pop("seeds", None)
        kinds = runs_for(task, cfg)
        todo = [(k, s) for s in range(n_seeds) for k in kinds]
        for i, (kind, seed) in enumerate(todo):
            row = {"task": task, "variant": kind, "seed": seed, "config": cfg}
            key = config_key(row)
            if store.done(key):
                continue
            t0 = time.perf_counter()
            ckpt = out / "checkpoints" / f"{key}.safetensors"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            res = fn(kind, seed, cfg, checkpoint=ckpt)
            data = {"data": load_brain_slices(64).source} if task == "register" else {}
            store.add({**row, "key": key, "kind": kind, **data, **res})
            ckpt.unlink(missing_ok=True)
            print(f"[tune {task} {i + 1}/{len(todo)}] {kind} seed={seed} ({time.perf_counter() - t0:.1f}s)", flush=True)
        if task == "ridge":
            ref_key = config_key({"task": task, "variant": "exact", "seed": 0, "config": cfg})
            if not store.done(ref_key):
                store.add({"task": task, "variant": "exact", "seed": 0, "config": cfg, "key": ref_key, **ridge_reference(cfg)})
    return store
