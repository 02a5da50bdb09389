"""The experiment CLI: ``python -m experiments {reproduce,ablate,proportionality,tune,selftune,continual,adapters,personalized,report}``.

Every finished run is appended to ``<out>/results.jsonl`` at once; re-running
the same command skips finished runs (so an interrupted run resumes), then
rewrites the plots and ``report.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import FORMULATIONS, MAIN_VARIANTS, ResultStore, config_key
from .report import write_report

TASKS = ("classify", "register", "segment")


def _task(name: str) -> Any:
    return importlib.import_module(f".{name}", __package__)


def _configs(task: str, size: str) -> dict[str, Any]:
    mod = _task(task)
    return {**mod.DEFAULTS, **mod.SIZES[size]}


def _load_data(task: str, args: argparse.Namespace) -> Any:
    mod = _task(task)
    return mod.load_data(args)


def _alias(store: ResultStore, key: str, row: dict[str, Any]) -> None:
    """Record a finished run once more under another label (e.g. the baseline of every ablation axis)."""
    label = (row["study"], row["axis"], str(row["level"]))
    same = [r for r in store.rows if r.get("key") == key]
    if not any((r.get("study", "main"), r.get("axis", "-"), str(r.get("level", "-"))) == label for r in same):
        store.add({**same[0], "study": row["study"], "axis": row["axis"], "level": row["level"], "alias": True})


def _run_grid(
    store: ResultStore,
    task: str,
    data: Any,
    runs: list[tuple[str, str, Any, dict[str, Any], str]],
    seeds: int,
) -> None:
    """Train every (run, seed) not in the store yet; a run whose config, variant and seed are done is only relabelled."""
    mod = _task(task)
    todo = []
    for study, axis, level, cfg, variant in runs:
        for seed in range(seeds):
            row = {"task": task, "study": study, "axis": axis, "level": level, "variant": variant, "seed": seed, "config": cfg}
            todo.append((config_key(row), row))
    pending = {k for k, _ in todo if not store.done(k)}
    total = len(pending)
    if total == 0:
        print(f"[{task}] all runs already finished in {store.path}")
    i = 0
    for key, row in todo:
        if store.done(key):
            _alias(store, key, row)
            continue
        i += 1
        label = f"[{task} {i}/{total}] {row['study']} {row['axis']}={row['level']} {row['variant']} seed={row['seed']}"
        t0 = time.perf_counter()
        ckpt = store.path.parent / "checkpoints" / f"{key}.safetensors"
        res = mod.run(row["variant"], row["seed"], data, row["config"], desc=label, checkpoint=ckpt)
        m = res["metrics"]
        shown = {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}
        print(f"{label}: {json.dumps(shown)} ({time.perf_counter() - t0:.1f}s)", flush=True)
        store.add({**row, "key": key, **res})
        ckpt.unlink(missing_ok=True)  # finished: the row holds everything


#: Learning rates of the ``lr`` study (Adam); the main study's 1e-3 is one of them.
LRS = ("3e-4", "1e-3", "3e-3")

#: Variants of the ``baseline`` study per task: stronger defaults and the theta0-init ablation.
BASELINES: dict[str, list[str]] = {
    "classify": ["default-hyperfan", "default-torchinit", "mip-theta0-model"],
    "register": ["default-hyperfan", "default-torchinit", "mip-theta0-model"],
    "segment": ["default-hyperfan", "default-torchinit", "mip-theta0-model", "default-rawphi"],
}
STUDIES = ("main", "baseline", "lr")


def study_runs(task: str, cfg: dict[str, Any], studies: list[str]) -> list[tuple[str, str, Any, dict[str, Any], str]]:
    """(study, axis, level, config, variant) of every run the studies ask for on one task.

    ``main``: the 2x2 and the plain network; ``baseline``: :data:`BASELINES`; ``lr``: the 2x2 at every
    rate of :data:`LRS` (the rate of the main config is the main study's runs, relabelled, not re-run).
    """
    runs: list[tuple[str, str, Any, dict[str, Any], str]] = []
    if "main" in studies:
        runs += [("main", "-", "-", cfg, v) for v in MAIN_VARIANTS]
    if "baseline" in studies:
        runs += [("baseline", "-", "-", cfg, v) for v in BASELINES[task]]
    if "lr" in studies:
        for lr in LRS:
            runs += [("lr", "lr", lr, {**cfg, "lr": float(lr)}, v) for v in FORMULATIONS]
    return runs


def cmd_reproduce(args: argparse.Namespace) -> int:
    size = "full" if args.full else "quick"
    seeds = args.seeds or (5 if args.full else 3)
    args.seeds = seeds
    out = Path(args.out)
    store = ResultStore(out / "results.jsonl")
    tasks = TASKS if args.task == "all" else (args.task,)
    studies = args.studies.split(",")
    bad = [s for s in studies if s not in STUDIES]
    if bad:
        print(f"unknown studies {bad}; choose from {list(STUDIES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for task in tasks:
        cfg = _configs(task, size)
        if args.steps:
            cfg["steps"] = args.steps
        data = _load_data(task, args)
        _run_grid(store, task, data, study_runs(task, cfg, studies), seeds)
    path = write_report(store.rows, out, header=_header(size, args, time.perf_counter() - t0))
    print(f"\nReport: {path.resolve()}")
    return 0


ABLATIONS: dict[str, list[Any]] = {
    "activation": ["relu", "leaky_relu", "tanh", "gelu", "elu"],
    "norm": ["none", "batchnorm", "layernorm", "weightnorm"],
    "k": [1, 2, 4, 8],
    "hidden": [[16, 64, 128], [64, 64], [32, 128, 256, 256]],
    "optimizer": ["adam@3e-4", "adam@1e-3", "adam@3e-3", "sgd@1e-3", "sgd@1e-2", "sgd@3e-2", "rmsprop@3e-4", "rmsprop@1e-3"],
    "encoding": ["identity", "zoneminusz", "l2", "standardize"],
    "depth": [0, 2, 4],
    "zero_init": [True],
    "head": ["lowrank@4", "lowrank@16"],
}


def _apply(cfg: dict[str, Any], axis: str, level: Any) -> dict[str, Any]:
    """The base config with one axis set to ``level``."""
    cfg = dict(cfg)
    if axis == "optimizer":
        opt, lr = str(level).split("@")
        cfg["optimizer"], cfg["lr"] = opt, float(lr)
    else:
        cfg[axis] = level
    if axis == "norm" and level == "batchnorm":
        cfg["per_sample_gamma"] = True  # BatchNorm inside the hypernetwork needs a batch of gammas
    return cfg


def cmd_ablate(args: argparse.Namespace) -> int:
    size = "full" if args.full else "quick"
    out = Path(args.out)
    store = ResultStore(out / "results.jsonl")
    base = _configs("classify", size)
    if args.steps:
        base["steps"] = args.steps
    axes = args.axes.split(",") if args.axes else list(ABLATIONS)
    data = _load_data("classify", args)
    runs = []
    for axis in axes:
        if axis not in ABLATIONS:
            print(f"unknown axis {axis!r}; choose from {list(ABLATIONS)}", file=sys.stderr)
            return 2
        for level in ABLATIONS[axis]:
            cfg = _apply(base, axis, level)
            # on the encoding axis both variants use that encoding: "default" without theta0, "mip" with it
            for v in ("default", "mip"):
                runs.append(("ablation", axis, "x".join(map(str, level)) if isinstance(level, list) else level, cfg, v))
    t0 = time.perf_counter()
    _run_grid(store, "classify", data, runs, args.seeds)
    path = write_report(store.rows, out, header=_header(size, args, time.perf_counter() - t0))
    print(f"\nReport: {path.resolve()}")
    return 0


def cmd_proportionality(args: argparse.Namespace) -> int:
    """Print |theta| at initialisation vs gamma: default (proportional) and MIP (near constant)."""
    import hyperloom as hl

    from .classify import ConvNet

    gammas = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
    print("|theta| of the generated ConvNet weights at initialisation (HyperLight README ConvNet, hidden [16, 64, 128])")
    print(f"{'formulation':<24}" + "".join(f"{g:>9}" for g in gammas) + f"{'max/min':>10}")
    for seed in range(args.seeds):
        for form, act in (("default", "relu"), ("default", "leaky_relu"), ("mip", "leaky_relu")):
            torch.manual_seed(seed)
            h = hl.hypernetize(ConvNet(), inputs={"g": (0.0, 4.0)}, formulation=form, activation=act)
            norms = hl.theta_norms(h, "g", gammas)
            ratio = max(norms) / min(norms) if min(norms) > 0 else float("inf")
            print(f"{form + ' ' + act + f' s{seed}':<24}" + "".join(f"{n:>9.4f}" for n in norms) + f"{ratio:>10.3f}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Train hypernetworks and fixed-lambda models, choose lambda by hl.sweep / hl.tune, report the amortization gap."""
    from .tune import run_all
    from .tune_report import write_tune_report

    size = "full" if args.full else "quick"
    out = Path(args.out)
    tasks = ["ridge", "register"] if args.task == "all" else [args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    store = run_all(size, out, tasks=tasks, seeds=args.seeds or None, steps=args.steps or None)
    seeds = (f" --seeds {args.seeds}" if args.seeds else "") + (f" --threads {args.threads}" if args.threads else "")
    header = (
        f"Size: **{size}**, torch {torch.__version__}, {torch.get_num_threads()} threads. Wall time of the last invocation: "
        f"{time.perf_counter() - t0:.0f} s. Regenerate with "
        f"`python -m experiments tune {'--full' if args.full else '--quick'}{seeds} --out {args.out}`."
    )
    path = write_tune_report(store.rows, out, header=header)
    print(f"\nReport: {path.resolve()}")
    return 0


def cmd_selftune(args: argparse.Namespace) -> int:
    """Tune while training (hl.SelfTuner) vs fixed defaults, random search and tune-after-training at equal steps."""
    from .selftune import run_all, write_report

    size = "full" if args.full else "quick"
    out = Path(args.out)
    tasks = ["ridge", "fmnist"] if args.task == "all" else [args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    store = run_all(size, out, tasks=tasks, seeds=args.seeds or None, steps=args.steps or None, args=args)
    extra = (f" --seeds {args.seeds}" if args.seeds else "") + (f" --threads {args.threads}" if args.threads else "")
    header = (
        f"Size: **{size}**, torch {torch.__version__}, {torch.get_num_threads()} threads. Wall time of the last invocation: "
        f"{time.perf_counter() - t0:.0f} s. Regenerate with "
        f"`python -m experiments selftune {'--full' if args.full else '--quick'}{extra} --out {args.out}`."
    )
    path = write_report(store.rows, out, header=header)
    print(f"\nReport: {path.resolve()}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    """Adapting a pretrained ViT to rotated images: hypernetwork-generated LoRA vs shared, oracle, full fine-tuning."""
    from . import adapters

    size = "full" if args.full else "quick"
    cfg = {**adapters.DEFAULTS, **adapters.SIZES[size]}
    if args.steps:
        cfg["steps"] = args.steps
    if args.pretrain_steps:
        cfg["pretrain_steps"] = args.pretrain_steps
    out = Path(args.out)
    store = ResultStore(out / "results.jsonl")
    t0 = time.perf_counter()
    adapters.run_all(args, cfg, out, store)
    rows = [r for r in store.rows if r.get("task") == "adapters" and r.get("config") == cfg]
    path = adapters.write_report(rows, cfg, out, _header(size, args, time.perf_counter() - t0))
    print(f"\nReport: {path.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    store = ResultStore(out / "results.jsonl")
    print(write_report(store.rows, out).resolve())
    return 0


def _header(size: str, args: argparse.Namespace, wall: float) -> str:
    studies = getattr(args, "studies", "main")
    extra = f" --studies {studies}" if studies != "main" else ""
    return (
        f"Size: **{size}**, seeds: {args.seeds}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Wall time of the last invocation: {wall:.0f} s. Regenerate with "
        f"`python -m experiments {args.cmd} {'--full' if size == 'full' else '--quick'} --seeds {args.seeds}{extra} --out {args.out}`."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, default_out: str) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--quick", action="store_true", help="CPU-minutes budget (default)")
        g.add_argument("--full", action="store_true", help="longer runs")
        sp.add_argument("--seeds", type=int, default=3)
        sp.add_argument("--steps", type=int, default=0, help="override the number of training steps")
        sp.add_argument("--out", default=default_out)
        sp.add_argument("--data", default="auto", help="classification data: auto, fashion, mnist")

    r = sub.add_parser("reproduce", help="the three tasks of the paper, 2x2 formulations")
    r.add_argument("--task", default="all", choices=[*TASKS, "all"])
    r.add_argument(
        "--studies",
        default="main",
        help=f"comma-separated subset of {list(STUDIES)}: the 2x2 + plain network, stronger defaults and ablations, learning rates",
    )
    common(r, "runs/reproduce")
    r.set_defaults(seeds=0)
    a = sub.add_parser("ablate", help="ablations on task 1")
    a.add_argument("--axes", default="", help=f"comma-separated subset of {list(ABLATIONS)}")
    common(a, "runs/ablate")
    pr = sub.add_parser("proportionality", help="|theta| vs gamma at initialisation")
    pr.add_argument("--seeds", type=int, default=1)
    tu = sub.add_parser("tune", help="choose lambda after training (hl.sweep / hl.tune) and the amortization gap")
    tu.add_argument("--task", default="all", choices=["ridge", "register", "all"])
    g = tu.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU-minutes budget (default)")
    g.add_argument("--full", action="store_true", help="longer runs, more seeds")
    tu.add_argument("--seeds", type=int, default=0, help="override the number of seeds (per task default otherwise)")
    tu.add_argument("--steps", type=int, default=0, help="override the number of training steps")
    tu.add_argument("--out", default="runs/tune")
    tu.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice; 1 on a busy machine)")
    st = sub.add_parser("selftune", help="tune while training (hl.SelfTuner) vs random search and tune-after-training")
    st.add_argument("--task", default="all", choices=["ridge", "fmnist", "all"])
    g = st.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU-minutes budget (default)")
    g.add_argument("--full", action="store_true", help="longer runs, more seeds")
    st.add_argument("--seeds", type=int, default=0, help="override the number of seeds")
    st.add_argument("--steps", type=int, default=0, help="override the number of training steps (Fashion-MNIST)")
    st.add_argument("--out", default="runs/selftune")
    st.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice; 1 on a busy machine)")
    st.add_argument("--data", default="auto", help="classification data: auto, fashion, mnist")
    c = sub.add_parser("continual", help="continual learning on split / permuted Fashion-MNIST (task-conditioned hypernetworks)")
    c.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    c.add_argument("--benchmarks", default="", help="comma-separated subset of split,permuted (default: both)")
    c.add_argument("--beta", type=float, default=None, help="weight of the output regulariser (default 2.0)")
    common(c, "runs/continual")
    ad = sub.add_parser("adapters", help="pretrained ViT adapted to rotated images: hypernetwork LoRA vs the usual ways")
    common(ad, "runs/adapters")
    ad.set_defaults(seeds=2)
    ad.add_argument("--pretrain-steps", type=int, default=0, help="override the number of pretraining steps")
    pe = sub.add_parser("personalized", help="personalised classifiers from a client's data set (PeFLL-style, hl.Data)")
    pe.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    pe.add_argument("--clients", type=int, default=0, help="override the number of clients (default 60, a fifth unseen)")
    common(pe, "runs/personalized")
    rp = sub.add_parser("report", help="rewrite plots and report.md from results.jsonl")
    rp.add_argument("--out", default="runs/reproduce")
    args = p.parse_args(argv)
    if args.cmd == "continual":
        from .continual import main as continual_main

        return continual_main(args)
    if args.cmd == "personalized":
        from .personalized import main as personalized_main

        return personalized_main(args)
    return {
        "reproduce": cmd_reproduce,
        "ablate": cmd_ablate,
        "proportionality": cmd_proportionality,
        "tune": cmd_tune,
        "selftune": cmd_selftune,
        "adapters": cmd_adapters,
        "report": cmd_report,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
