"""Smoke run of the benchmark (tiny sizes): every section runs and reports its ratios."""

import json

from benchmarks.bench import HandMIP, main


def test_benchmark_quick_smoke(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--sections", "shared,per_sample,scaling"]) == 0
    out = capsys.readouterr().out
    assert "hyperloom ÷ hand-written =" in out and "vmap ÷ loop" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["shared_convnet"]["ratio_hyperloom_hand"] > 0
    assert [r["B"] for r in report["per_sample"]] == [1, 8]
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_hand_written_reference_equals_hyperloom():
    """The hand-written baseline computes the same function as hyperloom given the same weights."""
    import torch

    import hyperloom as hl
    from benchmarks.bench import ConvNet

    torch.manual_seed(0)
    hm = hl.hypernetize(ConvNet(), inputs={"z": hl.Input(0.0, 1.0, dim=2)}, hidden=(16, 64, 128))
    hand = HandMIP("convnet", [tuple(v.shape) for v in hm.theta0.values()], 2, [16, 64, 128])
    with torch.no_grad():
        for t0, p in zip(hand.theta0, hm.theta0.values()):
            t0.copy_(p)
        lin = [m for m in hm.hypernet.trunk.layers if isinstance(m, torch.nn.Linear)]
        for a, b in zip([m for m in hand.trunk if isinstance(m, torch.nn.Linear)], lin):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        hand.out.weight.copy_(hm.hypernet.head.linear.weight)
        assert hm.hypernet.head.linear.bias is None and hand.out.bias is None
    x, z = torch.randn(3, 1, 28, 28), torch.rand(2)
    torch.testing.assert_close(hand(x, z), hm(x, z=z))


def test_lora_benchmark_quick_smoke(tmp_path, capsys):
    import warnings

    import pytest

    pytest.importorskip("peft")
    from benchmarks import lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecations inside peft, SDPA's missing vmap rule
        assert lora.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per-sample ÷ shared =" in out and "shared ÷ peft =" in out
    report = json.loads((tmp_path / "bench-lora.json").read_text())
    assert {r["threads"] for r in report["speed"]} >= {1}
    assert [(r["hidden"], r["B"]) for r in report["memory"]] == [(64, 1), (64, 4), (128, 4)]
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_heads_benchmark_quick_smoke(tmp_path, capsys):
    import warnings

    from benchmarks import heads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert heads.main(["--quick", "--out", str(tmp_path), "--sections", "lora,convnet"]) == 0
    out = capsys.readouterr().out
    assert "structured ÷ dense step time =" in out and "chunked ÷ dense step time =" in out
    report = json.loads((tmp_path / "bench-heads.json").read_text())
    assert report["lora"]["time_ratio"] > 0 and set(report["convnet"]["ratios"]) == {"chunked", "structured"}


def test_pinn_benchmark_quick_smoke(tmp_path, capsys):
    """The per-sample PDE residual section runs (it checks that vmap and the loop compute the same residual)."""
    assert main(["--quick", "--out", str(tmp_path), "--sections", "pinn"]) == 0
    assert "vmap ÷ fastest loop =" in capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["pinn"]["B"] == 8 and report["pinn"]["ratio"] > 0


def test_selftune_benchmark_quick_smoke(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--sections", "selftune"]) == 0
    assert "selftune ÷ plain =" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())["selftune"]
    assert [r["T"] for r in rows] == [5] and rows[0]["ratio"] > 0
