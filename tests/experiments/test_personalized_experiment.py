import pytest
import torch

from experiments import personalized
from experiments.data import ImageData


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    y_train, y_test = torch.arange(600) % 10, torch.arange(300) % 10
    return ImageData("synthetic", torch.rand(600, 1, 28, 28, generator=g), y_train, torch.rand(300, 1, 28, 28, generator=g), y_test)


CFG = {
    **personalized.DEFAULTS,
    "steps": 2,
    "clients": 10,
    "n_min": 10,
    "n_max": 20,
    "n_test": 10,
    "hidden": 8,
    "hnet_hidden": [4],
    "code": 4,
    "clients_per_step": 2,
    "query": 4,
    "local_steps": 3,
    "set_sizes": [5, 10],
}


def test_clients_are_label_skewed_disjoint_and_split():
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        "synthetic", torch.rand(4000, 1, 28, 28, generator=g), torch.arange(4000) % 10, torch.rand(500, 1, 28, 28), torch.arange(500) % 10
    )
    cfg = {**CFG, "clients": 20, "n_min": 30, "n_max": 60}
    clients = personalized.Clients(data, cfg, seed=0)
    assert len(clients.unseen) == 4 and sorted(clients.seen + clients.unseen) == list(range(20))
    sizes = [len(y) for y in clients.y]
    assert len(set(sizes)) > 1 and min(sizes) >= 29
    for c in range(20):
        assert set(clients.y[c].tolist()) <= set(clients.classes[c]) and 2 <= len(clients.classes[c]) <= 3
        assert set(clients.yt[c].tolist()) <= set(clients.classes[c])
    x5, y5 = clients.subset(0, 5)
    assert x5.shape == (5, 196) and torch.equal(clients.subset(0, None)[1][:5], y5)


@pytest.mark.parametrize("method", personalized.METHODS)
def test_every_method_runs_and_reports_seen_and_unseen(data, method):
    results = personalized.run(method, 0, data, CFG)
    variants = [v for v, _ in results]
    assert variants == (["global", *(f"finetune-{k}" for k in personalized.FINETUNE_STEPS)] if method == "global" else [method])
    for _, res in results:
        m = res["metrics"]
        assert 0.0 <= m["seen_acc"] <= 1.0
        assert ("unseen_acc" in m) == (method != "task-hnet")
        if method != "task-hnet":
            assert sorted(m["unseen_by_size"]) == ["10", "5"]


def test_report_table_and_plot(data, tmp_path):
    rows = []
    for method in ("hnet-mip-unit", "global"):
        for seed in (0, 1):
            for variant, res in personalized.run(method, seed, data, CFG):
                rows.append({"task": "personalized", "variant": variant, "seed": seed, **res})
    path = personalized.write_report(rows, CFG, tmp_path, "header")
    text = path.read_text()
    assert "| hnet-mip-unit | 2 |" in text and "| finetune-25 | 2 |" in text and "FEMNIST" in text
    assert (tmp_path / "acc_vs_set_size.png").is_file()


def test_mean_ci():
    m, h = personalized.mean_ci([0.5, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(12.706 * 0.1414213 / 1.4142136, rel=1e-4)


def test_running_out_of_images_of_a_class_is_an_error(data):
    with pytest.raises(ValueError, match="not enough training images of class"):
        personalized.Clients(data, {**CFG, "n_min": 100, "n_max": 120}, seed=0)
