"""Checkpointed training that survives an interruption and ends bit-identical to an uninterrupted run.

    python examples/checkpoint_resume.py --dir runs/resume          # 200 steps, a few seconds
    python examples/checkpoint_resume.py --dir /tmp/resume --tiny   # the tests

A MIP hypernetwork over a small MLP is trained with ``hl.Trainer`` on a regression whose target depends on the
conditioning input (y = sin(x·w) scaled by lam). The run is cut after half its steps (as a crash or a
pre-emption would), started again with the same arguments (it resumes from the checkpoint: model, optimiser,
scheduler, step and random states), and compared with a run that was never interrupted: the weights are equal,
bit for bit. The final model is saved with ``hl.save_model`` and loaded back into a fresh model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import hyperloom as hl


def build() -> hl.HyperModel:
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    return hl.hypernetize(net, inputs={"lam": (0.5, 2.0)}, hidden=(16, 32))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return x, torch.sin(x @ torch.randn(8, 1, generator=g))


def train(checkpoint: Path, steps: int, *, every: int, stop: int | None = None) -> hl.HyperModel:
    """Train a run of ``steps`` steps (up to step ``stop``, a simulated crash), resuming from ``checkpoint`` if it exists."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 2), gamma=0.5)
    x, y = data()

    def loss_fn(model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lam = 0.5 + 1.5 * torch.rand(32)  # drawn from torch's global generator, which the checkpoint holds
        idx = torch.randint(0, len(x), (32,))
        return nn.functional.mse_loss(model(x[idx], lam=lam), y[idx] * lam[:, None]), {"lam": lam}

    trainer = hl.Trainer(model, opt, loss_fn, checkpoint=checkpoint, every=every, scheduler=sched, config={"steps": steps})
    resumed = trainer.resume()
    start = trainer.step
    losses = trainer.fit(steps if stop is None else stop, resume=False)
    if losses:
        print(
            f"  {'resumed at' if resumed else 'started at'} step {start}, ran to {trainer.step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="where the checkpoints go")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tiny", action="store_true", help="a few steps (the tests)")
    args = p.parse_args(argv)
    steps = 6 if args.tiny else args.steps
    every = max(2, steps // 10)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("interrupted.safetensors", "straight.safetensors"):
        (out / f).unlink(missing_ok=True)

    print("run 1: interrupted after half the steps")
    train(out / "interrupted.safetensors", steps, every=every, stop=steps // 2)
    print("run 1, started again with the same arguments")
    resumed = train(out / "interrupted.safetensors", steps, every=every)
    print("run 2: never interrupted")
    straight = train(out / "straight.safetensors", steps, every=every)
    same = all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values(), strict=True))
    print(f"resumed run bit-identical to the uninterrupted one: {same}")
    if not same:
        raise SystemExit(1)

    final = out / "model.safetensors"
    hl.save_model(resumed, final, config={"steps": steps})
    fresh = build()
    config = hl.load_model(fresh, final)
    x, _ = data()
    assert torch.equal(fresh(x[:4], lam=1.0), resumed(x[:4], lam=1.0))
    print(f"saved and reloaded {final} (config {config}): outputs equal")


if __name__ == "__main__":
    main(sys.argv[1:])
