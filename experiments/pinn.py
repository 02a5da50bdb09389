"""Physics-informed hypernetworks: one hypernetwork solves a family of PDEs, checked against manufactured solutions.

``python -m experiments pinn --quick`` (``--full``: longer). A hypernetwork maps a PDE's parameters
gamma to the weights of a small tanh MLP ``u(x, y)`` (a PINN); training uses the physics-informed loss
only (PDE residual at collocation points + Dirichlet boundary loss, no solution labels), each batch
mixing ``members`` family members, each with its own gamma, their Laplacians computed per sample by
:func:`hyperloom.laplacian` (``vmap`` over members and points, no loop).

Families (method of manufactured solutions: u* is chosen, f and the boundary data follow from it):

* ``poisson``: ``-Δu = f`` on the unit square; ``u* = Σ_j a_j sin(m_j πx) sin(n_j πy) + a_4 g(x, y; c)``,
  modes (1,1), (2,1), (1,2), a Gaussian bump ``g`` (width 0.15) centred at ``c``; gamma: ``amp`` ∈ [-1, 1]^4
  (``dim=4``), ``center`` ∈ [0.25, 0.75]^2 (``dim=2``).
* ``helmholtz``: ``-Δu - k²u = f``, the operator changes with gamma; ``u* = cos(k(x cos φ + y sin φ)) + a sin(πx) sin(πy)``
  (a plane wave, which the homogeneous operator annihilates, plus a forced mode); gamma: ``k`` ∈ [0.5, 4]
  (below the first Dirichlet eigenvalue √2 π ≈ 4.44, so every member is well-posed), ``phi`` ∈ [0, π/2],
  ``amp`` ∈ [-1, 1]. The plane wave enters only through the boundary data and the operator.

Baselines on the first ``baseline_members`` held-out members: a PINN (the same MLP) trained for that
member alone with the hypernetwork's number of gradient steps and collocation points per step
(``pinn-budget``), and one trained much longer on more points (``pinn-converged``, the quality
ceiling). The amortisation gap is the hypernetwork's error over the converged PINN's on the same members.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

import hyperloom as hl

from .common import ResultStore

Cond = dict[str, torch.Tensor]

DEFAULTS: dict[str, Any] = {
    "width": 32,
    "depth": 2,  # hidden tanh layers of the PINN
    "hidden": [64, 64],  # hypernetwork trunk
    "members": 16,  # family members per batch
    "points": 64,  # interior collocation points per member per step
    "boundary_points": 32,
    "lr": 1e-2,
    "bc_weight": 1.0,
    "test_members": 16,
    "grid": 33,
    "baseline_members": 3,
    "converged_points": 256,
}
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 1000, "converged_steps": 3000, "seeds": 3},
    "full": {"steps": 6000, "converged_steps": 12000, "seeds": 5, "members": 32},
}
VARIANTS = ("mip", "default")
#: The HyPINO-style variant: the hypernetwork reads the source f on a grid through an hl.Data encoder (MIP
#: formulation, unit-norm code) instead of gamma; run on the Poisson family, where f identifies the member.
DATA_VARIANT = "mip-data"
DATA_FAMILIES = ("poisson",)
SOURCE_GRID = 16
TEST_SEED = 10_000  # the held-out members come from their own random stream, never the training one


# --------------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------------


class Family:
    """A PDE family with manufactured solutions: inputs, sampling, u*, the source f and the residual."""

    name = ""
    inputs: ClassVar[dict[str, hl.Input]] = {}
    #: Typical size of f: the residual is divided by it so that PDE and boundary losses are comparable.
    scale = 1.0

    def sample(self, n: int, gen: torch.Generator) -> Cond:
        out = {}
        for name, spec in self.inputs.items():
            shape = (n,) if spec.dim == 1 else (n, spec.dim)
            out[name] = spec.low + (spec.high - spec.low) * torch.rand(shape, generator=gen, dtype=torch.float64)
        return out

    def exact(self, x: torch.Tensor, g: Cond) -> torch.Tensor:
        """u* at points ``x`` (B, N, 2) for members ``g`` (B, ...): (B, N)."""
        raise NotImplementedError

    def source(self, x: torch.Tensor, g: Cond) -> torch.Tensor:
        """f at ``x``: (B, N), derived analytically from u*."""
        raise NotImplementedError

    def residual(self, u: torch.Tensor, lap: torch.Tensor, x: torch.Tensor, g: Cond) -> torch.Tensor:
        """PDE residual (zero for the exact solution): (B, N)."""
        raise NotImplementedError


def _col(t: torch.Tensor, i: int | None = None) -> torch.Tensor:
    """A member's value broadcastable against (B, N): (B, 1)."""
    return (t if i is None else t[:, i]).unsqueeze(1)


class Poisson(Family):
    """-Δu = f on the unit square, u* = Σ_j a_j sin(m_j πx) sin(n_j πy) + a_4 exp(-|x - c|² / (2·0.15²)), modes (1,1), (2,1), (1,2);
    gamma: `amp` ∈ [-1, 1]^4 (`dim=4`), `center` c ∈ [0.25, 0.75]^2 (`dim=2`). f and the Dirichlet data follow from u*."""

    name = "poisson"
    inputs: ClassVar[dict[str, hl.Input]] = {"amp": hl.Input(-1.0, 1.0, dim=4), "center": hl.Input(0.25, 0.75, dim=2)}
    modes = ((1, 1), (2, 1), (1, 2))
    width = 0.15
    scale = 30.0

    def _bump(self, x: torch.Tensor, g: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        r2 = ((x - g["center"].unsqueeze(1)) ** 2).sum(-1)
        return torch.exp(-r2 / (2 * self.width**2)), r2

    def exact(self, x: torch.Tensor, g: Cond) -> torch.Tensor:
        a = g["amp"]
        u = sum(_col(a, j) * torch.sin(m * math.pi * x[..., 0]) * torch.sin(n * math.pi * x[..., 1]) for j, (m, n) in enumerate(self.modes))
        return u + _col(a, 3) * self._bump(x, g)[0]

    def source(self, x: torch.Tensor, g: Cond) -> torch.Tensor:
        a, s2 = g["amp"], self.width**2
        f = sum(
            _col(a, j) * math.pi**2 * (m * m + n * n) * torch.sin(m * math.pi * x[..., 0]) * torch.sin(n * math.pi * x[..., 1])
            for j, (m, n) in enumerate(self.modes)
        )
        bump, r2 = self._bump(x, g)
        return f - _col(a, 3) * bump * (r2 / s2**2 - 2 / s2)  # f = -Δu*, Δg = g (r²/s⁴ - 2/s²) in 2-D

    def residual(self, u: torch.Tensor, lap: torch.Tensor, x: torch.Tensor, g: Cond) -> torch.Tensor:
        return -lap - self.source(x, g)


class Helmholtz(Family):
    """-Δu - k²u = f (gamma changes the operator), u* = cos(k(x cos φ + y sin φ)) + a sin(πx) sin(πy): a plane wave the
    homogeneous operator annihilates (it enters through the boundary data and k alone) plus a forced mode;
    gamma: `k` ∈ [0.5, 4] (below the first Dirichlet eigenvalue √2·π ≈ 4.44), `phi` ∈ [0, π/2], `amp` ∈ [-1, 1]."""

    name = "helmholtz"
    inputs: ClassVar[dict[str, hl.Input]] = {"k": hl.Input(0.5, 4.0), "phi": hl.Input(0.0, math.pi / 2), "amp": hl.Input(-1.0, 1.0)}
    scale = 10.0

    def exact(self, x: torch.Tensor, g: Cond) -> torch.Tensor:
        k, phi = _col(g["k"]), _col(g["phi"])
        wave = torch.cos(k * (x[..., 0] * torch.cos(phi) + x[..., 1] * torch.sin(phi)))
        return wave + _col(g["amp"]) * torch.sin(math.pi * x[..., 0]) * torch.sin(math.pi * x[..., 1])

    def source(self, x: torch.Tensor, g: Cond) -> torch.Tensor:
        k = _col(g["k"])
        return _col(g["amp"]) * (2 * math.pi**2 - k**2) * torch.sin(math.pi * x[..., 0]) * torch.sin(math.pi * x[..., 1])

    def residual(self, u: torch.Tensor, lap: torch.Tensor, x: torch.Tensor, g: Cond) -> torch.Tensor:
        return -lap - _col(g["k"]) ** 2 * u - self.source(x, g)


FAMILIES: dict[str, Family] = {"poisson": Poisson(), "helmholtz": Helmholtz()}


# --------------------------------------------------------------------------------------------------
# points, networks, losses
# --------------------------------------------------------------------------------------------------


def interior(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(b, n, 2, generator=gen)


def boundary(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points per member spread over the four edges of the unit square: (b, n, 2)."""
    t = torch.rand(b, n, generator=gen)
    side = torch.randint(0, 4, (b, n), generator=gen)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    xs = torch.where(side == 0, zero, torch.where(side == 1, one, t))
    ys = torch.where(side == 2, zero, torch.where(side == 3, one, t))
    return torch.stack([xs, ys], -1)


def grid(n: int) -> torch.Tensor:
    """The ``n x n`` evaluation grid (boundary included): (n², 2), row-major in y."""
    s = torch.linspace(0, 1, n)
    yy, xx = torch.meshgrid(s, s, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)


def pinn(cfg: dict[str, Any]) -> nn.Sequential:
    """The primary network: 2 -> width (tanh) x depth -> 1."""
    layers: list[nn.Module] = [nn.Linear(2, cfg["width"]), nn.Tanh()]
    for _ in range(cfg["depth"] - 1):
        layers += [nn.Linear(cfg["width"], cfg["width"]), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(cfg["width"], 1))


def plain_laplacian(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u and Δu of an ordinary network at points (N, 2): both (N,), by autograd (the usual PINN code)."""
    x = x.detach().requires_grad_(True)
    u = net(x)[:, 0]
    (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    return u, lap


def rel_l2(u: torch.Tensor, u_star: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per member over the last dimension."""
    return (u - u_star).norm(dim=-1) / u_star.norm(dim=-1)


def cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to 10% of the initial rate."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def source_encoder(cfg: dict[str, Any]) -> nn.Module:
    """Reads f on the SOURCE_GRID x SOURCE_GRID grid (B, G, G) -> a 32-dimensional code (B, 32)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(SOURCE_GRID**2, 128), nn.Tanh(), nn.Linear(128, 32))


def build(fam: Family, variant: str, cfg: dict[str, Any]) -> hl.HyperModel:
    if variant == DATA_VARIANT:
        inputs: dict[str, Any] = {"f": hl.Data(source_encoder(cfg), per="sample")}
        return hl.hypernetize(pinn(cfg), predict=[nn.Linear], inputs=inputs, hidden=tuple(cfg["hidden"]), formulation="mip")
    return hl.hypernetize(pinn(cfg), predict=[nn.Linear], inputs=fam.inputs, hidden=tuple(cfg["hidden"]), formulation=variant)


def conditioning(fam: Family, g: Cond, variant: str) -> dict[str, torch.Tensor]:
    """What the hypernetwork reads: gamma itself, or (data variant) f on a grid scaled by the family's f scale."""
    if variant != DATA_VARIANT:
        return g
    xs = grid(SOURCE_GRID)
    n = next(iter(g.values())).shape[0]
    f = fam.source(xs.expand(n, *xs.shape), g) / fam.scale
    return {"f": f.reshape(n, SOURCE_GRID, SOURCE_GRID).float()}


def hyper_loss(model: hl.HyperModel, fam: Family, cfg: dict[str, Any], gen: torch.Generator, variant: str = "mip") -> torch.Tensor:
    """The physics-informed loss of one batch of ``members`` family members (float32 training)."""
    g64 = fam.sample(cfg["members"], gen)
    g = {k: v.float() for k, v in g64.items()}
    x = interior(cfg["members"], cfg["points"], gen)
    xb = boundary(cfg["members"], cfg["boundary_points"], gen)
    u, lap = hl.laplacian(model, torch.cat([x, xb], 1), **conditioning(fam, g, variant))  # one generation; the boundary's Δu is unused
    n = cfg["points"]
    res = fam.residual(u[:, :n, 0], lap[:, :n, 0], x, g) / fam.scale
    ub = u[:, n:, 0]
    return (res**2).mean() + cfg["bc_weight"] * ((ub - fam.exact(xb, g)) ** 2).mean()


def pinn_loss(net: nn.Module, fam: Family, g: Cond, cfg: dict[str, Any], gen: torch.Generator, points: int) -> torch.Tensor:
    """The same loss for one member ``g`` (each value of shape (1, ...)) and an ordinary network."""
    x = interior(1, points, gen)
    xb = boundary(1, cfg["boundary_points"], gen)
    u, lap = plain_laplacian(net, x[0])
    res = fam.residual(u[None], lap[None], x, g) / fam.scale
    ub = net(xb[0])[:, 0][None]
    return (res**2).mean() + cfg["bc_weight"] * ((ub - fam.exact(xb, g)) ** 2).mean()


def test_members(fam: Family, cfg: dict[str, Any]) -> Cond:
    return {k: v.float() for k, v in fam.sample(cfg["test_members"], torch.Generator().manual_seed(TEST_SEED)).items()}


def member(g: Cond, i: int) -> Cond:
    return {k: v[i : i + 1] for k, v in g.items()}


@torch.no_grad()
def evaluate_hyper(
    model: hl.HyperModel, fam: Family, g: Cond, cfg: dict[str, Any], variant: str = "mip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative L2 error per held-out member on the grid, and the predictions (M, G²)."""
    xs = grid(cfg["grid"])
    n = next(iter(g.values())).shape[0]
    x = xs.expand(n, *xs.shape)
    u = model(x, **conditioning(fam, g, variant))[..., 0]
    return rel_l2(u, fam.exact(x, g)), u


@torch.no_grad()
def evaluate_net(net: nn.Module, fam: Family, g: Cond, cfg: dict[str, Any]) -> tuple[float, torch.Tensor]:
    x = grid(cfg["grid"])[None]
    u = net(x[0])[:, 0][None]
    return float(rel_l2(u, fam.exact(x, g))[0]), u[0]


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------

#: Members whose fields are kept for the error maps (indices into the held-out set).
MAP_MEMBERS = (0, 1)


def run_hyper(family: str, variant: str, seed: int, cfg: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    fam = FAMILIES[family]
    torch.manual_seed(seed)
    model = build(fam, variant, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = cosine(opt, cfg["steps"])
    gen = torch.Generator().manual_seed(seed)
    g_test = test_members(fam, cfg)
    losses, curve = [], []
    t0 = time.perf_counter()
    checkpoints = _checkpoints(cfg["steps"])
    for step in range(1, cfg["steps"] + 1):
        loss = hyper_loss(model, fam, cfg, gen, variant)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step in checkpoints:
            err, _ = evaluate_hyper(model, fam, g_test, cfg, variant)
            curve.append([step, float(err.mean())])
            recent = losses[-50:]
            log(f"  [{family} {variant} s{seed}] step {step}: loss {sum(recent) / len(recent):.3g}, test rel. L2 {float(err.mean()):.4f}")
    train_s = time.perf_counter() - t0
    err, u = evaluate_hyper(model, fam, g_test, cfg, variant)
    t1 = time.perf_counter()
    evaluate_hyper(model, fam, g_test, cfg, variant)
    solve_s = (time.perf_counter() - t1) / cfg["test_members"]
    return {
        "rel_l2": err.tolist(),
        "mean_rel_l2": float(err.mean()),
        "loss_curve": losses[:: max(1, len(losses) // 200)],
        "err_curve": curve,
        "train_s": train_s,
        "solve_s_per_member": solve_s,
        "maps": {str(i): u[i].tolist() for i in MAP_MEMBERS},
    }


def _checkpoints(steps: int) -> set[int]:
    out, s = {steps}, 25
    while s < steps:
        out.add(s)
        s *= 2
    return out


def run_pinn(family: str, idx: int, steps: int, points: int, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """A PINN for held-out member ``idx`` alone."""
    fam = FAMILIES[family]
    g = member(test_members(fam, cfg), idx)
    torch.manual_seed(seed)
    net = pinn(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    sched = cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    checkpoints = _checkpoints(steps)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = pinn_loss(net, fam, g, cfg, gen, points)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step in checkpoints:
            curve.append([step, evaluate_net(net, fam, g, cfg)[0]])
    train_s = time.perf_counter() - t0
    err, u = evaluate_net(net, fam, g, cfg)
    return {"rel_l2": err, "err_curve": curve, "train_s": train_s, "map": u.tolist() if idx in MAP_MEMBERS else None}


def run_key(row: dict[str, Any]) -> str:
    """A stable key of a run's identity (family, kind, variant or member, seed, config) for resuming."""
    return hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]


def run_all(
    size: str,
    out: Path,
    *,
    seeds: int | None = None,
    steps: int | None = None,
    families: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ResultStore:
    """Every hypernetwork and baseline run not in ``out/results.jsonl`` yet (resumable)."""
    cfg = {**DEFAULTS, **SIZES[size], **(overrides or {})}
    if steps:
        cfg["steps"] = steps
    seeds = seeds or cfg["seeds"]
    cfg.pop("seeds")
    unknown = [f for f in families or [] if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    store = ResultStore(out / "results.jsonl")
    jobs: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []
    for family in families or list(FAMILIES):
        for seed in range(seeds):
            for variant in (*VARIANTS, DATA_VARIANT) if family in DATA_FAMILIES else VARIANTS:
                row = {"task": "pinn", "family": family, "kind": "hyper", "variant": variant, "seed": seed, "config": cfg}
                jobs.append((row, lambda f=family, v=variant, s=seed: run_hyper(f, v, s, cfg)))
            for idx in range(cfg["baseline_members"]):
                row = {"task": "pinn", "family": family, "kind": "pinn-budget", "member": idx, "seed": seed, "config": cfg}
                jobs.append((row, lambda f=family, i=idx, s=seed: run_pinn(f, i, cfg["steps"], cfg["points"], s, cfg)))
        for idx in range(cfg["baseline_members"]):  # the ceiling: one seed per member (it is the slowest run)
            row = {"task": "pinn", "family": family, "kind": "pinn-converged", "member": idx, "seed": 0, "config": cfg}
            jobs.append((row, lambda f=family, i=idx: run_pinn(f, i, cfg["converged_steps"], cfg["converged_points"], 0, cfg)))
    todo = [(run_key(r), r, fn) for r, fn in jobs]
    pending = [t for t in todo if not store.done(t[0])]
    print(f"[pinn] {len(todo) - len(pending)} of {len(todo)} runs already in {store.path}; {len(pending)} to go", flush=True)
    for i, (key, row, fn) in enumerate(pending, 1):
        t0 = time.perf_counter()
        res = fn()
        store.add({**row, "key": key, **res})
        what = f"{row['kind']} {row.get('variant', '')}{row.get('member', '')}"
        err = res.get("mean_rel_l2", res.get("rel_l2"))
        label = f"[pinn {i}/{len(pending)}] {row['family']} {what} seed={row['seed']}"
        print(f"{label}: rel. L2 {err:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return store
