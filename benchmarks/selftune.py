"""Cost of tuning while training: ``hl.SelfTuner`` steps against a plain hypernetwork training step.

One round of the self-tuner is ``T`` calls of :meth:`~hyperloom.SelfTuner.train_step` and one
:meth:`~hyperloom.SelfTuner.hyper_step` on a validation batch of the same size; the reference is
``T`` plain hypernetwork training steps (conditioning drawn with ``hl.sample``, forward, backward,
Adam step). The ratio of the two medians is the step cost of tuning online (goal <= 1.3).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hyperloom as hl

from .bench import ConvNet, adam, interleaved, iqr, med


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10)
    )


def _setups() -> list[tuple[str, Callable[[], hl.HyperModel], dict[str, Any], int]]:
    """(label, model builder, inputs, batch): the self-tuning experiment's MLP and the reproduction's ConvNet."""
    mlp_inputs = {"d1": (0.0, 0.9), "d2": (0.0, 0.9), "wd": (1e-6, 1e-1, "log")}

    def mlp() -> hl.HyperModel:
        h = hl.hypernetize(_mlp(), predict=["4", "7"], inputs=mlp_inputs, hidden=(32, 8))
        return hl.bind_dropout(h, {"d1": "3", "d2": "6"})

    conv_inputs = {"lam": (0.0, 1.0), "wd": (1e-5, 1e-1, "log")}

    def conv() -> hl.HyperModel:
        return hl.hypernetize(ConvNet(), inputs=conv_inputs, hidden=(16, 64, 128))

    return [("mlp (experiment), batch 64", mlp, mlp_inputs, 64), ("convnet, batch 64", conv, conv_inputs, 64)]


def section_selftune(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print("\n## Self-tuning: T x train_step + 1 hyper_step vs T plain hypernetwork training steps")
    rows = []
    setups = _setups()[:1] if args.quick else _setups()
    for label, build, _inputs, batch in setups:
        for period in (5,) if args.quick else (5, 10):
            torch.manual_seed(0)
            x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            xv, yv = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            plain, tuned = build(), build()
            opt_plain, opt_tuned = adam(plain.parameters()), adam(tuned.parameters())
            tuner = hl.SelfTuner(tuned, opt_tuned)

            def plain_round(plain: hl.HyperModel = plain, opt: torch.optim.Optimizer = opt_plain, period: int = period) -> None:
                for _ in range(period):
                    cond = hl.sample(plain)
                    loss = F.cross_entropy(plain(x, **cond), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

            def tuned_round(tuner: hl.SelfTuner = tuner, period: int = period) -> None:
                for _ in range(period):
                    tuner.train_step(lambda m, **c: F.cross_entropy(m(x, **c), y))
                tuner.hyper_step(lambda m, **c: F.cross_entropy(m(xv, **c), yv))

            res = interleaved({"plain": plain_round, "selftune": tuned_round}, rounds=args.rounds, inner=args.inner)
            ratio = med(res["selftune"]) / med(res["plain"])
            lo_p, hi_p = iqr(res["plain"])
            lo_s, hi_s = iqr(res["selftune"])
            print(
                f"{label}, T={period}: plain {med(res['plain']) / period:.2f} ms/step [{lo_p / period:.2f}, {hi_p / period:.2f}], "
                f"selftune {med(res['selftune']) / period:.2f} ms/step [{lo_s / period:.2f}, {hi_s / period:.2f}]; "
                f"selftune ÷ plain = {ratio:.3f}  (goal <= 1.3)"
            )
            rows.append(
                {
                    "setup": label,
                    "T": period,
                    "plain_ms_per_step": med(res["plain"]) / period,
                    "selftune_ms_per_step": med(res["selftune"]) / period,
                    "ratio": ratio,
                }
            )
    report["selftune"] = rows
