"""Tune while training: hl.SelfTuner (Self-Tuning Networks) against the usual ways, at equal training steps.

Two tasks:

* ``ridge`` — the known answer: ridge regression on scikit-learn's diabetes
  data (60 training rows, 200 validation rows, standardised), a linear primary
  network conditioned on ``lam`` in [1e-4, 1e2] (log). The validation-optimal
  ``lam*`` is computed from the closed-form solution path; the tuner starts at
  ``lam = 1``.
* ``fmnist`` — Fashion-MNIST, a small training subset (regularisation
  matters), an MLP 784-256-256-10 with a dropout layer after each hidden layer.
  Tuned: the two dropout rates ``d1``, ``d2`` in [0, 0.9] (bound to the
  unmodified ``nn.Dropout`` modules with ``hl.bind_dropout``) and an L2
  coefficient ``wd`` in [1e-6, 1e-1] (log) on all weights. The hypernetwork
  predicts the last two Linear layers. Methods, all at the same number of
  training steps S:

  - ``fixed``: the plain MLP with the defaults (dropout 0.5, no L2);
  - ``random``: random search, 8 configurations x S/8 steps of the plain MLP, best on validation;
  - ``after``: tune after training: a hypernetwork (MIP) trained over the whole
    range for S steps (``hl.sample`` per batch), then ``hl.sweep`` on a grid and
    ``hl.tune`` from the best grid point, on the validation loss;
  - ``stn-mip`` / ``stn-default``: ``hl.SelfTuner`` for S training steps
    (10% warm-up at the starting values, then a hyper step on a validation
    batch every ``hyper_every`` steps), MIP and the default formulation.

  Every method reports the test accuracy and loss (10,000 test images) of its
  final model at its chosen values (dropout off), the validation loss, the
  chosen values and the wall time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hyperloom as hl

from .common import ResultStore, config_key, set_seed
from .data import load_classification

RANGES: dict[str, Any] = {"d1": (0.0, 0.9), "d2": (0.0, 0.9), "wd": (1e-6, 1e-1, "log")}
DEFAULTS = {"d1": 0.5, "d2": 0.5, "wd": 0.0}
METHODS = ("fixed", "random", "after", "stn-mip", "stn-default")

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 3, "steps": 1500, "n_train": 1000, "n_val": 1000},
    "full": {"seeds": 5, "steps": 6000, "n_train": 2000, "n_val": 2000},
}
FMNIST: dict[str, Any] = {
    "batch": 64,
    "lr": 1e-3,
    "hidden": [32, 8],
    "predict": ["4", "7"],
    "random_configs": 8,
    "hyper_every": 10,
    "hyper_batch": 256,
    "hyper_lr": 1e-2,
    "perturb": 0.1,
    "entropy": 1e-3,
    "warmup": 0.1,
    "init": {"d1": 0.5, "d2": 0.5, "wd": 1e-5},
    "sweep": {"d1": 4, "d2": 4, "wd": 6},
    "tune_steps": 30,
}
RIDGE: dict[str, Any] = {"warmup": 200, "steps": 300, "hyper_every": 2, "lr": 3e-2, "hyper_lr": 5e-3, "perturb": 0.05, "init": 1.0}


# -- ridge -------------------------------------------------------------------------------------------
def ridge_split() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:60], perm[60:260]
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()
    return x[tr], y[tr], x[va], y[va]


def ridge_val_loss(lam: float, xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor) -> float:
    n = len(xtr)
    w = torch.linalg.solve(xtr.T @ xtr / n + lam * torch.eye(xtr.shape[1], dtype=torch.float64), xtr.T @ ytr / n)
    return float(((xva @ w - yva) ** 2).mean())


def run_ridge(variant: str, seed: int) -> dict[str, Any]:
    xtr, ytr, xva, yva = ridge_split()
    grid = torch.linspace(math.log(1e-4), math.log(1e2), 2401, dtype=torch.float64).exp()
    losses = torch.tensor([ridge_val_loss(float(g), xtr, ytr, xva, yva) for g in grid])
    lam_star, f_star = float(grid[losses.argmin()]), float(losses.min())
    set_seed(seed)
    model = hl.hypernetize(nn.Linear(10, 1), inputs={"lam": (1e-4, 1e2, "log")}, formulation=variant)
    opt = torch.optim.Adam(model.parameters(), lr=RIDGE["lr"])
    tuner = hl.SelfTuner(model, opt, init={"lam": RIDGE["init"]}, hyper_lr=RIDGE["hyper_lr"], perturb=RIDGE["perturb"])
    a, b, c, d = (t.float() for t in (xtr, ytr, xva, yva))

    def train_loss(m: nn.Module, lam: torch.Tensor) -> torch.Tensor:
        return ((m(a, lam=lam).squeeze(-1) - b) ** 2).mean() + lam * m.generate(lam=lam)["weight"].pow(2).sum()

    def val_loss(m: nn.Module, lam: torch.Tensor) -> torch.Tensor:
        return ((m(c, lam=lam).squeeze(-1) - d) ** 2).mean()

    t0 = time.perf_counter()
    for _ in range(RIDGE["warmup"]):
        tuner.train_step(train_loss)
    for step in range(RIDGE["steps"]):
        tuner.train_step(train_loss)
        if step % RIDGE["hyper_every"] == RIDGE["hyper_every"] - 1:
            tuner.hyper_step(val_loss)
    lam = float(tuner.values["lam"])  # type: ignore[arg-type]
    f = ridge_val_loss(lam, xtr, ytr, xva, yva)
    return {
        "metrics": {
            "lam": lam,
            "lam_star": lam_star,
            "ratio": lam / lam_star,
            "val_loss": f,
            "val_loss_star": f_star,
            "val_gap": f / f_star - 1,
            "val_loss_start": ridge_val_loss(RIDGE["init"], xtr, ytr, xva, yva),
            "wall_s": time.perf_counter() - t0,
        },
        "trajectory": [[r["train_steps"], r["values"]["lam"]] for r in tuner.history],
    }


# -- Fashion-MNIST -----------------------------------------------------------------------------------
def mlp(d1: float = 0.5, d2: float = 0.5) -> nn.Sequential:
    """784-256-256-10 with a dropout layer after each hidden layer (modules 3 and 6)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(d1), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(d2), nn.Linear(256, 10)
    )


def fmnist_data(cfg: dict[str, Any], args: Any = None) -> dict[str, torch.Tensor]:
    data = load_classification(getattr(args, "data", "auto") if args is not None else "auto")
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(1234))
    tr, va = perm[: cfg["n_train"]], perm[cfg["n_train"] : cfg["n_train"] + cfg["n_val"]]
    return {
        "name": data.name,  # type: ignore[dict-item]
        "xtr": data.x_train[tr],
        "ytr": data.y_train[tr],
        "xva": data.x_train[va],
        "yva": data.y_train[va],
        "xte": data.x_test,
        "yte": data.y_test,
    }


def _l2(named: Any) -> torch.Tensor:
    return sum((v.pow(2).sum() for k, v in named if k.endswith("weight")), torch.zeros(()))


def _evaluate(forward: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = torch.cat([forward(x[i : i + 2000]) for i in range(0, len(x), 2000)])
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_plain(
    values: dict[str, float], steps: int, data: dict[str, torch.Tensor], cfg: dict[str, Any], gen: torch.Generator
) -> nn.Module:
    net = mlp(values["d1"], values["d2"])
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    for _ in range(steps):
        idx = torch.randint(0, len(data["ytr"]), (cfg["batch"],), generator=gen)
        loss = F.cross_entropy(net(data["xtr"][idx]), data["ytr"][idx]) + values["wd"] * _l2(net.named_parameters())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return net.eval()


def build_hyper(variant: str, cfg: dict[str, Any]) -> hl.HyperModel:
    h = hl.hypernetize(mlp(), predict=cfg["predict"], inputs=RANGES, hidden=cfg["hidden"], formulation=variant)
    return hl.bind_dropout(h, {"d1": "3", "d2": "6"})


def _hyper_train_loss(x: torch.Tensor, y: torch.Tensor) -> Any:
    def loss(m: hl.HyperModel, **cond: torch.Tensor) -> torch.Tensor:
        theta = m.generate(**cond)
        named = [*theta.items(), *((k, p) for k, p in m.primary.named_parameters())]
        return F.cross_entropy(m(x, **cond), y) + cond["wd"] * _l2(named)

    return loss


def run_fmnist(method: str, seed: int, data: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps = cfg["steps"]
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if method in ("fixed", "random"):
        if method == "fixed":
            values = dict(DEFAULTS)
            net = train_plain(values, steps, data, cfg, gen)
        else:
            best: tuple[float, dict[str, float], nn.Module] | None = None
            tried = []
            for c in range(cfg["random_configs"]):
                draw = hl.sample(RANGES, generator=torch.Generator().manual_seed(1000 * seed + c), dtype=torch.float64)
                v = {k: float(t) for k, t in draw.items()}
                cand = train_plain(v, steps // cfg["random_configs"], data, cfg, gen)
                vl, _ = _evaluate(cand, data["xva"], data["yva"])
                tried.append({**v, "val_loss": vl})
                if best is None or vl < best[0]:
                    best = (vl, v, cand)
            assert best is not None
            values, net = best[1], best[2]
            out["tried"] = tried
        forward: Any = net
    else:
        variant = "default" if method == "stn-default" else "mip"
        h = build_hyper(variant, cfg)
        opt = torch.optim.Adam(h.parameters(), lr=cfg["lr"])

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(data["ytr"]), (cfg["batch"],), generator=gen)
            return data["xtr"][idx], data["ytr"][idx]

        if method == "after":
            for _ in range(steps):
                x, y = batch()
                cond = hl.sample(h, generator=gen)
                loss = _hyper_train_loss(x, y)(h, **cond)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
            h.eval()

            def val_metrics(m: nn.Module, **cond: Any) -> dict[str, float]:
                with torch.no_grad():
                    return {"val_loss": float(F.cross_entropy(m(data["xva"], **cond), data["yva"]))}

            sw = hl.sweep(h, val_metrics, cfg["sweep"], progress=False)
            start = sw.best("val_loss")
            tuned = hl.tune(
                h,
                lambda m, **c: F.cross_entropy(m(data["xva"], **c), data["yva"]),
                init={k: start[k] for k in RANGES},
                steps=cfg["tune_steps"],
                lr=0.05,
            )
            values = {k: float(v) for k, v in tuned.values.items()}  # type: ignore[arg-type]
        else:
            tuner = hl.SelfTuner(h, opt, init=cfg["init"], hyper_lr=cfg["hyper_lr"], perturb=cfg["perturb"], entropy=cfg["entropy"])
            warm = int(cfg["warmup"] * steps)
            for step in range(steps):
                x, y = batch()
                tuner.train_step(_hyper_train_loss(x, y))
                if step >= warm and (step - warm) % cfg["hyper_every"] == cfg["hyper_every"] - 1:
                    idx = torch.randint(0, len(data["yva"]), (cfg["hyper_batch"],), generator=gen)
                    xv, yv = data["xva"][idx], data["yva"][idx]
                    tuner.hyper_step(lambda m, xv=xv, yv=yv, **c: F.cross_entropy(m(xv, **c), yv))
            values = {k: float(v) for k, v in tuner.values.items()}  # type: ignore[arg-type]
            out["trajectory"] = [[r["train_steps"], r["values"]["d1"], r["values"]["d2"], r["values"]["wd"]] for r in tuner.history]
            out["scales"] = tuner.scales
        h.eval()
        fixed = dict(values)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return h(x, **fixed)

    wall = time.perf_counter() - t0
    val_loss, val_acc = _evaluate(forward, data["xva"], data["yva"])
    test_loss, test_acc = _evaluate(forward, data["xte"], data["yte"])
    out["metrics"] = {"test_acc": test_acc, "test_loss": test_loss, "val_loss": val_loss, "val_acc": val_acc, "wall_s": wall, **values}
    return out


# -- driver --------------------------------------------------------------------------------------------
def run_all(size: str, out: Path, *, tasks: list[str], seeds: int | None = None, steps: int | None = None, args: Any = None) -> ResultStore:
    store = ResultStore(out / "results.jsonl")
    n_seeds = seeds or SIZES[size]["seeds"]
    if "ridge" in tasks:
        for variant in ("mip", "default"):
            for seed in range(n_seeds):
                row = {"task": "ridge", "variant": variant, "seed": seed, "config": RIDGE}
                key = config_key(row)
                if store.done(key):
                    continue
                res = run_ridge(variant, seed)
                print(f"[ridge {variant} seed={seed}] {res['metrics']}", flush=True)
                store.add({**row, "key": key, **res})
    if "fmnist" in tasks:
        cfg = {**FMNIST, **{k: v for k, v in SIZES[size].items() if k != "seeds"}}
        if steps:
            cfg["steps"] = steps
        data = fmnist_data(cfg, args)
        for seed in range(n_seeds):
            for method in METHODS:
                row = {"task": "fmnist", "variant": method, "seed": seed, "config": cfg}
                key = config_key(row)
                if store.done(key):
                    continue
                res = run_fmnist(method, seed, data, cfg)
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in res["metrics"].items()}
                print(f"[fmnist {method} seed={seed}] {shown}", flush=True)
                store.add({**row, "key": key, "data": data["name"], **res})
    return store


# -- report --------------------------------------------------------------------------------------------
def _ci(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return "n/a"
    if a.size == 1:
        return f"{a[0]:.4f}"
    t = {2: 12.71, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}.get(a.size, 2.0)
    return f"{a.mean():.4f} ± {t * a.std(ddof=1) / math.sqrt(a.size):.4f}"


def write_report(rows: list[dict[str, Any]], out: Path, *, header: str) -> Path:
    lines = ["# Tune while training: self-tuning hypernetworks (hl.SelfTuner)", "", header, ""]
    lines += [
        "STN's published results (MacKay et al., ICLR 2019) are on CIFAR-10 and Penn Treebank; neither is available on "
        "this machine (no CIFAR-like data ships offline, see DATA.md), so this study uses a known answer (ridge) and "
        "Fashion-MNIST. Intervals: mean ± 95% t-interval over seeds.",
        "",
        "## Ridge regression: the known answer",
        "",
        "Diabetes data (60 training rows, 200 validation rows), `lam` in [1e-4, 1e2] (log), tuner started at `lam = 1` "
        f"after a warm-up of {RIDGE['warmup']} steps, then {RIDGE['steps']} training steps with a hyper step every "
        f"{RIDGE['hyper_every']}. `lam*` is the exact validation-optimal value (closed form on a 2401-point grid).",
        "",
        "| formulation | seeds | lam (mean) | lam* | lam / lam* | val loss gap to the optimum | val loss at the start | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in ("mip", "default"):
        rs = [r for r in rows if r["task"] == "ridge" and r["variant"] == variant]
        if not rs:
            continue
        m = [r["metrics"] for r in rs]
        lines.append(
            f"| {variant} | {len(rs)} | {np.mean([x['lam'] for x in m]):.4f} | {m[0]['lam_star']:.4f} | "
            f"{_ci([x['ratio'] for x in m])} | {_ci([100 * x['val_gap'] for x in m])} % | "
            f"+{100 * (m[0]['val_loss_start'] / m[0]['val_loss_star'] - 1):.1f} % | {np.mean([x['wall_s'] for x in m]):.1f} |"
        )
    fm = [r for r in rows if r["task"] == "fmnist"]
    if fm:
        cfg = fm[0]["config"]
        lines += [
            "",
            "## Fashion-MNIST: dropout rates and L2 tuned online vs at equal training steps",
            "",
            f"Data: {fm[0].get('data', 'fashion-mnist')}; {cfg['n_train']} training images, {cfg['n_val']} validation images "
            f"(from the training set), the 10,000 test images. MLP 784-256-256-10, dropout after each hidden layer; "
            f"{cfg['steps']} training steps of batch {cfg['batch']} (Adam {cfg['lr']}) for every method. "
            f"The hypernetwork predicts Linear layers {cfg['predict']} (hidden {cfg['hidden']}); SelfTuner: "
            f"{int(cfg['warmup'] * 100)}% warm-up at {cfg['init']}, a hyper step on {cfg['hyper_batch']} validation images every "
            f"{cfg['hyper_every']} steps, hyper_lr {cfg['hyper_lr']}, perturb {cfg['perturb']}, entropy {cfg['entropy']}. "
            f"Random search: {cfg['random_configs']} configurations x {cfg['steps'] // cfg['random_configs']} steps. "
            "Tune-after: the MIP hypernetwork trained over the whole ranges, then hl.sweep "
            f"{cfg['sweep']} and hl.tune ({cfg['tune_steps']} steps) on the validation loss.",
            "",
            "| method | seeds | test acc | test loss | val loss | d1 | d2 | wd | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            rs = [r for r in fm if r["variant"] == method]
            if not rs:
                continue
            m = [r["metrics"] for r in rs]
            wd = [x["wd"] for x in m]
            wd_s = "0" if all(w == 0 for w in wd) else f"{math.exp(np.mean(np.log(np.maximum(wd, 1e-12)))):.2e}"
            lines.append(
                f"| {method} | {len(rs)} | {_ci([x['test_acc'] for x in m])} | {_ci([x['test_loss'] for x in m])} | "
                f"{_ci([x['val_loss'] for x in m])} | {np.mean([x['d1'] for x in m]):.2f} | {np.mean([x['d2'] for x in m]):.2f} | "
                f"{wd_s} | {np.mean([x['wall_s'] for x in m]):.0f} |"
            )
        lines += ["", "d1, d2: mean over seeds; wd: geometric mean. ![trajectories](trajectories.png)", ""]
        _plot(fm, out / "trajectories.png")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for j, name in enumerate(("d1", "d2", "wd")):
        ax = axes[j]
        for method, color in (("stn-mip", "C0"), ("stn-default", "C1")):
            for i, r in enumerate(r for r in rows if r["variant"] == method and r.get("trajectory")):
                t = np.asarray(r["trajectory"], dtype=float)
                ax.plot(t[:, 0], t[:, 1 + j], color=color, alpha=0.8, lw=1, label=method if i == 0 else None)
        for r in rows:
            if r["variant"] == "random":
                ax.axhline(r["metrics"][name] if name != "wd" or r["metrics"][name] > 0 else np.nan, color="C2", lw=0.5, ls=":")
            if r["variant"] == "after":
                ax.axhline(r["metrics"][name], color="C3", lw=0.8, ls="--")
        ax.plot([], [], color="C2", ls=":", label="random search (chosen)")
        ax.plot([], [], color="C3", ls="--", label="tune after training")
        ax.set_title(name)
        ax.set_xlabel("training step")
        if name == "wd":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
