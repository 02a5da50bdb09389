import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import report
from experiments.report import SpeedUp, lr_table, main_table, paired_bootstrap, plot_trace, speedups, write_report

ROOT = Path(__file__).resolve().parents[2]
# the quick rows of the first reproduction: no traces, lr or baseline runs (the test adds its own)
QUICK = ROOT / "docs" / "results" / "reproduce-quick-before-study" / "results.jsonl"


def _curve(start: float, end: float, steps: int = 100) -> list[float]:
    return list(np.linspace(start, end, steps))


def row(variant, seed, *, task="classify", study="main", lr=1e-3, acc=0.8, curve=None, **extra):
    return {
        "task": task,
        "study": study,
        "axis": "lr" if study == "lr" else "-",
        "level": report._fmt_lr(lr) if study == "lr" else "-",
        "variant": variant,
        "seed": seed,
        "config": {"lr": lr, "steps": 100},
        "metrics": {"diverged_at": None, "test_acc": acc, "final_train_loss": 0.5, "test_acc_std_gamma": 0.01},
        "curve": curve if curve is not None else _curve(2.0, 0.5),
        "grad_norms": [1.0] * 100,
        "data": "fashion-mnist",
        **extra,
    }


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_identical_pairs_give_zero():
    a = {0: 0.7, 1: 0.8, 2: 0.75, 3: 0.9}
    assert paired_bootstrap(a, dict(a)) == (0.0, 0.0, 0.0, 4)


def test_bootstrap_constant_shift():
    a = {0: 0.7, 1: 0.8, 2: 0.75, 3: 0.9}
    b = {s: v - 0.25 for s, v in a.items()}
    d, lo, hi, n = paired_bootstrap(a, b)
    assert n == 4
    assert d == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_bootstrap_pairs_by_seed_and_ignores_unpaired():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 7: 100.0}
    b = {0: 0.0, 1: 1.0, 2: 2.0, 9: -100.0}
    d, lo, hi, n = paired_bootstrap(a, b)
    assert (d, lo, hi, n) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), 3)


def test_bootstrap_drops_nan_and_none_pairwise():
    a = {0: 1.0, 1: math.nan, 2: 3.0, 3: None, 4: 5.0}
    b = {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 2.0}
    d, lo, hi, n = paired_bootstrap(a, b)
    assert n == 3 and d == pytest.approx(2.0)
    assert lo < d < hi


def test_bootstrap_too_few_pairs():
    d, lo, hi, n = paired_bootstrap({0: 1.0}, {0: 0.5, 1: 0.0})
    assert d == 0.5 and math.isnan(lo) and math.isnan(hi) and n == 1
    d, lo, hi, n = paired_bootstrap({0: 1.0}, {1: 0.0})
    assert math.isnan(d) and math.isnan(lo) and n == 0


def test_bootstrap_ci_contains_mean_narrows_with_seeds_and_is_reproducible():
    rng = np.random.default_rng(1)
    widths = []
    for k in (5, 50, 500):
        diffs = rng.normal(0.1, 0.2, size=k)
        a = {s: 1.0 + float(x) for s, x in enumerate(diffs)}
        b = dict.fromkeys(range(k), 1.0)
        d, lo, hi, n = paired_bootstrap(a, b)
        assert n == k and lo <= d <= hi and d == pytest.approx(float(diffs.mean()))
        widths.append(hi - lo)
        assert paired_bootstrap(a, b) == (d, lo, hi, n)  # fixed generator seed
    assert widths[0] > widths[1] > widths[2]
    # a 95 % interval is wider than a 50 % one
    d, lo50, hi50, _ = paired_bootstrap(a, b, ci=0.5)
    assert hi50 - lo50 < widths[2]


# ------------------------------------------------------------------------------------------------ speed-up


def test_speedup_majority_censored_prints_below_one():
    ref = [row("default", s, curve=_curve(2.0, 0.5)) for s in range(5)]
    # mip: 3 of 5 seeds never get below 1.0 (the target is 0.5-ish), 2 reach it quickly
    mip = [row("mip", s, curve=_curve(2.0, 1.0)) for s in range(3)] + [row("mip", s, curve=_curve(1.0, 0.1)) for s in (3, 4)]
    sp = speedups({"default": ref, "mip": mip})["mip"]
    assert sp.n == 5 and sp.reached == 2
    assert sp.cell().startswith("<1x") and "(2/5 reached)" in sp.cell()


def test_speedup_keeps_one_censored_seed_and_the_median_moves():
    ref = [row("default", s, curve=_curve(2.0, 0.5)) for s in range(5)]
    fast = [row("mip", s, curve=_curve(2.0 - 0.2 * s, 0.1)) for s in range(5)]
    one_bad = [*fast[:4], row("mip", 4, curve=_curve(2.0, 1.5))]
    all_ok = speedups({"default": ref, "mip": fast})["mip"]
    censored = speedups({"default": ref, "mip": one_bad})["mip"]
    assert censored.n == 5 and censored.reached == 4  # not dropped
    m_all, kind_all = all_ok.quantile(0.5)
    m_cens, kind = censored.quantile(0.5)
    assert kind == kind_all == "" and m_cens < m_all
    # dropping the censored seed would give the median of the 4 reached seeds; ranking it lowest gives the 3rd of 5
    reached = sorted(r for r in censored.ratios if r is not None)
    assert m_cens == pytest.approx(reached[1]) and m_cens < float(np.median(reached))
    assert "(4/5 reached)" in censored.cell() and not censored.cell().startswith("<")


def test_speedup_quantile_rules():
    sp = SpeedUp([None, 2.0], [False, False])
    assert sp.quantile(0.5) == (1.5, "<")  # between a censored (<1) and 2.0: below 1.5
    assert SpeedUp([None, None, 3.0], [False] * 3).cell().startswith("<1x")
    assert SpeedUp([4.0, 4.0, 2.0], [True, True, False]).cell().startswith("≥4.00x")
    assert SpeedUp([2.0, 3.0, 4.0], [False] * 3).cell() == "3.00x [2.50, 3.50] (3/3 reached)"


# ------------------------------------------------------------------------------------------------ tables


def _table_rows(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_main_table_order_delta_and_no_leaks():
    rows = []
    for s in range(4):
        rows += [
            row("mip", s, acc=0.80 + 0.01 * s),
            row("default", s, acc=0.70 + 0.01 * s),
            row("plain", s, acc=0.90),
            row("default-hyperfan", s, study="baseline", acc=0.75 + 0.01 * s),
            row("additive-only", s, acc=0.78),
            row("encoding-only", s, acc=0.77),
            row("mip-theta0-model", s, study="baseline", acc=0.81),
            # never in the main table: another lr, an ablation
            row("mip", s, study="lr", lr=3e-3, acc=0.1),
            row("default", s, study="ablation", acc=0.0),
            row("default-torchinit", s, study="baseline", lr=1e-2, acc=0.0),
        ]
    table = main_table(rows, "classify")
    lines = table.splitlines()
    assert "Δ test accuracy vs default, mean [95 % bootstrap CI] (paired by seed)" in lines[0]
    body = [_table_rows(line) for line in lines[2:]]
    assert [c[0] for c in body] == ["plain", "default", "encoding-only", "additive-only", "mip", "default-hyperfan", "mip-theta0-model"]
    assert all(c[1] == "4" for c in body)  # no extra seeds leaked in
    by = {c[0]: c for c in body}
    assert by["default"][3] == ""  # no delta against itself
    assert by["mip"][3].startswith("+0.100 [+0.100, +0.100] (n=4)")
    assert by["default-hyperfan"][3].startswith("+0.050")
    assert by["plain"][-2].endswith("(4/4 reached)")  # plain has a curve: a speed-up like the others
    assert "0.000" not in by["default"][2]


def test_main_table_auc_loss_delta():
    rows = [row("default", s, curve=_curve(2.0, 0.5)) for s in range(3)] + [row("mip", s, curve=_curve(1.0, 0.5)) for s in range(3)]
    body = {c[0]: c for c in (_table_rows(line) for line in main_table(rows, "classify").splitlines()[2:])}
    header = _table_rows(main_table(rows, "classify").splitlines()[0])
    col = header.index("Δ loss AUC vs default, mean [95 % bootstrap CI] (paired by seed)")
    auc_default = report.auc_loss(_curve(2.0, 0.5))
    auc_mip = report.auc_loss(_curve(1.0, 0.5))
    assert auc_mip < auc_default
    assert body["mip"][col].startswith(f"{auc_mip - auc_default:+.3f}")


def test_lr_table_bolds_the_best_rate():
    rows = []
    for s in range(3):
        rows += [row("default", s, acc=0.7), row("mip", s, acc=0.8)]  # main runs at 1e-3
        rows += [row("default", s, study="lr", lr=3e-4, acc=0.75), row("default", s, study="lr", lr=3e-3, acc=0.6)]
        rows += [row("mip", s, study="lr", lr=3e-4, acc=0.7), row("mip", s, study="lr", lr=3e-3, acc=0.85)]
    table = lr_table(rows, "classify")
    lines = table.splitlines()
    assert _table_rows(lines[0]) == ["variant", "lr 3e-4", "lr 1e-3", "lr 3e-3", "best lr"]
    by = {c[0]: c for c in (_table_rows(line) for line in lines[2:])}
    assert by["default"][1] == "**0.750 (3)**" and by["default"][-1] == "3e-4"
    assert by["mip"][3] == "**0.850 (3)**" and by["mip"][-1] == "3e-3"
    assert by["mip"][2] == "0.800 (3)"  # the main runs count as the 1e-3 cell
    assert lr_table([r for r in rows if r["study"] == "main"], "classify") == ""


def test_lr_table_ranks_diverged_runs_worst():
    rows = []
    for s in range(3):
        rows.append(row("mip", s, study="lr", lr=3e-4, acc=0.7))
        bad = row("mip", s, study="lr", lr=3e-3, acc=0.9)
        if s < 2:  # 2 of 3 diverged: no accuracy
            bad["metrics"] = {"diverged_at": 10, "final_train_loss": math.nan}
        rows.append(bad)
    by = {c[0]: c for c in (_table_rows(line) for line in lr_table(rows, "classify").splitlines()[2:])}
    assert by["mip"][-1] == "3e-4" and by["mip"][2] == "diverged (3, 2 div.)"


def _trace(step_values):
    return [
        {"step": st, "delta_ratio": d, "output_variation": ov, "grad_norm_by_gamma": gn, "grad_norm_by_gamma_x": [0.1, 0.5, 0.9]}
        for st, d, ov, gn in step_values
    ]


def test_trace_plot_and_table(tmp_path):
    rows = []
    for s in range(3):
        rows.append(row("default", s, trace=_trace([(0, None, 0.1, [1.0, 2.0, 4.0]), (50, None, 0.2, [1.0, 2.0, 8.0])])))
        rows.append(row("mip", s, trace=_trace([(0, 0.0, 0.05, [1.0, 1.5, 2.0]), (50, 0.3 + s, 0.1, [1.0, 1.0, 3.0])])))
        rows.append(row("plain", s))  # no trace: skipped
    assert plot_trace(rows, "classify", tmp_path / "classify_trace.png")
    assert (tmp_path / "classify_trace.png").stat().st_size > 1000
    by = {c[0]: c for c in (_table_rows(line) for line in report.trace_table(rows, "classify").splitlines()[2:])}
    assert set(by) == {"default", "mip"}
    assert by["default"][2] == "50" and by["default"][3] == "n/a" and by["default"][5] == "8"
    assert by["mip"][3] == "1.3" and by["mip"][4] == "0.1" and by["mip"][5] == "3"


def test_trace_plot_skipped_without_traces(tmp_path):
    rows = [row(v, s) for v in ("default", "mip") for s in range(2)]
    assert not plot_trace(rows, "classify", tmp_path / "classify_trace.png")
    assert not (tmp_path / "classify_trace.png").exists()
    assert report.trace_table(rows, "classify") == ""
    write_report(rows, tmp_path)
    assert not (tmp_path / "classify_trace.png").exists()


# ------------------------------------------------------------------------------------------------ end to end


def test_write_report_on_the_committed_quick_results(tmp_path):
    shutil.copy(QUICK, tmp_path / "results.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    # the extra studies, built from the committed runs: an lr sweep, a baseline and traces
    extra = []
    for r in rows:
        if r["task"] == "classify" and r["variant"] in ("default", "mip"):
            lr_row = {**r, "study": "lr", "axis": "lr", "level": "3e-3", "config": {**r["config"], "lr": 3e-3}}
            lr_row["metrics"] = {**r["metrics"], "test_acc": r["metrics"]["test_acc"] - 0.1}
            extra.append(lr_row)
            if r["variant"] == "default":
                extra.append({**r, "study": "baseline", "variant": "default-hyperfan"})
        if r["task"] == "segment":
            r["trace"] = _trace([(0, 0.0 if r["variant"] == "mip" else None, 0.1, [1.0, 2.0]), (10, 0.2, 0.2, [1.0, 3.0])])
    rows += extra
    path = write_report(rows, tmp_path, header="header")
    text = path.read_text()
    for name in (
        "classify_curves.png",
        "classify_gradnorm.png",
        "classify_grad_norm_by_gamma.png",
        "classify_lr.png",
        "register_dice_by_lambda.png",
        "register_folding_by_lambda.png",
        "register_grad_norm_by_lambda.png",
        "segment_dice_by_phi.png",
        "segment_grad_norm_by_phi.png",
        "segment_trace.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"({name})" in text, name
    assert not (tmp_path / "register_smoothness_by_lambda.png").exists()  # no such metric in these rows
    assert not (tmp_path / "classify_trace.png").exists()
    assert "Data: fashion-mnist" in text and "Data: MNI152 2009a (nilearn)" in text
    assert text.count("| default-hyperfan |") == 1
    assert "censored" in text and "bootstrap" in text
    assert "### Learning-rate sweep (classify)" in text and "### Training traces (segment)" in text
    classify = text.split("## Task: classify")[1].split("### Learning-rate sweep")[0]
    assert classify.count("| mip |") == 1 and classify.count("| default |") == 1  # the lr rows stay out


def test_diverged_run_is_counted_censored_and_left_out_of_the_pairs(tmp_path):
    rows = [row("default", s, acc=0.7 + 0.01 * s) for s in range(3)]
    rows += [row("mip", s, acc=0.8 + 0.01 * s, curve=_curve(1.0, 0.2)) for s in range(2)]
    bad = row("mip", 2, curve=[*_curve(2.0, 1.5, 40), math.nan])
    bad["metrics"] = {"diverged_at": 40, "final_train_loss": math.nan}
    rows.append(bad)
    by = {c[0]: c for c in (_table_rows(line) for line in main_table(rows, "classify").splitlines()[2:])}
    mip = by["mip"]
    assert mip[1] == "3" and mip[-1] == "1/3"
    assert mip[2].endswith("(n=2)")  # the median over the 2 seeds with an accuracy
    assert mip[3].startswith("+0.100 [+0.100, +0.100] (n=2)")  # seed 2 has no partner value
    assert "(2/3 reached)" in mip[-2]  # the diverged seed is censored, not dropped
    assert math.isinf(report.auc_loss(bad["curve"]))
    assert (write_report(rows, tmp_path)).exists() and (tmp_path / "classify_curves.png").exists()


def test_plain_has_no_output_variation_in_the_trace_table():
    tr = _trace([(0, None, 0.0, [1.0, 2.0]), (10, None, 0.0, [1.0, 2.0])])
    rows = [row("plain", s, trace=tr) for s in range(2)] + [row("default", s, trace=tr) for s in range(2)]
    by = {c[0]: c for c in (_table_rows(line) for line in report.trace_table(rows, "classify").splitlines()[2:])}
    assert by["plain"][4] == "n/a" and by["default"][4] == "0" and by["plain"][5] == "2"
