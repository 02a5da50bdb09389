"""Speed and memory of hyperloom against the practical limit (hand-written PyTorch) and peers.

Every comparison runs its variants interleaved in one process (A B A B ..., the
order rotated every round, after a warm-up) and reports the median and the
interquartile range of many steps, and the ratio of medians. Absolute times
vary between machines and runs; the ratios are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hyperloom as hl
from hyperloom.heads import available_memory

# --------------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, inner: int, warmup: int = 2) -> dict[str, list[float]]:
    """Per-call milliseconds of each function, measured A B A B ... with the order rotated per round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            out[name].append((time.perf_counter() - t) / inner * 1000)
    return out


def med(v: list[float]) -> float:
    return statistics.median(v)


def iqr(v: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0], v[0], v[0]]
    return q[0], q[2]


def tensor_bytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def state_bytes(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimiser state (steady-state memory)."""
    grads = [p.grad for p in params if p.grad is not None]
    st = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(params) + tensor_bytes(grads) + tensor_bytes(st)


@contextlib.contextmanager
def _quiet_fds() -> Any:
    """Silence the profiler's C++ start/stop lines (written straight to the file descriptors)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def transient_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated and not yet freed during one call, from the profiler's allocator events.

    Memory that lives across steps (parameters, gradients, optimiser state) is not included: see
    :func:`state_bytes`.
    """
    with _quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


# --------------------------------------------------------------------------------------------------
# models: the primary networks, a hand-written hypernetwork, HyperLight
# --------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """HyperLight's README ConvNet."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 32, 3)
        self.c3, self.c4 = nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.c1(x))
        x = F.max_pool2d(F.leaky_relu(self.c2(x)), 2)
        x = F.max_pool2d(F.leaky_relu(self.c3(x)), 2)
        x = F.leaky_relu(self.c4(x))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, width: int = 256, inp: int = 784, out: int = 10) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(inp, width), nn.Linear(width, width), nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(F.leaky_relu(self.l2(F.leaky_relu(self.l1(x.flatten(1))))))


def functional_forward(kind: str, x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    """The primary network written with F.conv2d / F.linear on explicit weights (hand-written)."""
    if kind == "convnet":
        h = F.leaky_relu(F.conv2d(x, w[0], w[1]))
        h = F.max_pool2d(F.leaky_relu(F.conv2d(h, w[2], w[3])), 2)
        h = F.max_pool2d(F.leaky_relu(F.conv2d(h, w[4], w[5])), 2)
        h = F.leaky_relu(F.conv2d(h, w[6], w[7]))
        return F.linear(h.mean((2, 3)), w[8], w[9])
    h = F.leaky_relu(F.linear(x.flatten(1), w[0], w[1]))
    h = F.leaky_relu(F.linear(h, w[2], w[3]))
    return F.linear(h, w[4], w[5])


class HandMIP(nn.Module):
    """The same MIP hypernetwork written by hand: cos|sin -> MLP -> split -> theta0 + Delta -> F.* calls."""

    def __init__(self, kind: str, shapes: list[tuple[int, ...]], k: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = 2 * k
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.LeakyReLU()]
            prev = h
        self.trunk = nn.Sequential(*layers)
        self.sizes = [math.prod(s) for s in shapes]
        self.shapes = shapes
        self.out = nn.Linear(prev, sum(self.sizes), bias=False)  # theta0 is the offset (no second one)
        self.theta0 = nn.ParameterList([nn.Parameter(torch.randn(s) * 0.05) for s in shapes])
        self.kind = kind

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = z * (math.pi / 2)
        flat = self.out(self.trunk(torch.cat([a.cos(), a.sin()]).unsqueeze(0)))[0]
        ws = [t + f.view(t.shape) for t, f in zip(self.theta0, torch.split(flat, self.sizes))]
        return functional_forward(self.kind, x, ws)


def make_primary(kind: str, width: int = 256) -> nn.Module:
    return ConvNet() if kind == "convnet" else MLP(width)


def make_data(kind: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 1, 28, 28)
    return x, torch.randint(0, 10, (batch,))


FUSED = {"fused": True}


def adam(params: Any) -> torch.optim.Optimizer:
    # fused Adam on CPU is 3-5x faster than the default for-loop Adam on the large output layer; every
    # variant uses the same optimiser, so the ratios compare the models, not optimiser settings.
    return torch.optim.Adam(params, lr=1e-3, **FUSED)


def train_step(model: Callable[[], torch.Tensor], y: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        loss = F.cross_entropy(model(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def hyperlight_setup(kind: str, k: int, hidden: list[int]) -> tuple[Any, Any] | None:
    try:
        import hyperlight as hyl  # benchmark-only dependency: pip install hyperlight==0.0.5
    except ImportError:
        return None
    net = make_primary(kind)
    mods = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    main = hyl.hypernetize(net, modules=mods)
    hnet = hyl.HyperNet(input_shapes={"h": (k,)}, output_shapes=main.external_shapes(), hidden_sizes=hidden)
    return main, hnet


# --------------------------------------------------------------------------------------------------
# the sections
# --------------------------------------------------------------------------------------------------


def section_shared(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print("\n## 1-2. One weight set per batch: training step (forward + backward + Adam step)")
    k, hidden = 2, [16, 64, 128]
    for kind, batch in (("convnet", 64), ("mlp", 128)):
        torch.manual_seed(0)
        x, y = make_data(kind, batch)
        hm = hl.hypernetize(make_primary(kind), inputs={"z": hl.Input(0.0, 1.0, dim=k)}, hidden=tuple(hidden))
        shapes = [tuple(v.shape) for v in hm.theta0.values()]
        hand = HandMIP(kind, shapes, k, hidden)
        plain = make_primary(kind)
        zs = torch.rand(10_000, k)
        it = iter(range(10**9))

        def z() -> torch.Tensor:
            return zs[next(it) % len(zs)]

        fns: dict[str, Callable[[], None]] = {
            "hyperloom": train_step(lambda: hm(x, z=z()), y, adam(hm.parameters())),
            "hand-written": train_step(lambda: hand(x, z()), y, adam(hand.parameters())),
            "plain network": train_step(lambda: plain(x), y, adam(plain.parameters())),
        }
        setup = hyperlight_setup(kind, k, hidden) if kind == "convnet" else None
        if setup is not None:
            main, hnet = setup

            def hyperlight_forward() -> torch.Tensor:
                with main.using_externals(hnet(h=z())):
                    return main(x)

            fns["HyperLight 0.0.5"] = train_step(hyperlight_forward, y, adam(list(hnet.parameters())))
        res = interleaved(fns, rounds=args.rounds, inner=args.inner)
        ref = med(res["hand-written"])
        print(f"\n{kind}, batch {batch}, {hm.hypernet.num_outputs:,} predicted values, Adam({args.optimizer})")
        print(f"{'variant':<18}{'median ms':>11}{'IQR':>20}{'÷ hand-written':>16}")
        for n, v in res.items():
            lo, hi = iqr(v)
            print(f"{n:<18}{med(v):>11.2f}{f'[{lo:.2f}, {hi:.2f}]':>20}{med(v) / ref:>16.3f}")
        row = {n: med(v) for n, v in res.items()}
        row["ratio_hyperloom_hand"] = med(res["hyperloom"]) / ref
        if "HyperLight 0.0.5" in res:
            row["ratio_hyperloom_hyperlight"] = med(res["hyperloom"]) / med(res["HyperLight 0.0.5"])
            print(f"hyperloom ÷ HyperLight 0.0.5 = {row['ratio_hyperloom_hyperlight']:.3f}  (goal <= 0.65)")
        print(f"hyperloom ÷ hand-written = {row['ratio_hyperloom_hand']:.3f}  (goal <= 1.10)")
        # memory
        mem = {}
        for n, fn in fns.items():
            fn()
            model_params = {
                "hyperloom": list(hm.parameters()),
                "hand-written": list(hand.parameters()),
                "plain network": list(plain.parameters()),
            }.get(n)
            mem[n] = transient_peak(fn) / 2**20
            if model_params is not None:
                mem[n + " steady"] = sum(t.numel() * t.element_size() * 4 for t in model_params) / 2**20
        print("peak transient memory per step (MiB): " + ", ".join(f"{n} {v:.1f}" for n, v in mem.items() if "steady" not in n))
        row["mem_ratio_hyperloom_hand"] = mem["hyperloom"] / mem["hand-written"]
        print(f"memory hyperloom ÷ hand-written = {row['mem_ratio_hyperloom_hand']:.3f}")
        row["memory_mib"] = mem
        report[f"shared_{kind}"] = row


def section_per_sample(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print("\n## 3. A weight set per sample (B distinct gammas): training step, hyperloom vmap ÷ Python loop")
    k, hidden = 2, [16, 64, 128]
    torch.manual_seed(0)
    hm = hl.hypernetize(ConvNet(), inputs={"z": hl.Input(0.0, 1.0, dim=k)}, hidden=tuple(hidden))
    opt = adam(hm.parameters())
    print(f"{'B':>5}{'vmap ms':>10}{'loop ms':>10}{'vmap ÷ loop':>13}{'mem vmap÷loop':>15}")
    rows = []
    for batch in args.batches:
        x, y = make_data("convnet", batch)
        z = torch.rand(batch, k)

        def loop_forward(x: torch.Tensor = x, z: torch.Tensor = z, batch: int = batch) -> torch.Tensor:
            return torch.cat([hm(x[i : i + 1], z=z[i]) for i in range(batch)])

        fns = {
            "vmap": train_step(lambda x=x, z=z: hm(x, z=z), y, opt),
            "loop": train_step(loop_forward, y, opt),
        }
        rounds = max(3, args.rounds // (1 + batch // 32))
        res = interleaved(fns, rounds=rounds, inner=1, warmup=1)
        mv, ml = transient_peak(fns["vmap"]), transient_peak(fns["loop"])
        r = {"B": batch, "vmap_ms": med(res["vmap"]), "loop_ms": med(res["loop"]), "mem_vmap_mib": mv / 2**20, "mem_loop_mib": ml / 2**20}
        r["ratio"] = r["vmap_ms"] / r["loop_ms"]
        rows.append(r)
        print(f"{batch:>5}{r['vmap_ms']:>10.1f}{r['loop_ms']:>10.1f}{r['ratio']:>13.3f}{mv / max(ml, 1):>15.3f}")
    report["per_sample"] = rows
    b64 = [r for r in rows if r["B"] == 64]
    if b64:
        print(f"at B = 64: vmap ÷ loop = {b64[0]['ratio']:.3f} (goal <= 0.25)")
    setup = hyperlight_setup("convnet", k, hidden)
    if setup is not None and 64 in args.batches:
        main, hnet = setup
        x, y = make_data("convnet", 64)
        z = torch.rand(64, k)
        hopt = adam(list(hnet.parameters()))

        def hyperlight_loop() -> torch.Tensor:
            outs = []
            for i in range(64):
                with main.using_externals(hnet(h=z[i])):
                    outs.append(main(x[i : i + 1]))
            return torch.cat(outs)

        fns = {"hyperloom vmap": train_step(lambda: hm(x, z=z), y, opt), "HyperLight loop": train_step(hyperlight_loop, y, hopt)}
        res = interleaved(fns, rounds=3, inner=1, warmup=1)
        ratio = med(res["hyperloom vmap"]) / med(res["HyperLight loop"])
        report["per_sample_vs_hyperlight_B64"] = {n: med(v) for n, v in res.items()} | {"ratio": ratio}
        print(
            f"B = 64: hyperloom vmap {med(res['hyperloom vmap']):.1f} ms, HyperLight loop "
            f"{med(res['HyperLight loop']):.1f} ms, ratio {ratio:.3f}"
        )


def section_scaling(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print("\n## 5. Scaling: MLP primary (784-w-w-10), batch 128, one weight set per batch")
    k, hidden = 2, [16, 64, 128]
    rows = []
    print(f"{'predicted':>11}{'head':>14}{'step ms':>10}{'÷ hand':>8}{'steady MiB':>12}{'peak MiB':>10}")
    for width in args.widths:
        torch.manual_seed(0)
        x, y = make_data("mlp", 128)
        heads: list[tuple[str, dict[str, Any]]] = [("dense", {})] + [(f"lowrank r={r}", {"head": "lowrank", "rank": r}) for r in args.ranks]
        fns: dict[str, Callable[[], None]] = {}
        steady: dict[str, float] = {}
        n_pred = sum(p.numel() for p in MLP(width).parameters())
        need = 4 * (hidden[-1] + 1) * n_pred * 4  # dense head: weights, grads, two Adam moments (float32)
        free = available_memory(torch.device("cpu")) or 0
        if need > 0.4 * free:
            heads = [h for h in heads if h[0] != "dense"]
            print(f"{n_pred:>11,}{'dense':>14}  does not fit: {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
            rows.append(
                {
                    "width": width,
                    "predicted": n_pred,
                    "head": "dense",
                    "ms": math.nan,
                    "steady_mib": need / 2**20,
                    "peak_mib": math.nan,
                    "ratio_hand": math.nan,
                    "fits": False,
                }
            )
        for name, kw in heads:
            hm = hl.hypernetize(MLP(width), inputs={"z": hl.Input(0.0, 1.0, dim=k)}, hidden=tuple(hidden), **kw)
            n_pred = sum(t.numel() for t in hm.theta0.values())
            params = list(hm.parameters())
            fns[name] = train_step(lambda hm=hm: hm(x, z=torch.rand(k)), y, adam(params))
            steady[name] = 4 * tensor_bytes(params) / 2**20  # params + grads + two Adam moments
        if any(h[0] == "dense" for h in heads):
            shapes = [tuple(v.shape) for v in hm.theta0.values()]
            hand = HandMIP("mlp", shapes, k, hidden)
            fns["hand dense"] = train_step(lambda: hand(x, torch.rand(k)), y, adam(hand.parameters()))
            steady["hand dense"] = 4 * tensor_bytes(list(hand.parameters())) / 2**20
        res = interleaved(fns, rounds=max(3, args.rounds // 2), inner=1)
        ref = med(res["hand dense"]) if "hand dense" in res else math.nan
        for name in fns:
            peak = transient_peak(fns[name]) / 2**20
            r = {
                "width": width,
                "predicted": n_pred,
                "head": name,
                "ms": med(res[name]),
                "steady_mib": steady[name],
                "peak_mib": peak,
                "ratio_hand": med(res[name]) / ref,
            }
            rows.append(r)
            print(f"{n_pred:>11,}{name:>14}{r['ms']:>10.1f}{r['ratio_hand']:>8.2f}{r['steady_mib']:>12.1f}{peak:>10.1f}")
    report["scaling"] = rows
    print("\nHypernetwork width (last hidden layer), MLP w=256:")
    wrows = []
    for last in args.hidden_last:
        torch.manual_seed(0)
        x, y = make_data("mlp", 128)
        hm = hl.hypernetize(MLP(256), inputs={"z": hl.Input(0.0, 1.0, dim=k)}, hidden=(16, 64, last))
        fn = train_step(lambda hm=hm: hm(x, z=torch.rand(k)), y, adam(hm.parameters()))
        res = interleaved({"s": fn}, rounds=max(3, args.rounds // 2), inner=1)
        wrows.append({"hidden_last": last, "ms": med(res["s"]), "steady_mib": 4 * tensor_bytes(list(hm.parameters())) / 2**20})
        print(f"  hidden [16, 64, {last}]: {med(res['s']):.1f} ms, steady {wrows[-1]['steady_mib']:.1f} MiB")
    report["hypernet_width"] = wrows
    if args.out:
        plot_scaling(rows, Path(args.out) / "scaling.png")


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for head in dict.fromkeys(r["head"] for r in rows):
        rs = [r for r in rows if r["head"] == head and r.get("fits", True)]
        xs = [r["predicted"] for r in rs]
        axes[0].plot(xs, [r["ms"] for r in rs], marker="o", label=head)
        axes[1].plot(xs, [r["steady_mib"] + r["peak_mib"] for r in rs], marker="o", label=head)
    for ax, yl in zip(axes, ("training step (ms)", "steady + transient memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted parameters of the primary MLP")
        ax.set_ylabel(yl)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_pinn(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """A physics-informed step with a weight set per PDE member: hl.laplacian (vmap) vs loops over members."""
    members, points = args.pinn_members, 64
    print(f"\n## 4. Per-sample PDE residual step (B = {members} members x {points} points, u and Δu), vmap ÷ loop over members")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    hm = hl.hypernetize(net, inputs={"amp": hl.Input(-1.0, 1.0, dim=4), "center": hl.Input(0.25, 0.75, dim=2)}, hidden=(64, 64))
    opt = adam(hm.parameters())
    x = torch.rand(members, points, 2)
    cond = {"amp": torch.rand(members, 4) * 2 - 1, "center": 0.25 + 0.5 * torch.rand(members, 2)}
    f = torch.randn(members, points)

    def step(residual: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss = (residual() ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    def vmapped() -> torch.Tensor:
        u, lap = hl.laplacian(hm, x, **cond)
        return lap[..., 0] + f + u[..., 0]

    def loop_laplacian() -> torch.Tensor:  # the same torch.func code, one member (shared conditioning) at a time
        out = []
        for i in range(members):
            u, lap = hl.laplacian(hm, x[i], amp=cond["amp"][i], center=cond["center"][i])
            out.append(lap[:, 0] + f[i] + u[:, 0])
        return torch.stack(out)

    def loop_autograd() -> torch.Tensor:  # the usual PINN code: a shared call per member, Δu by double backward
        out = []
        for i in range(members):
            xi = x[i].clone().requires_grad_(True)
            u = hm(xi, amp=cond["amp"][i], center=cond["center"][i])[:, 0]
            (g,) = torch.autograd.grad(u.sum(), xi, create_graph=True)
            lap = sum(torch.autograd.grad(g[:, d].sum(), xi, create_graph=True)[0][:, d] for d in range(2))
            out.append(lap + f[i] + u)
        return torch.stack(out)

    torch.testing.assert_close(vmapped(), loop_autograd(), rtol=1e-4, atol=1e-3)  # the same residual
    fns = {"vmap": step(vmapped), "loop (hl.laplacian)": step(loop_laplacian), "loop (autograd)": step(loop_autograd)}
    res = interleaved(fns, rounds=args.pinn_rounds, inner=1, warmup=1)
    ms = {n: med(v) for n, v in res.items()}
    best_loop = min(ms["loop (hl.laplacian)"], ms["loop (autograd)"])
    ratio = ms["vmap"] / best_loop
    for n, v in res.items():
        lo, hi = iqr(v)
        print(f"{n:<22}{ms[n]:>10.1f} ms  [IQR {lo:.1f}, {hi:.1f}]")
    print(f"B = {members}: vmap ÷ fastest loop = {ratio:.3f} (goal <= 0.25)")
    report["pinn"] = {"B": members, "points": points, **{f"{n}_ms": v for n, v in ms.items()}, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="few rounds, small sizes (a smoke run)")
    p.add_argument(
        "--sections",
        default="shared,per_sample,scaling,selftune,pinn",
        help="comma-separated subset of shared, per_sample, scaling, selftune, pinn",
    )
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--optimizer",
        choices=["adam-fused", "adam"],
        default="adam-fused",
        help="Adam's fused kernel (default) or PyTorch's default per-tensor loop",
    )
    args = p.parse_args(argv)
    FUSED.clear()
    if args.optimizer == "adam-fused":
        FUSED["fused"] = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.inner = 3, 1
        args.batches, args.widths, args.ranks, args.hidden_last = [1, 8], [16, 64], [4], [128]
        args.pinn_members, args.pinn_rounds = 8, 2
    else:
        args.rounds, args.inner = 15, 3
        args.batches = [1, 8, 32, 64, 128]
        args.widths = [12, 96, 768, 3000]  # ~10k, ~85k, ~1.2M, ~11.4M predicted parameters
        args.ranks = [4, 16]
        args.hidden_last = [128, 256, 512]
        args.pinn_members, args.pinn_rounds = 256, 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, python {sys.version.split()[0]}")
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "optimizer": args.optimizer}
    from .selftune import section_selftune

    sections = {
        "shared": section_shared,
        "per_sample": section_per_sample,
        "scaling": section_scaling,
        "selftune": section_selftune,
        "pinn": section_pinn,
    }
    bad = [s for s in args.sections.split(",") if s not in sections]
    if bad:
        p.error(f"--sections: unknown {bad}; choose a comma-separated subset of {list(sections)}")
    for s in args.sections.split(","):
        sections[s](args, report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=1))
        print(f"\nwrote {out / 'bench.json'}")
    return 0
