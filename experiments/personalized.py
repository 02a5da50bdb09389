"""Personalised learning from a client's data set (PeFLL-style) on label-skewed Fashion-MNIST clients.

Clients: ``clients`` label-skewed shards of Fashion-MNIST (2 or 3 classes each, Dirichlet(1) proportions, unequal
sizes); each client has a labelled set (its training data) and test images of the same class mix. A fraction
``unseen`` of the clients is held out entirely: never seen in training; at test time each gives only its
labelled set (no gradient step for the hypernetwork) and is scored on its own test images.

Methods, all with the same primary classifier (an MLP on 14x14 images, 196 -> 32 -> 10):

* ``hnet-<formulation>-<code>``: ``hl.hypernetize(mlp, inputs={"support": hl.Data(encoder, per="set")})``: a
  set encoder reads the client's labelled set ``(images, labels)`` (each element encoded, mean-pooled) and the
  hypernetwork generates the whole classifier. 2x2 of formulation (``default``: theta = h(code); ``mip``:
  theta = theta0 + h(code)) x code (``plain``: ``norm=None``; ``unit``: constant norm, MIP's principle applied to
  the learned code); ``hnet-mip-unit-attn``: attention pooling (Set Transformer PMA) instead of the mean.
  Trained on the seen clients: each step, ``clients_per_step`` clients, each with a random subset of its
  labelled set (size uniform in [min_set, n]) as the support and a batch of its data as the query.
* ``task-hnet``: a ``hl.Task`` embedding per seen client (pFedHN-style), MIP/unit; seen clients only.
* ``global``: one MLP trained on the pooled data of the seen clients.
* ``finetune-<k>``: the global model fine-tuned on the client's labelled set for k full-batch Adam steps.
* ``local``: an MLP per client trained from scratch on its labelled set only.

Metrics: mean client accuracy on seen and on unseen clients (each client's labelled set in full), and on
unseen clients the accuracy with a labelled set of ``set_sizes`` examples (a random subset; the same subset for
every method).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .common import ResultStore, config_key, set_seed
from .data import ImageData, load_classification

HNETS = ("hnet-default-plain", "hnet-default-unit", "hnet-mip-plain", "hnet-mip-unit", "hnet-mip-unit-attn")
METHODS = (*HNETS, "task-hnet", "global", "local")
FINETUNE_STEPS = (5, 25, 100)

DEFAULTS: dict[str, Any] = {
    "clients": 60,
    "unseen": 0.2,
    "n_min": 40,
    "n_max": 300,
    "n_test": 100,
    "hidden": 32,
    "hnet_hidden": [64],
    "code": 32,
    "min_set": 5,
    "clients_per_step": 4,
    "query": 32,
    "lr": 1e-3,
    "global_batch": 128,
    "ft_lr": 1e-3,
    "local_steps": 200,
    "local_lr": 3e-3,
    "set_sizes": [5, 10, 25, 50, 100],
}
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 500},
    "full": {"steps": 3000},
}


class MLP(nn.Module):
    """The primary classifier: 196 -> hidden -> 10 (ReLU)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(196, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


class SetElement(nn.Module):
    """Encodes one labelled example ``(image (196,), label)`` of a client's set: [image, one-hot label] -> MLP."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(196 + 10, 64)
        self.fc2 = nn.Linear(64, code)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, F.one_hot(y, 10).to(x.dtype)], dim=-1)
        return self.fc2(torch.relu(self.fc1(h)))  # type: ignore[no-any-return]


class Clients:
    """Label-skewed clients: per client a labelled set (train split) and test images (test split)."""

    def __init__(self, data: ImageData, cfg: dict[str, Any], seed: int) -> None:
        rng = np.random.default_rng(20_000 + seed)  # the clients depend on the seed, not on the method
        xtr = F.avg_pool2d(data.x_train, 2).flatten(1)
        xte = F.avg_pool2d(data.x_test, 2).flatten(1)
        by_class_tr = [np.flatnonzero(data.y_train.numpy() == c) for c in range(10)]
        by_class_te = [np.flatnonzero(data.y_test.numpy() == c) for c in range(10)]
        for a in by_class_tr:
            rng.shuffle(a)
        used = [0] * 10
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.xt: list[torch.Tensor] = []
        self.yt: list[torch.Tensor] = []
        self.classes: list[list[int]] = []
        for _ in range(cfg["clients"]):
            k = int(rng.integers(2, 4))
            classes = sorted(int(c) for c in rng.choice(10, size=k, replace=False))
            p = rng.dirichlet(np.ones(k))
            n = int(rng.integers(cfg["n_min"], cfg["n_max"] + 1))
            counts = np.maximum(1, np.round(p * n).astype(int))
            counts_t = np.maximum(1, np.round(p * cfg["n_test"]).astype(int))
            tr, te = [], []
            for c, m, mt in zip(classes, counts, counts_t):
                if used[c] + m > len(by_class_tr[c]):
                    raise ValueError(f"{data.name}: not enough training images of class {c} for {cfg['clients']} disjoint clients")
                tr.append(by_class_tr[c][used[c] : used[c] + m])  # disjoint across clients
                used[c] += m
                te.append(rng.choice(by_class_te[c], size=mt, replace=False))
            tr_i = torch.from_numpy(np.concatenate(tr))
            te_i = torch.from_numpy(np.concatenate(te))
            self.x.append(xtr[tr_i])
            self.y.append(data.y_train[tr_i])
            self.xt.append(xte[te_i])
            self.yt.append(data.y_test[te_i])
            self.classes.append(classes)
        n_unseen = max(1, round(cfg["unseen"] * cfg["clients"]))
        order = rng.permutation(cfg["clients"])
        self.unseen = sorted(int(i) for i in order[:n_unseen])
        self.seen = sorted(int(i) for i in order[n_unseen:])
        # the labelled subsets of the set-size study: one random order per client, the same for every method
        self.order = [torch.from_numpy(rng.permutation(len(y))) for y in self.y]

    def subset(self, c: int, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``c``'s labelled set, or its first ``size`` examples in the fixed random order."""
        idx = self.order[c] if size is None else self.order[c][: min(size, len(self.y[c]))]
        return self.x[c][idx], self.y[c][idx]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _hnet(method: str, cfg: dict[str, Any], clients: Clients) -> Any:
    import hyperloom as hl

    if method == "task-hnet":
        inputs: dict[str, Any] = {"client": hl.Task(len(clients.seen), dim=cfg["code"])}
        form = "mip"
    else:
        _, form, code = method.split("-")[:3]
        pool = "attention" if method.endswith("-attn") else "mean"
        spec = hl.Data(SetElement(cfg["code"]), per="set", pool=pool, norm="unit" if code == "unit" else None)
        inputs = {"support": spec}
    return hl.hypernetize(MLP(cfg["hidden"]), inputs=inputs, hidden=cfg["hnet_hidden"], formulation=form, theta0="init")


def _train_hnet(method: str, cfg: dict[str, Any], clients: Clients, gen: torch.Generator) -> tuple[Any, list[float]]:
    model = _hnet(method, cfg, clients)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    seen = clients.seen
    curve = []
    for _ in range(cfg["steps"]):
        opt.zero_grad()
        total = torch.zeros(())
        picks = torch.randint(0, len(seen), (cfg["clients_per_step"],), generator=gen).tolist()
        for j in picks:
            c = seen[j]
            n = len(clients.y[c])
            q = torch.randint(0, n, (cfg["query"],), generator=gen)
            if method == "task-hnet":
                logits = model(clients.x[c][q], client=j)
            else:
                s = int(torch.randint(cfg["min_set"], n + 1, (1,), generator=gen))
                sup = torch.randperm(n, generator=gen)[:s]
                logits = model(clients.x[c][q], support=(clients.x[c][sup], clients.y[c][sup]))
            total = total + F.cross_entropy(logits, clients.y[c][q])
        loss = total / len(picks)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return model, curve


@torch.no_grad()
def _eval_hnet(method: str, model: Any, clients: Clients, sizes: list[int]) -> dict[str, Any]:
    model.eval()
    seen = []
    for j, c in enumerate(clients.seen):
        if method == "task-hnet":
            logits = model(clients.xt[c], client=j)
        else:
            logits = model(clients.xt[c], support=clients.subset(c, None))
        seen.append(_accuracy(logits, clients.yt[c]))
    out: dict[str, Any] = {"seen": seen}
    if method == "task-hnet":
        return out
    out["unseen"] = [_accuracy(model(clients.xt[c], support=clients.subset(c, None)), clients.yt[c]) for c in clients.unseen]
    out["by_size"] = {
        str(s): [_accuracy(model(clients.xt[c], support=clients.subset(c, s)), clients.yt[c]) for c in clients.unseen] for s in sizes
    }
    return out


def _train_global(cfg: dict[str, Any], clients: Clients, gen: torch.Generator) -> tuple[MLP, list[float]]:
    x = torch.cat([clients.x[c] for c in clients.seen])
    y = torch.cat([clients.y[c] for c in clients.seen])
    model = MLP(cfg["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    curve = []
    for _ in range(cfg["steps"]):
        idx = torch.randint(0, len(y), (cfg["global_batch"],), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return model, curve


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, record: tuple[int, ...], test: Any) -> dict[int, float]:
    """Full-batch Adam on ``(x, y)``; the test accuracy after each step count in ``record``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out: dict[int, float] = {}
    for step in range(steps + 1):
        if step > 0:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step in record:
            with torch.no_grad():
                out[step] = float(test(model))
    return out


def _per_client(cfg: dict[str, Any], clients: Clients, make: Any, steps: int, lr: float, record: tuple[int, ...]) -> dict[str, Any]:
    """Seen and unseen accuracies (and by set size on unseen) of a model fitted per client, at each of ``record``."""

    def run(c: int, size: int | None) -> dict[int, float]:
        x, y = clients.subset(c, size)
        return _fit(make(), x, y, steps, lr, record, lambda m: _accuracy(m(clients.xt[c]), clients.yt[c]))

    res: dict[str, Any] = {str(k): {"seen": [], "unseen": [], "by_size": {str(s): [] for s in cfg["set_sizes"]}} for k in record}
    for c in clients.seen:
        for k, a in run(c, None).items():
            res[str(k)]["seen"].append(a)
    for c in clients.unseen:
        for k, a in run(c, None).items():
            res[str(k)]["unseen"].append(a)
        for s in cfg["set_sizes"]:
            for k, a in run(c, s).items():
                res[str(k)]["by_size"][str(s)].append(a)
    return res


def run(method: str, seed: int, data: ImageData, cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Train and evaluate one method for one seed; returns ``[(variant, result)]`` (global gives its fine-tunes too)."""
    set_seed(seed)
    clients = Clients(data, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    if method in (*HNETS, "task-hnet"):
        model, curve = _train_hnet(method, cfg, clients, gen)
        ev = _eval_hnet(method, model, clients, cfg["set_sizes"])
        return [(method, _summary(ev, curve, time.perf_counter() - t0))]
    if method == "global":
        model, curve = _train_global(cfg, clients, gen)
        t_train = time.perf_counter() - t0
        ft = _per_client(cfg, clients, lambda: copy.deepcopy(model), max(FINETUNE_STEPS), cfg["ft_lr"], (0, *FINETUNE_STEPS))
        wall = time.perf_counter() - t0
        out = [("global", _summary(ft["0"], curve, t_train))]
        out += [(f"finetune-{k}", _summary(ft[str(k)], curve, wall)) for k in FINETUNE_STEPS]
        return out
    if method == "local":
        steps = cfg["local_steps"]
        res = _per_client(cfg, clients, lambda: MLP(cfg["hidden"]), steps, cfg["local_lr"], (steps,))
        return [("local", _summary(res[str(steps)], [], time.perf_counter() - t0))]
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def _summary(ev: dict[str, Any], curve: list[float], wall: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {"seen_acc": float(np.mean(ev["seen"])), "wall_s": wall}
    if "unseen" in ev:
        metrics["unseen_acc"] = float(np.mean(ev["unseen"]))
        metrics["unseen_by_size"] = {s: float(np.mean(v)) for s, v in ev["by_size"].items()}
    return {"metrics": metrics, "per_client": ev, "curve": curve[:: max(1, len(curve) // 100)]}


# -- report ----------------------------------------------------------------------------------------------------------
VARIANTS = (*HNETS, "task-hnet", "global", *(f"finetune-{k}" for k in FINETUNE_STEPS), "local")
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval over seeds (nan with one value)."""
    a = np.asarray(values, dtype=float)
    if a.size < 2:
        return (float(a.mean()) if a.size else math.nan, math.nan)
    return float(a.mean()), float(_T975.get(a.size - 1, 1.96) * a.std(ddof=1) / math.sqrt(a.size))


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    m, h = mean_ci(values)
    return f"{100 * m:.1f}" + (f" ± {100 * h:.1f}" if math.isfinite(h) else "")


def _by(rows: list[dict[str, Any]], variant: str, key: str, size: str | None = None) -> dict[int, float]:
    out = {}
    for r in rows:
        if r["variant"] != variant:
            continue
        m = r["metrics"]
        v = m.get("unseen_by_size", {}).get(size) if size is not None else m.get(key)
        if v is not None:
            out[int(r["seed"])] = float(v)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines = [
        "| method | seeds | seen clients | unseen clients | unseen: Δ vs finetune-25 (paired) |",
        "|---|---|---|---|---|",
    ]
    ref = _by(rows, "finetune-25", "unseen_acc")
    for v in variants:
        seen, unseen = _by(rows, v, "seen_acc"), _by(rows, v, "unseen_acc")
        pairs = [unseen[s] - ref[s] for s in sorted(set(unseen) & set(ref))]
        delta = "" if v == "finetune-25" or not pairs else _signed_cell(pairs)
        lines.append(f"| {v} | {len(seen)} | {_cell(list(seen.values()))} | {_cell(list(unseen.values()))} | {delta} |")
    return "\n".join(lines)


def _signed_cell(values: list[float]) -> str:
    m, h = mean_ci(values)
    return f"{100 * m:+.1f}" + (f" ± {100 * h:.1f}" if math.isfinite(h) else "")


def size_table(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v and "unseen_by_size" in r["metrics"] for r in rows)]
    lines = ["| method | " + " | ".join(f"n = {s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(_cell(list(_by(rows, v, "", str(s)).values())) for s in sizes) + " |")
    return "\n".join(lines)


def plot_sizes(rows: list[dict[str, Any]], sizes: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plots are optional
        return False
    shown = (
        "hnet-default-plain",
        "hnet-mip-plain",
        "hnet-mip-unit",
        "hnet-mip-unit-attn",
        "global",
        "finetune-25",
        "finetune-100",
        "local",
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in shown:
        pts = [(s, mean_ci(list(_by(rows, v, "", str(s)).values()))) for s in sizes]
        pts = [(s, m, h) for s, (m, h) in pts if math.isfinite(m)]
        if not pts:
            continue
        xs, ms, hs = zip(*pts)
        ms_a, hs_a = 100 * np.asarray(ms), 100 * np.nan_to_num(np.asarray(hs))
        style = "-o" if v.startswith("hnet") else "--s"
        ax.plot(xs, ms_a, style, label=v, markersize=4)
        ax.fill_between(xs, ms_a - hs_a, ms_a + hs_a, alpha=0.12)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("labelled examples given by an unseen client")
    ax.set_ylabel("mean client test accuracy (%)")
    ax.set_title("Unseen clients: accuracy vs labelled-set size (95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path, header: str) -> Path:
    sizes = list(cfg["set_sizes"])
    plotted = plot_sizes(rows, sizes, out / "acc_vs_set_size.png")
    walls = [r["metrics"]["wall_s"] for r in rows if not r["variant"].startswith("finetune")]
    n_unseen = max(1, round(cfg["unseen"] * cfg["clients"]))
    text = [
        "# Personalised learning from a client's data set (PeFLL-style, Fashion-MNIST)",
        "",
        header,
        "",
        f"{cfg['clients']} label-skewed clients (2-3 classes each, Dirichlet(1) proportions, {cfg['n_min']}-{cfg['n_max']} "
        f"labelled examples, {cfg['n_test']} test images of the same class mix), {n_unseen} of them held out entirely "
        f"(unseen: at test time they give only their labelled set, no gradient step). Primary classifier: an MLP on 14x14 "
        f"images (196 → {cfg['hidden']} → 10). Set encoder: [image, one-hot label] → 64 → {cfg['code']}, mean-pooled (attention "
        f"pooling for `-attn`); hypernetwork hidden {cfg['hnet_hidden']}; {cfg['steps']} steps of {cfg['clients_per_step']} clients "
        f"each; the global model the same number of steps (batch {cfg['global_batch']}). finetune-k: the global model after k "
        f"full-batch Adam steps (lr {cfg['ft_lr']}) on the client's labelled set; local: {cfg['local_steps']} steps "
        f"(lr {cfg['local_lr']}) from scratch on it. task-hnet: one hl.Task embedding per seen client (pFedHN-style; it has "
        "nothing to offer an unseen client).",
        "",
        "Mean client test accuracy (%), mean ± 95 % t-interval half-width over seeds (each seed: new clients, "
        "new split, new initialisation); Δ: the per-seed difference from finetune-25 on unseen clients.",
        "",
        table(rows),
        "",
        "## Accuracy vs the size of an unseen client's labelled set",
        "",
        "The first n examples of each unseen client's labelled set in a fixed random order (the same subset for every "
        "method; n is capped at the client's size).",
        "",
        size_table(rows, sizes),
        "",
        *(["![accuracy vs labelled-set size](acc_vs_set_size.png)", ""] if plotted else []),
        f"Runs: {len(rows)} rows, summed run time {sum(walls):.0f} s.",
        "",
        "PeFLL (Scott et al., 2024) reports its results on CIFAR-10/100 and FEMNIST, which are not available on these "
        "machines (no CIFAR-like data ships in any installed package, and nothing is downloaded): the numbers above are "
        "Fashion-MNIST at CPU scale and are not comparable with the paper's.",
        "",
    ]
    reading = out / "reading.md"  # the human reading of these numbers, kept when the report is regenerated
    if reading.is_file():
        text += ["## Reading", "", reading.read_text().strip(), ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def main(args: Any) -> int:
    size = "full" if args.full else "quick"
    torch.set_num_threads(1)  # small networks: one thread is faster on the shared 2-core machine (see continual.py)
    out = Path(args.out)
    store = ResultStore(out / "results.jsonl")
    cfg = {**DEFAULTS, **SIZES[size]}
    if args.steps:
        cfg["steps"] = args.steps
    if getattr(args, "clients", 0):
        cfg["clients"] = args.clients
    methods = args.methods.split(",") if getattr(args, "methods", "") else list(METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"unknown methods {bad}; choose from {list(METHODS)}")
        return 2
    data = load_classification(args.data)
    t0 = time.perf_counter()
    ran = 0
    for seed in range(args.seeds):
        for m in methods:
            row = {"task": "personalized", "method": m, "seed": seed, "config": cfg}
            key = config_key({**row, "variant": m})
            if store.done(key):
                continue
            t1 = time.perf_counter()
            results = run(m, seed, data, cfg)
            ran += 1
            for i, (variant, res) in enumerate(results):
                shown = {k: round(v, 4) for k, v in res["metrics"].items() if isinstance(v, float)}
                print(f"[personalized] {variant} seed={seed}: {shown} ({time.perf_counter() - t1:.1f}s)", flush=True)
                # the run's key on its last row: a crash in between re-runs the whole method
                row_key = key if i == len(results) - 1 else f"{key}-{variant}"
                store.add({**row, "variant": variant, "key": row_key, "data": data.name, **res})
    wall = time.perf_counter() - t0
    rows = [r for r in store.rows if r.get("config") == cfg]
    done = {}
    for r in rows:  # keep one row per (variant, seed): the last written
        done[(r["variant"], r["seed"])] = r
    rows = list(done.values())
    flags = (
        (f" --steps {args.steps}" if args.steps else "")
        + (f" --clients {args.clients}" if getattr(args, "clients", 0) else "")
        + (f" --methods {args.methods}" if getattr(args, "methods", "") else "")
    )
    timing = f"Wall time of the last invocation: {wall:.0f} s ({ran} runs)" if ran else "Report regenerated (no new runs)"
    header = (
        f"Size: **{size}** ({cfg['steps']} steps, data {data.name}), seeds: {args.seeds}, torch {torch.__version__}, 1 thread. "
        f"{timing}. Regenerate with `python -m experiments personalized --{size} --seeds {args.seeds}{flags} --out {args.out}`."
    )
    path = write_report(rows, cfg, out, header)
    print(f"\nReport: {path.resolve()}")
    return 0
