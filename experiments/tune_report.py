"""Tables and plots of ``python -m experiments tune`` (rows of results.jsonl -> report.md + PNGs)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

import hyperloom as hl

from .report import _pyplot, _save
from .tune import CLASSES, VARIANTS


def _data_line(groups: dict[str, list[dict[str, Any]]]) -> str:
    """The data set the rows name (older rows without it: the MNI152 interleaved split of their time)."""
    names = sorted({str(r.get("data", "")) for rs in groups.values() for r in rs} - {""})
    old = "MNI152 2009a slices, interleaved train / held-out blocks (rows written before the data was recorded)"
    return "; ".join(names) if names else old


def _ms(values: list[float], digits: int = 3, sci: bool = False) -> str:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return "n/a"
    f = (lambda v: f"{v:.2e}") if sci else (lambda v: f"{v:.{digits}f}")
    return f(a.mean()) if a.size == 1 else f"{f(a.mean())} ± {f(a.std(ddof=1))}"


def _by_kind(rows: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["task"] == task and "kind" in r and r.get("diverged_at") is None:
            out[r["kind"]].append(r)
    return out


def _at(rows: list[dict[str, Any]], lam: float, key: str) -> list[float]:
    return [a[key] for r in rows for a in r.get("at", []) if math.isclose(a["lam"], lam)]


def _fixed(groups: dict[str, list[dict[str, Any]]], lam: float, steps: int) -> list[dict[str, Any]]:
    return [
        r
        for k, rs in groups.items()
        if k.startswith("fixed:") and math.isclose(float(k.split(":")[1]), lam) and int(k.split(":")[2]) == steps
        for r in rs
    ]


def _budget(groups: dict[str, list[dict[str, Any]]]) -> tuple[int, int]:
    steps = sorted({int(k.split(":")[2]) for k in groups if k.startswith("fixed:")})
    return steps[-1], steps[0]


def _gap_table(groups: dict[str, list[dict[str, Any]]], lams: list[float], key: str, title: str, sci: bool, higher_better: bool) -> str:
    """Per lambda: the metric of the fixed models (S and S/5 steps), of each hypernetwork, and hyper - fixed(S) per seed."""
    s_full, s_fifth = _budget(groups)
    head = f"| {title} | fixed, {s_full} steps | fixed, {s_fifth} steps |"
    sep = "|---|---|---|"
    for v in VARIANTS:
        head += f" hyper {v} | gap {v} - fixed({s_full}) | gap {v} - fixed({s_fifth}) |"
        sep += "---|---|---|"
    lines = [head, sep]
    for lam in lams:
        full, fifth = _fixed(groups, lam, s_full), _fixed(groups, lam, s_fifth)
        cells = [f"λ = {lam:g}", _ms(_at(full, lam, key), sci=sci), _ms(_at(fifth, lam, key), sci=sci)]
        for v in VARIANTS:
            hyper = groups.get(f"hyper:{v}", [])
            cells.append(_ms(_at(hyper, lam, key), sci=sci))
            for ref in (full, fifth):
                by_seed = {r["seed"]: _at([r], lam, key)[0] for r in ref}
                gaps = [_at([h], lam, key)[0] - by_seed[h["seed"]] for h in hyper if h["seed"] in by_seed]
                cells.append(_ms(gaps, sci=sci))
        lines.append("| " + " | ".join(cells) + " |")
    better = "higher" if higher_better else "lower"
    lines.append(f"\n({better} is better; a gap is hypernetwork - fixed model at the same λ, same seed; mean ± std over seeds)")
    return "\n".join(lines)


def ridge_section(rows: list[dict[str, Any]], out: Path) -> str:
    groups = _by_kind(rows, "ridge")
    if not groups:
        return ""
    ref = next(r for r in rows if r["task"] == "ridge" and r["variant"] == "exact")
    lams = sorted({a["lam"] for r in groups.get("hyper:mip", []) for a in r["at"]})
    n = len(groups.get("hyper:mip", []))
    parts = [
        "## Ridge regression (diabetes, 300 train / 71 val / 71 test), exact solution path known",
        f"Hypernetwork on λ ∈ [1e-3, 1e2] (log), {groups['hyper:mip'][0]['steps']} Adam steps; seeds: {n}.",
        "\n### Amortization gap in weight space: ‖w(λ) - w*(λ)‖ / ‖w*(λ)‖\n",
        _gap_table(groups, lams, "w_rel_err", "weights", sci=True, higher_better=False),
        "\n### Excess training objective L(w(λ)) - L(w*(λ))\n",
        _gap_table(groups, lams, "excess_objective", "objective", sci=True, higher_better=False),
        "\n### Choosing λ on validation data\n",
        f"Exact path: λ* = {ref['lam_star']:.3g}, validation MSE {ref['val_mse']:.4f}, **test MSE {ref['test_mse']:.4f}**.\n",
        "| variant | λ* by hl.sweep | test MSE at it | " + " | ".join(f"hl.tune from {s:g}: λ, test MSE" for s in _starts(groups)) + " |",
        "|---|---|---|" + "---|" * len(_starts(groups)),
    ]
    for v in VARIANTS:
        rs = groups.get(f"hyper:{v}", [])
        cells = [v, _ms([r["sweep_best"]["lam"] for r in rs], sci=True), _ms([r["sweep_best"]["test_mse"] for r in rs], 4)]
        for i in range(len(_starts(groups))):
            cells.append(f"{_ms([r['tune'][i]['lam'] for r in rs], sci=True)}, {_ms([r['tune'][i]['test_mse'] for r in rs], 4)}")
        parts.append("| " + " | ".join(cells) + " |")
    if _plot_ridge(groups, ref, lams, out / "ridge_weight_error_by_lambda.png"):
        parts.append("\n![weight error vs lambda](ridge_weight_error_by_lambda.png)")
    return "\n".join(parts)


def _starts(groups: dict[str, list[dict[str, Any]]]) -> list[float]:
    rs = groups.get("hyper:mip") or groups.get("hyper:default") or []
    return [t["start"] for t in rs[0]["tune"]] if rs else []


def _plot_ridge(groups: dict[str, list[dict[str, Any]]], ref: dict[str, Any], lams: list[float], path: Path) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    s_full, s_fifth = _budget(groups)
    lines = [(f"hyper:{v}", f"hypernetwork, {v}", "o-") for v in VARIANTS]
    for label, steps in ((f"fixed, {s_full} steps", s_full), (f"fixed, {s_fifth} steps", s_fifth)):
        ys = [np.mean(_at(_fixed(groups, lam, steps), lam, "w_rel_err")) for lam in lams]
        ax.plot(lams, ys, "s--", label=label)
    for kind, label, style in lines:
        ys = [np.mean(_at(groups.get(kind, []), lam, "w_rel_err")) for lam in lams]
        ax.plot(lams, ys, style, label=label)
    ax.axvline(ref["lam_star"], color="grey", lw=1, ls=":", label="exact λ* (validation)")
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel("‖w - w*‖ / ‖w*‖ (mean over seeds)")
    ax.set_title("ridge: distance to the exact solution")
    return _save(plt, fig, ax, path, log=True, legend_size=8)


def register_section(rows: list[dict[str, Any]], out: Path) -> str:
    groups = _by_kind(rows, "register")
    if not groups:
        return ""
    hyper = {v: groups.get(f"hyper:{v}", []) for v in VARIANTS}
    lams = sorted({a["lam"] for rs in hyper.values() for r in rs for a in r["at"]})
    n = max(len(rs) for rs in hyper.values())
    parts = [
        "## Registration (brain slices, λ ∈ [0, 1]), λ chosen on validation slices, confirmed on test slices",
        f"Hypernetwork trained {next(iter(hyper.values()))[0]['steps']} steps with `hl.sample(..., ends=0.2)`; seeds: {n}. "
        "Validation and test pairs come from alternate blocks of 4 slices of the held-out test set (not seen in training). "
        f"Data: {_data_line(groups)}",
        "\n### Amortization gap: test registration loss at λ (the training objective)\n",
        _gap_table(groups, lams, "loss", "loss", sci=False, higher_better=False),
        "\n### Amortization gap: test Dice at λ\n",
        _gap_table(groups, lams, "dice", "Dice", sci=False, higher_better=True),
        "\n### λ* by hl.sweep (validation Dice) vs hl.tune (validation soft-Dice loss), test Dice at λ*\n",
        "| variant | λ* sweep | test Dice at it | "
        + " | ".join(f"tune from {s:g}: λ, test Dice" for s in _starts(groups))
        + " | best test Dice over the sweep (oracle) |",
        "|---|---|---|" + "---|" * len(_starts(groups)) + "---|",
    ]
    for v, rs in hyper.items():
        cells = [v, _ms([r["sweep_best"]["dice"]["lam"] for r in rs], 2), _ms([r["sweep_best"]["dice"]["dice"] for r in rs])]
        for i in range(len(_starts(groups))):
            cells.append(f"{_ms([r['tune'][i]['lam'] for r in rs], 2)}, {_ms([r['tune'][i]['dice'] for r in rs])}")
        cells.append(_ms([max(t["dice"] for t in r["test_sweep"]) for r in rs]))
        parts.append("| " + " | ".join(cells) + " |")
    s_full, _ = _budget(groups)
    fixed_best = [
        max(a["dice"] for lam in lams for r in _fixed(groups, lam, s_full) if r["seed"] == seed for a in r["at"]) for seed in range(n)
    ]
    parts.append(
        f"\nBest test Dice of the fixed models ({s_full} steps) over their {len(lams)} λ values: {_ms(fixed_best)} "
        "(max over λ, mean over seeds)."
    )
    parts += ["\n### Per tissue class: λ* maximising each class's validation Dice (hl.sweep + Sweep.best per metric)\n"]
    parts += ["| variant | " + " | ".join(f"{c}: λ*, test Dice" for c in CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    for v, rs in hyper.items():
        cells = [v]
        for c in CLASSES:
            best = [r["sweep_best"][f"dice_{c}"] for r in rs]
            cells.append(f"{_ms([b['lam'] for b in best], 2)}, {_ms([b[f'dice_{c}'] for b in best])}")
        parts.append("| " + " | ".join(cells) + " |")
    if _plot_register(hyper, out / "register_dice_folding_by_lambda.png"):
        parts.append("\n![Dice and folding vs lambda](register_dice_folding_by_lambda.png)")
    mip = hyper.get("mip") or []
    if mip:
        sw = hl.Sweep(mip[0]["sweep"], ["lam"], {"lam": hl.Input(0.0, 1.0)})
        sw.plot(
            ["dice"] + [f"dice_{c}" for c in CLASSES],
            out / "register_dice_by_class_mip.png",
            mark="max",
            title="MIP, seed 0: validation Dice per class vs λ",
        )
        parts.append("\n![Dice per class vs lambda (MIP)](register_dice_by_class_mip.png)")
    return "\n".join(parts)


def _plot_register(hyper: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for v, rs in hyper.items():
        if not rs:
            continue
        x = [p["lam"] for p in rs[0]["sweep"]]
        dice = np.mean([[p["dice"] for p in r["sweep"]] for r in rs], 0)
        fold = np.mean([[p["folding_pct"] for p in r["sweep"]] for r in rs], 0)
        (line,) = a1.plot(x, dice, "o-", ms=3, label=v)
        a2.plot(x, fold, "o-", ms=3, label=v, color=line.get_color())
        star = float(np.mean([r["sweep_best"]["dice"]["lam"] for r in rs]))
        a1.axvline(star, ls="--", lw=1, color=line.get_color())
        a2.axvline(star, ls="--", lw=1, color=line.get_color())
    a1.set_ylabel("validation Dice (mean over seeds)")
    a2.set_ylabel("% folding pixels (validation)")
    for a in (a1, a2):
        a.set_xlabel("λ")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("registration: dashed = λ* maximising validation Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_tune_report(rows: list[dict[str, Any]], out: Path, *, header: str = "") -> Path:
    sections = [s for s in (ridge_section(rows, out), register_section(rows, out)) if s]
    text = "# Tune after training: hl.sweep / hl.tune and the amortization gap\n\n" + header + "\n\n" + "\n\n".join(sections) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path
