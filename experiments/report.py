"""Plots and a Markdown report from the result rows (results.jsonl).

A result row is a dict with the keys ``task``, ``study`` ("main", "baseline", "lr", "ablation"), ``axis``,
``level``, ``variant``, ``seed``, ``config`` (with ``lr``), ``metrics`` (a dict), ``curve`` (training loss per
step), ``grad_norms``, ``data`` (the data set's name) and optionally ``trace`` (a list of
``{"step", "delta_ratio", "output_variation", "grad_norm_by_gamma", "grad_norm_by_gamma_x"}``).

Statistics (:data:`RULES` is the report's own description): medians with the interquartile range over seeds;
differences from the default formulation as the mean of the per-seed (paired) differences with a Student-t
interval, the number of pairs and Holm-adjusted p-values over each table's comparisons; speed-ups against the
default paired by seed (the default against itself is 1.0), seeds that never reach the target kept in as
censored; segmentation stalls flagged by a fixed rule (:func:`stalled`) and compared with Fisher's exact test.
Rows with different settings (config and data) are reported in separate tables, never pooled.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
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

#: Fewest pairs for which an interval is printed (a t-interval needs an estimate of the spread).
MIN_PAIRS = 2


@dataclass(frozen=True)
class Delta:
    """A paired comparison: mean of the per-seed differences, its t-interval, the pairs and a two-sided p."""

    mean: float
    lo: float
    hi: float
    n: int
    p: float


def t_interval(values: Any, *, ci: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of ``values`` with a Student-t confidence interval: ``(mean, lo, hi, n)``.

    Non-finite values and ``None`` are dropped. The interval is ``mean ± t_{n-1, (1+ci)/2} · sd / √n``
    (``sd`` with ``n - 1`` in the denominator): exact coverage for normal data at any ``n ≥ 2``, and the
    right width at the 3-10 seeds of these studies, where a percentile bootstrap of the mean is too narrow
    (with 5 values it covers a 95 % target about 88 % of the time). With fewer than :data:`MIN_PAIRS`
    values the interval is ``(nan, nan)``.

    Example:
        >>> m, lo, hi, n = t_interval([1.0, 2.0, 3.0])
        >>> (m, round(lo, 3), round(hi, 3), n)
        (2.0, -0.484, 4.484, 3)
    """
    from scipy import stats

    d = np.asarray(_finite(values), dtype=float)
    k = int(d.size)
    if k < MIN_PAIRS:
        return (float(d[0]) if k else math.nan, math.nan, math.nan, k)
    mean = float(d.mean())
    half = float(stats.t.ppf(0.5 + ci / 2.0, k - 1)) * float(d.std(ddof=1)) / math.sqrt(k)
    return mean, mean - half, mean + half, k


def paired_diffs(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed ``s`` in both whose two values are finite (a seed is a pair: same data
    order, same initialisation stream); unpaired seeds and missing values are dropped."""
    out = []
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
            continue
        out.append(float(x) - float(y))
    return out


def paired_t(a: dict[int, float], b: dict[int, float], *, ci: float = 0.95) -> Delta:
    """Paired comparison of ``a`` and ``b`` by seed: mean difference, t-interval and the paired t-test's p.

    ``p`` is two-sided (H0: mean difference 0); with identical differences (no spread) it is 0 when they
    are not zero and 1 when they are; nan with fewer than :data:`MIN_PAIRS` pairs.

    Example:
        >>> d = paired_t({0: 1.0, 1: 2.0, 2: 3.5}, {0: 0.0, 1: 1.0, 2: 2.0})
        >>> (round(d.mean, 3), d.n, round(d.p, 3))
        (1.167, 3, 0.02)
    """
    from scipy import stats

    diffs = paired_diffs(a, b)
    mean, lo, hi, k = t_interval(diffs, ci=ci)
    if k < MIN_PAIRS:
        return Delta(mean, lo, hi, k, math.nan)
    if float(np.std(diffs)) == 0.0:
        p = 0.0 if mean != 0.0 else 1.0
    else:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return Delta(mean, lo, hi, k, p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    The i-th smallest of the m finite p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; nan
    entries stay nan and do not count in m.

    Example:
        >>> holm([0.01, 0.04, 0.03, float("nan")])
        [0.03, 0.06, 0.06, nan]
    """
    idx = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)), key=lambda i: pvalues[i])
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = round(running, 12)
    return out


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher's exact test of ``k1`` events out of ``n1`` against ``k2`` out of ``n2``.

    Example:
        >>> round(fisher_exact(4, 5, 1, 5), 3)
        0.206
    """
    from scipy import stats

    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)


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
    """Per-seed speed-ups of one variant against the reference; ``None`` = censored (never reached the
    target: somewhere below the reference's steps ÷ the run's length)."""

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
        upper bound (a censored seed contributes); "?": both (undetermined).
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
        # a censored ratio is below 1 (the reference needs at most the whole run): 1 is its upper bound
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
        return f"{kind}{v:.2f}"

    def geometric(self, *, ci: float = 0.95) -> tuple[float, float, float, int]:
        """Geometric mean of the ratios with a t-interval on their logarithms; nan unless every seed reached."""
        if self.n == 0 or self.reached < self.n:
            return math.nan, math.nan, math.nan, self.n
        m, lo, hi, k = t_interval([math.log(r) for r in self.ratios if r is not None], ci=ci)
        return math.exp(m), math.exp(lo) if math.isfinite(lo) else math.nan, math.exp(hi) if math.isfinite(hi) else math.nan, k

    def cell(self) -> str:
        """'1.52x [1.20, 1.93] (geo. mean, 95 % t-CI, n=5)' when every seed reached the target, otherwise the
        median over all seeds with the censored ones ranked lowest: '<1x median (1/5 reached)'."""
        if self.n == 0:
            return "n/a"
        if self.reached == self.n:
            g, lo, hi, k = self.geometric()
            capped = "≥" if any(self.capped) else ""
            if math.isfinite(lo):
                return f"{capped}{g:.2f}x [{lo:.2f}, {hi:.2f}] (geo. mean, n={k})"
            return f"{capped}{g:.2f}x (n={k}, no CI)"
        med = self.text(0.5)
        med = "<1x" if med == "<1.00" else f"{med}x"
        return f"{med} median, no CI ({self.reached}/{self.n} reached)"


def _window_target(row: dict[str, Any], key: str = "curve") -> tuple[int, int, float]:
    """(run length, moving-average window, final moving-average value) of a row's curve."""
    curve = row.get(key) or []
    # a diverged run's curve stops early: the run's length is its configured number of steps
    n = max(len(curve), int((row.get("config") or {}).get("steps") or 0))
    w = curve_window(n)
    final = smooth(curve, w)[-1] if curve else math.nan
    return n, w, final


def speedups(groups: dict[str, list[dict[str, Any]]], ref: str = "default", *, key: str = "curve") -> dict[str, SpeedUp]:
    """Speed-up of every variant against a fixed reference, paired by seed.

    For seed s, the target is the reference's final moving-average value of ``key`` (the training loss;
    window 10 % of the run, at least 25 steps); the speed-up is (steps the reference's moving average needs
    to first reach its target) ÷ (steps the variant's moving average needs to first reach the same target),
    counting full windows only. So the reference against itself is exactly 1.0, and a variant that is 1.5x
    gets to the reference's end-of-run level in two thirds of the reference's steps. A seed that never reaches
    the target is kept as censored (``None``); seeds whose reference diverged (no target) or that have no
    reference partner are left out. Empty without the reference variant.
    """
    if ref not in groups:
        return {}
    targets: dict[int, tuple[float, int]] = {}
    for r in groups[ref]:
        if not r.get(key):
            continue
        _, w, target = _window_target(r, key)
        s = steps_to_reach(r[key], target, w) if math.isfinite(target) else None
        if s is not None:
            targets[int(r["seed"])] = (target, s)
    if not targets:
        return {}
    out = {}
    for v, rs in groups.items():
        sp = SpeedUp()
        for r in rs:
            if not r.get(key) or int(r["seed"]) not in targets:
                continue
            target, ref_steps = targets[int(r["seed"])]
            _, w, _ = _window_target(r, key)
            s = steps_to_reach(r[key], target, w)
            sp.ratios.append(ref_steps / s if s else None)
            sp.capped.append(s is not None and s == w and ref_steps > w)
        out[v] = sp
    return out


def val_curve(row: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation metric) at the trace's probe steps (higher is better); empty for rows written before
    the trace recorded a validation point."""
    return [(int(t["step"]), float(t["val"])) for t in row.get("trace") or [] if t.get("val") is not None]


def val_speedups(groups: dict[str, list[dict[str, Any]]], ref: str = "default") -> dict[str, SpeedUp]:
    """Speed-up against a fixed reference on held-out data, paired by seed.

    For seed s, the target is the reference's validation metric at its last probe step (:func:`val_curve`:
    accuracy or Dice on validation data, higher is better); the speed-up is (the first probe step at which the
    reference reaches its target) ÷ (the first probe step at which the variant reaches the same target). The
    curve is measured only at the probe steps (5 or 10 per run), so a ratio's resolution is one probe
    interval; a variant already at the target at step 0 counts as reaching it at the first probe step (a lower
    bound, ``capped``). Seeds that never reach it are censored (``None``); seeds whose reference diverged (its
    trace stops before the end: no final level) are left out, as in :func:`speedups`. Empty without the
    reference or without validation curves.

    Example:
        >>> row = lambda v, vals: {"variant": v, "seed": 0, "trace": [{"step": 10 * i, "val": x} for i, x in enumerate(vals)]}
        >>> sp = val_speedups({"default": [row("default", [0.1, 0.5, 0.7, 0.8])], "mip": [row("mip", [0.1, 0.8, 0.9, 0.9])]})
        >>> sp["mip"].ratios, sp["default"].ratios
        ([3.0], [1.0])
    """
    if ref not in groups:
        return {}

    def first(curve: list[tuple[int, float]], target: float) -> tuple[int | None, bool]:
        positive = [st for st, _ in curve if st > 0]
        for st, v in curve:
            if v >= target:
                return (st, False) if st > 0 else (min(positive, default=None), True)
        return None, False

    targets: dict[int, tuple[float, int]] = {}
    for r in groups[ref]:
        c = val_curve(r)
        # a diverged reference's trace stops at its last probe before the divergence: no final level
        if (r.get("metrics") or {}).get("diverged_at") is not None:
            continue
        if c and math.isfinite(c[-1][1]):
            s, _ = first(c, c[-1][1])
            if s:
                targets[int(r["seed"])] = (c[-1][1], s)
    if not targets:
        return {}
    out = {}
    for v, rs in groups.items():
        sp = SpeedUp()
        for r in rs:
            c = val_curve(r)
            if not c or int(r["seed"]) not in targets:
                continue
            target, ref_steps = targets[int(r["seed"])]
            s, capped = first(c, target)
            sp.ratios.append(ref_steps / s if s else None)
            sp.capped.append(capped and v != ref)  # the reference against itself is 1 by construction
        out[v] = sp
    return out


# ---------------------------------------------------------------------------------------------- stalls

#: Rule for a segmentation run that stalled on a soft-Dice class collapse (see :func:`stalled`).
STALL_CLASS_DICE = 0.05
STALL_LOSS = 0.35
STALL_DICE = 0.5
STALL_RULE = (
    "A segmentation run **stalled** (a soft-Dice class collapse) when some tissue class has test Dice below "
    f"{STALL_CLASS_DICE} (averaged over φ: the class is essentially never predicted); rows written before the "
    "per-class Dice was recorded use the training curve and the mean Dice instead: final moving-average "
    f"training loss ≥ {STALL_LOSS} (one of the 4 classes missing from the soft-Dice mean costs 0.25, plus the "
    f"others' residual) and test Dice (mean over φ and classes) < {STALL_DICE}. A diverged run counts as stalled."
)


def stalled(row: dict[str, Any]) -> bool | None:
    """Whether a segmentation run stalled on a class-collapse plateau (:data:`STALL_RULE`); None for other tasks.

    Example:
        >>> stalled({"task": "segment", "metrics": {"diverged_at": None, "dice_by_class": [0.7, 0.0, 0.8]}})
        True
    """
    if row.get("task") != "segment":
        return None
    m = row.get("metrics") or {}
    if m.get("diverged_at") is not None:
        return True
    by_class = m.get("dice_by_class")
    if by_class:
        return min(float(c) for c in by_class) < STALL_CLASS_DICE
    _, _, final = _window_target(row)
    dice = metric(row, "dice")
    return bool(final >= STALL_LOSS and (math.isnan(dice) or dice < STALL_DICE))


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


def settings(row: dict[str, Any], *, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings a row was run with: its config (steps, learning rate, sizes, ...) and its data set."""
    cfg = {k: v for k, v in (row.get("config") or {}).items() if k not in without}
    return {**cfg, "data": row.get("data")}


def _skey(row: dict[str, Any], *, without: tuple[str, ...] = ()) -> str:
    return json.dumps(settings(row, without=without), sort_keys=True, default=str)


def settings_groups(rows: list[dict[str, Any]], task: str) -> list[list[dict[str, Any]]]:
    """The task's "main" and "baseline" rows split by their settings (:func:`settings`), largest group first.

    Rows run with different settings (a ``--steps 60`` run written into a folder that holds a ``--steps 20``
    run, a ``--full`` run into a quick run's folder) are never pooled: each group gets its own table.
    """
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["task"] == task and r.get("study", "main") in MAIN_STUDIES:
            by[_skey(r)].append(r)
    return sorted(by.values(), key=lambda g: -len(g))


def settings_diff(groups: list[list[dict[str, Any]]]) -> list[str]:
    """Per group, 'key=value, ...' for the settings that differ between the groups ('' for a single group)."""
    if len(groups) < 2:
        return [""] * len(groups)
    sets = [settings(g[0]) for g in groups]
    keys = sorted({k for s in sets for k in s if len({json.dumps(t.get(k), sort_keys=True, default=str) for t in sets}) > 1})
    return [", ".join(f"{k}={str(s.get(k))[:60]}" for k in keys) for s in sets]


def main_lr(rows: list[dict[str, Any]], task: str) -> float | None:
    """The learning rate of the task's main configuration (that of its largest settings group)."""
    groups = settings_groups(rows, task)
    return _lr(groups[0][0]) if groups else None


def _one_per_seed(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for r in rows:
        if (r["variant"], r["seed"]) in seen:
            continue
        seen.add((r["variant"], r["seed"]))
        out[r["variant"]].append(r)
    return {v: out[v] for v in variant_order(out)}


def main_groups(rows: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of study "main" and "baseline" of the task's largest settings group (:func:`settings_groups`), by
    variant, one row per (variant, seed) (the first); sweep and ablation rows never enter. To report another
    settings group, pass its rows."""
    groups = settings_groups(rows, task)
    return _one_per_seed(groups[0]) if groups else {}


def lr_cells(rows: list[dict[str, Any]], task: str) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """(variant, learning rate) -> rows, from the task's "main" and "lr" rows (one per seed) whose settings,
    the learning rate aside, are those of the main configuration."""
    groups = settings_groups(rows, task)
    ref = _skey(groups[0][0], without=("lr",)) if groups else None
    out: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for r in rows:
        if r["task"] != task or r.get("study", "main") not in ("main", "lr"):
            continue
        if ref is not None and _skey(r, without=("lr",)) != ref:
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


def _delta_text(d: Delta, p_adj: float | None = None) -> str:
    """'+0.032 [+0.017, +0.048] (n=5, p=0.004, Holm 0.02)'."""
    if d.n == 0:
        return "n/a (no paired seeds)"
    if d.n < MIN_PAIRS:
        return f"{_signed(d.mean)} (n=1, no CI)"
    ps = f"p={_p(d.p)}" + (f", Holm {_p(p_adj)}" if p_adj is not None and math.isfinite(p_adj) else "")
    return f"{_signed(d.mean)} [{_signed(d.lo)}, {_signed(d.hi)}] (n={d.n}, {ps})"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def _delta_cell(rs: list[dict[str, Any]], ref: list[dict[str, Any]], key: str) -> str:
    return _delta_text(paired_t(_by_seed(rs, key), _by_seed(ref, key)))


def stall_counts(groups: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[int, int]]:
    """Per variant: (stalled runs, runs) by :func:`stalled`; empty for tasks without a stall rule."""
    out = {}
    for v, rs in groups.items():
        flags = [stalled(r) for r in rs]
        if any(f is not None for f in flags):
            out[v] = (sum(bool(f) for f in flags), len(flags))
    return out


def stall_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Stalled runs per variant with Fisher's exact test against the default, the plain network and MIP."""
    counts = stall_counts(groups)
    if not counts:
        return ""
    refs = [r for r in ("default", "plain", "mip") if r in counts]
    lines = [
        "| variant | stalled / runs | " + " | ".join(f"Fisher p vs {r}" for r in refs) + " |",
        "|" + "---|" * (2 + len(refs)),
    ]
    for v, (k, n) in counts.items():
        ps = ["" if r == v else _p(fisher_exact(k, n, *counts[r])) for r in refs]
        lines.append(f"| {v} | {k}/{n} | " + " | ".join(ps) + " |")
    return "\n".join(lines)


#: Per task: variants whose training loss is not the hypernetworks' (the plain registration network is
#: trained at one lambda), so a speed-up on it would compare different losses.
NOT_COMPARABLE_LOSS = {("register", "plain"): "n/a (trained at λ = 0.2 only: another loss)"}


def main_deltas(groups: dict[str, list[dict[str, Any]]], task: str) -> tuple[dict[tuple[str, str], Delta], dict[tuple[str, str], float]]:
    """The main table's family of comparisons: (variant, key) -> paired difference from the default for the
    headline metric and the loss AUC of every variant, and the Holm-adjusted p of each over that family."""
    head_key = TASK_METRICS[task][0][0]
    ref = groups.get("default", [])
    deltas: dict[tuple[str, str], Delta] = {}
    if ref:
        for v, rs in groups.items():
            if v != "default":
                for key in (head_key, "auc_loss"):
                    deltas[(v, key)] = paired_t(_by_seed(rs, key), _by_seed(ref, key))
    fam = list(deltas)
    return deltas, dict(zip(fam, holm([deltas[k].p for k in fam])))


def main_table(rows: list[dict[str, Any]], task: str) -> str:
    """The task's main table (one row per variant) from its largest settings group (or from ``rows`` as a
    whole when they are one group). Δ cells: paired t-intervals with Holm-adjusted p over the table's family
    of comparisons (every variant's headline and loss-AUC difference from the default)."""
    groups = main_groups(rows, task)
    if not groups:
        return ""
    head_key, head_title, _ = TASK_METRICS[task][0]
    others = TASK_METRICS[task][1:]
    sp = speedups(groups)
    vsp = val_speedups(groups)
    ref = groups.get("default", [])
    deltas, adj = main_deltas(groups, task)
    stalls = stall_counts(groups)
    cols = [
        "variant",
        "seeds",
        f"{head_title}, median [IQR]",
        f"Δ {head_title} vs default: mean [95 % t-CI] (n pairs, p, Holm-adjusted p)",
        *(t for _, t, _ in others),
        "loss AUC (mean moving-average train loss)",
        "Δ loss AUC vs default: mean [95 % t-CI] (n pairs, p, Holm-adjusted p)",
        "speed-up vs default (paired by seed; target: that seed's final default train loss)",
        *(["speed-up vs default on validation data (paired; target: that seed's final default validation metric)"] if vsp else []),
        "diverged",
        *(["stalled"] if stalls else []),
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v, rs in groups.items():
        n = len(rs)
        is_ref = v == "default"
        if (task, v) in NOT_COMPARABLE_LOSS:
            speed = NOT_COMPARABLE_LOSS[(task, v)]
        else:
            speed = sp[v].cell() if v in sp else "n/a"
        cells = [
            v,
            str(n),
            _median_cell([metric(r, head_key) for r in rs], n),
            "" if is_ref or not ref else _delta_text(deltas[(v, head_key)], adj[(v, head_key)]),
            *(_median_cell([metric(r, k) for r in rs], n) for k, _, _ in others),
            _median_cell([metric(r, "auc_loss") for r in rs], n),
            "" if is_ref or not ref else _delta_text(deltas[(v, "auc_loss")], adj[(v, "auc_loss")]),
            speed,
            *([vsp[v].cell() if v in vsp else "n/a"] if vsp else []),
            f"{sum(r['metrics'].get('diverged_at') is not None for r in rs)}/{n}",
            *([f"{stalls[v][0]}/{stalls[v][1]}"] if stalls else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ranked_median(rs: list[dict[str, Any]], key: str, higher: bool) -> float:
    """Median over all seeds where a diverged run (or one without the metric) ranks worst."""
    worst = -math.inf if higher else math.inf
    vals = [metric(r, key) for r in rs]
    vals = [worst if math.isnan(v) else v for v in vals]
    return float(np.median(vals)) if vals else math.nan


#: Per task: the validation metric a learning rate (or lambda) is chosen on, where the rows have it.
VAL_KEY = {"classify": "val_acc", "register": "val_dice_best", "segment": "val_dice"}


def chosen_lr(cells: dict[tuple[str, float], list[dict[str, Any]]], task: str, variant: str) -> tuple[float | None, bool]:
    """(the variant's chosen learning rate, chosen on validation data?): the rate whose median over seeds of
    the validation metric (:data:`VAL_KEY`; a diverged seed ranks worst) is best, when every run of the variant
    that did not diverge has it; otherwise on the reported test metric itself (optimistic)."""
    key, _, higher = HEADLINE[task]
    vkey = VAL_KEY[task]
    mine = sorted(lr for v, lr in cells if v == variant)
    rs = [r for lr in mine for r in cells[(variant, lr)]]
    # a diverged run has no evaluation at all (it ranks worst on either metric): only the runs that finished
    # must have the validation metric, else a rate at which every seed diverged sends the choice to test data
    finished = [r for r in rs if (r.get("metrics") or {}).get("diverged_at") is None]
    on_val = bool(finished) and all(math.isfinite(metric(r, vkey)) for r in finished)
    sel = {lr: _ranked_median(cells[(variant, lr)], vkey if on_val else key, higher) for lr in mine}
    finite = {lr: m for lr, m in sel.items() if math.isfinite(m)}
    best = (max if higher else min)(finite, key=finite.__getitem__) if finite else None
    return best, on_val


def lr_best(rows: list[dict[str, Any]], task: str) -> tuple[Any, Any, Any, Any] | None:
    """(chosen rate per variant, rows at it, paired differences from the default and the plain network at their
    chosen rates, Holm-adjusted p over that family); None with fewer than two rates. See :func:`lr_best_table`."""
    cells = lr_cells(rows, task)
    if len({lr for _, lr in cells}) < 2:
        return None
    key = HEADLINE[task][0]
    chosen = {v: chosen_lr(cells, task, v) for v in variant_order(v for v, _ in cells)}
    at = {v: cells[(v, lr)] for v, (lr, _) in chosen.items() if lr is not None}
    refs = [r for r in ("default", "plain") if r in at]
    # default vs plain is the same comparison as plain vs default: counted once in the family
    deltas = {(v, ref): paired_t(_by_seed(at[v], key), _by_seed(at[ref], key)) for v in at for ref in refs if v not in (ref, "default")}
    fam = list(deltas)
    return chosen, at, deltas, dict(zip(fam, holm([deltas[k].p for k in fam])))


def lr_best_table(rows: list[dict[str, Any]], task: str) -> str:
    """Every variant at its own chosen learning rate (:func:`chosen_lr`): the headline test metric, its paired
    difference from the default and from the plain network, each at *their* chosen rates (seed s against seed
    s; Holm over the table's family), and the relative step of the first updates at that rate.

    This is the comparison that separates the formulation from its effective step size: with one learning
    rate for all, a variant whose updates move the generated weights more per step may win by a larger
    effective learning rate alone. Empty with fewer than two rates per variant.
    """
    best = lr_best(rows, task)
    if best is None:
        return ""
    chosen, at, deltas, adj = best
    key, title, _ = HEADLINE[task]
    variants = list(chosen)
    refs = [r for r in ("default", "plain") if r in at]
    lines = [
        f"| variant | chosen lr (on) | seeds | {title} at it, median [IQR] | "
        + " | ".join(f"Δ vs {r} at its chosen lr: mean [95 % t-CI] (n, p, Holm)" for r in refs)
        + " | relative step, first 10 updates |",
        "|" + "---|" * (5 + len(refs)),
    ]
    for v in variants:
        lr, on_val = chosen[v]
        if lr is None:
            lines.append(f"| {v} | n/a (every rate diverged) |" + " |" * (3 + len(refs)))
            continue
        rs = at[v]
        steps = _finite(metric(r, "rel_step_first10") for r in rs)
        ds = [
            _delta_text(deltas[(v, r)], adj[(v, r)]) if (v, r) in deltas else "(see plain)" if v == "default" and r != v else ""
            for r in refs
        ]
        cells_ = [
            v,
            f"{_fmt_lr(lr)} ({'validation' if on_val else 'test, optimistic'})",
            str(len(rs)),
            _median_cell([metric(r, key) for r in rs], len(rs)),
            *ds,
            f"{float(np.median(steps)):.4f}" if steps else "n/a",
        ]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def lr_table(rows: list[dict[str, Any]], task: str) -> str:
    """Variant x learning rate: the headline metric's median (seeds); each variant's chosen rate in bold.

    The rate is chosen on the validation metric (:data:`VAL_KEY`) when every cell of the variant has it (the
    column "chosen on" says "validation"), otherwise on the reported test metric itself ("test": optimistic).
    Empty unless the task has rows of study "lr".
    """
    if not any(r["task"] == task and r.get("study") == "lr" for r in rows):
        return ""
    key, _, higher = HEADLINE[task]
    cells = lr_cells(rows, task)
    lrs = sorted({lr for _, lr in cells})
    variants = variant_order(v for v, _ in cells)
    lines = [
        "| variant | " + " | ".join(f"lr {_fmt_lr(lr)}" for lr in lrs) + " | chosen lr | chosen on |",
        "|" + "---|" * (len(lrs) + 3),
    ]
    for v in variants:
        best, on_val = chosen_lr(cells, task, v)
        meds = {lr: _ranked_median(cells[(v, lr)], key, higher) for lr in lrs if (v, lr) in cells}
        row = []
        for lr in lrs:
            if lr not in meds:
                row.append("")
                continue
            rs = cells[(v, lr)]
            div = sum(r["metrics"].get("diverged_at") is not None for r in rs)
            m = meds[lr]
            txt = f"{m:.3f}" if math.isfinite(m) else "diverged"
            steps = _finite(metric(r, "rel_step_first10") for r in rs)
            step = f"; step {float(np.median(steps)):.3g}" if steps else ""
            txt += f" ({len(rs)}" + (f", {div} div." if div else "") + step + ")"
            row.append(f"**{txt}**" if lr == best else txt)
        chosen = _fmt_lr(best) if best is not None else "n/a"
        lines.append(f"| {v} | " + " | ".join(row) + f" | {chosen} | {'validation' if on_val else 'test (optimistic)'} |")
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


def _theta_spread(r: dict[str, Any], which: int) -> float:
    """max/min over gamma of the gradient norm w.r.t. the generated weights at trace point ``which``."""
    tr = [e for e in (r.get("trace") or []) if e.get("theta_grad_by_gamma")]
    return _spread(tr[which]["theta_grad_by_gamma"]) if tr else math.nan


def gamma_table(rows: list[dict[str, Any]]) -> str:
    """The gamma-range stress test (study "gamma"): per range and variant, test accuracy, its paired
    difference from the default at the same range, the paired speed-up, and the spread (max/min over gamma)
    of the gradient norm w.r.t. the generated weights at the first and the last trace point."""
    g = [r for r in rows if r.get("study") == "gamma"]
    if not g:
        return ""
    levels: list[str] = []
    for r in g:
        if str(r["level"]) not in levels:
            levels.append(str(r["level"]))
    lines = [
        "| gamma range | variant | seeds | test accuracy, median [IQR] | Δ vs default at this range: mean [95 % t-CI] (n, p) | "
        "Δ vs additive-only at this range (the encoding's share) | "
        "speed-up vs default (paired) | ‖∂L/∂θ‖ max/min over gamma, step 0 | same, last step | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        groups = _one_per_seed([r for r in g if str(r["level"]) == level])
        sp = speedups(groups)
        ref = groups.get("default", [])
        for v, rs in groups.items():
            n = len(rs)
            delta = "" if v == "default" or not ref else _delta_cell(rs, ref, "test_acc")
            add = groups.get("additive-only", [])
            delta_add = _delta_cell(rs, add, "test_acc") if v == "mip" and add else ""
            first = _finite(_theta_spread(r, 0) for r in rs)
            last = _finite(_theta_spread(r, -1) for r in rs)
            cells = [
                level,
                v,
                str(n),
                _median_cell([metric(r, "test_acc") for r in rs], n),
                delta,
                delta_add,
                sp[v].cell() if v in sp else "n/a",
                f"{float(np.median(first)):.3g}" if first else "n/a",
                f"{float(np.median(last)):.3g}" if last else "n/a",
                f"{sum(r['metrics'].get('diverged_at') is not None for r in rs)}/{n}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CLASSES = ("CSF", "GM", "WM")


def segattr_table(rows: list[dict[str, Any]]) -> str:
    """Segmentation attribution (study "segattr"): per arm, stalls (:func:`stalled`) with Fisher's exact test
    against MIP with the soft-Dice loss at 1e-3, Dice, per-class Dice and the relative step of the first updates."""
    arms = segattr_arms(rows)
    if not arms:
        return ""
    ref = "mip-soft_dice"
    rk = sum(bool(stalled(r)) for r in arms.get(ref, []))
    rn = len(arms.get(ref, []))
    lines = [
        "| arm | variant | loss | lr | seeds | stalled | Fisher p vs mip-soft_dice | Dice, median [IQR] | "
        + " | ".join(f"{c} Dice" for c in CLASSES)
        + " | relative step, first 10 updates |",
        "|" + "---|" * (9 + len(CLASSES)),
    ]
    for arm, rs in arms.items():
        n = len(rs)
        k = sum(bool(stalled(r)) for r in rs)
        cfg = rs[0].get("config") or {}
        p = "" if arm == ref or not rn else _p(fisher_exact(k, n, rk, rn))
        per = []
        for i in range(len(CLASSES)):
            vals = _finite((r["metrics"].get("dice_by_class") or [math.nan] * 3)[i] for r in rs)
            per.append(f"{float(np.median(vals)):.3f}" if vals else "n/a")
        steps = _finite(metric(r, "rel_step_first10") for r in rs)
        cells = [
            arm,
            rs[0]["variant"],
            str(cfg.get("loss", "soft_dice")),
            _fmt_lr(float(cfg.get("lr", math.nan))),
            str(n),
            f"{k}/{n}",
            p,
            _median_cell([metric(r, "dice") for r in rs], n),
            *per,
            f"{float(np.median(steps)):.4f}" if steps else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def segattr_arms(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Study "segattr" rows per arm (one row per seed)."""
    arms: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for r in rows:
        if r.get("study") == "segattr" and (str(r["level"]), r["seed"]) not in seen:
            seen.add((str(r["level"]), r["seed"]))
            arms[str(r["level"])].append(r)
    return dict(arms)


def plot_segattr(rows: list[dict[str, Any]], path: Path) -> bool:
    """Per arm of the segmentation attribution, each tissue class's validation Dice over training (the trace's
    ``val_by_class``): one thin line per seed, the median thick. A stall shows as one class flat near 0. False
    (and no file) when no row has the per-class validation curve."""
    arms = {a: [r for r in rs if any("val_by_class" in t for t in r.get("trace") or [])] for a, rs in segattr_arms(rows).items()}
    arms = {a: rs for a, rs in arms.items() if rs}
    if not arms:
        return False
    plt = _pyplot()
    ncol = 3
    nrow = -(-len(arms) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), sharex=True, sharey=True, squeeze=False)
    for ax, (arm, rs) in zip(axes.flat, arms.items()):
        for c, name in enumerate(CLASSES):
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                pts = [(int(t["step"]), float(t["val_by_class"][c])) for t in r["trace"] if "val_by_class" in t]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{c}", alpha=0.25, lw=0.7)
                for st, v in pts:
                    by_step[st].append(v)
            steps = sorted(by_step)
            ax.plot(steps, [float(np.median(by_step[s])) for s in steps], color=f"C{c}", lw=2, label=name)
        k = sum(bool(stalled(r)) for r in rs)
        ax.set_title(f"{arm}: {k}/{len(rs)} stalled", fontsize=9)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(arms) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation Dice")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Segmentation attribution: validation Dice per class over training (thin: seeds, thick: median)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ablation_table(rows: list[dict[str, Any]]) -> str:
    abl = [r for r in rows if r.get("study") == "ablation"]
    if not abl:
        return ""
    by: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in abl:
        by[(r["axis"], str(r["level"]))][r["variant"]].append(r)
    lines = [
        "| axis | setting | default acc | MIP acc | Δ acc (MIP - default) [95 % t-CI] (n, p, Holm p) | default final loss | "
        "MIP final loss | MIP speed-up | diverged (default/MIP) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # Holm over the table's distinct comparisons: the base setting recurs on every axis (the same runs, counted once)
    deltas, family = {}, {}
    for k, g in by.items():
        if "default" in g and "mip" in g:
            deltas[k] = paired_t(_by_seed(g["mip"], "test_acc"), _by_seed(g["default"], "test_acc"))
            family.setdefault(frozenset(r.get("key", id(r)) for v in ("default", "mip") for r in g[v]), deltas[k].p)
    adjusted = dict(zip(family, holm(list(family.values()))))
    for (axis, level), g in by.items():

        def cell(v: str, k: str, g: dict[str, list[dict[str, Any]]] = g) -> str:
            vals = _finite(metric(r, k) for r in g.get(v, []))
            return "n/a" if not vals else f"{float(np.median(vals)):.3f}"

        sp = speedups(g).get("mip")
        div = "/".join(str(sum(r["metrics"].get("diverged_at") is not None for r in g.get(v, []))) for v in ("default", "mip"))
        if sp is None or sp.n == 0:
            spd = "n/a"
        elif sp.reached == sp.n:
            spd = sp.cell().split(" [")[0].split(" (")[0] + f" ({sp.reached}/{sp.n})"
        else:
            spd = sp.cell()
        if (axis, level) in deltas:
            runs = frozenset(r.get("key", id(r)) for v in ("default", "mip") for r in g[v])
            delta = _delta_text(deltas[(axis, level)], adjusted[runs])
        else:
            delta = "n/a"
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
        note = " — trained at λ = 0.2 only" if (task, v) in NOT_COMPARABLE_LOSS else ""
        ax.plot(xs, med, marker="o", label=f"{v} (n={len(rs)}){note}")
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
    "**How to read the table.** Rows: study `main` and `baseline` runs with the same settings (config and data; "
    "runs with other settings get their own table, sweep and ablation runs never enter). Metrics: median [25th, "
    "75th percentile] over the seeds that have the metric (a diverged run has no evaluation; `n=` says how many "
    "when fewer than all). "
    "**Δ vs default** is the mean over seeds of the per-seed difference variant - default (seed s of both share "
    "data order and initialisation stream, so the seeds are pairs; seeds without a partner or with a missing or "
    "non-finite value are left out) with a 95 % Student-t interval (mean ± t(n-1) · sd / √n, which keeps its "
    "coverage at 3-10 pairs where a percentile bootstrap is too narrow), the number of pairs n, the paired "
    "t-test's two-sided p, and that p after Holm's correction over the table's family of comparisons (every "
    "variant's headline and loss-AUC difference from the default). Read a difference as a finding only where "
    "the Holm-adjusted p is below 0.05. "
    "**Loss AUC**: the mean of the moving-average training loss (window 10 % of the run, at least 25 steps) over "
    "the whole run, the area under the loss curve per step: a speed and level comparison without a threshold "
    "(lower is better; a diverged run's AUC is infinite). "
    "**Speed-up vs default**, paired by seed: the target of seed s is the default's final moving-average training "
    "loss in seed s; the speed-up is the steps the default needs to first reach it ÷ the steps the variant needs "
    "to first reach it (full windows only), so the default scores exactly 1.00x. When every seed reaches the "
    "target: geometric mean with a 95 % t-interval on the log ratios (n seeds; `≥`: some seed reached it at the "
    "first full window, a lower bound). Otherwise the seeds that never reach it are censored (below 1x) and "
    "ranked lowest, and the cell gives the median over all seeds (`<1x`: the median seed never reached it) with "
    "`(k/n reached)`, no interval. "
    "**Speed-up on validation data** (where the rows hold a validation curve: the trace's validation metric at "
    "its 5-10 probe steps; accuracy for the classifier, best Dice over λ for registration, Dice for "
    "segmentation): the same pairing with the target the default's validation metric at its last probe step and "
    "the steps counted at the probe steps, so a ratio's resolution is one probe interval (`≥`: reached at the "
    "first probe, a lower bound). Without that column the rows hold no validation curve and the speed-up is "
    "measured on the training loss only. "
)


def _section(rows: list[dict[str, Any]], task: str, out: Path, suffix: str, title: str) -> list[str]:
    """One task's section (main table, stalls, plots, learning-rate sweep, traces) from one settings group."""
    table = main_table(rows, task)
    if not table:
        return []
    names = data_names(rows, task)
    lr = main_lr(rows, task)
    steps = sorted({int((r.get("config") or {}).get("steps") or 0) for r in rows if r["task"] == task})
    parts = [
        f"## Task: {task}{title}",
        "",
        f"Data: {'; '.join(names) if names else 'not recorded'}. Steps: {', '.join(map(str, steps))}. Learning rate: "
        f"{_fmt_lr(lr) if lr is not None else 'n/a'}. Headline metric: {HEADLINE[task][1]} (`{HEADLINE[task][0]}`).",
        "",
    ]
    if task == "register" and "plain" in main_groups(rows, task):
        parts += [
            "Caveat: the plain network is trained at λ = 0.2 only (flat line on the by-λ plots: one network for "
            "every λ); its Dice at the best λ is its Dice at its own λ, and its training loss is not the "
            "hypernetworks' (no speed-up).",
            "",
        ]
    if task == "register":
        mg = [r for rs in main_groups(rows, task).values() for r in rs]
        if mg and all("val_dice_best" in (r.get("metrics") or {}) for r in mg if r["metrics"].get("diverged_at") is None):
            parts += [
                "Dice at the best λ: the test Dice at the λ that is best on the validation slices (the test subject's "
                "slices in blocks of 4, alternately validation and test); the metric `dice_best_test_chosen` keeps the "
                "optimistic value with λ chosen on the test pairs themselves.",
                "",
            ]
        else:
            parts += ["Dice at the best λ: λ chosen on the test pairs themselves (these rows have no validation split): optimistic.", ""]
    parts += [table, ""]
    stt = stall_table(main_groups(rows, task))
    if stt:
        parts += [f"Stalls ({task}). {STALL_RULE} Fisher's exact test, two-sided, not adjusted.", "", stt, ""]
    tag = f"{task}{suffix}"
    if plot_curves(rows, task, out / f"{tag}_curves.png"):
        parts += [f"![{task} training curves]({tag}_curves.png)", ""]
    if plot_curves(rows, task, out / f"{tag}_gradnorm.png", key="grad_norms", ylabel="grad norm"):
        parts += [f"![{task} gradient norms]({tag}_gradnorm.png)", ""]
    for key, name, xl, yl in GAMMA_PLOTS[task]:
        name = name.replace(f"{task}_", f"{tag}_", 1)
        if plot_metric_vs_gamma(rows, task, out / name, key, xl, yl):
            parts += [f"![{task} {key}]({name})", ""]
    lrt = lr_table(rows, task)
    if lrt:
        parts += [
            f"### Learning-rate sweep ({task})",
            "",
            f"{HEADLINE[task][1]}: median over seeds (number of seeds, diverged runs) per variant and learning rate, "
            "from the `lr` sweep and the `main` runs; a diverged run ranks worst in the median. Bold: each "
            "variant's chosen rate, the best on the validation metric where the rows have one (`chosen on: "
            "validation`), otherwise the best on the same test data it is reported on (optimistic). `step`: the "
            "median relative change of the generated weights over the first 10 updates, where recorded (the same "
            "learning rate is not the same step for every formulation).",
            "",
            lrt,
            "",
        ]
        if plot_lr(rows, task, out / f"{tag}_lr.png"):
            parts += [f"![{task} learning-rate sweep]({tag}_lr.png)", ""]
        lbt = lr_best_table(rows, task)
        if lbt:
            parts += [
                f"Each variant at its own chosen learning rate ({task}): the same learning rate is not the same "
                "step (the last column), so this is the comparison that separates a formulation from its "
                "effective step size. Δ: paired by seed against the default and the plain network, each at its "
                "own chosen rate, 95 % t-interval, Holm over the table's comparisons."
                + (" The plain registration network is trained at λ = 0.2 only (another loss)." if task == "register" else ""),
                "",
                lbt,
                "",
            ]
    trt = trace_table(rows, task)
    if trt and plot_trace(rows, task, out / f"{tag}_trace.png"):
        parts += [
            f"### Training traces ({task})",
            "",
            "At each run's last trace step, median over seeds: ‖Δ‖/‖θ0‖ (averaged over gamma; additive variants "
            "only), the relative variation of the model output across gamma on a fixed probe batch, and max/min "
            "of the loss's gradient norm over the gamma bins (of all trainable parameters: for registration it "
            "includes the (1 - λ) weighting of the loss, for the default the output bias; not a clean measure of "
            "proportionality).",
            "",
            trt,
            "",
            f"![{task} training traces]({tag}_trace.png)",
            "",
        ]
    return parts


def write_report(rows: list[dict[str, Any]], out: Path, *, header: str = "") -> Path:
    """Write plots and report.md into ``out``; return the report path.

    A task whose rows were run with different settings (:func:`settings_groups`) gets one section per
    settings group, titled with the settings that differ, never a pooled table.
    """
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# hyperloom experiment report", "", header, ""]
    note = out / "NOTE.md"
    if note.exists():
        parts += [note.read_text().strip(), ""]
    if any(r.get("study", "main") in MAIN_STUDIES for r in rows):
        parts += [RULES, ""]
    for task in ("classify", "register", "segment"):
        groups = settings_groups(rows, task)
        diffs = settings_diff(groups)
        for i, (g, diff) in enumerate(zip(groups, diffs)):
            if len(groups) > 1:
                title = f" — settings {i + 1} of {len(groups)}: {diff}"
                # the lr sweep belongs to the settings it was run from: give each group its own lr rows
                base = _skey(g[0], without=("lr",))
                extra = [r for r in rows if r["task"] == task and r.get("study") == "lr" and _skey(r, without=("lr",)) == base]
                parts += _section(g + extra, task, out, f"_s{i + 1}", title)
            else:
                parts += _section(rows, task, out, "", "")
    sat = segattr_table(rows)
    if sat:
        parts += [
            "## Is the segmentation stall MIP's fault? (task: segment)",
            "",
            f"{STALL_RULE} Arms: loss (soft Dice, soft Dice + cross-entropy) x {{plain, additive-only, MIP}}; MIP at a "
            "learning rate whose relative step matches plain's, plain at one that matches MIP's; MIP with a "
            "zero-initialised head. Fisher's exact test two-sided, unadjusted. Relative step: mean over the first 10 "
            "updates of ‖θ_after - θ_before‖ / ‖θ_before‖ of the generated weights at φ = 0.25 (the weights "
            "themselves for the plain network); median over seeds.",
            "",
            sat,
            "",
        ]
        if plot_segattr(rows, out / "segattr_val_by_class.png"):
            parts += ["![validation Dice per class over training, per arm](segattr_val_by_class.png)", ""]
    gam = gamma_table(rows)
    if gam:
        parts += [
            "## gamma-range stress test (task: classify)",
            "",
            "gamma ~ U(lo, hi)² drawn per minibatch and declared with that range (the encoding maps it to [0, 1]; the raw "
            "variants see it as is). If MIP's mechanism (removing the proportionality θ ∝ ‖gamma‖) matters, its advantage "
            "over the default should grow with the range. ‖∂L/∂θ‖: the loss's gradient w.r.t. the generated weights "
            "θ(gamma) only (not the hypernetwork's parameters, so neither an output bias nor a loss weighting enters), on "
            "a fixed probe batch at 5 values of gamma across the range; max/min over those values, median over seeds. "
            "Δ and speed-up: paired by seed with the default at the same range; p unadjusted.",
            "",
            gam,
            "",
        ]
    abl = ablation_table(rows)
    if abl:
        parts += [
            "## Ablations (task: classify)",
            "",
            "Median over seeds. Δ acc: mean of the per-seed differences MIP - default with a 95 % t-interval "
            "(paired by seed; n pairs; two-sided paired t-test p and Holm's adjustment over the table's distinct "
            "comparisons, the base setting that recurs on every axis counted once; a finding only where Holm p < 0.05). "
            "MIP speed-up: paired by seed against the default under the same setting (see the rules above); "
            "`<1x`: the median seed never reached the default's final loss.",
            "",
            abl,
            "",
        ]
        if plot_ablation(rows, out / "ablations.png"):
            parts += ["![ablations](ablations.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
