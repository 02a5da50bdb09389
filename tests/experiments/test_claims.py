"""The study's claims are recomputed from the committed rows: the README block and docs/results/claims.md
cannot drift from the tables, and the verdict rules do what they say."""

import math

import pytest

from experiments import claims
from experiments.report import Delta


def test_generated_blocks_and_claims_page_match_the_committed_rows():
    computed = claims.compute()
    page = (claims.RESULTS / "claims.md").read_text()
    assert page == claims.claims_page(computed), "docs/results/claims.md is stale: run `python -m experiments claims`"
    for rel, named in claims.blocks().items():
        text = (claims.ROOT / rel).read_text()
        for name, render in named.items():
            block = f"<!-- {name}:start -->\n{render()}\n<!-- {name}:end -->"
            assert block in text, f"{rel}: block {name!r} is stale or missing: run `python -m experiments claims`"


def test_refresh_replaces_only_between_the_markers():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb"
    assert claims.refresh(text, "x", "new") == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb"
    assert claims.refresh("no markers", "x", "new") == "no markers"


def test_every_claim_names_a_source_with_its_command():
    for c in claims.compute():
        assert c.source in claims.SOURCES and c.verdict and c.measured


def test_verdict_rules():
    ok = Delta(0.03, 0.01, 0.05, 5, 0.01)
    assert claims.verdict(ok, 0.02) == claims.HOLDS
    assert claims.verdict(ok, 0.06) == claims.SAME_SIGN  # the interval excludes 0 but Holm does not
    assert claims.verdict(Delta(0.03, -0.01, 0.07, 5, 0.1), 0.01) == claims.SAME_SIGN
    assert claims.verdict(Delta(-0.01, -0.03, 0.01, 5, 0.3), 0.3) == claims.OPPOSITE
    assert claims.verdict(Delta(-0.03, -0.05, -0.01, 5, 0.01), 0.06) == claims.OPPOSITE  # Holm fails
    assert claims.verdict(Delta(-0.03, -0.05, -0.01, 5, 0.01), 0.01) == claims.FAILS
    assert claims.verdict(Delta(0.03, 0.01, 0.05, 5, 0.01), 0.01, higher=False) == claims.FAILS
    assert claims.verdict(Delta(-0.03, -0.05, -0.01, 5, 0.01), 0.01, higher=False) == claims.HOLDS
    assert claims.verdict(Delta(math.nan, math.nan, math.nan, 0, math.nan), math.nan) == claims.UNMEASURED
    assert claims._combine([claims.HOLDS, claims.HOLDS, claims.UNMEASURED]) == claims.HOLDS
    assert claims._combine([claims.HOLDS, claims.FAILS]).startswith("mixed (holds on 1, does not hold on 1 of 2")


def _row(task, variant, seed, value, *, study="main", level="-", extra=None):
    key = {"classify": "test_acc", "register": "dice_best", "segment": "dice"}[task]
    return {
        "task": task,
        "study": study,
        "axis": "-",
        "level": level,
        "variant": variant,
        "seed": seed,
        "config": {"lr": 1e-3, "steps": 100},
        "metrics": {"diverged_at": None, key: value, **(extra or {})},
        "curve": [1.0] * 100,
        "data": "x",
    }


def test_main_claims_from_rows_with_a_known_answer():
    rows = []
    for s in range(5):
        rows += [_row("classify", "default", s, 0.70 + 0.01 * s), _row("classify", "mip", s, 0.75 + 0.01 * s + 0.001 * (s % 2))]
        rows += [_row("classify", "additive-only", s, 0.69 + 0.01 * s - 0.001 * (s % 2))]
        rows += [_row("classify", "encoding-only", s, 0.70 + 0.01 * s + (0.02 if s % 2 else -0.01))]
    by = {c.id: c for c in claims.main_claims(rows)}
    assert by["mip-beats-default"].verdict == claims.HOLDS and "classifier test accuracy +0.050 [" in by["mip-beats-default"].measured
    assert by["additive-helps"].verdict == claims.FAILS
    assert by["encoding-helps"].verdict == claims.SAME_SIGN


def test_gamma_claim_pairs_the_advantage_across_ranges():
    rows = []
    for s in range(4):
        for level, gap in (("0.5-1", 0.01), ("0-1", 0.05), ("0-4", 0.10 + 0.01 * s)):
            rows += [
                _row("classify", "default", s, 0.6, study="gamma", level=level),
                _row("classify", "mip", s, 0.6 + gap, study="gamma", level=level),
            ]
    c = claims.gamma_claim(rows)
    assert c.verdict == claims.HOLDS and "growth from [0.5, 1] to [0, 4] +0.105 [" in c.measured
    assert claims.gamma_claim([]).verdict == claims.UNMEASURED


def test_segattr_claim_names_the_factor_that_removes_the_stall():
    def seg(arm, variant, s, stall):
        return _row(
            "segment",
            variant,
            s,
            0.4 if stall else 0.7,
            study="segattr",
            level=arm,
            extra={"dice_by_class": [0.0 if stall else 0.5, 0.8, 0.8]},
        )

    rows = [seg("mip-soft_dice", "mip", s, True) for s in range(10)]
    rows += [seg("mip-lr2e-4", "mip", s, False) for s in range(10)]
    rows += [seg("mip-dice_ce", "mip", s, s < 8) for s in range(10)]
    (c,) = claims.segattr_claims(rows)
    assert c.verdict == claims.HOLDS and "Removes the stall significantly: the step size" in c.measured
    assert "the loss" not in c.measured.split("significantly:")[1]
    assert claims.segattr_claims([])[0].verdict == claims.UNMEASURED


# ------------------------------------------------------------------------------------------ review: edge cases


def _curve(f):
    """A training loss falling linearly from 2.0 to 0.5 over 100 steps, f times as fast (held at 0.5 after)."""
    return [2.0 - 1.5 * min(i * f, 99) / 99 for i in range(100)]


def _curved(variant, seed, f, task="classify"):
    r = _row(task, variant, seed, 0.8)
    r["curve"] = _curve(f) if f else [2.0] * 100  # f=0: never falls, never reaches the default's loss
    return r


def _plateau(variant, seed, k, end=0.5):
    """A loss falling linearly from 2.0 to ``end`` over ``k`` steps, flat after (k=0: flat at 2.0)."""
    r = _row("classify", variant, seed, 0.8)
    r["curve"] = [2.0 - (2.0 - end) * min(i, k) / k for i in range(100)] if k else [2.0] * 100
    return r


def _faster(rows):
    return {c.id: c for c in claims.main_claims(rows)}["mip-faster"]


def test_speedup_claim_with_one_seed_follows_the_direction():
    # one seed: the default reaches its plateau (0.5) at step 75, MIP later (0.93x): no interval, but the
    # ratio is below 1 -- opposite sign, untested
    c = _faster([_plateau("default", 0, 50), _plateau("mip", 0, 70, 0.4)])
    assert c.measured.startswith("classifier 0.93x (n=1") and c.verdict == claims.OPPOSITE, c.measured
    assert _faster([_plateau("default", 0, 50), _plateau("mip", 0, 20, 0.45)]).verdict == claims.SAME_SIGN


def test_speedup_claim_with_censored_seeds_follows_the_median():
    # 4 of 5 seeds reach the default's loss, all of them later than the default; one never does: the median is
    # below 1 although most seeds reached
    rows = [_plateau("default", s, 50) for s in range(5)]
    rows += [_plateau("mip", s, 70, 0.4) if s < 4 else _plateau("mip", s, 0) for s in range(5)]
    c = _faster(rows)
    assert "0.93x median, no CI (4/5 reached)" in c.measured and c.verdict == claims.OPPOSITE, c.measured
    # the same censoring with seeds that reach it sooner: in the claimed direction, no interval
    rows = [_plateau("default", s, 50) for s in range(5)]
    rows += [_plateau("mip", s, 20, 0.45) if s < 4 else _plateau("mip", s, 0) for s in range(5)]
    assert _faster(rows).verdict == claims.SAME_SIGN


def test_speedup_claim_is_holm_adjusted_over_the_tables_speedups():
    # each of three variants: ratios 1.04..1.45, t-interval on the log ratios above 1 (p = 0.025 each), so
    # Holm over the table's three speed-ups gives 0.076: not a finding by the page's own rule
    fs = [1.15, 1.6, 1.3, 1.05, 1.45]
    rows = [_curved("default", s, 1.0) for s in range(5)]
    rows += [_curved(v, s, f) for v in ("mip", "additive-only", "encoding-only") for s, f in enumerate(fs)]
    c = _faster(rows)
    assert "1.23x [1.04, 1.45]" in c.measured and "Holm p 0.076" in c.measured
    assert c.verdict == claims.SAME_SIGN
    # alone in its table, the same ratios hold
    only = [r for r in rows if r["variant"] in ("default", "mip")]
    assert _faster(only).verdict == claims.HOLDS


def _lr_row(variant, seed, lr, acc, val, *, diverged=False):
    r = _row("classify", variant, seed, acc, study="main" if lr == 1e-3 else "lr", level=f"{lr}")
    r["config"] = {"lr": lr, "steps": 100}
    r["metrics"]["val_acc"] = val
    if diverged:
        r["metrics"] = {"diverged_at": 3}
    return r


def test_lr_claim_counts_comparisons_not_tasks():
    rows = []
    for s in range(4):
        rows += [_lr_row("default", s, lr, 0.60 + 0.01 * s, 0.6) for lr in (1e-3, 3e-3)]
        rows += [_lr_row("plain", s, lr, 0.90 + 0.01 * s * (s % 2), 0.9) for lr in (1e-3, 3e-3)]
        rows += [_lr_row("mip", s, lr, 0.80 + 0.012 * s, 0.8) for lr in (1e-3, 3e-3)]
    c = claims.lr_claim(rows)
    # one task, two comparisons (vs default: holds; vs plain: does not hold)
    assert c.verdict.startswith("mixed") and "of 2 comparisons" in c.verdict and "tasks" not in c.verdict, c.verdict


def test_lr_claim_reports_mip_diverging_at_every_rate():
    rows = []
    for s in range(3):
        rows += [_lr_row("default", s, lr, 0.60, 0.6) for lr in (1e-3, 3e-3)]
        rows += [_lr_row("mip", s, lr, 0.0, 0.0, diverged=True) for lr in (1e-3, 3e-3)]
    c = claims.lr_claim(rows)
    assert c.verdict == claims.FAILS and "diverged at every rate" in c.measured, (c.verdict, c.measured)


def test_lr_claim_marks_rates_chosen_on_test_data():
    rows = []
    for s in range(3):
        for v, acc in (("default", 0.6), ("mip", 0.7)):
            for lr in (1e-3, 3e-3):
                r = _lr_row(v, s, lr, acc + 0.01 * s, math.nan)
                del r["metrics"]["val_acc"]  # rows written before the validation split
                rows.append(r)
    c = claims.lr_claim(rows)
    assert "chosen on test data" in c.measured, c.measured


def test_segattr_claim_does_not_hold_when_no_factor_lowers_the_stall_rate():
    def seg(arm, s, stall):
        extra = {"dice_by_class": [0.0 if stall else 0.5, 0.8, 0.8]}
        return _row("segment", "mip", s, 0.5, study="segattr", level=arm, extra=extra)

    # every factor stalls at least as often as MIP with soft Dice: the direction is against the claim
    rows = [seg("mip-soft_dice", s, s < 3) for s in range(10)]
    rows += [seg("mip-lr2e-4", s, s < 5) for s in range(10)] + [seg("mip-dice_ce", s, s < 3) for s in range(10)]
    (c,) = claims.segattr_claims(rows)
    assert c.verdict == claims.FAILS, c.measured
    # one factor lowers it, not significantly: same sign
    rows += [seg("mip-zeroinit", s, s < 1) for s in range(10)]
    assert claims.segattr_claims(rows)[0].verdict == claims.SAME_SIGN


def test_refresh_refuses_malformed_markers():
    good = "<!-- x:start -->\nold\n<!-- x:end -->"
    for bad in (
        "a\n<!-- x:start -->\nold\nb",  # no end: the rest of the file would be the block
        "a\n<!-- x:end -->\nold\n<!-- x:start -->\nb",  # out of order
        f"{good}\n{good}",  # twice: the second copy would stay stale
        "<!-- x:start -->\n<!-- x:start -->\nold\n<!-- x:end -->",  # a stray start inside the block
    ):
        with pytest.raises(ValueError, match="x:"):
            claims.refresh(bad, "x", "new")


def test_main_writes_nothing_when_a_block_cannot_be_refreshed(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    readme = "# r\n<!-- claims:start -->\nold\n<!-- claims:end -->\n"
    broken = "# e\n<!-- main-table:start -->\nold\n"  # its end marker lost in an edit
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "experiments.md").write_text(broken)
    with pytest.raises(ValueError, match="main-table"):
        claims.main(root=tmp_path)
    assert (tmp_path / "README.md").read_text() == readme
    assert (tmp_path / "docs" / "experiments.md").read_text() == broken
    assert not (tmp_path / "docs" / "results" / "claims.md").exists()
    # a file that lost a block entirely is refused too (the command would otherwise report it refreshed)
    (tmp_path / "docs" / "experiments.md").write_text("# e\n")
    with pytest.raises(ValueError, match="main-table"):
        claims.main(root=tmp_path)
    assert (tmp_path / "README.md").read_text() == readme


def test_main_claim_counts_diverged_runs_instead_of_calling_them_unmeasured():
    def diverged(r):
        r["metrics"] = {"diverged_at": 7}  # a diverged run has no evaluation
        return r

    rows = [_row("classify", "default", s, 0.70 + 0.01 * s) for s in range(5)]
    rows += [diverged(_row("classify", "mip", s, 0.0)) for s in range(5)]
    by = {c.id: c for c in claims.main_claims(rows)}
    c = by["mip-beats-default"]
    assert c.verdict == claims.FAILS and "MIP diverged on 5/5 seeds" in c.measured and "diverged" in c.short, c
    # some seeds diverged: the pairs left are the rest, and the text says why n is smaller
    rows = [_row("classify", "default", s, 0.70 + 0.01 * s) for s in range(5)]
    rows += [diverged(_row("classify", "mip", s, 0.0)) if s < 2 else _row("classify", "mip", s, 0.75 + 0.011 * s) for s in range(5)]
    c = {c.id: c for c in claims.main_claims(rows)}["mip-beats-default"]
    assert "(n=3" in c.measured and "MIP diverged on 2/5 seeds, left out of the pairs" in c.measured, c.measured


def test_quick_lr_table_heads_each_task_with_its_own_rates():
    rows = []
    for task, rates in (("classify", (1e-3, 3e-3)), ("register", (1e-4, 1e-3, 1e-2))):
        for lr in rates:
            for s in range(2):
                r = _row(task, "mip", s, 0.5 + lr, study="main" if lr == 1e-3 else "lr", level=f"{lr}")
                r["config"] = {"lr": lr, "steps": 100}
                rows.append(r)
    head, _, mip = claims.quick_lr_table(rows).splitlines()
    # the classifier's column lists the classifier's rates (it listed the last task's), registration its own
    assert "classifier (1e-3 / 3e-3)" in head and "registration (1e-4 / 1e-3 / 1e-2)" in head, head
    assert mip.split(" | ")[1].count(" / ") == 1 and mip.split(" | ")[2].count(" / ") == 2


def test_lr_claim_says_when_a_variant_was_run_at_one_rate_only():
    rows = []
    for s in range(3):
        rows += [_lr_row(v, s, lr, 0.6 + 0.1 * (v == "mip") + 0.01 * s, 0.6) for v in ("default", "mip") for lr in (1e-3, 3e-3)]
        rows.append(_lr_row("plain", s, 1e-3, 0.7, 0.7))  # not swept: its "chosen" rate is the only one it has
    c = claims.lr_claim(rows)
    assert "plain at 1e-3, run at one rate only" in c.measured and "default at 1e-3)" in c.measured, c.measured


def test_full_source_switches_to_the_validation_rerun_only_when_every_task_is_complete(monkeypatch):
    import json

    rows = [
        _row(t, v, s, 0.5)
        for t in ("classify", "register", "segment")
        for v in ("plain", "default", "encoding-only", "additive-only", "mip")
        for s in range(claims.FULL_SEEDS)
    ]
    store = {"reproduce-full-val": rows}
    monkeypatch.setattr(claims, "load", lambda name: json.loads(json.dumps(store.get(name, []))))
    assert claims.full_source() == "reproduce-full-val"
    # one classifier seed missing (the classifier still running): the older rows stay the source
    store["reproduce-full-val"] = [r for r in rows if not (r["task"] == "classify" and r["variant"] == "mip" and r["seed"] == 4)]
    assert claims.full_source() == "reproduce-full"
    store["reproduce-full-val"] = [r for r in rows if r["task"] != "segment"]
    assert claims.full_source() == "reproduce-full"
