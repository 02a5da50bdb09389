"""Hypernetwork-generated LoRA on a BERT-style encoder: step time and memory (``python -m benchmarks.lora``).

Speed (side by side, interleaved, one thread and all threads): a training step (forward, backward,
fused Adam) of

* ``plain``: the same BERT trained without adapters (full fine-tuning);
* ``peft``: one static LoRA adapter (``peft``, same targets and rank), the usual practice;
* ``shared``: hyperloom LoRA, one conditioning value for the batch;
* ``per-sample``: hyperloom LoRA, one conditioning value (so one adapter) per sample;
* ``materialising``: hyperloom's generic per-sample path before LoRA mode (``hypernetize`` predicting the
  query/value weights with a rank-8 low-rank head, ``torch.func.vmap``: every sample's full weight is formed).

Memory of the per-sample step against B and hidden: the peak of the bytes allocated and not yet freed
during one step, from torch's CPU allocator events (``torch.profiler`` with ``profile_memory``, the same
measure as ``python -m benchmarks``); parameters, gradients and optimiser state that live across steps are
not in it. The per-sample step is compared with the shared step of the same batch (what per-sample
conditioning adds) and with the materialising path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hyperloom as hl

from .bench import adam, interleaved, iqr, med, transient_peak

TARGETS = ["*.attention.self.query", "*.attention.self.value"]
RANK, ALPHA = 8, 16
HIDDEN = (16, 64, 128)


def bert(hidden: int, layers: int, seq: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=max(128, seq),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def batch_data(n: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[n // 2 :, seq - seq // 4 :] = 0  # real padding in half of the batch
    return ids, mask


def step(forward: Callable[[], Any], opt: torch.optim.Optimizer) -> Callable[[], None]:
    def run() -> None:
        loss = forward().last_hidden_state.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


Variant = tuple[Callable[[], Any], torch.optim.Optimizer]


def variants(hidden: int, layers: int, seq: int, n: int, *, with_peft: bool, with_materialising: bool) -> dict[str, Variant]:
    ids, mask = batch_data(n, seq)
    lam_pool = torch.rand(4096, n)
    it = iter(range(10**9))

    def lam_shared() -> float:
        return float(lam_pool[next(it) % 4096, 0])

    def lam_per_sample() -> torch.Tensor:
        return lam_pool[next(it) % 4096]

    base = bert(hidden, layers, seq)
    plain = bert(hidden, layers, seq)
    fns: dict[str, Variant] = {"plain": (lambda: plain(ids, attention_mask=mask), adam(plain.parameters()))}
    if with_peft:
        import peft

        pm = peft.get_peft_model(bert(hidden, layers, seq), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"]))
        fns["peft"] = (lambda: pm(input_ids=ids, attention_mask=mask), adam([p for p in pm.parameters() if p.requires_grad]))
    hnet = hl.hypernetize(base, inputs={"lam": (0.0, 1.0)}, predict=TARGETS, hidden=HIDDEN, lora=hl.LoRA(rank=RANK, alpha=ALPHA))
    opt = adam([p for p in hnet.parameters() if p.requires_grad])
    fns["shared"] = (lambda: hnet(ids, attention_mask=mask, lam=lam_shared()), opt)
    fns["per-sample"] = (lambda: hnet(ids, attention_mask=mask, lam=lam_per_sample()), opt)
    if with_materialising:
        # before LoRA mode: the weights predicted (rank-8 low-rank head), one full weight per sample under vmap;
        # no attention mask (a 2-D mask cannot run under vmap in transformers' BERT)
        old = hl.hypernetize(
            bert(hidden, layers, seq),
            inputs={"lam": (0.0, 1.0)},
            predict=[t + ".weight" for t in TARGETS],
            hidden=HIDDEN,
            head="lowrank",
            rank=RANK,
            zero_init=True,
        )
        old.check_outputs = False
        old.primary.requires_grad_(False)
        fns["materialising"] = (lambda: old(ids, lam=lam_per_sample()), adam([p for p in old.parameters() if p.requires_grad]))
        fns["shared, no mask"] = (lambda: hnet(ids, lam=lam_shared()), opt)
        fns["per-sample, no mask"] = (lambda: hnet(ids, lam=lam_per_sample()), opt)
    return fns


def section_speed(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(f"\n## Step time, BERT hidden {args.hidden}, {args.layers} layers, seq {args.seq}, B = {args.batch}, rank {RANK} on query/value")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        vs = variants(args.hidden, args.layers, args.seq, args.batch, with_peft=args.peft, with_materialising=args.materialising)
        fns = {k: step(*v) for k, v in vs.items()}
        res = interleaved(fns, rounds=args.rounds, inner=args.inner, warmup=2)
        m = {k: med(v) for k, v in res.items()}
        row: dict[str, Any] = {"threads": threads, "ms": m, "iqr": {k: iqr(v) for k, v in res.items()}}
        row["shared_over_plain"] = m["shared"] / m["plain"]
        row["per_sample_over_shared"] = m["per-sample"] / m["shared"]
        if "peft" in m:
            row["shared_over_peft"] = m["shared"] / m["peft"]
        if "materialising" in m:
            row["materialising_over_per_sample_no_mask"] = m["materialising"] / m["per-sample, no mask"]
        rows.append(row)
        print(f"\n{threads} thread(s): median ms per step (IQR)")
        for k, v in res.items():
            lo, hi = iqr(v)
            print(f"  {k:<22}{m[k]:>9.1f}   ({lo:.1f}-{hi:.1f})")
        print(f"  shared ÷ plain = {row['shared_over_plain']:.3f} (goal <= 1.05)")
        print(f"  per-sample ÷ shared = {row['per_sample_over_shared']:.3f} (goal <= 1.10)")
        if "shared_over_peft" in row:
            print(f"  shared ÷ peft = {row['shared_over_peft']:.3f}")
        if "materialising_over_per_sample_no_mask" in row:
            print(f"  materialising per-sample (vmap) ÷ factorised per-sample = {row['materialising_over_per_sample_no_mask']:.3f}")
    report["speed"] = rows


def forward_backward_peak(forward: Callable[[], Any], opt: torch.optim.Optimizer) -> int:
    """Peak bytes allocated during one forward + backward (activations, saved tensors, gradients), from a clean state.

    Gradients are set to None first, so every variant starts from its parameters alone; one warm-up call
    before, so lazily created buffers are not counted.
    """

    def fwd_bwd() -> None:
        forward().last_hidden_state.square().mean().backward()

    opt.zero_grad(set_to_none=True)
    fwd_bwd()
    opt.zero_grad(set_to_none=True)
    peak = transient_peak(fwd_bwd)
    opt.zero_grad(set_to_none=True)
    return peak


def _bytes_formula(hidden: int, layers: int, n: int) -> tuple[int, int]:
    """Values per step of the per-sample adapters: factorised ``B r (m + n)`` vs materialised ``B m n`` (all targets)."""
    targets = 2 * layers
    return n * RANK * (2 * hidden) * targets, n * hidden * hidden * targets


def section_memory(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print("\n## Peak memory of one forward + backward from a clean state (torch CPU allocator events), MiB")
    print(
        f"{'hidden':>7}{'B':>5}{'plain':>9}{'shared':>9}{'per-smp':>9}{'per-smp-shared':>16}{'B·r·(m+n)':>11}{'B·m·n':>9}{'materialising':>15}"
    )
    torch.set_num_threads(args.threads[-1])
    rows = []
    grid = [(h, b) for h in args.mem_hidden for b in args.mem_batches if h == args.mem_hidden[0] or b == args.mem_batch_at]
    for h, n in grid:
        fac, dense = _bytes_formula(h, args.layers, n)
        mat_ok = args.materialising and dense * 4 * 3 < args.mem_cap_mib * 2**20
        vs = variants(h, args.layers, args.seq, n, with_peft=False, with_materialising=mat_ok)
        peak = {k: forward_backward_peak(*v) / 2**20 for k, v in vs.items() if k in ("plain", "shared", "per-sample", "materialising")}
        row = {"hidden": h, "B": n, **{k + "_mib": v for k, v in peak.items()}}
        row["factorised_values_mib"] = fac * 4 / 2**20
        row["materialised_values_mib"] = dense * 4 / 2**20
        row["per_sample_minus_shared_mib"] = peak["per-sample"] - peak["shared"]
        rows.append(row)
        mat = f"{peak['materialising']:>15.1f}" if "materialising" in peak else f"{'skipped':>15}"
        print(
            f"{h:>7}{n:>5}{peak['plain']:>9.1f}{peak['shared']:>9.1f}{peak['per-sample']:>9.1f}{row['per_sample_minus_shared_mib']:>16.1f}"
            f"{row['factorised_values_mib']:>11.2f}{row['materialised_values_mib']:>9.1f}{mat}"
        )
    report["memory"] = rows


def plot_memory(rows: list[dict[str, Any]], path: Path, hidden0: int, batch_at: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, fixed, label in (
        (axes[0], "B", ("hidden", hidden0), "B (hidden %d)"),
        (axes[1], "hidden", ("B", batch_at), "hidden (B = %d)"),
    ):
        sel = sorted((r for r in rows if r[fixed[0]] == fixed[1]), key=lambda r: r[key])
        xs = [r[key] for r in sel]
        ax.plot(xs, [r["per_sample_minus_shared_mib"] for r in sel], "o-", label="per-sample - shared step (measured)")
        ax.plot(xs, [r["factorised_values_mib"] for r in sel], "--", label="B·r·(m+n) values, fp32")
        ax.plot(xs, [r["materialised_values_mib"] for r in sel], ":", label="B·m·n values, fp32")
        mat = [(r[key], r["materialising_mib"] - r["shared_mib"]) for r in sel if "materialising_mib" in r]
        if mat:
            ax.plot(*zip(*mat), "s-", label="materialising (vmap) - shared step (measured)")
        ax.set_xlabel(label % fixed[1])
        ax.set_ylabel("MiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Extra peak memory of per-sample LoRA adapters (BERT, rank 8 on query/value)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (a smoke run)")
    p.add_argument("--sections", default="speed,memory", help="comma-separated subset of speed, memory")
    p.add_argument("--out", default="runs/bench-lora")
    args = p.parse_args(argv)
    all_threads = torch.get_num_threads()
    args.threads = sorted({1, all_threads})
    args.peft = args.materialising = True
    args.mem_cap_mib = 6144
    if args.quick:
        args.hidden, args.layers, args.seq, args.batch = 64, 1, 8, 4
        args.rounds, args.inner = 2, 1
        args.mem_hidden, args.mem_batches, args.mem_batch_at = [64, 128], [1, 4], 4
    else:
        args.hidden, args.layers, args.seq, args.batch = 256, 4, 64, 32
        args.rounds, args.inner = 15, 2
        args.mem_hidden, args.mem_batches, args.mem_batch_at = [256, 512, 768, 1024], [1, 8, 16, 32, 64], 32
    print(f"torch {torch.__version__}, {all_threads} threads available, device cpu, python {sys.version.split()[0]}")
    report: dict[str, Any] = {"torch": torch.__version__, "threads_available": all_threads}
    sections = {"speed": section_speed, "memory": section_memory}
    bad = [s for s in args.sections.split(",") if s not in sections]
    if bad:
        p.error(f"--sections: unknown {bad}; choose a comma-separated subset of {list(sections)}")
    for s in args.sections.split(","):
        sections[s](args, report)
    torch.set_num_threads(all_threads)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-lora.json").write_text(json.dumps(report, indent=1))
        if "memory" in report:
            plot_memory(report["memory"], out / "memory.png", args.mem_hidden[0], args.mem_batch_at)
        print(f"\nwrote {out / 'bench-lora.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
