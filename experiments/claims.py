"""The study's claims, computed from the committed rows: every number the README's results summary states about
the reproduction, with the rule that turns it into a verdict.

``python -m experiments claims`` reads the result folders under ``docs/results`` (:data:`SOURCES`), writes
``docs/results/claims.md`` (one section per claim: what the paper or the reviewer says, what the rows show,
the verdict, the command that regenerates the rows) and refreshes the README's summary block between
``<!-- claims:start -->`` and ``<!-- claims:end -->``. ``tests/experiments/test_claims.py`` regenerates both from
the committed rows and fails when either differs from what is committed, so no number can be edited by hand
around the tables, and a rerun that changes a number changes the sentence.

Verdicts (:func:`verdict`): **holds** when the paired 95 % t-interval excludes zero in the claimed direction and
the Holm-adjusted p (over the family of the table the number comes from) is below 0.05; **same sign, not
significant** when the mean is in the claimed direction but that test fails; **opposite sign, not
significant** when the mean is in the opposite direction but the same test of the opposite claim fails (a tie
within noise); **does not hold** when the opposite claim passes that test (or when the variant diverged on every
seed on which the default finished: a diverged run has no evaluation and drops out of the pairs); **not
measured** when the rows are not committed yet. Speed-ups are tested on their log ratios (Holm over the table's
speed-ups); where a speed-up has no interval (one seed, or seeds that never reach the target) the verdict
follows the direction of its geometric mean, or of its median with those seeds ranked lowest (same sign /
opposite sign, not significant: untested). Stall counts: **holds** when some factor stalls less often with
Holm-adjusted Fisher p below 0.05, **same sign, not significant** when some factor stalls less often but none
significantly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report
from .report import Delta, fisher_exact, holm, main_deltas, main_groups, paired_t, speedups, stalled

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

#: Result folder (under docs/results) -> the command that produced its rows.
SOURCES: dict[str, str] = {
    "reproduce-full": "python -m experiments reproduce --full --studies main --out docs/results/reproduce-full",
    # the full budget re-run with a validation split, and the learning-rate study in the same folder (its 1e-3
    # runs are the main study's); replaces reproduce-full's rows once every task is done
    "reproduce-full-val": (
        "python -m experiments reproduce --full --studies main,baseline --seeds 5 --threads 1 --out runs/reproduce-full-val"
        " && python -m experiments reproduce --full --studies lrfull --seeds 3 --threads 1 --out runs/reproduce-full-val"
    ),
    "gamma-range-quick": (
        "python -m experiments reproduce --quick --task classify --studies gamma --seeds 5 --threads 1 --out runs/gamma-range"
    ),
    "segattr": "python -m experiments reproduce --full --task segment --studies segattr --seeds 10 --threads 1 --out runs/segattr",
    # the ablations on the current design (issue 22 item 8), in two folders when run on two cores
    "ablate-300": "python -m experiments ablate --quick --seeds 3 --threads 1 --out runs/ablate-300",
}

HOLDS, SAME_SIGN, FAILS, UNMEASURED = "holds", "same sign, not significant", "does not hold", "not measured"
OPPOSITE = "opposite sign, not significant"
TASK_NAMES = {"classify": "classifier", "register": "registration", "segment": "segmentation"}


@dataclass
class Claim:
    """One claim: who makes it, what the rows show (a sentence with its numbers), the verdict, the source."""

    id: str
    claim: str
    measured: str
    verdict: str
    source: str
    short: str = ""  # the README's numbers (``measured`` when empty)

    def line(self) -> str:
        """The README's one line: '**claim** — verdict: numbers'."""
        return f"- **{self.claim}** — *{self.verdict}*: {self.short or self.measured}"


def load(name: str) -> list[dict[str, Any]]:
    """The committed rows of ``docs/results/<name>/results.jsonl`` (empty when absent)."""
    path = RESULTS / name / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdict(d: Delta, p_adj: float, *, higher: bool = True) -> str:
    """:data:`HOLDS` / :data:`SAME_SIGN` / :data:`OPPOSITE` / :data:`FAILS` for a paired difference claimed
    positive (``higher``) or negative, or :data:`UNMEASURED` without pairs. The test is symmetric: the opposite
    of the claim must pass the same test (interval and Holm) to make it "does not hold".

    Example:
        >>> verdict(Delta(0.03, 0.01, 0.05, 5, 0.01), 0.02), verdict(Delta(0.03, -0.01, 0.07, 5, 0.1), 0.3)
        ('holds', 'same sign, not significant')
        >>> verdict(Delta(-0.02, -0.04, 0.0, 5, 0.06), 0.2), verdict(Delta(-0.02, -0.03, -0.01, 5, 0.01), 0.02)
        ('opposite sign, not significant', 'does not hold')
        >>> verdict(Delta(math.nan, math.nan, math.nan, 0, math.nan), math.nan)
        'not measured'
    """
    if d.n == 0 or not math.isfinite(d.mean):
        return UNMEASURED
    sign = 1.0 if higher else -1.0
    significant = math.isfinite(p_adj) and p_adj < 0.05
    if sign * d.mean <= 0:
        against = math.isfinite(d.lo) and (d.hi < 0 if higher else d.lo > 0)
        return FAILS if against and significant else OPPOSITE
    excludes = math.isfinite(d.lo) and (d.lo > 0 if higher else d.hi < 0)
    return HOLDS if excludes and significant else SAME_SIGN


def _d(d: Delta, p_adj: float | None = None, digits: int = 3, *, label: str = "Holm p") -> str:
    if d.n == 0:
        return "n/a"
    if not math.isfinite(d.lo):
        return f"{d.mean:+.{digits}f} (n={d.n})"
    holm_text = f", {label} {report._p(p_adj)}" if p_adj is not None and math.isfinite(p_adj) else ""
    return f"{d.mean:+.{digits}f} [{d.lo:+.{digits}f}, {d.hi:+.{digits}f}] (n={d.n}{holm_text})"


def _combine(verdicts: list[str], unit: str = "tasks") -> str:
    """One verdict over tasks (or over the ``unit`` named, e.g. comparisons): holds only where it holds on every measured
    one; 'mixed' names the split."""
    vs = [v for v in verdicts if v != UNMEASURED]
    if not vs:
        return UNMEASURED
    if len(set(vs)) == 1:
        return vs[0]
    return "mixed (" + ", ".join(f"{v} on {vs.count(v)}" for v in dict.fromkeys(vs)) + f" of {len(vs)} {unit})"


def speedup_tests(sp: dict[str, report.SpeedUp], task: str) -> tuple[dict[str, Delta], dict[str, float]]:
    """The speed-up column of a task's main table as a family of tests: per variant whose every seed reached the
    target (at least :data:`report.MIN_PAIRS` seeds), the mean log ratio with its t-interval and the one-sample
    t-test's p (H0: ratio 1), and the Holm-adjusted p over the family (every variant but the default and those
    whose training loss is not comparable, :data:`report.NOT_COMPARABLE_LOSS`)."""
    deltas = {}
    for v, s in sp.items():
        if v == "default" or (task, v) in report.NOT_COMPARABLE_LOSS or s.n < report.MIN_PAIRS or s.reached < s.n:
            continue
        logs = {i: math.log(r) for i, r in enumerate(s.ratios) if r is not None}
        deltas[v] = paired_t(logs, dict.fromkeys(logs, 0.0))
    fam = list(deltas)
    return deltas, dict(zip(fam, holm([deltas[v].p for v in fam])))


#: The full budget's main-study rows: the rerun with a validation split once it holds every task's main study
#: (every variant of :data:`report.VARIANT_ORDER` on :data:`FULL_SEEDS` seeds), else the older rows (registration's
#: λ chosen on the test pairs).
FULL_SEEDS = 5


def full_source() -> str:
    """``"reproduce-full-val"`` when its main study is complete for every task, else ``"reproduce-full"``."""
    rows = load("reproduce-full-val")
    for task in ("classify", "register", "segment"):
        groups = main_groups(rows, task)
        if any(len({r["seed"] for r in groups.get(v, [])}) < FULL_SEEDS for v in report.VARIANT_ORDER):
            return "reproduce-full"
    return "reproduce-full-val"


def main_claims(rows: list[dict[str, Any]], source: str = "reproduce-full") -> list[Claim]:
    """The paper's 2x2 at the full budget: each half of MIP and MIP itself against the default, per task."""
    out = []
    specs = [
        ("mip-beats-default", "mip", "MIP beats the paper's default formulation"),
        ("additive-helps", "additive-only", "The additive output θ = θ0 + Δ alone beats the default"),
        ("encoding-helps", "encoding-only", "The cos|sin input encoding alone beats the default"),
    ]
    for cid, variant, text in specs:
        parts, shorts, verdicts = [], [], []
        for task in ("classify", "register", "segment"):
            groups = main_groups(rows, task)
            if variant not in groups or "default" not in groups:
                verdicts.append(UNMEASURED)
                continue
            deltas, adj = main_deltas(groups, task)
            key = report.TASK_METRICS[task][0][0]
            d, p = deltas[(variant, key)], adj[(variant, key)]
            # a diverged run has no evaluation, so it drops out of the pairs: say so, and a variant that
            # diverged where the default finished has not "not been measured"
            div = {x: sum((r.get("metrics") or {}).get("diverged_at") is not None for r in groups[x]) for x in (variant, "default")}
            note = ", ".join(f"{'MIP' if x == 'mip' else x} diverged on {k}/{len(groups[x])} seeds" for x, k in div.items() if k)
            note = f" ({note}{', left out of the pairs' if d.n else ''})" if note else ""
            finished_ref = any(math.isfinite(report.metric(r, key)) for r in groups["default"])
            verdicts.append(FAILS if d.n == 0 and div[variant] and finished_ref else verdict(d, p))
            parts.append(f"{TASK_NAMES[task]} {report.HEADLINE[task][1]} {_d(d, p)}{note}")
            shorts.append(f"{TASK_NAMES[task]} {_d(d, p)}{note}")
        measured = "; ".join(parts) + " (full budget, paired by seed, 95 % t-interval)" if parts else "no full-budget rows"
        short = "; ".join(shorts) + " (accuracy / Dice, full budget)" if shorts else ""
        out.append(Claim(cid, text, measured, _combine(verdicts), source, short))
    parts, verdicts = [], []
    for task in ("classify", "register", "segment"):
        groups = main_groups(rows, task)
        all_sp = speedups(groups)
        sp = all_sp.get("mip")
        if sp is None or sp.n == 0:
            continue
        logs, adj = speedup_tests(all_sp, task)
        if "mip" in logs and math.isfinite(logs["mip"].lo):
            d, p = logs["mip"], adj["mip"]
            ci = f"{math.exp(d.mean):.2f}x [{math.exp(d.lo):.2f}, {math.exp(d.hi):.2f}]"
            parts.append(f"{TASK_NAMES[task]} {ci} (n={d.n}, Holm p {report._p(p)})")
            verdicts.append(verdict(d, p))  # on the log ratio: above 0 is faster
        else:
            # no interval (one seed, or seeds that never reached the target): the direction of the geometric
            # mean, or of the median with the censored seeds ranked lowest (a censored median is below 1)
            parts.append(f"{TASK_NAMES[task]} {sp.cell()}")
            if sp.reached == sp.n:
                verdicts.append(SAME_SIGN if sp.geometric()[0] > 1 else OPPOSITE)
            else:
                med, kind = sp.quantile(0.5)
                verdicts.append(SAME_SIGN if med > 1 and kind != "<" else OPPOSITE)
    out.append(
        Claim(
            "mip-faster",
            "MIP reaches the default's final training loss sooner",
            (
                "; ".join(parts) + " (steps of the default to its final loss ÷ MIP's steps to the same loss, paired by seed; "
                "geometric mean, t-interval and Holm over the table's speed-ups on the log ratios)"
            )
            if parts
            else "no full-budget rows",
            _combine(verdicts) if verdicts else UNMEASURED,
            source,
        )
    )
    return out


def lr_claim(rows: list[dict[str, Any]]) -> Claim:
    """Issue 22 item 5: with every variant at its own validation-chosen learning rate, do MIP and additive-only
    still beat the default and the plain network?"""
    parts, verdicts = [], []
    for task in ("classify", "register", "segment"):
        best = report.lr_best(rows, task)
        if best is None:
            continue
        chosen, _, deltas, adj = best
        cells = report.lr_cells(rows, task)
        n_rates = {v: sum(w == v for w, _ in cells) for v in chosen}
        if "mip" in chosen and chosen["mip"][0] is None:
            parts.append(f"{TASK_NAMES[task]}: MIP diverged at every rate")
            verdicts.append(FAILS)
            continue
        for ref in ("default", "plain"):
            if ("mip", ref) in deltas and not (task == "register" and ref == "plain"):
                d, p = deltas[("mip", ref)], adj[("mip", ref)]
                verdicts.append(verdict(d, p))
                (lr_m, val_m), (lr_r, val_r) = chosen["mip"], chosen[ref]
                on = "" if val_m and val_r else ", chosen on test data"
                one = {x: ", run at one rate only" if n_rates[x] == 1 else "" for x in ("mip", ref)}  # nothing was tuned
                parts.append(
                    f"{TASK_NAMES[task]} vs {ref} {_d(d, p)} (MIP at {report._fmt_lr(lr_m)}{one['mip']}, "
                    f"{ref} at {report._fmt_lr(lr_r)}{one[ref]}{on})"
                )
    return Claim(
        "own-best-lr",
        "MIP's advantage survives tuning every variant's learning rate (on validation data, at the full budget)",
        "; ".join(parts) if parts else "the full-budget learning-rate study has no committed rows yet",
        _combine(verdicts, "comparisons") if verdicts else UNMEASURED,
        "reproduce-full-val",
    )


GAMMA_CLAIM = "MIP's advantage over the default grows with γ's range"


def gamma_claim(rows: list[dict[str, Any]]) -> Claim:
    """Issue 22 item 7: if MIP's mechanism is real, its advantage over the default grows with gamma's range.
    Measured per seed as (MIP - default) at [0, 4] minus (MIP - default) at [0.5, 1] (seeds pair across
    ranges: the same data order and initialisation stream)."""
    g = [r for r in rows if r.get("study") == "gamma"]
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in g:
        by.setdefault((str(r["level"]), r["variant"]), {}).setdefault(int(r["seed"]), report.metric(r, "test_acc"))
    adv = {}
    for level in ("0.5-1", "0-1", "0-4"):
        m, d = by.get((level, "mip"), {}), by.get((level, "default"), {})
        adv[level] = {s: m[s] - d[s] for s in set(m) & set(d) if math.isfinite(m[s]) and math.isfinite(d[s])}
    if not adv["0-4"] or not adv["0.5-1"]:
        return Claim(
            "gamma-range",
            "MIP's advantage over the default grows with γ's range",
            "not enough γ-range rows",
            UNMEASURED,
            "gamma-range-quick",
        )
    growth = paired_t(adv["0-4"], adv["0.5-1"])
    means = [f"{lvl.replace('-', ', ')}: {report.t_interval(list(a.values()))[0]:+.3f} (n={len(a)})" for lvl, a in adv.items() if a]
    measured = (
        "MIP − default accuracy per range [" + "; ".join(means) + f"]; growth from [0.5, 1] to [0, 4] {_d(growth, growth.p, label='p')}"
        " (paired by seed; one test, no family to adjust over)"
    )
    return Claim(
        "gamma-range", "MIP's advantage over the default grows with γ's range", measured, verdict(growth, growth.p), "gamma-range-quick"
    )


SEG_CLAIM = "MIP's segmentation stall has a cause among loss, step size, encoding and Δ's init"


def segattr_claims(rows: list[dict[str, Any]]) -> list[Claim]:
    """Issue 22 item 6: is the segmentation stall MIP's fault? Stall counts per arm (:func:`report.stalled`) and
    Fisher's exact tests of each factor against MIP with soft Dice at 1e-3, Holm over the factors."""
    arms = report.segattr_arms(rows)
    ref = "mip-soft_dice"
    if ref not in arms:
        return [Claim("seg-stall", SEG_CLAIM, "the attribution study has no committed rows yet", UNMEASURED, "segattr")]
    counts = {a: (sum(bool(stalled(r)) for r in rs), len(rs)) for a, rs in arms.items()}
    k0, n0 = counts[ref]
    factors = {
        "the encoding (additive-only, soft Dice)": "additive-only-soft_dice",
        "the loss (MIP, Dice + cross-entropy)": "mip-dice_ce",
        "the step size (MIP at 2e-4, plain's relative step)": "mip-lr2e-4",
        "Δ's initialisation (MIP, zero-init)": "mip-zeroinit",
    }
    present = {f: a for f, a in factors.items() if a in counts}
    ps = [fisher_exact(*counts[a], k0, n0) for a in present.values()]
    adj = holm(ps)
    parts = [f"MIP, soft Dice, 1e-3: {k0}/{n0} stalled"]
    explains = []
    for (f, a), p, pa in zip(present.items(), ps, adj):
        k, n = counts[a]
        parts.append(f"changing {f}: {k}/{n} (Fisher p {report._p(p)}, Holm {report._p(pa)})")
        if pa < 0.05 and k / n < k0 / n0:
            explains.append(f)
    for a in ("plain-soft_dice", "plain-lr5e-3", "plain-dice_ce", "additive-only-dice_ce"):
        if a in counts:
            parts.append(f"{a}: {counts[a][0]}/{counts[a][1]}")
    # in the claimed direction: some factor stalls less often than MIP with soft Dice (significantly: holds)
    lower = any(counts[a][0] / counts[a][1] < k0 / n0 for a in present.values())
    v = HOLDS if explains else (SAME_SIGN if lower else FAILS)
    text = "; ".join(parts) + (
        ". Removes the stall significantly: " + ", ".join(explains) if explains else ". No single factor removes it significantly"
    )
    return [Claim("seg-stall", SEG_CLAIM, text + ".", v, "segattr")]


def compute() -> list[Claim]:
    """Every claim from the committed rows."""
    full = full_source()
    return [
        *main_claims(load(full), full),
        lr_claim(load("reproduce-full-val")),
        gamma_claim(load("gamma-range-quick")),
        *segattr_claims(load("segattr")),
    ]


# ------------------------------------------------------------------------------ generated tables of the results page

TASK_TITLES = {
    "classify": "1. classifier, γ ~ U(0,1)² (test accuracy)",
    "register": "2. HyperMorph registration (Dice at the best λ)",
    "segment": "3. scale-space segmentation (Dice, mean over φ)",
}


def _quick_full() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    quick = load(QUICK)
    return quick, load(full_source()), QUICK


#: The quick study's folder: the rows with a validation split where committed, else the older rows.
QUICK = "reproduce-quick"


def main_study_table() -> str:
    """Per task and variant of the main study: quick and full medians, the full budget's paired difference from
    the default (Holm over the report table's family) and its paired speed-ups (training loss; validation data
    where the rows hold a validation curve)."""
    quick, full, _ = _quick_full()
    val = any(report.val_curve(r) for r in full)
    cols = ["task (headline metric)", "variant", "quick, median [IQR] (seeds)", "full, median [IQR] (seeds)"]
    cols += ["full: Δ vs default, mean [95 % t-CI] (n, p, Holm p)", "full: speed-up vs default (train loss), paired by seed"]
    if val:
        cols.append("full: speed-up vs default (validation data)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for task in ("classify", "register", "segment"):
        qg, fg = main_groups(quick, task), main_groups(full, task)
        key = report.HEADLINE[task][0]
        deltas, adj = main_deltas(fg, task)
        sp, vsp = speedups(fg), report.val_speedups(fg)
        for i, v in enumerate(v for v in report.VARIANT_ORDER if v in qg or v in fg):
            q, f = qg.get(v, []), fg.get(v, [])
            cells = [
                TASK_TITLES[task] if i == 0 else "",
                "MIP" if v == "mip" else v,
                f"{report._median_cell([report.metric(r, key) for r in q], len(q))} ({len(q)})" if q else "n/a",
                f"{report._median_cell([report.metric(r, key) for r in f], len(f))} ({len(f)})" if f else "n/a",
                report._delta_text(deltas[(v, key)], adj[(v, key)]) if (v, key) in deltas else "",
                report.NOT_COMPARABLE_LOSS.get((task, v)) or (sp[v].cell() if v in sp else "n/a"),
            ]
            if val:
                cells.append(vsp[v].cell() if v in vsp else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_table() -> str:
    """The baseline study's variants (stronger defaults, θ0's init) against the default of the same seeds."""
    quick, full, _ = _quick_full()
    lines = [
        "| variant | task, budget | headline, median [IQR] | Δ vs default, mean [95 % t-CI] (n, p, Holm p) |",
        "|---|---|---|---|",
    ]
    for task in ("classify", "register", "segment"):
        for budget, rows in (("quick", quick), ("full", full)):
            g = main_groups(rows, task)
            deltas, adj = main_deltas(g, task)
            key = report.HEADLINE[task][0]
            for v in sorted(x for x in g if x not in report.VARIANT_ORDER):
                rs = g[v]
                lines.append(
                    f"| `{v}` | {task}, {budget} | {report._median_cell([report.metric(r, key) for r in rs], len(rs))} | "
                    f"{report._delta_text(deltas[(v, key)], adj[(v, key)])} |"
                )
    return "\n".join(lines)


def stall_sentence() -> str:
    """Segmentation stalls per variant at each budget with Fisher's exact tests of MIP against the others."""
    quick, full, _ = _quick_full()
    out = []
    for budget, rows in (("full", full), ("quick", quick)):
        counts = report.stall_counts(main_groups(rows, "segment"))
        if not counts:
            continue
        text = ", ".join(f"{v} {k}/{n}" for v, (k, n) in counts.items() if v in report.VARIANT_ORDER)
        if "mip" in counts:
            ps = [
                f"MIP vs {v} p = {report._p(fisher_exact(*counts['mip'], *counts[v]))}"
                for v in ("additive-only", "default", "plain")
                if v in counts
            ]
            text += "; Fisher's exact test " + ", ".join(ps) + " (unadjusted)"
        out.append(f"{budget} budget: {text}")
    return ("Stalled runs (rule: `experiments/report.py`, `STALL_RULE`): " + "; ".join(out) + ".") if out else ""


def quick_lr_table(quick: list[dict[str, Any]] | None = None) -> str:
    """The quick learning-rate sweep per task (``quick``: the rows, by default those of :data:`QUICK`): the
    headline metric's median per rate, the chosen rate in bold and what it was chosen on; each task's column
    names its rates where they are not the first column's."""
    quick = _quick_full()[0] if quick is None else quick
    per_task: dict[str, dict[str, str]] = {}
    rates: dict[str, list[float]] = {}
    for task in ("classify", "register", "segment"):
        cells = report.lr_cells(quick, task)
        rates[task] = sorted({lr for _, lr in cells})
        key, _, higher = report.HEADLINE[task]
        for v in report.variant_order(v for v, _ in cells):
            best, on_val = report.chosen_lr(cells, task, v)
            vals = []
            for lr in sorted({lr for _, lr in cells}):
                if (v, lr) not in cells:
                    vals.append("–")
                    continue
                m = report._ranked_median(cells[(v, lr)], key, higher)
                txt = f"{m:.3f}" if math.isfinite(m) else "div."
                vals.append(f"**{txt}**" if lr == best else txt)
            per_task.setdefault(v, {})[task] = " / ".join(vals) + ("" if on_val else " (test-chosen)")
    if not per_task:
        return ""
    heads, first = [], None
    for task, title in (("classify", "classifier"), ("register", "registration"), ("segment", "segmentation")):
        if rates[task] and rates[task] != first:
            title += " (" + " / ".join(report._fmt_lr(lr) for lr in rates[task]) + ")"
        first = first or rates[task] or None
        heads.append(title)
    lines = ["| variant | " + " | ".join(heads) + " |", "|---|---|---|---|"]
    for v, by in per_task.items():
        lines.append(f"| {v} | " + " | ".join(by.get(t, "n/a") for t in ("classify", "register", "segment")) + " |")
    return "\n".join(lines)


def full_lr_tables() -> str:
    """Per task with rows: the full-budget learning-rate sweep and every variant at its own chosen rate."""
    rows = load("reproduce-full-val")
    out = []
    for task in ("classify", "register", "segment"):
        sweep, best = report.lr_table(rows, task), report.lr_best_table(rows, task)
        if sweep:
            out += [f"*{TASK_NAMES[task]}*", "", sweep, "", best or "(one rate per variant so far)", ""]
    return "\n".join(out).strip() or "(no rows committed yet)"


#: Generated blocks: file (from the repository root) -> block name -> the function that renders it.
def blocks(claims: list[Claim] | None = None) -> dict[str, dict[str, Any]]:
    claims = compute() if claims is None else claims
    return {
        "README.md": {"claims": lambda: "\n".join(c.line() for c in claims)},
        "docs/experiments.md": {
            "main-table": main_study_table,
            "baseline-table": baseline_table,
            "stalls": stall_sentence,
            "quick-lr-table": quick_lr_table,
            "claims": lambda: "\n".join(c.line() for c in claims),
            "gamma-table": lambda: report.gamma_table(load("gamma-range-quick")) or "(no rows committed yet)",
            "segattr-table": lambda: report.segattr_table(load("segattr")) or "(no rows committed yet)",
            "full-lr-tables": full_lr_tables,
            "ablation-table": lambda: report.ablation_table(load("ablate-300")) or "(no rows committed yet)",
        },
    }


def refresh(text: str, name: str, body: str) -> str:
    """``text`` with the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``body``
    (unchanged when both markers are absent).

    Raises:
        ValueError: a marker without the other, either twice, or the end before the start (refreshing would
            swallow the rest of the file or leave a stale copy).
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    ns, ne = text.count(start), text.count(end)
    if ns == ne == 0:
        return text
    if ns != 1 or ne != 1 or text.index(end) < text.index(start):
        order = " (end before start)" if ns == ne == 1 else ""
        raise ValueError(f"block {name!r}: expected one {start} before one {end}, found {ns} and {ne}{order}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


RULES = (__doc__ or "").split("Verdicts (:func:`verdict`): ")[1].replace("\n", " ").strip()


def claims_page(claims: list[Claim]) -> str:
    """``docs/results/claims.md``: every claim with its verdict rule and the command behind its rows."""
    out = [
        "# The study's claims, computed from the committed rows",
        "",
        "Generated by `python -m experiments claims` from the rows under `docs/results/` (a test regenerates this page "
        "and the README's summary and fails on any difference). "
        + (__doc__ or "").split("Verdicts (:func:`verdict`): ")[1].replace("\n", " ").strip(),
        "",
    ]
    for c in claims:
        out += [
            f"## {c.claim}",
            "",
            f"Verdict: **{c.verdict}**. {c.measured}",
            "",
            f"Rows: `docs/results/{c.source}` (regenerate with `{SOURCES[c.source]}`).",
            "",
        ]
    return "\n".join(out)


def main(*, root: Path = ROOT) -> int:
    """Write ``docs/results/claims.md`` and the generated blocks under ``root`` (the rows are always the
    committed ones, :data:`RESULTS`). Everything is rendered before anything is written, so a crash or a broken
    block leaves every file as it was.

    Raises:
        ValueError: a file lacks one of its blocks, or a block's markers are malformed (:func:`refresh`).
    """
    from hyperloom.fileio import atomic_write_text

    claims = compute()
    named_blocks = blocks(claims)
    page = root / "docs" / "results" / "claims.md"
    writes = {page: claims_page(claims)}
    for rel, named in named_blocks.items():
        path = root / rel
        text = path.read_text()
        new = text
        for name, render in named.items():
            if f"<!-- {name}:start -->" not in new and f"<!-- {name}:end -->" not in new:
                raise ValueError(f"{rel}: block {name!r} is missing (<!-- {name}:start --> ... <!-- {name}:end -->)")
            new = refresh(new, name, render())
        if new != text:
            writes[path] = new
    for path, text in writes.items():
        atomic_write_text(path, text)
    for c in claims:
        print(f"[{c.verdict}] {c.claim}")
    print(f"\nWrote {page} and the generated blocks of " + ", ".join(named_blocks) + ".")
    return 0
