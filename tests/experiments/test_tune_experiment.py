import json
import math

import torch

from experiments import tune as T
from experiments.tune_report import write_tune_report


def test_ridge_exact_is_the_minimiser():
    d = T.ridge_data()
    assert d["x_train"].shape == (300, 10) and d["x_val"].shape == (71, 10) and d["x_test"].shape == (71, 10)
    for lam in (1e-3, 0.3, 100.0):
        w, b = T.ridge_exact(d, lam)
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        T.ridge_objective(w, b, d["x_train"], d["y_train"], lam).backward()
        assert float(w.grad.abs().max()) < 1e-10 and abs(float(b.grad)) < 1e-10
    # more shrinkage, smaller weights
    assert float(T.ridge_exact(d, 100.0)[0].norm()) < float(T.ridge_exact(d, 0.01)[0].norm())


def test_register_validation_and_test_slices_are_disjoint_and_held_out():
    val, test = T.register_data()
    assert len(val.x_test) > 0 and len(test.x_test) > 0
    d_vt = torch.cdist(val.x_test.flatten(1), test.x_test.flatten(1))
    d_tr = torch.cdist(torch.cat([val.x_test, test.x_test]).flatten(1), val.x_train.flatten(1))
    assert float(d_vt.min()) > 0 and float(d_tr.min()) > 0


TINY = {
    "ridge": {"steps": 10, "fixed": [1e-2, 1.0], "sweep_points": 5, "tune_starts": [0.1], "tune_steps": 3},
    "register": {
        "steps": 5,
        "batch": 2,
        "fixed": [0.3, 0.7],
        "n_val": 4,
        "n_test": 4,
        "sweep_points": 3,
        "tune_starts": [0.5],
        "tune_steps": 2,
    },
}


def test_tune_experiment_runs_resumes_and_reports(tmp_path):
    store = T.run_all("quick", tmp_path, tasks=["ridge", "register"], seeds=1, overrides=TINY)
    kinds = {(r["task"], r.get("kind")) for r in store.rows}
    for task in ("ridge", "register"):
        assert (task, "hyper:default") in kinds and (task, "hyper:mip") in kinds
        assert (task, f"fixed:{TINY[task]['fixed'][0]}:{TINY[task]['steps']}") in kinds
        assert (task, f"fixed:{TINY[task]['fixed'][0]}:{TINY[task]['steps'] // 5}") in kinds  # 1/5 of the budget
    reg = next(r for r in store.rows if r.get("kind") == "hyper:mip" and r["task"] == "register")
    assert [p["lam"] for p in reg["sweep"]] == [0.0, 0.5, 1.0]
    assert all(0.0 <= t["lam"] <= 1.0 and 0.0 <= t["dice"] <= 1.0 for t in reg["tune"])
    assert set(reg["sweep_best"]) == {"dice", "dice_csf", "dice_grey", "dice_white"}
    n = len((tmp_path / "results.jsonl").read_text().splitlines())
    T.run_all("quick", tmp_path, tasks=["ridge", "register"], seeds=1, overrides=TINY)  # everything done: nothing re-run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    path = write_tune_report(rows, tmp_path)
    text = path.read_text()
    assert "Amortization gap in weight space" in text and "λ* by hl.sweep" in text and "Per tissue class" in text
    for png in ("ridge_weight_error_by_lambda.png", "register_dice_folding_by_lambda.png", "register_dice_by_class_mip.png"):
        assert (tmp_path / png).stat().st_size > 0
    exact = next(r for r in rows if r["variant"] == "exact")
    assert 1e-3 <= exact["lam_star"] <= 1e2 and math.isfinite(exact["test_mse"])
