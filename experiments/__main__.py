"""The experiment CLI: ``python -m experiments <command>``.

Commands: reproduce, ablate, proportionality, tune, selftune, continual, adapters, heads, personalized, pinn, report.

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
    *,
    command: str = "",
) -> int:
    """Train every (run, seed) not in the store yet; a run whose config, variant and seed are done is only relabelled.

    Returns the number of runs trained; ``command`` (the command line) is recorded in each new row."""
    mod = _task(task)
    todo = []
    # seed-major: every run at seed 0, then every run at seed 1, ...; a grid stopped part-way (or still running
    # while its rows are reported) has the same seeds for every arm, not all seeds of the first arms and none of the last
    for seed in range(seeds):
        for study, axis, level, cfg, variant in runs:
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
        store.add({**row, "key": key, **res, **({"command": command} if command else {})})
        ckpt.unlink(missing_ok=True)  # finished: the row holds everything
    return total


#: Learning rates of the ``lr`` study (Adam); the main study's 1e-3 is one of them.
LRS = ("3e-4", "1e-3", "3e-3")

#: Variants of the ``baseline`` study per task: stronger defaults and the theta0-init ablation.
BASELINES: dict[str, list[str]] = {
    "classify": ["default-hyperfan", "default-torchinit", "mip-theta0-model"],
    "register": ["default-hyperfan", "default-torchinit", "mip-theta0-model"],
    "segment": ["default-hyperfan", "default-torchinit", "mip-theta0-model", "default-rawphi"],
}
STUDIES = ("main", "baseline", "lr", "gamma", "segattr", "lrfull")

#: Is the segmentation stall MIP's fault? (``--studies segattr``, segmentation only; issue 22 item 6, >= 10 seeds.)
#: Arm name -> (variant, config overrides): loss (soft Dice / Dice + cross-entropy) x {plain, additive-only, MIP};
#: MIP at a learning rate whose relative step matches plain's (0.0062 / 0.032 of 1e-3, about 2e-4) and plain at
#: one matching MIP's (about 5e-3), from the probe quoted in the issue; MIP with a zero-initialised head.
SEGATTR: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"{v}-{loss}": (v, {"loss": loss}) for loss in ("soft_dice", "dice_ce") for v in ("plain", "additive-only", "mip")},
    "mip-lr2e-4": ("mip", {"lr": 2e-4}),
    "plain-lr5e-3": ("plain", {"lr": 5e-3}),
    "mip-zeroinit": ("mip", {"zero_init": True}),
}

#: The learning-rate study at the full budget (``--full --studies lrfull``; issue 22 item 5): every variant at
#: every rate, the rate chosen on validation data.
LRS_FULL = ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2")
LRFULL_VARIANTS = ("plain", "default", "default-torchinit", "additive-only", "mip")

#: The gamma-range stress test (``--studies gamma``, classifier only): gamma ~ U(lo, hi)^k declared with that
#: range. [0, 1] draws exactly the main study's gammas but is its own run: these runs also record the gradient
#: norm w.r.t. the generated weights per gamma.
GAMMA_RANGES: dict[str, tuple[float, float]] = {"0.5-1": (0.5, 1.0), "0-1": (0.0, 1.0), "0-4": (0.0, 4.0)}
GAMMA_VARIANTS = ("default", "default-hyperfan", "additive-only", "mip")


def study_runs(task: str, cfg: dict[str, Any], studies: list[str]) -> list[tuple[str, str, Any, dict[str, Any], str]]:
    """(study, axis, level, config, variant) of every run the studies ask for on one task.

    ``main``: the 2x2 and the plain network; ``baseline``: :data:`BASELINES`; ``lr``: the 2x2 at every
    rate of :data:`LRS` (the rate of the main config is the main study's runs, relabelled, not re-run);
    ``gamma`` (classifier only): :data:`GAMMA_VARIANTS` at every range of :data:`GAMMA_RANGES`.
    """
    runs: list[tuple[str, str, Any, dict[str, Any], str]] = []
    if "main" in studies:
        runs += [("main", "-", "-", cfg, v) for v in MAIN_VARIANTS]
    if "baseline" in studies:
        runs += [("baseline", "-", "-", cfg, v) for v in BASELINES[task]]
    if "lr" in studies:
        for lr in LRS:
            runs += [("lr", "lr", lr, {**cfg, "lr": float(lr)}, v) for v in FORMULATIONS]
    if "gamma" in studies and task == "classify":
        for name, span in GAMMA_RANGES.items():
            runs += [("gamma", "gamma_range", name, {**cfg, "gamma_range": list(span)}, v) for v in GAMMA_VARIANTS]
    if "segattr" in studies and task == "segment":
        runs += [("segattr", "arm", name, {**cfg, **over}, v) for name, (v, over) in SEGATTR.items()]
    if "lrfull" in studies:
        for lr in LRS_FULL:
            runs += [("lr", "lr", lr, {**cfg, "lr": float(lr)}, v) for v in LRFULL_VARIANTS]
    return runs


def pending_runs(store: ResultStore, task: str, runs: list[tuple[str, str, Any, dict[str, Any], str]], seeds: int) -> tuple[int, int]:
    """(runs still to train, runs in all) of a grid: what a command will do before it starts."""
    keys = {config_key({"task": task, "variant": v, "seed": seed, "config": cfg}) for _, _, _, cfg, v in runs for seed in range(seeds)}
    return sum(not store.done(k) for k in keys), len(keys)


def reproduce_command(args: argparse.Namespace, size: str) -> str:
    """The command line that reruns (or resumes) this reproduction, every non-default option kept."""
    parts = ["python -m experiments reproduce", f"--{size}"]
    if args.task != "all":
        parts.append(f"--task {args.task}")
    if args.studies != "main":
        parts.append(f"--studies {args.studies}")
    parts.append(f"--seeds {args.seeds}")
    if args.steps:
        parts.append(f"--steps {args.steps}")
    if args.data != "auto":
        parts.append(f"--data {args.data}")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    parts.append(f"--out {args.out}")
    return " ".join(parts)


def reproduce_header(rows: list[dict[str, Any]], *, command: str = "", trained: int | None = None, wall: float = 0.0) -> str:
    """The report's header, from the rows themselves: per task the settings (steps, seeds), the commands that
    produced the rows and the training time they record; with ``trained``, what the last invocation did."""
    by_task: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("study", "main") not in ("main", "baseline", "lr"):
            continue
        t = by_task.setdefault(r["task"], {"steps": set(), "seeds": set(), "wall": 0.0})
        t["steps"].add(int((r.get("config") or {}).get("steps") or 0))
        t["seeds"].add(int(r["seed"]))
        if not r.get("alias"):
            t["wall"] += float((r.get("metrics") or {}).get("wall_s") or 0.0)
    parts = []
    if by_task:
        parts.append(
            "Rows: "
            + "; ".join(
                f"{task}: {'/'.join(map(str, sorted(t['steps'])))} steps, {len(t['seeds'])} seeds, {t['wall'] / 60:.0f} min of training"
                for task, t in by_task.items()
            )
            + f" (training time summed over the rows, torch {torch.__version__})."
        )
    cmds = []
    for r in rows:
        c = r.get("command")
        if c and c not in cmds:
            cmds.append(c)
    if command and command not in cmds:
        cmds.append(command)
    if cmds:
        parts.append("Regenerate (runs resume; finished runs are skipped) with " + " and ".join(f"`{c}`" for c in cmds) + ".")
    if trained is not None:
        did = f"trained {trained} runs in {wall:.0f} s" if trained else "trained no runs (all had finished before)"
        parts.append(f"The last invocation {did}, {torch.get_num_threads()} threads.")
    return " ".join(parts)


def cmd_reproduce(args: argparse.Namespace) -> int:
    size = "full" if args.full else "quick"
    seeds = args.seeds or (5 if args.full else 3)
    args.seeds = seeds
    args.out = args.out or f"runs/reproduce-{size}"  # --quick and --full never share a folder by default
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    tasks = TASKS if args.task == "all" else (args.task,)
    studies = args.studies.split(",")
    bad = [s for s in studies if s not in STUDIES]
    if bad:
        print(f"--studies: unknown {bad}; choose a comma-separated subset of {list(STUDIES)}", file=sys.stderr)
        return 2
    store = ResultStore(out / "results.jsonl")
    command = reproduce_command(args, size)
    plan = []
    for task in tasks:
        cfg = _configs(task, size)
        if args.steps:
            cfg["steps"] = args.steps
        data = _load_data(task, args)
        runs = study_runs(task, cfg, studies)
        plan.append((task, cfg, data, runs))
    todo = [pending_runs(store, task, runs, seeds) for task, _, _, runs in plan]
    print(f"Output: {out.resolve()} (results.jsonl, report.md, plots)")
    for (task, cfg, data, _), (k, n) in zip(plan, todo):
        name = getattr(data, "source", None) or getattr(data, "name", "?")
        print(f"  {task}: {k} of {n} runs to train ({n - k} finished before), {cfg['steps']} steps, {seeds} seeds; data: {name}")
    print(f"  {sum(k for k, _ in todo)} runs in all, {torch.get_num_threads()} torch threads; resume with: {command}", flush=True)
    t0 = time.perf_counter()
    trained = 0
    for task, _, data, runs in plan:
        trained += _run_grid(store, task, data, runs, seeds, command=command)
    header = reproduce_header(store.rows, command=command, trained=trained, wall=time.perf_counter() - t0)
    path = write_report(store.rows, out, header=header)
    print(f"\nReport: {path.resolve()}")
    return 0


ABLATIONS: dict[str, list[Any]] = {
    "activation": ["relu", "leaky_relu", "tanh", "gelu", "elu"],
    "norm": ["none", "batchnorm", "layernorm", "weightnorm"],
    "k": [1, 2, 4, 8],
    "hidden": [[16, 64, 128], [64, 64], [32, 128, 256, 256]],
    "optimizer": [
        *("adam@3e-4", "adam@1e-3", "adam@3e-3"),
        *("sgd@1e-3", "sgd@1e-2", "sgd@3e-2", "sgd@1e-1", "sgd@1.0"),  # momentum 0.9
        *("sgd0@1e-2", "sgd0@1e-1", "sgd0@1.0"),  # momentum 0
        *("sgd99@1e-3", "sgd99@1e-2"),  # momentum 0.99
        *("rmsprop@3e-4", "rmsprop@1e-3"),
    ],
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
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
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


def cmd_pinn(args: argparse.Namespace) -> int:
    """One hypernetwork per PDE family (manufactured solutions), physics-informed loss only, against per-member PINNs."""
    from .pinn import run_all
    from .pinn_report import write_report as write_pinn_report

    size = "full" if args.full else "quick"
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    families = args.families.split(",") if args.families else None
    t0 = time.perf_counter()
    store = run_all(size, out, seeds=args.seeds or None, steps=args.steps or None, families=families)
    extra = (f" --seeds {args.seeds}" if args.seeds else "") + (f" --steps {args.steps}" if args.steps else "")
    extra += f" --threads {args.threads}" if args.threads else ""
    header = (
        f"Size: **{size}**, torch {torch.__version__}, {torch.get_num_threads()} threads. Wall time of the last invocation: "
        f"{time.perf_counter() - t0:.0f} s. Regenerate with "
        f"`python -m experiments pinn {'--full' if args.full else '--quick'}{extra} --out {args.out}`."
    )
    path = write_pinn_report(store.rows, out, header=header)
    print(f"\nReport: {path.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (out / "results.jsonl").is_file():
        print(f"--out {args.out}: no results.jsonl there (nothing to report); name a folder a run wrote", file=sys.stderr)
        return 2
    store = ResultStore(out / "results.jsonl")
    print(write_report(store.rows, out, header=reproduce_header(store.rows)).resolve())
    return 0


def _header(size: str, args: argparse.Namespace, wall: float) -> str:
    studies = getattr(args, "studies", "main")
    extra = f" --studies {studies}" if studies != "main" else ""
    return (
        f"Size: **{size}**, seeds: {args.seeds}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Wall time of the last invocation: {wall:.0f} s. Regenerate with "
        f"`python -m experiments {args.cmd} {'--full' if size == 'full' else '--quick'} --seeds {args.seeds}{extra} --out {args.out}`."
    )


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in --help, except for on/off flags and empty defaults (their help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, argparse._StoreTrueAction) or action.default in ("", None):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments", description=(__doc__ or "").replace("``", ""))
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, default_out: str, out_help: str = "output folder") -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--quick", action="store_true", help="CPU-minutes budget (default)")
        g.add_argument("--full", action="store_true", help="longer runs")
        sp.add_argument("--seeds", type=int, default=3, help="seeds per variant")
        sp.add_argument("--steps", type=int, default=0, help="override the number of training steps (0: the size's own)")
        sp.add_argument("--out", default=default_out, help=out_help)
        sp.add_argument(
            "--data",
            default="auto",
            choices=["auto", "fashion", "mnist"],
            help="classification data (auto: Fashion-MNIST if installed, else MNIST)",
        )

    r = sub.add_parser("reproduce", help="the three tasks of the paper, 2x2 formulations", formatter_class=_DefaultsHelp)
    r.add_argument("--task", default="all", choices=[*TASKS, "all"], help="which task")
    r.add_argument(
        "--studies",
        default="main",
        help=f"comma-separated subset of {list(STUDIES)}: the 2x2 + plain network, stronger defaults and ablations, learning rates",
    )
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice; 1 on a busy machine)")
    common(r, "", "output folder (default: runs/reproduce-quick, with --full runs/reproduce-full)")
    r.set_defaults(seeds=0)
    for act in r._actions:
        if act.dest == "seeds":
            act.help = "seeds per variant (0: 3 quick, 5 full)"
    a = sub.add_parser("ablate", help="ablations on task 1")
    a.add_argument("--axes", default="", help=f"comma-separated subset of {list(ABLATIONS)}")
    a.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice; 1 on a busy machine)")
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
    hd = sub.add_parser("heads", help="dense, low-rank, chunked and structured heads on task 1: accuracy vs hypernetwork size")
    common(hd, "runs/heads")
    hd.add_argument("--heads", default="", help="comma-separated subset of the heads (default: all; several processes can share --out)")
    hd.add_argument("--forms", default="", help="comma-separated subset of default,mip,encoding-only (default: all)")
    pi = sub.add_parser("pinn", help="physics-informed hypernetworks on PDE families with manufactured solutions")
    g = pi.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU-minutes budget (default)")
    g.add_argument("--full", action="store_true", help="longer runs, more seeds")
    pi.add_argument("--seeds", type=int, default=0, help="override the number of seeds (3 quick, 5 full)")
    pi.add_argument("--steps", type=int, default=0, help="override the number of hypernetwork training steps")
    pi.add_argument("--families", default="", help="comma-separated subset of poisson,helmholtz (default: both)")
    pi.add_argument("--out", default="runs/pinn")
    pi.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    pe = sub.add_parser("personalized", help="personalised classifiers from a client's data set (PeFLL-style, hl.Data)")
    pe.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    pe.add_argument("--clients", type=int, default=0, help="override the number of clients (default 60, a fifth unseen)")
    common(pe, "runs/personalized")
    rp = sub.add_parser("report", help="rewrite plots and report.md from results.jsonl", formatter_class=_DefaultsHelp)
    rp.add_argument("--out", default="runs/reproduce-quick", help="the folder whose results.jsonl is reported")
    sub.add_parser(
        "claims",
        help="recompute the study's claims from the committed rows: docs/results/claims.md and the README's summary block",
    )
    args = p.parse_args(argv)
    if args.cmd == "claims":
        from .claims import main as claims_main

        return claims_main()
    if args.cmd == "heads":
        from .heads import main as heads_main

        return heads_main(args)
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
        "pinn": cmd_pinn,
        "report": cmd_report,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
