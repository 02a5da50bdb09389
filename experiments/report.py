"""Plots and a Markdown report from the result rows (results.jsonl)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .common import curve_window, median_iqr, smooth, steps_to_reach

TASK_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    # (metric key, column title, higher is better)
    "classify": [
        ("test_acc", "test accuracy", True),
        ("test_acc_std_gamma", "acc. spread over gamma", False),
        ("final_train_loss", "final train loss", False),
    ],
    "register": [
        ("dice", "Dice (mean over lambda)", True),
        ("folding_pct", "% folding voxels", False),
        ("final_train_loss", "final train loss", False),
    ],
    "segment": [
        ("dice", "Dice (mean over phi)", True),
        ("dice_spread", "Dice spread over phi", False),
        ("final_train_loss", "final train loss", False),
    ],
}
VARIANT_ORDER = ["default", "encoding-only", "additive-only", "mip"]


def _fmt(med: float, lo: float, hi: float) -> str:
    if math.isnan(med):
        return "n/a"
    return f"{med:.3f} [{lo:.3f}, {hi:.3f}]"


def group(rows: list[dict[str, Any]], task: str, study: str = "main") -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["task"] == task and r.get("study", "main") == study:
            out[r["variant"]].append(r)
    return out


def speedups(groups: dict[str, list[dict[str, Any]]], ref: str = "default") -> dict[str, tuple[float, ...]]:
    """Per variant: total steps / steps to reach the reference's median final (smoothed) loss."""
    if ref not in groups:
        return {}
    finals = [smooth(r["curve"], curve_window(len(r["curve"])))[-1] for r in groups[ref]]
    target = float(np.median(finals))
    out = {}
    for v, rs in groups.items():
        vals = []
        capped = False
        for r in rs:
            s = steps_to_reach(r["curve"], target)
            vals.append(len(r["curve"]) / s if s else math.nan)
            capped |= s is not None and s == curve_window(len(r["curve"]))
        reached = [x for x in vals if not math.isnan(x)]
        stats = median_iqr(reached) if reached else (math.nan, math.nan, math.nan)
        out[v] = (*stats, len(reached), len(vals), capped)
    return out


def _speed(s: tuple[float, ...]) -> str:
    """'2.21x', or '>=8.00x' when a run reached the target at the first full window (a lower bound)."""
    return ("≥" if len(s) > 5 and s[5] else "") + f"{s[0]:.2f}x"


def main_table(rows: list[dict[str, Any]], task: str) -> str:
    groups = group(rows, task)
    if not groups:
        return ""
    metrics = TASK_METRICS[task]
    sp = speedups(groups)
    head = "| variant | seeds | " + " | ".join(t for _, t, _ in metrics) + " | speed-up vs default | diverged |"
    lines = [head, "|" + "---|" * (len(metrics) + 4)]
    for v in [v for v in VARIANT_ORDER if v in groups]:
        rs = groups[v]
        cells = [_fmt(*median_iqr([r["metrics"].get(k, math.nan) for r in rs])) for k, _, _ in metrics]
        s = sp.get(v, (math.nan, math.nan, math.nan, 0, len(rs)))
        spd = "never" if math.isnan(s[0]) else f"{_speed(s)} [{s[1]:.2f}, {s[2]:.2f}]"
        spd += f" ({s[3]}/{s[4]} reached)"
        div = sum(r["metrics"].get("diverged_at") is not None for r in rs)
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {spd} | {div}/{len(rs)} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict[str, Any]]) -> str:
    abl = [r for r in rows if r.get("study") == "ablation"]
    if not abl:
        return ""
    by: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in abl:
        by[(r["axis"], str(r["level"]))][r["variant"]].append(r)
    lines = [
        "| axis | setting | default acc | MIP acc | default final loss | MIP final loss | MIP speed-up | diverged (default/MIP) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (axis, level), g in by.items():

        def cell(v: str, k: str, g: dict[str, list[dict[str, Any]]] = g) -> str:
            med, _, _ = median_iqr([r["metrics"].get(k, math.nan) for r in g.get(v, [])])
            return "n/a" if math.isnan(med) else f"{med:.3f}"

        sp = speedups(g).get("mip", (math.nan, math.nan, math.nan, 0, 0))
        div = "/".join(str(sum(r["metrics"].get("diverged_at") is not None for r in g.get(v, []))) for v in ("default", "mip"))
        spd = "never" if math.isnan(sp[0]) else f"{_speed(sp)} ({sp[3]}/{sp[4]})"
        lines.append(
            f"| {axis} | {level} | {cell('default', 'test_acc')} | {cell('mip', 'test_acc')} | "
            f"{cell('default', 'final_train_loss')} | {cell('mip', 'final_train_loss')} | {spd} | {div} |"
        )
    return "\n".join(lines)


def _pyplot() -> Any:
    """matplotlib's pyplot with the file-only Agg backend (imported lazily: only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, ax: Any, path: Path, *, log: bool = False) -> bool:
    """Legend, optional log y-axis, tight layout, write the PNG, free the figure."""
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(rows: list[dict[str, Any]], task: str, path: Path, key: str = "curve", ylabel: str = "train loss") -> bool:
    plt = _pyplot()
    groups = group(rows, task)
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in [v for v in VARIANT_ORDER if v in groups]:
        curves = [smooth(r[key], curve_window(len(r[key]))) for r in groups[v]]
        n = min(len(c) for c in curves)
        a = np.array([c[:n] for c in curves], dtype=float)
        a[~np.isfinite(a)] = np.nan
        x = np.arange(1, n + 1)
        ax.plot(x, np.nanmedian(a, 0), label=f"{v} (n={len(curves)})")
        ax.fill_between(x, np.nanmin(a, 0), np.nanmax(a, 0), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel + " (moving average)")
    ax.set_title(f"{task}: median over seeds, band = min..max")
    return _save(plt, fig, ax, path, log=key == "grad_norms")


def plot_metric_vs_gamma(rows: list[dict[str, Any]], task: str, path: Path, key: str, xlabel: str, ylabel: str) -> bool:
    plt = _pyplot()
    groups = group(rows, task)
    have = {v: [r for r in rs if r["metrics"].get(key)] for v, rs in groups.items()}
    have = {v: rs for v, rs in have.items() if rs}
    if not have:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in [v for v in VARIANT_ORDER if v in have]:
        a = np.array([r["metrics"][key] for r in have[v]], dtype=float)
        xs = have[v][0]["metrics"].get(key + "_x", list(range(a.shape[1])))
        ax.plot(xs, np.median(a, 0), marker="o", label=v)
        ax.fill_between(xs, a.min(0), a.max(0), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(plt, fig, ax, path, log="grad" in key)


def plot_ablation(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = _pyplot()
    abl = [r for r in rows if r.get("study") == "ablation"]
    if not abl:
        return False
    keys = sorted({(r["axis"], str(r["level"])) for r in abl})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(keys)), 4))
    width = 0.4
    for j, v in enumerate(["default", "mip"]):
        meds = []
        for axis, level in keys:
            vals = [
                r["metrics"].get("final_train_loss", math.nan)
                for r in abl
                if r["axis"] == axis and str(r["level"]) == level and r["variant"] == v
            ]
            meds.append(median_iqr(vals)[0])
        ax.bar(np.arange(len(keys)) + (j - 0.5) * width, meds, width, label=v)
    ax.set_xticks(np.arange(len(keys)), [f"{a}={lv}" for a, lv in keys], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("final train loss (median over seeds)")
    return _save(plt, fig, ax, path)


GAMMA_PLOTS = {
    "classify": [("grad_norm_by_gamma", "gamma = t * 1 (bin centre t)", "grad norm of hypernetwork")],
    "register": [
        ("dice_by_lambda", "lambda", "Dice"),
        ("folding_by_lambda", "lambda", "% folding voxels"),
        ("grad_norm_by_gamma", "lambda (bin centre)", "grad norm of hypernetwork"),
    ],
    "segment": [("dice_by_phi", "phi", "Dice"), ("grad_norm_by_gamma", "phi (bin centre)", "grad norm of hypernetwork")],
}


def write_report(rows: list[dict[str, Any]], out: Path, *, header: str = "") -> Path:
    """Write plots and report.md into ``out``; return the report path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# hyperloom experiment report", "", header, ""]
    for task in ("classify", "register", "segment"):
        table = main_table(rows, task)
        if not table:
            continue
        parts += [
            f"## Task: {task}",
            "",
            "Median [25th, 75th percentile] over seeds. Speed-up: total steps / first step at which a variant's "
            "moving-average training loss (window 10% of the run) reaches the default formulation's median final "
            "moving-average loss (median over the seeds that reach it; how many did is in brackets).",
            "",
            table,
            "",
        ]
        if plot_curves(rows, task, out / f"{task}_curves.png"):
            parts += [f"![{task} training curves]({task}_curves.png)", ""]
        if plot_curves(rows, task, out / f"{task}_gradnorm.png", key="grad_norms", ylabel="grad norm"):
            parts += [f"![{task} gradient norms]({task}_gradnorm.png)", ""]
        for key, xl, yl in GAMMA_PLOTS[task]:
            name = f"{task}_{key}.png"
            if plot_metric_vs_gamma(rows, task, out / name, key, xl, yl):
                parts += [f"![{task} {key}]({name})", ""]
    abl = ablation_table(rows)
    if abl:
        parts += [
            "## Ablations (task: classify)",
            "",
            "Median over seeds. MIP speed-up: steps for MIP's moving-average loss to reach the default's median "
            "final loss under the same setting (≥: reached within the first window, a lower bound).",
            "",
            abl,
            "",
        ]
        if plot_ablation(rows, out / "ablations.png"):
            parts += ["![ablations](ablations.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
