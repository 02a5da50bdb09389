import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import report
from experiments.report import SpeedUp, lr_table, main_table, paired_t, plot_trace, speedups, write_report

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


# ------------------------------------------------------------------------------------------------ intervals


def test_t_interval_identical_pairs_give_zero():
    a = {0: 0.7, 1: 0.8, 2: 0.75, 3: 0.9}
    d = paired_t(a, dict(a))
    assert (d.mean, d.lo, d.hi, d.n, d.p) == (0.0, 0.0, 0.0, 4, 1.0)


def test_t_interval_constant_shift():
    a = {0: 0.7, 1: 0.8, 2: 0.75, 3: 0.9}
    d = paired_t(a, {s: v - 0.25 for s, v in a.items()})
    assert d.n == 4 and d.p == 0.0
    assert d.mean == pytest.approx(0.25) and d.lo == pytest.approx(0.25) and d.hi == pytest.approx(0.25)


def test_t_interval_pairs_by_seed_and_drops_unpaired_and_missing():
    d = paired_t({0: 1.0, 1: 2.0, 2: 3.5, 7: 100.0, 8: math.nan, 9: None}, {0: 0.0, 1: 1.0, 2: 2.0, 8: 0.0, 9: 0.0, 10: -100.0})
    assert d.n == 3 and d.mean == pytest.approx(3.5 / 3)
    # by hand: diffs 1, 1, 1.5: sd 0.2887, t(2, 0.975) = 4.3027
    half = 4.302652729911275 * float(np.std([1.0, 1.0, 1.5], ddof=1)) / math.sqrt(3)
    assert d.lo == pytest.approx(d.mean - half) and d.hi == pytest.approx(d.mean + half)


def test_t_interval_too_few_pairs():
    d = paired_t({0: 1.0}, {0: 0.5, 1: 0.0})
    assert d.mean == 0.5 and math.isnan(d.lo) and math.isnan(d.hi) and d.n == 1 and math.isnan(d.p)
    d = paired_t({0: 1.0}, {1: 0.0})
    assert math.isnan(d.mean) and d.n == 0


@pytest.mark.parametrize("n", [3, 5, 10])
def test_t_interval_covers_a_known_mean_95_percent_of_the_time(n):
    """Coverage on synthetic paired data with a known mean difference, at the seed counts of the studies."""
    rng = np.random.default_rng(n)
    true = 0.03
    trials = 2000
    hits = 0
    for _ in range(trials):
        base = rng.normal(0.8, 0.05, size=n)
        diff = rng.normal(true, 0.02, size=n)
        d = paired_t(dict(enumerate(base + diff)), dict(enumerate(base)))
        hits += d.lo <= true <= d.hi
    # binomial sd at 2000 trials: 0.5 %; a percentile bootstrap of 5 pairs gives about 88 %
    assert 0.93 <= hits / trials <= 0.97


def test_percentile_bootstrap_would_undercover_at_five_pairs():
    """The reason for the t-interval: the percentile bootstrap of the mean of 5 pairs covers well under 95 %."""
    rng = np.random.default_rng(0)
    hits = t_hits = 0
    for _ in range(1000):
        d = rng.normal(0.0, 1.0, size=5)
        means = d[rng.integers(0, 5, size=(2000, 5))].mean(axis=1)
        lo, hi = np.quantile(means, [0.025, 0.975])
        hits += lo <= 0.0 <= hi
        _, tlo, thi, _ = report.t_interval(d)
        t_hits += tlo <= 0.0 <= thi
    assert hits / 1000 < 0.91 < 0.93 < t_hits / 1000


def test_holm_adjustment():
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert report.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    adj = report.holm([math.nan, 0.2, 0.9])
    assert math.isnan(adj[0]) and adj[1:] == pytest.approx([0.4, 0.9])
    assert report.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_fisher_exact_four_of_five_against_one_of_five():
    assert report.fisher_exact(4, 5, 1, 5) == pytest.approx(0.2063, abs=1e-3)
    assert report.fisher_exact(2, 5, 2, 5) == pytest.approx(1.0)
    assert report.fisher_exact(5, 5, 0, 5) == pytest.approx(0.0079, abs=1e-3)


# ------------------------------------------------------------------------------------------------ speed-up


def test_speedup_of_the_default_against_itself_is_one():
    ref = [row("default", s, curve=_curve(2.0, 0.5 + 0.1 * s)) for s in range(5)]
    sp = speedups({"default": ref})["default"]
    assert sp.ratios == [1.0] * 5 and sp.cell().startswith("1.00x [1.00, 1.00]")


def test_speedup_is_paired_by_seed_against_the_default():
    # default seed s ends at 0.5 + 0.3 s; the variant gets there in half the steps in every seed
    ref = [row("default", s, curve=_curve(2.0, 0.5 + 0.3 * s)) for s in range(3)]
    fast = [row("mip", s, curve=[*_curve(2.0, 0.5 + 0.3 * s, 50), *[0.5 + 0.3 * s] * 50]) for s in range(3)]
    sp = speedups({"default": ref, "mip": fast})["mip"]
    assert sp.n == 3 and sp.reached == 3
    for r in sp.ratios:
        assert r == pytest.approx(2.0, rel=0.15)
    assert "(geo. mean, n=3)" in sp.cell()
    # a seed whose default partner is missing is left out
    assert speedups({"default": ref[:2], "mip": fast})["mip"].n == 2


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
    assert SpeedUp([4.0, 4.0, 2.0], [True, True, False]).cell().startswith("≥3.17x")  # geometric mean, a lower bound
    cell = SpeedUp([2.0, 3.0, 4.0], [False] * 3).cell()
    lo, hi = (math.exp(v) for v in report.t_interval([math.log(2.0), math.log(3.0), math.log(4.0)])[1:3])
    assert cell == f"2.88x [{lo:.2f}, {hi:.2f}] (geo. mean, n=3)"


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
    assert "Δ test accuracy vs default: mean [95 % t-CI] (n pairs, p, Holm-adjusted p)" in lines[0]
    body = [_table_rows(line) for line in lines[2:]]
    assert [c[0] for c in body] == ["plain", "default", "encoding-only", "additive-only", "mip", "default-hyperfan", "mip-theta0-model"]
    assert all(c[1] == "4" for c in body)  # no extra seeds leaked in
    by = {c[0]: c for c in body}
    assert by["default"][3] == ""  # no delta against itself
    assert by["mip"][3].startswith("+0.100 [+0.100, +0.100] (n=4, p=<0.001, Holm <0.001)")
    assert by["default-hyperfan"][3].startswith("+0.050")
    assert by["plain"][-2].endswith("(geo. mean, n=4)")  # plain has a curve: a speed-up like the others
    assert by["default"][-2].startswith("1.00x [1.00, 1.00]")
    assert "0.000" not in by["default"][2]


def test_main_table_auc_loss_delta():
    rows = [row("default", s, curve=_curve(2.0, 0.5)) for s in range(3)] + [row("mip", s, curve=_curve(1.0, 0.5)) for s in range(3)]
    body = {c[0]: c for c in (_table_rows(line) for line in main_table(rows, "classify").splitlines()[2:])}
    header = _table_rows(main_table(rows, "classify").splitlines()[0])
    col = header.index("Δ loss AUC vs default: mean [95 % t-CI] (n pairs, p, Holm-adjusted p)")
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
    assert _table_rows(lines[0]) == ["variant", "lr 3e-4", "lr 1e-3", "lr 3e-3", "chosen lr", "chosen on"]
    by = {c[0]: c for c in (_table_rows(line) for line in lines[2:])}
    assert by["default"][1] == "**0.750 (3)**" and by["default"][-2] == "3e-4" and by["default"][-1] == "test (optimistic)"
    assert by["mip"][3] == "**0.850 (3)**" and by["mip"][-2] == "3e-3"
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
    assert by["mip"][-2] == "3e-4" and by["mip"][2] == "diverged (3, 2 div.)"


def test_lr_table_chooses_on_validation_and_reports_test_there():
    rows = []
    for s in range(3):
        # on test 3e-3 looks best, on validation 3e-4 is: the choice follows validation
        for study, lr, acc, val in (("main", 1e-3, 0.70, 0.70), ("lr", 3e-4, 0.72, 0.80), ("lr", 3e-3, 0.90, 0.60)):
            r = row("mip", s, study=study, lr=lr, acc=acc)
            r["metrics"]["val_acc"] = val
            rows.append(r)
    by = {c[0]: c for c in (_table_rows(line) for line in lr_table(rows, "classify").splitlines()[2:])}
    assert by["mip"][1] == "**0.720 (3)**" and by["mip"][-2] == "3e-4" and by["mip"][-1] == "validation"


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
    assert "censored" in text and "t-interval" in text and "Holm" in text
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
    assert mip[3].startswith("+0.100 [+0.100, +0.100] (n=2,")  # seed 2 has no partner value
    assert "(2/3 reached)" in mip[-2]  # the diverged seed is censored, not dropped
    assert math.isinf(report.auc_loss(bad["curve"]))
    assert (write_report(rows, tmp_path)).exists() and (tmp_path / "classify_curves.png").exists()


def test_plain_has_no_output_variation_in_the_trace_table():
    tr = _trace([(0, None, 0.0, [1.0, 2.0]), (10, None, 0.0, [1.0, 2.0])])
    rows = [row("plain", s, trace=tr) for s in range(2)] + [row("default", s, trace=tr) for s in range(2)]
    by = {c[0]: c for c in (_table_rows(line) for line in report.trace_table(rows, "classify").splitlines()[2:])}
    assert by["plain"][4] == "n/a" and by["default"][4] == "0" and by["plain"][5] == "2"


# ------------------------------------------------------------------------------------------------ stalls


def _seg(variant, seed, *, final, dice, by_class=None, steps=100):
    r = row(variant, seed, task="segment", curve=[1.0] * 20 + [final] * (steps - 20))
    r["metrics"] = {"diverged_at": None, "dice": dice, "final_train_loss": final, "dice_spread": 0.0}
    if by_class is not None:
        r["metrics"]["dice_by_class"] = by_class
    return r


def test_stall_rule():
    # per-class Dice decides when recorded: a class never predicted is a stall, whatever the loss
    assert report.stalled(_seg("mip", 0, final=0.2, dice=0.6, by_class=[0.9, 0.01, 0.9])) is True
    assert report.stalled(_seg("mip", 0, final=0.45, dice=0.4, by_class=[0.4, 0.3, 0.5])) is False
    # older rows: plateau level of the training loss and the mean Dice together
    assert report.stalled(_seg("mip", 0, final=0.404, dice=0.416)) is True
    assert report.stalled(_seg("plain", 0, final=0.32, dice=0.56)) is False  # an under-trained run is not a stall
    assert report.stalled(_seg("plain", 0, final=0.40, dice=0.63)) is False
    bad = _seg("mip", 0, final=0.3, dice=0.6)
    bad["metrics"]["diverged_at"] = 5
    assert report.stalled(bad) is True
    assert report.stalled(row("mip", 0)) is None  # no rule for the classifier


def test_stall_counts_and_fisher_in_the_segment_table():
    rows = []
    for s in range(5):
        rows.append(_seg("mip", s, final=0.404 if s < 4 else 0.2, dice=0.41 if s < 4 else 0.7))
        rows.append(_seg("additive-only", s, final=0.404 if s == 0 else 0.2, dice=0.41 if s == 0 else 0.7))
        rows.append(_seg("default", s, final=0.2, dice=0.7))
    table = report.stall_table(report.main_groups(rows, "segment"))
    by = {c[0]: c for c in (_table_rows(line) for line in table.splitlines()[2:])}
    assert by["mip"][1] == "4/5" and by["additive-only"][1] == "1/5" and by["default"][1] == "0/5"
    assert _table_rows(table.splitlines()[0])[-1] == "Fisher p vs mip"
    assert by["additive-only"][-1] == "0.21"
    main = {c[0]: c for c in (_table_rows(line) for line in main_table(rows, "segment").splitlines()[2:])}
    assert main["mip"][-1] == "4/5"
    assert report.stall_table(report.main_groups([row("mip", 0)], "classify")) == ""


# ------------------------------------------------------------------------------------------------ settings


def test_rows_with_other_settings_are_never_pooled(tmp_path):
    short = [row(v, s, acc=0.5) for v in ("default", "mip") for s in range(3)]
    long = []
    for v in ("default", "mip"):
        for s in range(2):
            r = row(v, s, acc=0.9)
            r["config"] = {**r["config"], "steps": 500}
            long.append(r)
    rows = short + long
    # the largest settings group alone: no 0.9 accuracy in the 100-step table
    body = {c[0]: c for c in (_table_rows(line) for line in main_table(rows, "classify").splitlines()[2:])}
    assert body["mip"][1] == "3" and body["mip"][2].startswith("0.500")
    text = write_report(rows, tmp_path).read_text()
    assert "## Task: classify — settings 1 of 2: steps=100" in text
    assert "## Task: classify — settings 2 of 2: steps=500" in text
    second = text.split("settings 2 of 2")[1]
    assert "| mip | 2 | 0.900" in second
    assert (tmp_path / "classify_s2_curves.png").exists()
    # a different data set is another setting as well
    other = [{**r, "data": "mnist"} for r in short]
    assert report.settings_diff(report.settings_groups(short + other, "classify")) == ["data=fashion-mnist", "data=mnist"]


# ------------------------------------------------------------------------------------------------ gamma range


def test_gamma_table_pairs_within_each_range(tmp_path):
    rows = []
    for level, gain in (("0.5-1", 0.01), ("0-4", 0.2)):
        for s in range(3):
            for v, acc in (("default", 0.6), ("additive-only", 0.6 + gain / 2), ("mip", 0.6 + gain)):
                tr = [{"step": 0, "theta_grad_by_gamma": [1.0, 1.0 + 9 * (v == "default") * (level == "0-4")]}, {"step": 100}]
                r = row(v, s, study="gamma", acc=acc + 0.001 * s, trace=tr)
                r["axis"], r["level"] = "gamma_range", level
                rows.append(r)
    table = report.gamma_table(rows)
    body = [_table_rows(line) for line in table.splitlines()[2:]]
    by = {(c[0], c[1]): c for c in body}
    assert by[("0.5-1", "mip")][4].startswith("+0.010 [+0.010, +0.010] (n=3")
    assert by[("0-4", "mip")][4].startswith("+0.200")
    # the encoding's share: mip against additive-only at the same range, only in mip's row
    assert by[("0-4", "mip")][5].startswith("+0.100") and by[("0.5-1", "mip")][5].startswith("+0.005")
    assert by[("0-4", "default")][5] == "" and by[("0-4", "additive-only")][5] == ""
    assert by[("0-4", "default")][7] == "10" and by[("0-4", "mip")][7] == "1"
    assert by[("0-4", "default")][6].startswith("1.00x")
    text = write_report(rows, tmp_path).read_text()
    assert "## gamma-range stress test (task: classify)" in text
    assert "## Task: classify" not in text  # gamma rows never enter the main table


def test_gamma_study_runs():
    from experiments.__main__ import study_runs

    runs = study_runs("classify", {"steps": 10, "lr": 1e-3}, ["gamma"])
    spans = {(lv, *c["gamma_range"]) for _, _, lv, c, _ in runs}
    assert spans == {("0.5-1", 0.5, 1.0), ("0-1", 0.0, 1.0), ("0-4", 0.0, 4.0)}
    assert sorted({v for *_, v in runs}) == ["additive-only", "default", "default-hyperfan", "mip"]
    assert study_runs("segment", {"steps": 10}, ["gamma"]) == []


# ------------------------------------------------------------------------------------------------ segmentation attribution


def test_segattr_table_counts_stalls_per_arm_against_mip_soft_dice(tmp_path):
    rows = []
    for s in range(5):
        for arm, variant, loss, bad in (("mip-soft_dice", "mip", "soft_dice", s < 4), ("mip-dice_ce", "mip", "dice_ce", s < 1)):
            r = _seg(variant, s, final=0.2, dice=0.7, by_class=[0.8, 0.0 if bad else 0.6, 0.8])
            r["study"], r["axis"], r["level"] = "segattr", "arm", arm
            r["config"] = {**r["config"], "loss": loss}
            r["metrics"]["rel_step_first10"] = 0.03
            rows.append(r)
    table = report.segattr_table(rows)
    by = {c[0]: c for c in (_table_rows(line) for line in table.splitlines()[2:])}
    assert by["mip-soft_dice"][5] == "4/5" and by["mip-dice_ce"][5] == "1/5" and by["mip-dice_ce"][6] == "0.21"
    assert by["mip-dice_ce"][2] == "dice_ce" and by["mip-dice_ce"][-1] == "0.0300" and by["mip-dice_ce"][9] == "0.600"
    assert "## Is the segmentation stall MIP's fault?" in write_report(rows, tmp_path).read_text()


def test_lr_table_shows_the_relative_step():
    rows = []
    for s in range(2):
        for study, lr in (("main", 1e-3), ("lr", 3e-3)):
            r = row("mip", s, study=study, lr=lr)
            r["metrics"]["rel_step_first10"] = 0.01 if lr == 1e-3 else 0.03
            rows.append(r)
    by = {c[0]: c for c in (_table_rows(line) for line in lr_table(rows, "classify").splitlines()[2:])}
    assert "step 0.01)" in by["mip"][1] and "step 0.03)" in by["mip"][2]


# ------------------------------------------------------------------------------------ speed-up on validation data


def _val_trace(vals, every=10):
    return [{"step": every * i, "val": v} for i, v in enumerate(vals)]


def test_val_speedup_is_paired_by_seed_on_the_validation_curve():
    # default seed s reaches its final 0.8 at step 40; mip gets there at step 20 (2x), except seed 2 at step 40 (1x)
    ref = [row("default", s, trace=_val_trace([0.1, 0.3, 0.5, 0.7, 0.8])) for s in range(3)]
    mip = [row("mip", s, trace=_val_trace([0.1, 0.6, 0.8, 0.8, 0.85] if s < 2 else [0.1, 0.6, 0.7, 0.7, 0.85])) for s in range(3)]
    sp = report.val_speedups({"default": ref, "mip": mip})
    assert sp["default"].ratios == [1.0, 1.0, 1.0]
    assert sp["mip"].ratios == [2.0, 2.0, 1.0]
    # a variant that never reaches the default's final validation metric is censored, not dropped
    slow = [row("additive-only", s, trace=_val_trace([0.1, 0.2, 0.3, 0.4, 0.5])) for s in range(3)]
    assert report.val_speedups({"default": ref, "additive-only": slow})["additive-only"].ratios == [None] * 3


def test_val_speedup_at_step_zero_is_a_capped_lower_bound_not_infinite():
    ref = [row("default", 0, trace=_val_trace([0.1, 0.3, 0.5, 0.8]))]
    good_at_init = [row("mip", 0, trace=_val_trace([0.9, 0.9, 0.9, 0.9]))]
    sp = report.val_speedups({"default": ref, "mip": good_at_init})["mip"]
    assert sp.ratios == [3.0] and sp.capped == [True] and sp.cell().startswith("≥")


def test_the_reference_against_itself_is_exactly_one_even_when_it_never_improved():
    # the default already at its final level at step 0: its own ratio is 1 by construction, not a lower bound
    flat = [row("default", s, trace=_val_trace([0.8, 0.8, 0.8])) for s in range(3)]
    sp = report.val_speedups({"default": flat})["default"]
    assert sp.ratios == [1.0] * 3 and sp.capped == [False] * 3 and sp.cell().startswith("1.00x")


def test_val_speedup_column_only_with_validation_curves():
    plain = [row(v, s) for v in ("default", "mip") for s in range(3)]
    assert "on validation data" not in main_table(plain, "classify")
    traced = [row(v, s, trace=_val_trace([0.1, 0.5, 0.8])) for v in ("default", "mip") for s in range(3)]
    table = main_table(traced, "classify")
    assert "on validation data" in table and "1.00x" in table
    assert report.val_speedups({"mip": traced[3:]}) == {}  # no reference: no column


# ------------------------------------------------------------------------------------ each variant at its own rate


def test_lr_best_table_compares_each_variant_at_its_own_validation_chosen_rate():
    rows = []
    for s in range(4):
        # plain is best (on validation) at 3e-3, mip at 1e-3; on test mip at 3e-3 would look better (not chosen)
        spec = {
            "plain": {1e-3: (0.70, 0.70), 3e-3: (0.80, 0.80)},
            "default": {1e-3: (0.60, 0.60), 3e-3: (0.55, 0.50)},
            "mip": {1e-3: (0.82, 0.85), 3e-3: (0.95, 0.60)},
        }
        for v, by_lr in spec.items():
            for lr, (acc, val) in by_lr.items():
                r = row(v, s, study="main" if lr == 1e-3 else "lr", lr=lr, acc=acc + 0.01 * s * (v == "mip"))
                r["metrics"]["val_acc"] = val
                r["metrics"]["rel_step_first10"] = lr * (30 if v == "mip" else 8)
                rows.append(r)
    table = report.lr_best_table(rows, "classify")
    by = {c[0]: c for c in (_table_rows(line) for line in table.splitlines()[2:])}
    assert by["plain"][1] == "3e-3 (validation)" and by["mip"][1] == "1e-3 (validation)" and by["default"][1] == "1e-3 (validation)"
    # mip at 1e-3 (0.82 + 0.01 s) against plain at 3e-3 (0.80): +0.035 on average, paired over 4 seeds
    assert by["mip"][5].startswith("+0.035 [") and "n=4" in by["mip"][5]
    assert by["mip"][4].startswith("+0.235 [")  # against the default at its 1e-3
    assert by["mip"][-1] == "0.0300" and by["plain"][-1] == "0.0240"
    assert by["default"][5] == "(see plain)"  # counted once in the family
    # one rate only: nothing to choose, no table
    assert report.lr_best_table([r for r in rows if r["study"] == "main"], "classify") == ""


def test_segattr_plot_and_table_from_per_class_validation_curves(tmp_path):
    def seg(arm, variant, seed, by_class_final):
        r = row(variant, seed, task="segment", study="segattr", level=arm, axis="arm")
        r["metrics"].update({"dice": sum(by_class_final) / 3, "dice_by_class": by_class_final})
        r["trace"] = [{"step": st, "val": 0.5, "val_by_class": [x * st / 100 for x in by_class_final]} for st in (0, 50, 100)]
        return r

    rows = [seg("mip-soft_dice", "mip", s, [0.0 if s < 2 else 0.5, 0.8, 0.8]) for s in range(3)]
    rows += [seg("plain-soft_dice", "plain", s, [0.5, 0.8, 0.8]) for s in range(3)]
    assert report.plot_segattr(rows, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0
    by = {c[0]: c for c in (_table_rows(line) for line in report.segattr_table(rows).splitlines()[2:])}
    assert by["mip-soft_dice"][5] == "2/3" and by["plain-soft_dice"][5] == "0/3"
    # rows without the per-class validation curve: no plot, no file
    for r in rows:
        r["trace"] = [{"step": 0, "val": 0.5}]
    assert not report.plot_segattr(rows, tmp_path / "q.png") and not (tmp_path / "q.png").exists()


def test_chosen_lr_stays_on_validation_when_a_rate_diverged_on_every_seed():
    # a diverged run has no evaluation (no val_acc): a rate at which every seed diverged must not send the
    # variant's choice to the test metric; it ranks worst on validation
    cells = {}
    for lr, acc, val in ((1e-3, 0.70, 0.80), (3e-3, 0.75, 0.60)):
        cells[("mip", lr)] = [row("mip", s, lr=lr, acc=acc) for s in range(3)]
        for r in cells[("mip", lr)]:
            r["metrics"]["val_acc"] = val
    cells[("mip", 1e-2)] = [row("mip", s, lr=1e-2) for s in range(3)]
    for r in cells[("mip", 1e-2)]:
        r["metrics"] = {"diverged_at": 5}
    assert report.chosen_lr(cells, "classify", "mip") == (1e-3, True)
    # a rate whose runs finished without the validation metric (older rows): the choice falls back to test
    for r in cells[("mip", 3e-3)]:
        del r["metrics"]["val_acc"]
    assert report.chosen_lr(cells, "classify", "mip") == (3e-3, False)


def test_val_speedup_leaves_out_seeds_whose_reference_diverged():
    # seed 1's default diverged after its third probe: its last validation point is not a final level, and
    # the training-loss speed-up leaves such a seed out too
    ref = [row("default", s, trace=_val_trace([0.1, 0.3, 0.5, 0.8] if s == 0 else [0.1, 0.2, 0.3])) for s in range(2)]
    ref[1]["metrics"]["diverged_at"] = 25
    mip = [row("mip", s, trace=_val_trace([0.1, 0.8, 0.9, 0.9])) for s in range(2)]
    sp = report.val_speedups({"default": ref, "mip": mip})
    assert sp["mip"].ratios == [3.0] and sp["default"].ratios == [1.0]


def test_ablation_table_is_holm_adjusted_over_distinct_comparisons():
    """The ablation table reads many comparisons: each Δ carries Holm's p over the table's distinct comparisons,
    and the base setting, recorded once per axis with the same runs, counts once in that family."""

    def abl(axis, level, variant, seed, acc, key):
        return row(variant, seed, study="ablation", acc=acc, axis=axis, level=level, key=key)

    rows = []
    for s, (d_base, d_a, d_b) in enumerate([(0.10, 0.20, 0.01), (0.12, 0.25, -0.01), (0.11, 0.22, 0.02)]):
        for axis in ("x", "y"):  # the base setting on two axes: the same runs (same keys)
            rows += [abl(axis, "base", "default", s, 0.5, f"bd{s}"), abl(axis, "base", "mip", s, 0.5 + d_base, f"bm{s}")]
        rows += [abl("x", "a", "default", s, 0.5, f"ad{s}"), abl("x", "a", "mip", s, 0.5 + d_a, f"am{s}")]
        rows += [abl("y", "b", "default", s, 0.5, f"cd{s}"), abl("y", "b", "mip", s, 0.5 + d_b, f"cm{s}")]
    table = report.ablation_table(rows)
    raw = {
        lvl: paired_t({s: 0.5 + d[i] for s, d in enumerate(diffs)}, dict.fromkeys(range(3), 0.5)).p
        for i, lvl in enumerate(("base", "a", "b"))
        for diffs in [[(0.10, 0.20, 0.01), (0.12, 0.25, -0.01), (0.11, 0.22, 0.02)]]
    }
    expected = dict(zip(raw, report.holm(list(raw.values()))))  # a family of 3, not 4
    for lvl, p_adj in expected.items():
        line = next(ln for ln in table.splitlines() if f"| {lvl} |" in ln)
        assert f"Holm {report._p(p_adj)})" in line
    assert "Holm p" in table.splitlines()[0]
