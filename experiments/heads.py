"""Heads that scale: dense, low-rank, chunked and structured heads on the reproduction's classifier.

``python -m experiments heads --quick`` trains task 1 of the reproduction (Fashion-MNIST, the ConvNet
with every weight predicted from gamma ~ U(0, 1)^2, one gamma per minibatch) at ``width`` 2 (242 k
parameters, so that the hypernetwork's trunk alone is not a large part of the target) with each head
under three formulations: ``default`` (raw gamma, no theta0), ``mip`` (cos|sin encoding + additive
theta0) and ``encoding-only`` (MIP's encoding without theta0: the only MIP variant whose trainable
count can fall below the target's, since theta0 is a full copy of the predicted parameters). The
shared heads also run with the ``concat`` combination under MIP, the measured alternative to the
default ``product``.

Every finished run is appended to ``<out>/results.jsonl``; re-running resumes. The report
(``<out>/report.md``) gives test accuracy (mean and 95 % t-interval over seeds), hypernetwork parameters
with and without theta0, their ratio to the target, and the training step time, and plots accuracy
against the hypernetwork's size.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .common import ResultStore, build_variant
from .report import _pyplot, _save

#: Head label -> the config's ``head`` entry (JSON-able).
HEADS: dict[str, Any] = {
    "dense": "dense",
    "lowrank": "lowrank@4",
    "chunked": {"kind": "chunked", "chunk_size": 1024, "width": 32},
    "structured": {"kind": "structured", "block": 32, "width": 16},
}
#: The measured alternative combination of features and embeddings (MIP only).
CONCAT: dict[str, Any] = {
    "chunked-concat": {**HEADS["chunked"], "combine": "concat"},
    "structured-concat": {**HEADS["structured"], "combine": "concat"},
}
FORMS = ("default", "mip", "encoding-only")
FORM_LABEL = {"default": "default", "mip": "MIP", "encoding-only": "MIP enc., no θ0"}
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 60, "batch": 32, "n_test": 1000, "n_eval_gamma": 4, "probes": 0, "width": 2, "checkpoint_every": 10**6},
    "full": {"steps": 1500, "n_test": 10000, "n_eval_gamma": 8, "probes": 0, "width": 2},
}
# two-sided 95 % Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def runs(heads: list[str] | None = None, forms: list[str] | None = None) -> list[tuple[str, str, Any, dict[str, Any], str]]:
    """(study, axis, level, config-overrides, variant) of every run (or of the given heads and formulations).

    Formulation-major (MIP first), so that an interrupted run has the main comparison first.
    """
    out = [("heads", "head", label, {"head": spec}, form) for form in FORMS for label, spec in HEADS.items()]
    out += [("heads", "head", label, {"head": spec}, "mip") for label, spec in CONCAT.items()]
    order = ("mip", "encoding-only", "default")
    out.sort(key=lambda r: order.index(r[4]) if r[2] in HEADS else len(order))
    return [r for r in out if (heads is None or r[2] in heads) and (forms is None or r[4] in forms)]


def sizes(cfg: dict[str, Any], variant: str) -> dict[str, int]:
    """Hypernetwork parameters with and without theta0, and the target's, for one (config, variant)."""
    import hyperloom as hl

    from .classify import DEFAULTS, ConvNet

    full = {**DEFAULTS, **cfg}
    torch.manual_seed(0)
    model = build_variant(variant, full, ConvNet(10, width=full["width"]), {"z": hl.Input(0.0, 1.0, dim=full["k"])})
    hn = model.hypernet
    total = sum(p.numel() for p in hn.parameters())
    theta0 = sum(p.numel() for p in hn.theta0.parameters()) if hn.theta0 is not None else 0
    target = sum(p.numel() for p in ConvNet(10, width=full["width"]).parameters())
    return {"hyper": total, "hyper_without_theta0": total - theta0, "target": target}


def mean_ci(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, _T95.get(len(v) - 1, 1.96) * sd / math.sqrt(len(v))


def table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["level"], r["variant"]), []).append(r)
    order = [*HEADS, *CONCAT]
    lines = [
        "| head | formulation | test acc. (%) mean ± 95 % CI | seeds | hypernet params | w/o θ0 | w/o θ0 ÷ target | ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for label in order:
        for form in FORMS:
            rs = cells.get((label, form))
            if not rs:
                continue
            m, ci = mean_ci([100 * r["metrics"].get("test_acc", math.nan) for r in rs])
            ms = sorted(1000 * r["metrics"]["wall_s"] / r["config"]["steps"] for r in rs)[len(rs) // 2]
            s = rs[0]["sizes"]
            ratio = s["hyper_without_theta0"] / s["target"]
            summary.append({"head": label, "form": form, "acc": m, "ci": ci, "n": len(rs), "ms": ms, **s, "ratio": ratio})
            lines.append(
                f"| {label} | {FORM_LABEL[form]} | {m:.2f} ± {ci:.2f} | {len(rs)} | {s['hyper']:,} | {s['hyper_without_theta0']:,} | "
                f"{ratio:.3f} | {ms:.0f} |"
            )
    return "\n".join(lines), summary


def plot(summary: list[dict[str, Any]], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {"default": "o", "mip": "s", "encoding-only": "^"}
    colors = {h: f"C{i}" for i, h in enumerate([*HEADS, *CONCAT])}
    for s in summary:
        size = s["hyper"] if s["form"] == "mip" else s["hyper_without_theta0"]
        ax.errorbar(
            size, s["acc"], yerr=s["ci"] if math.isfinite(s["ci"]) else None, fmt=markers[s["form"]], color=colors[s["head"]], capsize=3
        )
    for h, c in colors.items():
        ax.plot([], [], "o", color=c, label=h)
    for f, mk in markers.items():
        ax.plot([], [], mk, color="gray", label=FORM_LABEL[f])
    target = summary[0]["target"] if summary else 0
    if target:
        ax.axvline(target, color="k", lw=0.8, ls="--", label="target size")
    ax.set_xlabel("hypernetwork parameters (trainable; MIP includes θ0)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST classifier: accuracy vs hypernetwork size")
    ax.set_xscale("log")
    return _save(plt, fig, ax, path)


def write_report(rows: list[dict[str, Any]], out: Path, header: str) -> Path:
    text, summary = table(rows)
    plotted = plot(summary, out / "acc_vs_size.png")
    by = {(s["head"], s["form"]): s for s in summary}
    notes = []
    dense_mip = by.get(("dense", "mip"))
    for h in ("chunked", "structured"):
        for f in FORMS:
            s, d = by.get((h, f)), by.get(("dense", f))
            if s and d:
                notes.append(
                    f"- {h}, {FORM_LABEL[f]}: {s['acc'] - d['acc']:+.2f} accuracy points vs the dense head "
                    f"({s['ratio']:.3f}x the target's size without θ0, dense {d['ratio']:.1f}x); step time {s['ms'] / d['ms']:.2f}x dense"
                )
    for h in ("chunked", "structured"):
        p, c = by.get((h, "mip")), by.get((h + "-concat", "mip"))
        if p and c:
            notes.append(f"- combination, {h}, MIP: product {p['acc']:.2f} ± {p['ci']:.2f} vs concat {c['acc']:.2f} ± {c['ci']:.2f}")
    cfg0 = rows[0]["config"] if rows else {}
    body = [
        "# Heads that scale: quick results\n",
        header + "\n",
        "Task 1 of the reproduction (Fashion-MNIST, every weight of the ConvNet at width 2 predicted from "
        f"gamma ~ U(0, 1)^2, one gamma per minibatch of {cfg0.get('batch', '?')}, Adam 1e-3, {cfg0.get('steps', '?')} steps). "
        "Heads: dense (split init), low-rank (rank 4), "
        f"chunked ({json.dumps(HEADS['chunked'])}), structured ({json.dumps(HEADS['structured'])}); "
        "the `-concat` rows combine features and embeddings by concatenation instead of the default product. "
        "Accuracy: mean over seeds (each seed's accuracy averaged over evaluation gamma values) with a 95 % Student-t interval. "
        "Step time: training wall time ÷ steps (median over seeds), on a shared machine: compare within one run only.\n",
        text + "\n",
        "## Reading\n",
        "\n".join(notes) + "\n",
    ]
    if dense_mip:
        body.append(f"\nTarget size: {dense_mip['target']:,} parameters.\n")
    if plotted:
        body.append("\n![accuracy vs hypernetwork size](acc_vs_size.png)\n")
    path = out / "report.md"
    path.write_text("\n".join(body))
    return path


def main(args: argparse.Namespace) -> int:
    from . import classify
    from .__main__ import _run_grid

    size = "full" if args.full else "quick"
    cfg = {**classify.DEFAULTS, **classify.SIZES[size], **SIZES[size]}
    if args.steps:
        cfg["steps"] = args.steps
    out = Path(args.out)
    store = ResultStore(out / "results.jsonl")
    data = classify.load_data(args)
    t0 = time.perf_counter()
    heads = args.heads.split(",") if getattr(args, "heads", "") else None
    forms = args.forms.split(",") if getattr(args, "forms", "") else None
    grid = [(study, axis, level, {**cfg, **over}, variant) for study, axis, level, over, variant in runs(heads, forms)]
    _run_grid(store, "classify", data, grid, args.seeds)
    known: dict[str, dict[str, int]] = {}
    rows = []
    for r in store.rows:
        if r.get("study") != "heads" or r.get("config", {}).get("steps") != cfg["steps"]:
            continue
        key = json.dumps([r["config"]["head"], r["variant"]], sort_keys=True)
        if key not in known:
            known[key] = sizes(r["config"], r["variant"])
        rows.append({**r, "sizes": known[key]})
    wall = time.perf_counter() - t0
    header = (
        f"Size: **{size}**, seeds: {args.seeds}, steps: {cfg['steps']}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Wall time of the last invocation: {wall:.0f} s. Regenerate with "
        f"`python -m experiments heads {'--full' if size == 'full' else '--quick'} --seeds {args.seeds} --out {args.out}`."
    )
    path = write_report(rows, out, header)
    print(f"\nReport: {path.resolve()}")
    return 0
