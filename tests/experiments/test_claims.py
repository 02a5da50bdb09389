"""The study's claims are recomputed from the committed rows: the README block and docs/results/claims.md
cannot drift from the tables, and the verdict rules do what they say."""

import math

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
    assert claims.verdict(Delta(-0.01, -0.03, 0.01, 5, 0.3), 0.3) == claims.FAILS
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
