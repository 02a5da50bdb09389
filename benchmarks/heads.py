"""Shared heads against the dense head: sizes, step time, memory (``python -m benchmarks heads``).

Sections (all ratios measured side by side in one run):

* ``counts``: hypernetwork parameters in LoRA mode (query/value, rank 8) on a BERT-base-size model
  (``transformers.BertConfig()``, 109.5 M parameters) and on the same model with twice the layers, and on
  a 1B-class Llama-style config — every model built on the meta device (no allocation, counts only).
  Targets: the structured head without ``theta0`` is <= 1 % of the base model, and doubling the layers
  grows it by < 1 %.
* ``lora``: a per-sample LoRA training step (forward, backward, Adam) on the BERT-base-size model at
  B = 32 with the structured and the dense head: median step time (interleaved) and the peak of transient
  memory (torch's CPU allocator events). Target: structured <= 1.10x dense time, peak no higher.
* ``convnet``: a training step of the reproduction's classifier ConvNet (``width`` 2, 242 k parameters,
  every weight predicted, one conditioning value per batch of 64) with the dense, chunked and structured
  heads. Target: chunked and structured <= 1.2x dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hyperloom as hl

from .bench import adam, interleaved, iqr, med, transient_peak

TARGETS = ["*.attention.self.query", "*.attention.self.value"]
LLAMA_TARGETS = ["*.self_attn.q_proj", "*.self_attn.v_proj"]
RANK, ALPHA, HIDDEN = 8, 16, (16, 64, 128)
HEADS: dict[str, Any] = {
    "dense": "dense",
    "chunked": hl.Chunked(chunk_size=1024, width=32),
    "structured": hl.Structured(block=32, width=32),
}


def _quiet_transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def bert_base(layers: int = 12, *, device: str = "meta", seq: int = 512) -> nn.Module:
    tf = _quiet_transformers()
    cfg = tf.BertConfig(num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.device(device):
        torch.manual_seed(0)
        return tf.BertModel(cfg, add_pooling_layer=False)


def llama_1b() -> nn.Module:
    """A Llama-3.2-1B-shaped decoder (16 layers, 2048 wide, 8 KV heads, 128 k vocabulary) on the meta device."""
    tf = _quiet_transformers()
    cfg = tf.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return tf.LlamaForCausalLM(cfg)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hyper_counts(hm: Any) -> dict[str, int]:
    """Hypernetwork parameters with and without ``theta0``."""
    total = count(hm.hypernet)
    theta0 = count(hm.hypernet.theta0) if hm.hypernet.theta0 is not None else 0
    return {"with_theta0": total, "without_theta0": total - theta0, "head": count(hm.hypernet.head)}


def lora_model(base: nn.Module, head: Any, targets: list[str]) -> Any:
    return hl.hypernetize(base, inputs={"lam": (0.0, 1.0)}, predict=targets, hidden=HIDDEN, head=head, lora=hl.LoRA(rank=RANK, alpha=ALPHA))


def section_counts(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(f"\n## Hypernetwork size in LoRA mode (query/value, rank {RANK}, trunk {HIDDEN}), models on the meta device")
    rows = []
    models: list[tuple[str, Callable[[], nn.Module], list[str]]] = [
        ("BERT-base (12 layers)", lambda: bert_base(12), TARGETS),
        ("BERT-base, 24 layers", lambda: bert_base(24), TARGETS),
        ("Llama-style 1B (16 layers)", llama_1b, LLAMA_TARGETS),
    ]
    print(f"{'model':<28}{'base':>14}{'head':>12}{'hypernet':>14}{'w/o theta0':>14}{'÷ base (w/o θ0)':>18}")
    for label, build, targets in models:
        base = build()
        nb = count(base)
        for head in ("dense", "structured"):
            c = hyper_counts(lora_model(base, head, targets))
            row = {"model": label, "base": nb, "head_kind": head, **c, "ratio_without_theta0": c["without_theta0"] / nb}
            rows.append(row)
            print(
                f"{label + ', ' + head:<28}{nb:>14,}{c['head']:>12,}{c['with_theta0']:>14,}{c['without_theta0']:>14,}"
                f"{100 * row['ratio_without_theta0']:>17.3f}%"
            )
    s12 = next(r for r in rows if r["model"].startswith("BERT-base (") and r["head_kind"] == "structured")
    s24 = next(r for r in rows if r["model"].startswith("BERT-base, 24") and r["head_kind"] == "structured")
    d12 = next(r for r in rows if r["model"].startswith("BERT-base (") and r["head_kind"] == "dense")
    growth = s24["without_theta0"] / s12["without_theta0"] - 1
    print(f"structured w/o theta0 ÷ base = {100 * s12['ratio_without_theta0']:.3f}% (goal <= 1%)")
    print(f"doubling the layers grows the structured hypernetwork (w/o theta0) by {100 * growth:.3f}% (goal < 1%)")
    print(f"structured ÷ dense hypernetwork (w/o theta0) = {s12['without_theta0'] / d12['without_theta0']:.4f}")
    report["counts"] = {"rows": rows, "structured_over_base": s12["ratio_without_theta0"], "doubling_growth": growth}


def _bert_batch(n: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30000, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[n // 2 :, seq - seq // 4 :] = 0
    return ids, mask


def section_lora(args: argparse.Namespace, report: dict[str, Any]) -> None:
    layers, n, seq = args.lora_layers, args.lora_batch, args.lora_seq
    print(f"\n## Per-sample LoRA step, BERT-base size ({layers} layers, 768 wide), B = {n}, seq {seq}, {torch.get_num_threads()} thread(s)")
    ids, mask = _bert_batch(n, seq)
    lam_pool = torch.rand(64, n)
    counter = iter(range(10**9))
    fns: dict[str, Callable[[], None]] = {}
    fwd: dict[str, tuple[Callable[[], Any], torch.optim.Optimizer]] = {}
    for head in ("dense", "structured"):
        hm = lora_model(bert_base(layers, device="cpu"), head, TARGETS)
        opt = adam([p for p in hm.parameters() if p.requires_grad])

        def forward(hm: Any = hm) -> Any:
            return hm(ids, attention_mask=mask, lam=lam_pool[next(counter) % 64])

        def step(forward: Callable[[], Any] = forward, opt: torch.optim.Optimizer = opt) -> None:
            loss = forward().last_hidden_state.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[head], fwd[head] = step, (forward, opt)
    res = interleaved(fns, rounds=args.rounds, inner=1, warmup=1)
    m = {k: med(v) for k, v in res.items()}
    peaks = {}
    for k, (forward, opt) in fwd.items():
        opt.zero_grad(set_to_none=True)
        peaks[k] = transient_peak(lambda forward=forward: forward().last_hidden_state.square().mean().backward()) / 2**20
        opt.zero_grad(set_to_none=True)
    for k in fns:
        lo, hi = iqr(res[k])
        print(f"  {k:<12}{m[k]:>9.1f} ms ({lo:.1f}-{hi:.1f})   peak {peaks[k]:>8.1f} MiB")
    t_ratio, p_ratio = m["structured"] / m["dense"], peaks["structured"] / peaks["dense"]
    print(f"  structured ÷ dense step time = {t_ratio:.3f} (goal <= 1.10)")
    print(f"  structured ÷ dense peak memory = {p_ratio:.3f} (goal <= 1.00)")
    report["lora"] = {"layers": layers, "B": n, "seq": seq, "ms": m, "peak_mib": peaks, "time_ratio": t_ratio, "peak_ratio": p_ratio}


class ConvNet(nn.Module):
    """The reproduction's classifier ConvNet at ``width`` (experiments/classify.py; 242 k parameters at width 2)."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        c1, c2, c3 = 16 * width, 32 * width, 64 * width
        self.c1, self.c2, self.c3, self.c4 = nn.Conv2d(1, c1, 5), nn.Conv2d(c1, c2, 3), nn.Conv2d(c2, c3, 3), nn.Conv2d(c3, c3, 3)
        self.fc = nn.Linear(c3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.c1(x))
        x = F.max_pool2d(F.leaky_relu(self.c2(x)), 2)
        x = F.max_pool2d(F.leaky_relu(self.c3(x)), 2)
        x = F.leaky_relu(self.c4(x))
        return self.fc(x.mean((2, 3)))


def section_convnet(args: argparse.Namespace, report: dict[str, Any]) -> None:
    b = args.conv_batch
    print(f"\n## Classifier ConvNet (width {args.conv_width}), every weight predicted, B = {b}, one value per batch, Adam")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
    lam = torch.rand(64).tolist()
    counter = iter(range(10**9))
    fns: dict[str, Callable[[], None]] = {}
    sizes: dict[str, dict[str, int]] = {}
    target = count(ConvNet(args.conv_width))
    for name, head in HEADS.items():
        torch.manual_seed(0)
        hm = hl.hypernetize(ConvNet(args.conv_width), inputs={"lam": (0.0, 1.0)}, hidden=HIDDEN, head=head)
        opt = adam(list(hm.parameters()))
        sizes[name] = hyper_counts(hm)

        def step(hm: Any = hm, opt: torch.optim.Optimizer = opt) -> None:
            loss = F.cross_entropy(hm(x, lam=lam[next(counter) % 64]), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[name] = step
    res = interleaved(fns, rounds=args.rounds, inner=args.inner, warmup=2)
    m = {k: med(v) for k, v in res.items()}
    print(f"  target: {target:,} parameters")
    for k in fns:
        lo, hi = iqr(res[k])
        w = sizes[k]["without_theta0"]
        print(f"  {k:<12}{m[k]:>9.1f} ms ({lo:.1f}-{hi:.1f})   hypernet w/o θ0 {w:>11,} ({w / target:.3f}x target)")
    ratios = {k: m[k] / m["dense"] for k in ("chunked", "structured")}
    for k, r in ratios.items():
        print(f"  {k} ÷ dense step time = {r:.3f} (goal <= 1.2)")
    report["convnet"] = {"width": args.conv_width, "B": b, "target": target, "ms": m, "sizes": sizes, "ratios": ratios}


SECTIONS = {"counts": section_counts, "lora": section_lora, "convnet": section_convnet}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks heads", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="few rounds, small sizes (a smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", default="runs/bench-heads")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--lora-seq", type=int, default=16, help="sequence length of the per-sample LoRA step")
    p.add_argument("--rounds", type=int, default=0, dest="rounds_override", help="override the number of timed rounds")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.inner, args.lora_layers, args.lora_batch, args.lora_seq = 2, 1, 1, 4, 8
        args.conv_width, args.conv_batch = 1, 8
    else:
        args.rounds, args.inner, args.lora_layers, args.lora_batch = 5, 2, 12, 32
        args.conv_width, args.conv_batch = 2, 64
    if args.rounds_override:
        args.rounds = args.rounds_override
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, python {sys.version.split()[0]}")
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for s in args.sections.split(","):
        SECTIONS[s](args, report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-heads.json").write_text(json.dumps(report, indent=1))
        print(f"\nwrote {out / 'bench-heads.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
