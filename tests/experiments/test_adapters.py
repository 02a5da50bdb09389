import json

import pytest
import torch

import hyperloom as hl

pytest.importorskip("transformers")

from experiments import adapters
from experiments.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_rotate_reference():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 3] = 1.0  # top right
    assert torch.allclose(adapters.rotate(x, torch.tensor([0.0])), x, atol=1e-6)
    r90 = adapters.rotate(x, torch.tensor([90.0]))
    assert torch.allclose(r90, torch.rot90(x, 1, (2, 3)), atol=1e-5) or torch.allclose(r90, torch.rot90(x, -1, (2, 3)), atol=1e-5)
    r180 = adapters.rotate(x, torch.tensor([180.0]))
    assert torch.allclose(r180, torch.rot90(x, 2, (2, 3)), atol=1e-5)


def test_variants_start_from_the_pretrained_model_and_train_what_they_should():
    cfg = {**adapters.DEFAULTS, "vit": {**adapters.DEFAULTS["vit"], "num_hidden_layers": 1}}
    base = adapters.vit(cfg, 10).eval()
    x, t = torch.rand(4, 1, 28, 28), torch.rand(4)
    ref = base(x).logits
    counts = {}
    for v in ["frozen", "shared-lora", "hyper-lora-default", "hyper-lora-mip", "hyper-lora-mip-structured", "oracle-lora@60", "full-ft"]:
        m = adapters.build(v, base, cfg).eval()
        assert torch.equal(m(x, t), ref), v  # every adapter starts exactly at the pretrained model
        counts[v] = adapters.trainable(m)
    r, n_targets = cfg["rank"], 3
    assert counts["frozen"] == 0
    assert counts["shared-lora"] == counts["oracle-lora@60"] == r * (64 + 64) * 2 + r * (64 + 128)  # q, v, fc1 of one block
    assert counts["full-ft"] == sum(p.numel() for p in base.parameters())
    assert counts["hyper-lora-mip"] > counts["shared-lora"] and n_targets == 3
    assert isinstance(adapters.build("hyper-lora-mip-structured", base, cfg).model.hypernet.head, hl.StructuredHead)


def test_run_all_smoke_resumes_and_reports(tmp_path):
    """The whole pipeline on a tiny configuration (the CLI's quick size takes minutes)."""
    from argparse import Namespace

    from experiments.common import ResultStore

    cfg = {
        **adapters.DEFAULTS,
        "pretrain_steps": 2,
        "steps": 2,
        "batch": 8,
        "n_test": 16,
        "eval_angles": [0, 90, 180],
        "oracle_angles": [0, 180],
        "vit": {**adapters.DEFAULTS["vit"], "num_hidden_layers": 1},
    }
    args = Namespace(seeds=1, data="auto")
    store = ResultStore(tmp_path / "results.jsonl")
    adapters.run_all(args, cfg, tmp_path, store)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    expected = {"frozen", "shared-lora", "hyper-lora-default", "hyper-lora-mip", "hyper-lora-mip-structured", "full-ft"}
    expected |= {"oracle-lora@0", "oracle-lora@180"}
    assert {r["variant"] for r in rows} == expected
    assert all(set(r["metrics"]["acc_by_angle"]) == {"0", "90", "180"} for r in rows)
    adapters.run_all(args, cfg, tmp_path, ResultStore(tmp_path / "results.jsonl"))  # everything finished: nothing re-run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    summary = adapters.summarise(rows, cfg)
    # the oracle at 0 degrees is the LoRA trained at 0 degrees
    at0 = next(r for r in rows if r["variant"] == "oracle-lora@0")["metrics"]["acc_by_angle"]["0"]
    assert summary["oracle-lora"]["acc"]["0"] == at0
    report = adapters.write_report(rows, cfg, tmp_path, "header").read_text()
    assert "| hyper-lora-mip |" in report and "| oracle-lora |" in report
    assert (tmp_path / "accuracy_vs_angle.png").stat().st_size > 1000


def test_cli_parses(monkeypatch):
    seen = {}
    monkeypatch.setattr(adapters, "run_all", lambda args, cfg, out, store: seen.update(cfg=cfg, seeds=args.seeds))
    monkeypatch.setattr(adapters, "write_report", lambda rows, cfg, out, header: out / "report.md")
    assert main(["adapters", "--steps", "7", "--pretrain-steps", "5", "--out", "/tmp/unused-adapters"]) == 0
    assert seen["cfg"]["steps"] == 7 and seen["cfg"]["pretrain_steps"] == 5 and seen["seeds"] == 2
