"""Plots and a Markdown report from the result rows (results.jsonl).

A result row is a dict with the keys ``task``, ``study`` ("main", "baseline", "lr", "ablation"), ``axis``,
``level``, ``variant``, ``seed``, ``config`` (with ``lr``), ``metrics`` (a dict), ``curve`` (training loss per
step), ``grad_norms``, ``data`` (the data set's name) and optionally ``trace`` (a list of
``{"step", "delta_ratio", "output_variation", "grad_norm_by_gamma", "grad_norm_by_gamma_x"}``).

Statistics: medians with the interquartile range over seeds; differences from the default formulation as the
mean of the per-seed (paired) differences with a percentile bootstrap CI; speed-ups with the seeds that never
reach the target kept in as censored (ranked below every seed that reached it).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import curve_window, smooth, steps_to_reach

#: The metric each task is judged by (higher is better for all three).
HEADLINE: dict[str, tuple[str, str, bool]] = {
    "classify": ("test_acc", "test accuracy", True),
    "register": ("dice_best", "Dice at the best lambda", True),
    "segment": ("dice", "Dice (mean over phi)", True),
}
TASK_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    # (metric key, column title, higher is better); the first entry is the headline metric
    "classify": [
        HEADLINE["classify"],
        ("test_acc_std_gamma", "acc. spread over gamma", False),
        ("final_train_loss", "final train loss", False),
    ],
    "register": [
        HEADLINE["register"],
        ("dice", "Dice (mean over lambda)", True),
        ("folding_pct", "% folding voxels", False),
        ("final_train_loss", "final train loss", False),
    ],
    "segment": [
        HEADLINE["segment"],
        ("dice_spread", "Dice spread over phi", False),
        ("final_train_loss", "final train loss", False),
    ],
}
#: The paper's 2x2 after the plain network (the reference without a hypernetwork); other variants follow, sorted.
VARIANT_ORDER = ["plain", "default", "encoding-only", "additive-only", "mip"]
MAIN_STUDIES = ("main", "baseline")
BAND = "band = min..max"


def variant_order(variants: Any) -> list[str]:
    """The variants in report order: plain, default, encoding-only, additive-only, mip, then the others sorted."""
    vs = set(variants)
    return [v for v in VARIANT_ORDER if v in vs] + sorted(vs - set(VARIANT_ORDER))


def _finite(values: Any) -> list[float]:
    out = []
    for v in values:
        if v is None or isinstance(v, (list, dict, str)):
            continue
        v = float(v)
        if not math.isnan(v):
            out.append(v)
    return out


def _fmt(med: float, lo: float, hi: float) -> str:
    if math.isnan(med):
        return "n/a"
    return f"{med:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_lr(lr: float) -> str:
    """0.0003 -> '3e-4', 0.00025 -> '2.5e-4'."""
    mant, exp = f"{lr:.6e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


# ---------------------------------------------------------------------------------------------- statistics


def paired_bootstrap(
    a: dict[int, float], b: dict[int, float], *, n: int = 10000, seed: int = 0, ci: float = 0.95
) -> tuple[float, float, float, int]:
    """Mean of the paired differences ``a[s] - b[s]`` with a percentile bootstrap CI.

    Only seeds present in both (a seed is a pair: same data order, same initialisation stream) count; a pair
    whose value is None or not finite on either side is dropped. The CI comes from ``n`` resamples of the
    pairs with replacement (``numpy.random.default_rng(seed)``, so the report is reproducible). Returns
    ``(mean_diff, lo, hi, n_pairs)``; with fewer than 2 pairs the interval is ``(nan, nan)`` and the mean
    is the one difference (or nan without any).
    """
    diffs = []
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
            continue
        diffs.append(float(x) - float(y))
    d = np.asarray(diffs, dtype=float)
    k = d.size
    if k < 2:
        return (float(d[0]) if k else math.nan, math.nan, math.nan, k)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, k, size=(n, k))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    mean = float(d.mean())
    # rounding in the resampled means must not put the point estimate outside a degenerate interval
    return mean, float(min(lo, mean)), float(max(hi, mean)), k


def auc_loss(curve: list[float]) -> float:
    """Mean of the moving-average training loss over the run (area under the loss curve / steps).

    No threshold is needed, unlike the speed-up. A run that diverged (a non-finite loss) gives inf.
    """
    if not curve:
        return math.nan
    return float(np.mean(smooth(curve, curve_window(len(curve)))))


def metric(row: dict[str, Any], key: str) -> float:
    """A scalar metric of a row; ``auc_loss`` is computed from the curve; nan where missing."""
    if key == "auc_loss":
        return auc_loss(row.get("curve") or [])
    v = row.get("metrics", {}).get(key)
    if v is None or isinstance(v, (list, dict, str)):
        return math.nan
    return float(v)


def _by_seed(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(r["seed"]): metric(r, key) for r in rows}


@dataclass
class SpeedUp:
    """Per-seed speed-ups of one variant; ``None`` = censored (never reached the target, so below 1x)."""

    ratios: list[float | None] = field(default_factory=list)
    capped: list[bool] = field(default_factory=list)  # reached at the first full window: a lower bound

    @property
    def n(self) -> int:
        return len(self.ratios)

    @property
    def reached(self) -> int:
        return sum(r is not None for r in self.ratios)

    def _ranked(self) -> list[tuple[float, bool, bool]]:
        """(value, censored, capped) sorted ascending, censored seeds first (they rank below every reached one)."""
        items = [(-math.inf, True, False) if r is None else (r, False, c) for r, c in zip(self.ratios, self.capped)]
        return sorted(items, key=lambda t: t[0])

    def quantile(self, q: float) -> tuple[float, str]:
        """The q-quantile over all seeds (linear interpolation on ranks) and its kind.

        Kind "": a value; "≥": a lower bound (a seed that reached at the first window contributes); "<": an
        upper bound (a censored seed contributes: its ratio is somewhere below 1); "?": both (undetermined).
        """
        ranked = self._ranked()
        if not ranked:
            return math.nan, ""
        pos = q * (len(ranked) - 1)
        i, j = math.floor(pos), math.ceil(pos)
        f = pos - i
        parts = [(ranked[i], 1.0 - f)] + ([(ranked[j], f)] if j != i and f > 0 else [])
        parts = [(t, w) for t, w in parts if w > 0]
        censored = any(t[1] for t, _ in parts)
        capped = any(t[2] for t, _ in parts)
        # a censored ratio is < 1: the interpolated value is below the one with 1 in its place
        value = sum((1.0 if t[1] else t[0]) * w for t, w in parts)
        if censored and capped:
            return value, "?"
        return value, "<" if censored else "≥" if capped else ""

    def text(self, q: float = 0.5) -> str:
        v, kind = self.quantile(q)
        if math.isnan(v):
            return "n/a"
        if kind == "?":
            return "n/a (censored and capped)"
        return f"{kind}{v:.2f}" if kind != "<" else f"<{v:.2f}"

    def cell(self) -> str:
        """'1.52x [1.20, 2.10] (3/3 reached)' or '<1x [<1.00, 1.30] (1/3 reached)'."""
        if self.n == 0:
            return "n/a"
        med = self.text(0.5)
        med = "<1x" if med == "<1.00" else f"{med}x"
        return f"{med} [{self.text(0.25)}, {self.text(0.75)}] ({self.reached}/{self.n} reached)"


def speed_target(ref_rows: list[dict[str, Any]]) -> float:
    """The reference's median final moving-average training loss (window 10% of the run)."""
    finals = [smooth(r["curve"], curve_window(len(r["curve"])))[-1] for r in ref_rows if r.get("curve")]
    return float(np.median(finals)) if finals else math.nan


def speedups(groups: dict[str, list[dict[str, Any]]], ref: str = "default") -> dict[str, SpeedUp]:
    """Per variant, per seed: total steps / steps to reach the reference's median final (smoothed) loss.

    A seed that never reaches the target is kept as censored (``None``, ranked below every seed that did);
    nothing is dropped. Empty without the reference variant.
    """
    if ref not in groups:
        return {}
    target = speed_target(groups[ref])
    if math.isnan(target):
        return {}
    out = {}
    for v, rs in groups.items():
        sp = SpeedUp()
        for r in rs:
            if not r.get("curve"):
                continue
            # a diverged run's curve stops early: the run's length is its configured number of steps
            n = max(len(r["curve"]), int((r.get("config") or {}).get("steps") or 0))
            s = steps_to_reach(r["curve"], target, curve_window(n))
            sp.ratios.append(n / s if s else None)
            sp.capped.append(s is not None and s == curve_window(n))
        out[v] = sp
    return out


# ---------------------------------------------------------------------------------------------- row selection


def group(rows: list[dict[str, Any]], task: str, study: str = "main") -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["task"] == task and r.get("study", "main") == study:
            out[r["variant"]].append(r)
    return out


def _lr(row: dict[str, Any]) -> float | None:
    lr = (row.get("config") or {}).get("lr")
    if lr is None and row.get("study") == "lr":
        try:
            lr = float(row["level"])
        except (KeyError, TypeError, ValueError):
            return None
    return None if lr is None else float(lr)


def main_lr(rows: list[dict[str, Any]], task: str) -> float | None:
    """The learning rate of the task's main configuration: the most common one among its "main" rows
    (or its "baseline" rows when there are no "main" rows)."""
    for study in MAIN_STUDIES:
        lrs = Counter(_lr(r) for r in rows if r["task"] == task and r.get("study", "main") == study)
        if lrs:
            return lrs.most_common(1)[0][0]
    return None


def main_groups(rows: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of study "main" and "baseline" at the main configuration's learning rate, by variant, one row
    per (variant, seed) (the first); sweep and ablation rows never enter."""
    lr = main_lr(rows, task)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for r in rows:
        if r["task"] != task or r.get("study", "main") not in MAIN_STUDIES or _lr(r) != lr:
            continue
        if (r["variant"], r["seed"]) in seen:
            continue
        seen.add((r["variant"], r["seed"]))
        out[r["variant"]].append(r)
    return {v: out[v] for v in variant_order(out)}


def lr_cells(rows: list[dict[str, Any]], task: str) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """(variant, learning rate) -> rows, from the task's "main" and "lr" rows (one per seed)."""
    out: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for r in rows:
        if r["task"] != task or r.get("study", "main") not in ("main", "lr"):
            continue
        lr = _lr(r)
        if lr is None or (r["variant"], lr, r["seed"]) in seen:
            continue
        seen.add((r["variant"], lr, r["seed"]))
        out[(r["variant"], lr)].append(r)
    return out


def data_names(rows: list[dict[str, Any]], task: str) -> list[str]:
    names: list[str] = []
    for r in rows:
        if r["task"] == task and r.get("data") and str(r["data"]) not in names:
            names.append(str(r["data"]))
    return names


# ---------------------------------------------------------------------------------------------- tables


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile that keeps infinities (a diverged run's loss AUC) without NaNs."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    i, j = math.floor(pos), math.ceil(pos)
    a, b = v[i], v[j]
    if i == j or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return a if math.isinf(a) else b
    return a + (b - a) * (pos - i)


def _median_cell(values: list[float], n_total: int) -> str:
    """'median [25th, 75th percentile]' over the values that are not NaN, '(n=k)' when some are missing."""
    vals = _finite(values)
    cell = _fmt(*(_quantile(vals, q) for q in (0.5, 0.25, 0.75))) if vals else "n/a"
    if vals and len(vals) < n_total:
        cell += f" (n={len(vals)})"
    return cell


def _delta_cell(rs: list[dict[str, Any]], ref: list[dict[str, Any]], key: str) -> str:
    d, lo, hi, k = paired_bootstrap(_by_seed(rs, key), _by_seed(ref, key))
    if k == 0:
        return "n/a (no paired seeds)"
    if k < 2:
        return f"{_signed(d)} (n=1, no CI)"
    return f"{_signed(d)} [{_signed(lo)}, {_signed(hi)}] (n={k})"


def main_table(rows: list[dict[str, Any]], task: str) -> str:
    groups = main_groups(rows, task)
    if not groups:
        return ""
    head_key, head_title, _ = TASK_METRICS[task][0]
    others = TASK_METRICS[task][1:]
    sp = speedups(groups)
    ref = groups.get("default", [])
    cols = [
        "variant",
        "seeds",
        head_title,
        f"Δ {head_title} vs default, mean [95 % bootstrap CI] (paired by seed)",
        *(t for _, t, _ in others),
        "loss AUC (mean moving-average train loss)",
        "Δ loss AUC vs default, mean [95 % bootstrap CI] (paired by seed)",
        "speed-up vs default, median [IQR] over all seeds",
        "diverged",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v, rs in groups.items():
        n = len(rs)
        is_ref = v == "default"
        cells = [
            v,
            str(n),
            _median_cell([metric(r, head_key) for r in rs], n),
            "" if is_ref or not ref else _delta_cell(rs, ref, head_key),
            *(_median_cell([metric(r, k) for r in rs], n) for k, _, _ in others),
            _median_cell([metric(r, "auc_loss") for r in rs], n),
            "" if is_ref or not ref else _delta_cell(rs, ref, "auc_loss"),
            sp[v].cell() if v in sp else "n/a",
            f"{sum(r['metrics'].get('diverged_at') is not None for r in rs)}/{n}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ranked_median(rs: list[dict[str, Any]], key: str, higher: bool) -> float:
    """Median over all seeds where a diverged run (or one without the metric) ranks worst."""
    worst = -math.inf if higher else math.inf
    vals = [metric(r, key) for r in rs]
    vals = [worst if math.isnan(v) else v for v in vals]
    return float(np.median(vals)) if vals else math.nan


def lr_table(rows: list[dict[str, Any]], task: str) -> str:
    """Variant x learning rate: the headline metric's median (seeds); the best rate per variant in bold.

    Empty unless the task has rows of study "lr".
    """
    if not any(r["task"] == task and r.get("study") == "lr" for r in rows):
        return ""
    key, _, higher = HEADLINE[task]
    cells = lr_cells(rows, task)
    lrs = sorted({lr for _, lr in cells})
    variants = variant_order(v for v, _ in cells)
    lines = [
        "| variant | " + " | ".join(f"lr {_fmt_lr(lr)}" for lr in lrs) + " | best lr |",
        "|" + "---|" * (len(lrs) + 2),
    ]
    for v in variants:
        meds = {lr: _ranked_median(cells[(v, lr)], key, higher) for lr in lrs if (v, lr) in cells}
        finite = {lr: m for lr, m in meds.items() if math.isfinite(m)}
        best = (max if higher else min)(finite, key=finite.__getitem__) if finite else None
        row = []
        for lr in lrs:
            if lr not in meds:
                row.append("")
                continue
            rs = cells[(v, lr)]
            div = sum(r["metrics"].get("diverged_at") is not None for r in rs)
            m = meds[lr]
            txt = f"{m:.3f}" if math.isfinite(m) else "diverged"
            txt += f" ({len(rs)}" + (f", {div} div." if div else "") + ")"
            row.append(f"**{txt}**" if lr == best else txt)
        lines.append(f"| {v} | " + " | ".join(row) + f" | {_fmt_lr(best) if best is not None else 'n/a'} |")
    return "\n".join(lines)


def _last_trace(r: dict[str, Any]) -> dict[str, Any] | None:
    tr = r.get("trace") or []
    return tr[-1] if tr else None


def _spread(gn: Any) -> float:
    """max/min of the grad norms over the gamma bins (nan when undefined)."""
    vals = _finite(gn or [])
    if not vals or min(vals) <= 0:
        return math.nan
    return max(vals) / min(vals)


TRACE_KEYS: list[tuple[str, str]] = [
    ("delta_ratio", "‖Δ‖/‖θ0‖"),
    ("output_variation", "output variation across gamma"),
    ("grad_spread", "grad norm max/min over gamma bins"),
]


def _trace_value(entry: dict[str, Any], key: str) -> float:
    if key == "grad_spread":
        return _spread(entry.get("grad_norm_by_gamma"))
    v = entry.get(key)
    return math.nan if v is None else float(v)


def trace_table(rows: list[dict[str, Any]], task: str) -> str:
    """Per variant, at each run's last trace step: medians over seeds of the trace quantities."""
    groups = {v: [r for r in rs if _last_trace(r)] for v, rs in main_groups(rows, task).items()}
    groups = {v: rs for v, rs in groups.items() if rs}
    if not groups:
        return ""
    lines = [
        "| variant | seeds | step | " + " | ".join(t for _, t in TRACE_KEYS) + " |",
        "|" + "---|" * (len(TRACE_KEYS) + 3),
    ]
    for v, rs in groups.items():
        last = [_last_trace(r) for r in rs]
        steps = sorted({int(e["step"]) for e in last if e is not None})
        cells = []
        for k, _ in TRACE_KEYS:
            # the plain network does not depend on gamma: its output variation is not a hypernetwork's
            vals = [] if k == "output_variation" and v == "plain" else _finite(_trace_value(e, k) for e in last if e is not None)
            cells.append(f"{float(np.median(vals)):.3g}" if vals else "n/a")
        step = str(steps[0]) if len(steps) == 1 else f"{steps[0]}..{steps[-1]}" if steps else "n/a"
        lines.append(f"| {v} | {len(rs)} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(rows: list[dict[str, Any]]) -> str:
    abl = [r for r in rows if r.get("study") == "ablation"]
    if not abl:
        return ""
    by: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in abl:
        by[(r["axis"], str(r["level"]))][r["variant"]].append(r)
    lines = [
        "| axis | setting | default acc | MIP acc | Δ acc (MIP - default) [95 % CI] | default final loss | MIP final loss | "
        "MIP speed-up | diverged (default/MIP) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (axis, level), g in by.items():

        def cell(v: str, k: str, g: dict[str, list[dict[str, Any]]] = g) -> str:
            vals = _finite(metric(r, k) for r in g.get(v, []))
            return "n/a" if not vals else f"{float(np.median(vals)):.3f}"

        sp = speedups(g).get("mip")
        div = "/".join(str(sum(r["metrics"].get("diverged_at") is not None for r in g.get(v, []))) for v in ("default", "mip"))
        spd = "n/a" if sp is None or sp.n == 0 else sp.cell().split(" [")[0] + f" ({sp.reached}/{sp.n})"
        delta = _delta_cell(g.get("mip", []), g.get("default", []), "test_acc") if "default" in g and "mip" in g else "n/a"
        lines.append(
            f"| {axis} | {level} | {cell('default', 'test_acc')} | {cell('mip', 'test_acc')} | {delta} | "
            f"{cell('default', 'final_train_loss')} | {cell('mip', 'final_train_loss')} | {spd} | {div} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    """matplotlib's pyplot with the file-only Agg backend (imported lazily: only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, ax: Any, path: Path, *, log: bool = False, legend_size: int = 7) -> bool:
    """Legend, optional log y-axis, tight layout, write the PNG, free the figure."""
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _band_title(counts: list[int]) -> str:
    """'median over 3 seeds; band = min..max' (or a range of seed counts, each in the legend)."""
    counts = sorted(set(counts))
    if not counts:
        return BAND
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"median over {n} seeds; {BAND}"


def plot_curves(rows: list[dict[str, Any]], task: str, path: Path, key: str = "curve", ylabel: str = "train loss") -> bool:
    groups = {v: [r for r in rs if r.get(key)] for v, rs in main_groups(rows, task).items()}
    groups = {v: rs for v, rs in groups.items() if rs}
    if not groups:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v, rs in groups.items():
        curves = [smooth(r[key], curve_window(len(r[key]))) for r in rs]
        n = min(len(c) for c in curves)
        a = np.array([c[:n] for c in curves], dtype=float)
        a[~np.isfinite(a)] = np.nan
        x = np.arange(1, n + 1)
        with warnings.catch_warnings():  # steps where every seed has diverged are all-NaN: left blank
            warnings.simplefilter("ignore", RuntimeWarning)
            med, lo, hi = np.nanmedian(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)
        ax.plot(x, med, label=f"{v} (n={len(curves)})")
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel + " (moving average)")
    ax.set_title(f"{task}: {_band_title([len(rs) for rs in groups.values()])}", fontsize=9)
    return _save(plt, fig, ax, path, log=key == "grad_norms")


def plot_metric_vs_gamma(rows: list[dict[str, Any]], task: str, path: Path, key: str, xlabel: str, ylabel: str) -> bool:
    have = {v: [r for r in rs if r["metrics"].get(key)] for v, rs in main_groups(rows, task).items()}
    have = {v: rs for v, rs in have.items() if rs}
    if not have:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v, rs in have.items():
        width = min(len(r["metrics"][key]) for r in rs)
        a = np.array([r["metrics"][key][:width] for r in rs], dtype=float)
        xs = list(rs[0]["metrics"].get(key + "_x", range(a.shape[1])))[:width]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med, lo, hi = np.nanmedian(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)
        ax.plot(xs, med, marker="o", label=f"{v} (n={len(rs)})")
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{task}: {ylabel} vs {xlabel.split(' ')[0]}\n{_band_title([len(rs) for rs in have.values()])}", fontsize=9)
    return _save(plt, fig, ax, path, log="grad" in key)


def plot_lr(rows: list[dict[str, Any]], task: str, path: Path) -> bool:
    """The headline metric vs learning rate (log x), one line per variant: median, band = min..max over seeds."""
    if not any(r["task"] == task and r.get("study") == "lr" for r in rows):
        return False
    key, title, _ = HEADLINE[task]
    cells = lr_cells(rows, task)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    counts = []
    for v in variant_order(v for v, _ in cells):
        pts = []
        for lr in sorted(lr for w, lr in cells if w == v):
            vals = _finite(metric(r, key) for r in cells[(v, lr)])
            counts.append(len(cells[(v, lr)]))
            if vals:
                pts.append((lr, float(np.median(vals)), min(vals), max(vals)))
        if not pts:
            continue
        x, med, lo, hi = (np.array(c) for c in zip(*pts))
        ax.plot(x, med, marker="o", label=v)
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(title)
    ax.set_title(f"{task}: {title} vs learning rate\n{_band_title(counts)} (diverged runs left out)", fontsize=9)
    return _save(plt, fig, ax, path)


def plot_trace(rows: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Training traces: ‖Δ‖/‖θ0‖, output variation across gamma and the grad-norm spread over gamma bins vs step.

    Median over seeds with a min..max band, one line per variant; rows without a trace are skipped; False
    (and no file) when no row has one.
    """
    groups = {v: [r for r in rs if r.get("trace")] for v, rs in main_groups(rows, task).items()}
    groups = {v: rs for v, rs in groups.items() if rs}
    if not groups:
        return False
    # the main study's variants only (the baselines are in the trace table): 8 bands would hide each other;
    # one colour per variant in every panel
    main = {v: rs for v, rs in groups.items() if v in VARIANT_ORDER} or groups
    colours = {v: f"C{i}" for i, v in enumerate(variant_order(list(groups)))}
    groups = main
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (k, label) in zip(axes, TRACE_KEYS):
        drawn = False
        for v, rs in groups.items():
            if k == "output_variation" and v == "plain":
                continue
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                for e in r["trace"]:
                    val = _trace_value(e, k)
                    if math.isfinite(val):
                        by_step[int(e["step"])].append(val)
            if not by_step:
                continue  # e.g. delta_ratio of a variant without theta0
            steps = sorted(by_step)
            ax.plot(steps, [np.median(by_step[s]) for s in steps], label=f"{v} (n={len(rs)})", color=colours[v])
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.2, color=colours[v])
            drawn = True
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        if drawn:
            if k != "output_variation":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{task}: training traces; {_band_title([len(rs) for rs in groups.values()])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ablation(rows: list[dict[str, Any]], path: Path) -> bool:
    abl = [r for r in rows if r.get("study") == "ablation"]
    if not abl:
        return False
    plt = _pyplot()
    keys = sorted({(r["axis"], str(r["level"])) for r in abl})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(keys)), 4))
    width = 0.4
    for j, v in enumerate(["default", "mip"]):
        meds = []
        for axis, level in keys:
            vals = _finite(
                r["metrics"].get("final_train_loss") for r in abl if r["axis"] == axis and str(r["level"]) == level and r["variant"] == v
            )
            meds.append(float(np.median(vals)) if vals else math.nan)
        ax.bar(np.arange(len(keys)) + (j - 0.5) * width, meds, width, label=v)
    ax.set_xticks(np.arange(len(keys)), [f"{a}={lv}" for a, lv in keys], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("final train loss (median over seeds)")
    return _save(plt, fig, ax, path)


#: Per task: (metric key, file name, x label, y label) of the plots over the conditioning variable.
GAMMA_PLOTS: dict[str, list[tuple[str, str, str, str]]] = {
    "classify": [("grad_norm_by_gamma", "classify_grad_norm_by_gamma.png", "gamma = t * 1 (bin centre t)", "grad norm of hypernetwork")],
    "register": [
        ("dice_by_lambda", "register_dice_by_lambda.png", "lambda", "Dice"),
        ("folding_by_lambda", "register_folding_by_lambda.png", "lambda", "% folding voxels"),
        ("smoothness_by_lambda", "register_smoothness_by_lambda.png", "lambda", "mean squared displacement gradient"),
        ("grad_norm_by_gamma", "register_grad_norm_by_lambda.png", "lambda (bin centre)", "grad norm of hypernetwork"),
    ],
    "segment": [
        ("dice_by_phi", "segment_dice_by_phi.png", "phi", "Dice"),
        ("grad_norm_by_gamma", "segment_grad_norm_by_phi.png", "phi (bin centre)", "grad norm of hypernetwork"),
    ],
}

RULES = (
    "**How to read the table.** Rows: study `main` and `baseline` runs at the main configuration's learning rate "
    "(sweep and ablation runs never enter). Metrics: median [25th, 75th percentile] over the seeds that have the "
    "metric (a diverged run has no evaluation; `n=` says how many when fewer than all). "
    "**Δ vs default** is the mean over seeds of the per-seed difference variant - default (seed s of both share "
    "data order and initialisation stream, so the seeds are pairs; seeds without a partner or with a missing or "
    "non-finite value are left out), with a 95 % percentile bootstrap CI (10,000 resamples of the pairs, fixed "
    "generator seed 0). With few seeds the CI is coarse (3 seeds: only 10 distinct resamples; 2 seeds: it is the "
    "range of the two differences) and says little more than whether the seeds agree in sign. "
    "**Loss AUC**: the mean of the moving-average training loss (window 10 % "
    "of the run, at least 25 steps) over the whole run, the area under the loss curve per step: a speed and level "
    "comparison without a threshold (lower is better; a diverged run's AUC is infinite). "
    "**Speed-up**: total steps ÷ the first step at which a seed's moving-average loss reaches the target, the "
    "default's median final moving-average loss; only full windows count. A seed that never reaches the target "
    "is censored: its speed-up is below 1x and ranks below every seed that reached it; it is not dropped. The "
    "median and quartiles are taken over all seeds on these ranks: where one falls on (or is interpolated with) a "
    "censored seed the report prints an upper bound (`<1x`, or `<v` when interpolated with a reached seed); `≥` "
    "marks a lower bound (the seed reached the target at the first full window). `(k/n reached)` counts the seeds "
    "that reached the target."
)


def write_report(rows: list[dict[str, Any]], out: Path, *, header: str = "") -> Path:
    """Write plots and report.md into ``out``; return the report path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# hyperloom experiment report", "", header, ""]
    if any(r.get("study", "main") in MAIN_STUDIES for r in rows):
        parts += [RULES, ""]
    for task in ("classify", "register", "segment"):
        table = main_table(rows, task)
        if not table:
            continue
        names = data_names(rows, task)
        lr = main_lr(rows, task)
        parts += [
            f"## Task: {task}",
            "",
            f"Data: {'; '.join(names) if names else 'not recorded'}. Main configuration learning rate: "
            f"{_fmt_lr(lr) if lr is not None else 'n/a'}. Headline metric: {HEADLINE[task][1]} (`{HEADLINE[task][0]}`).",
            "",
            table,
            "",
        ]
        if plot_curves(rows, task, out / f"{task}_curves.png"):
            parts += [f"![{task} training curves]({task}_curves.png)", ""]
        if plot_curves(rows, task, out / f"{task}_gradnorm.png", key="grad_norms", ylabel="grad norm"):
            parts += [f"![{task} gradient norms]({task}_gradnorm.png)", ""]
        for key, name, xl, yl in GAMMA_PLOTS[task]:
            if plot_metric_vs_gamma(rows, task, out / name, key, xl, yl):
                parts += [f"![{task} {key}]({name})", ""]
        lrt = lr_table(rows, task)
        if lrt:
            parts += [
                f"### Learning-rate sweep ({task})",
                "",
                f"{HEADLINE[task][1]}: median over seeds (number of seeds, diverged runs) per variant and learning rate, "
                "from the `lr` sweep and the `main` runs; a diverged run ranks worst in the median. Bold: each "
                "variant's best rate.",
                "",
                lrt,
                "",
            ]
            if plot_lr(rows, task, out / f"{task}_lr.png"):
                parts += [f"![{task} learning-rate sweep]({task}_lr.png)", ""]
        trt = trace_table(rows, task)
        if trt and plot_trace(rows, task, out / f"{task}_trace.png"):
            parts += [
                f"### Training traces ({task})",
                "",
                "At each run's last trace step, median over seeds: ‖Δ‖/‖θ0‖ (averaged over gamma; additive variants "
                "only), the relative variation of the model output across gamma on a fixed probe batch, and max/min "
                "of the loss's gradient norm over the gamma bins.",
                "",
                trt,
                "",
                f"![{task} training traces]({task}_trace.png)",
                "",
            ]
    abl = ablation_table(rows)
    if abl:
        parts += [
            "## Ablations (task: classify)",
            "",
            "Median over seeds. Δ acc: mean of the per-seed differences MIP - default with a 95 % percentile "
            "bootstrap CI (paired by seed; with 2 seeds it is the range of the two differences). "
            "MIP speed-up: steps for MIP's moving-average loss to reach the default's "
            "median final loss under the same setting, median over all seeds with the seeds that never reach it "
            "ranked lowest (`<1x`: the median seed never reached it; ≥: reached within the first window, a lower bound).",
            "",
            abl,
            "",
        ]
        if plot_ablation(rows, out / "ablations.png"):
            parts += ["![ablations](ablations.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
