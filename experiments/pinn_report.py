"""Tables and plots of ``python -m experiments pinn`` (rows of results.jsonl -> report.md + PNGs)."""

from __future__ import annotations

import inspect
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .pinn import DATA_VARIANT, FAMILIES, MAP_MEMBERS, VARIANTS, grid, test_members
from .report import _pyplot, _save

ALL_VARIANTS = (*VARIANTS, DATA_VARIANT)

#: Two-sided 95 % Student t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    m, h = ci(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {h:.{digits}f}"


def _rows(rows: list[dict[str, Any]], family: str, kind: str, variant: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("family") == family and r.get("kind") == kind and (variant is None or r.get("variant") == variant)]


def family_summary(rows: list[dict[str, Any]], family: str) -> dict[str, Any]:
    """Per-seed numbers of one family: hypernetwork errors (all held-out members, baseline members), baselines, gaps."""
    members = sorted({r["member"] for r in _rows(rows, family, "pinn-converged")})
    conv = {r["member"]: r["rel_l2"] for r in _rows(rows, family, "pinn-converged")}
    conv_curve = {r["member"]: r["err_curve"] for r in _rows(rows, family, "pinn-converged")}
    budget_by_seed: dict[int, list[float]] = {}
    for r in _rows(rows, family, "pinn-budget"):
        budget_by_seed.setdefault(r["seed"], []).append(r["rel_l2"])
    out: dict[str, Any] = {"members": members, "converged": [conv[m] for m in members], "budget": {}, "hyper": {}}
    out["budget"] = {s: statistics.fmean(v) for s, v in sorted(budget_by_seed.items()) if len(v) == len(members)}
    for v in ALL_VARIANTS:
        per_seed = {}
        for r in _rows(rows, family, "hyper", v):
            on_base = [r["rel_l2"][m] for m in members]
            # per-member PINN steps (read off the converged run's curve) that first reach the hypernetwork's error
            reach = []
            for m in members:
                hit = [s for s, e in conv_curve[m] if e <= r["rel_l2"][m]]
                reach.append(min(hit) if hit else math.inf)
            per_seed[r["seed"]] = {
                "all": r["mean_rel_l2"],
                "base": statistics.fmean(on_base) if on_base else math.nan,
                "gap_ratio": statistics.fmean(on_base) / statistics.fmean(out["converged"]) if on_base else math.nan,
                "gap_diff": statistics.fmean(on_base) - statistics.fmean(out["converged"]) if on_base else math.nan,
                "reach": reach,
                "train_s": r["train_s"],
                "solve_ms": 1000 * r["solve_s_per_member"],
                "curve": r["err_curve"],
            }
        out["hyper"][v] = dict(sorted(per_seed.items()))
    return out


def _reach_cell(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    med = statistics.median(values) if values else math.nan
    shown = f"{med:.0f}" if math.isfinite(med) else "never"
    return f"{shown} ({len(finite)}/{len(values)} reach)"


def tables(rows: list[dict[str, Any]], family: str, cfg: dict[str, Any]) -> str:
    s = family_summary(rows, family)
    nb = len(s["members"])
    steps = cfg["steps"]
    lines = [
        "| method | rel. L2, all held-out members | rel. L2, the baseline members | ÷ converged PINN (gap) | - converged PINN "
        "| train s | solve ms / member |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in ALL_VARIANTS:
        h = s["hyper"][v]
        if not h:
            continue

        def col(k: str, h: dict[int, dict[str, Any]] = h) -> list[float]:
            return [d[k] for d in h.values()]

        lines.append(
            f"| hypernetwork, {v} ({len(h)} seeds) | {fmt(col('all'))} | {fmt(col('base'))} | {fmt(col('gap_ratio'), 2)} | "
            f"{fmt(col('gap_diff'))} | {statistics.fmean(col('train_s')):.0f} | {statistics.fmean(col('solve_ms')):.2f} |"
        )
    b = list(s["budget"].values())
    conv_rows = _rows(rows, family, "pinn-converged")
    budget_rows = _rows(rows, family, "pinn-budget")
    if b:
        t = statistics.fmean(r["train_s"] for r in budget_rows)
        gap = [bb / statistics.fmean(s["converged"]) for bb in b] if s["converged"] else []
        lines.append(
            f"| PINN per member, {steps} steps ({len(b)} seeds) | - | {fmt(b)} | {fmt(gap, 2)} | - | {t:.0f} per member | {t * 1000:.0f} |"
        )
    if s["converged"]:
        t = statistics.fmean(r["train_s"] for r in conv_rows)
        lines.append(
            f"| PINN per member, converged: {cfg['converged_steps']} steps x {cfg['converged_points']} points (1 seed) | - | "
            f"{fmt([statistics.fmean(s['converged'])])} | 1 | 0 | {t:.0f} per member | {t * 1000:.0f} |"
        )
    out = "\n".join(lines)
    out += (
        f"\n\nRelative L2 error ‖u - u*‖ / ‖u*‖ on a {cfg['grid']}x{cfg['grid']} grid (boundary included), mean over members; "
        f"mean ± 95 % t-interval over seeds. 'All held-out members': {cfg['test_members']} gamma from a stream never used in training; "
        f"'the baseline members': the first {nb} of them, on which the per-member PINNs were trained. Gap ÷: "
        "the baseline members' mean error ÷ the converged PINN's mean error on them (1 = the ceiling). "
        "Solve time: one forward pass of the hypernetwork "
        "and the PINN per member, against training a PINN.\n"
    )
    diff = [s["hyper"]["mip"][k]["all"] - s["hyper"]["default"][k]["all"] for k in s["hyper"]["mip"] if k in s["hyper"]["default"]]
    if diff:
        out += f"\n**MIP - default**, paired by seed, all held-out members: {fmt(diff)} (negative: MIP better).\n"
    reach = {v: [x for d in s["hyper"][v].values() for x in d["reach"]] for v in ALL_VARIANTS if s["hyper"][v]}
    if reach and s["converged"]:
        cells = ", ".join(f"{v}: {_reach_cell(r)}" for v, r in reach.items())
        out += (
            f"\n**What one forward pass is worth**: per-member PINN steps at which the converged run's error first falls to "
            "the hypernetwork's on the same member (median over members x seeds; the converged run evaluated at steps 25, 50, 100, ...): "
            f"{cells}.\n"
        )
    out += "\n" + member_table(rows, family, cfg, s)
    return out


def member_table(rows: list[dict[str, Any]], family: str, cfg: dict[str, Any], s: dict[str, Any]) -> str:
    """Per baseline member: its gamma, the size of u*, and every method's error (hypernetworks: mean over seeds)."""
    if not s["members"]:
        return ""
    fam = FAMILIES[family]
    g = test_members(fam, cfg)
    x = grid(cfg["grid"])[None]
    lines = [
        "Per baseline member (hypernetworks and budget PINN: mean over seeds):",
        "",
        "| member | gamma | rms u* | hypernetwork mip | hypernetwork default | hypernetwork mip-data | PINN, budget | PINN, converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in s["members"]:
        gm = {k: v[m : m + 1] for k, v in g.items()}
        rms = float(fam.exact(x, gm).pow(2).mean().sqrt())
        desc = ", ".join(f"{k}=" + ",".join(f"{float(t):.2f}" for t in v[m].reshape(-1)) for k, v in g.items())
        hyp = {v: [r["rel_l2"][m] for r in _rows(rows, family, "hyper", v)] for v in ALL_VARIANTS}
        bud = [r["rel_l2"] for r in _rows(rows, family, "pinn-budget") if r["member"] == m]
        conv = [r["rel_l2"] for r in _rows(rows, family, "pinn-converged") if r["member"] == m]
        cells = [f"{statistics.fmean(v):.4f}" if v else "n/a" for v in (hyp["mip"], hyp["default"], hyp[DATA_VARIANT], bud, conv)]
        lines.append(f"| {m} | {desc} | {rms:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_maps(rows: list[dict[str, Any]], family: str, cfg: dict[str, Any], path: Path) -> bool:
    """Seed 0: u*, u (MIP), |u - u*| for MIP, default and the converged PINN, for the mapped members."""
    hyper = {v: next((r for r in _rows(rows, family, "hyper", v) if r["seed"] == 0), None) for v in VARIANTS}
    conv = {r["member"]: r for r in _rows(rows, family, "pinn-converged")}
    if hyper["mip"] is None:
        return False
    fam = FAMILIES[family]
    g = test_members(fam, cfg)
    x = grid(cfg["grid"])
    n = cfg["grid"]
    plt = _pyplot()
    cols = ["u*", "u, hypernetwork (MIP)", "|u - u*| MIP", "|u - u*| default", "|u - u*| PINN converged"]
    fig, axes = plt.subplots(len(MAP_MEMBERS), len(cols), figsize=(3.0 * len(cols), 2.8 * len(MAP_MEMBERS)), squeeze=False)
    for i, m in enumerate(MAP_MEMBERS):
        gm = {k: v[m : m + 1] for k, v in g.items()}
        u_star = fam.exact(x[None], gm)[0].numpy().reshape(n, n)
        fields: list[np.ndarray | None] = [u_star]
        u_mip = np.asarray(hyper["mip"]["maps"][str(m)]).reshape(n, n)
        fields.append(u_mip)
        for v in VARIANTS:
            r = hyper[v]
            fields.append(np.abs(np.asarray(r["maps"][str(m)]).reshape(n, n) - u_star) if r else None)
        c = conv.get(m)
        fields.append(np.abs(np.asarray(c["map"]).reshape(n, n) - u_star) if c and c.get("map") else None)
        lo, hi = float(u_star.min()), float(u_star.max())
        err_max = max(float(f.max()) for f in fields[2:] if f is not None)
        desc = ", ".join(f"{k}=" + np.array2string(v[m].numpy(), precision=2, separator=",") for k, v in g.items())
        for j, (ax, f) in enumerate(zip(axes[i], fields)):
            ax.set_xticks([])
            ax.set_yticks([])
            if f is None:
                ax.set_visible(False)
                continue
            kw = {"vmin": lo, "vmax": hi, "cmap": "viridis"} if j < 2 else {"vmin": 0.0, "vmax": err_max, "cmap": "magma"}
            im = ax.imshow(f, origin="lower", extent=(0, 1, 0, 1), **kw)
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(cols[j] if i == 0 else "", fontsize=9)
        axes[i][0].set_ylabel(f"member {m}\n{desc}", fontsize=7)
    fig.suptitle(f"{family}: held-out members (seed 0); error maps share one colour scale per row", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_curves(rows: list[dict[str, Any]], family: str, path: Path) -> bool:
    s = family_summary(rows, family)
    if not any(s["hyper"].values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in ALL_VARIANTS:
        curves = [d["curve"] for d in s["hyper"][v].values()]
        if not curves:
            continue
        steps = [p[0] for p in curves[0]]
        errs = np.asarray([[p[1] for p in c] for c in curves if len(c) == len(steps)])
        ax.plot(steps, errs.mean(0), marker="o", label=f"hypernetwork {v}: all held-out members (mean of {len(errs)} seeds)")
        ax.fill_between(steps, errs.min(0), errs.max(0), alpha=0.2)
    for kind, style in (("pinn-budget", "--"), ("pinn-converged", ":")):
        rs = _rows(rows, family, kind)
        if not rs:
            continue
        steps = [p[0] for p in rs[0]["err_curve"]]
        errs = np.asarray([[p[1] for p in r["err_curve"]] for r in rs if len(r["err_curve"]) == len(steps)])
        ax.plot(steps, errs.mean(0), style, marker=".", label=f"{kind}: one PINN per member (mean of {len(errs)} runs)")
    ax.set_xscale("log")
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{family}: test error during training", fontsize=10)
    return _save(plt, fig, ax, path, log=True)


def write_report(rows: list[dict[str, Any]], out: Path, *, header: str) -> Path:
    rows = [r for r in rows if r.get("task") == "pinn"]
    cfg = rows[0]["config"] if rows else {}
    parts = [
        "# Physics-informed hypernetworks: PDE families with manufactured solutions",
        "",
        header,
        f"Training time summed over all {len(rows)} runs (all invocations): {sum(r.get('train_s', 0.0) for r in rows):.0f} s.",
        "",
        "One hypernetwork per family maps gamma to the weights of a PINN (a tanh MLP, "
        f"2 → {cfg.get('width')} x {cfg.get('depth')} → 1, every Linear predicted; trunk {cfg.get('hidden')}), trained by the "
        "physics-informed loss only (residual at interior collocation points + Dirichlet boundary loss; never a solution value inside "
        f"the domain), {cfg.get('members')} members per batch, each with its own gamma, {cfg.get('points')} interior and "
        f"{cfg.get('boundary_points')} boundary points per member, {cfg.get('steps')} Adam steps (lr {cfg.get('lr')}, cosine to 10 %). "
        "Per-sample Laplacians by `hl.laplacian` (vmap over members and points). See `experiments/pinn.py` for the families. "
        "`mip-data` (Poisson only): the HyPINO-style variant, the hypernetwork reads the source f on a 16 x 16 grid through an "
        "`hl.Data` encoder (MLP 256 -> 128 -> 32, unit-norm code) instead of gamma.",
        "",
    ]
    for family in FAMILIES:
        if not any(r["family"] == family for r in rows):
            continue
        parts += [f"## {family}", "", inspect.cleandoc(FAMILIES[family].__doc__ or ""), "", tables(rows, family, cfg), ""]
        if plot_curves(rows, family, out / f"{family}_curves.png"):
            parts += [f"![test error during training]({family}_curves.png)", ""]
        if plot_maps(rows, family, cfg, out / f"{family}_maps.png"):
            parts += [f"![error maps]({family}_maps.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
