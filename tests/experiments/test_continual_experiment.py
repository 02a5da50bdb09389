import math

import pytest
import torch

from experiments import continual
from experiments.data import ImageData


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the experiment does: two threads on these tiny networks are many times slower here
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    y_train, y_test = torch.arange(200) % 10, torch.arange(100) % 10
    return ImageData("synthetic", torch.rand(200, 1, 28, 28, generator=g), y_train, torch.rand(100, 1, 28, 28, generator=g), y_test)


CFG = {**continual.DEFAULTS, "steps": 2, "tasks": {"split": 3, "permuted": 2}, "n_test": 40, "hidden": [8], "hnet_hidden": [4]}


@pytest.mark.parametrize(
    ("benchmark", "method"), [("split", m) for m in continual.METHODS] + [("permuted", "finetune"), ("permuted", "hnet-default-plain")]
)
def test_every_method_runs_and_fills_the_lower_triangle(data, benchmark, method):
    res = continual.run(method, benchmark, 0, data, CFG)
    T = CFG["tasks"][benchmark]
    acc = res["acc"]
    for t in range(T):
        for k in range(T):
            assert math.isnan(acc[t][k]) == (k > t)
    assert 0.0 <= res["metrics"]["final_acc"] <= 1.0
    if method == "joint":
        assert res["metrics"]["forgetting"] == 0.0


def test_split_tasks_hold_their_two_classes_and_masks(data):
    tasks = continual.TaskData(data, "split", 3, 40, seed=0)
    for t in range(3):
        assert set(tasks.ytr[t].tolist()) == {2 * t, 2 * t + 1}
        assert torch.isfinite(tasks.masks[t]).sum() == 2
    perm = continual.TaskData(data, "permuted", 2, 40, seed=0)
    assert not torch.equal(perm.perms[0], perm.perms[1]) and torch.equal(perm.perms[0].sort().values, torch.arange(784))


def test_report_table_and_heatmaps(data, tmp_path):
    rows = []
    for m in ("finetune", "hnet-mip-unit"):
        for seed in (0, 1):
            res = continual.run(m, "split", seed, data, CFG)
            rows.append({"task": "continual", "benchmark": "split", "method": m, "seed": seed, **res})
    path = continual.write_report(rows, tmp_path, "header")
    text = path.read_text()
    assert "| finetune (n=2) |" in text and "99.79 %" in text
    assert (tmp_path / "heatmap_split.png").is_file()
