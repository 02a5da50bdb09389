import dataclasses
import math

from experiments import selftune as S


def test_the_ridge_optimum_is_interior_and_better_than_the_start():
    xtr, ytr, xva, yva = S.ridge_split()
    losses = {lam: S.ridge_val_loss(lam, xtr, ytr, xva, yva) for lam in (1e-4, 0.2, 1.0, 1e2)}
    assert losses[0.2] < min(losses[1e-4], losses[1.0], losses[1e2])


def test_selftune_experiment_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(S.SIZES, "quick", {"seeds": 1, "steps": 16, "n_train": 64, "n_val": 64})
    monkeypatch.setattr(S, "RIDGE", {**S.RIDGE, "warmup": 4, "steps": 6})
    monkeypatch.setattr(
        S, "FMNIST", {**S.FMNIST, "random_configs": 2, "hyper_every": 2, "sweep": {"d1": 2, "d2": 2, "wd": 2}, "tune_steps": 2}
    )
    real = S.load_classification
    monkeypatch.setattr(
        S, "load_classification", lambda name: dataclasses.replace(d := real(name), x_test=d.x_test[:500], y_test=d.y_test[:500])
    )
    store = S.run_all("quick", tmp_path, tasks=["ridge", "fmnist"])
    assert len(store.rows) == 2 + len(S.METHODS)
    fm = {r["variant"]: r for r in store.rows if r["task"] == "fmnist"}
    for method, r in fm.items():
        m = r["metrics"]
        assert 0.0 <= m["test_acc"] <= 1.0 and math.isfinite(m["test_loss"]), method
        assert 0.0 <= m["d1"] <= 0.9 and 0.0 <= m["d2"] <= 0.9 and (m["wd"] == 0.0 or 1e-6 <= m["wd"] <= 1e-1), method
    assert fm["fixed"]["metrics"]["d1"] == 0.5 and len(fm["random"]["tried"]) == 2
    assert len(fm["stn-mip"]["trajectory"]) > 0 and len(fm["stn-default"]["trajectory"]) > 0
    capsys.readouterr()
    again = S.run_all("quick", tmp_path, tasks=["ridge", "fmnist"])  # resumes: nothing re-run
    assert len(again.rows) == len(store.rows) and capsys.readouterr().out == ""
    path = S.write_report(again.rows, tmp_path, header="test")
    text = path.read_text()
    assert "CIFAR-10 and Penn Treebank" in text and "| stn-mip | 1 |" in text and "| mip | 1 |" in text
    assert (tmp_path / "trajectories.png").stat().st_size > 1000
