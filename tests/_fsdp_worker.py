"""One process of the FSDP2 test (tests/test_distributed.py): a HyperModel and a LoRAModel whose base layers are sharded.

``python tests/_fsdp_worker.py RANK WORLD STORE OUT``: with WORLD > 1 the base model's blocks are sharded with
``fully_shard`` and the root (the hypernetwork and the rest) is sharded last, as FSDP2 wants; each rank takes its
slice of the same global batch. Rank 0 writes the global losses and the full gradients (DTensor gradients gathered).
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import hyperloom as hl


def base() -> nn.Module:
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU())  # noqa: E731
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), block(), block(), nn.Linear(16, 3))


def build(kind: str) -> nn.Module:
    if kind == "lora":  # the whole base model frozen, LoRA on the blocks' projections
        return hl.hypernetize(
            base(), inputs={"lam": (0.0, 1.0)}, hidden=(8,), head="structured", lora=hl.LoRA(rank=2, targets=["2.0", "3.0"])
        )
    hm = hl.hypernetize(base(), inputs={"lam": (0.0, 1.0)}, hidden=(8,), predict=["4.weight", "4.bias"])
    return hm  # the blocks are trained as usual, the last layer is generated


def run(kind: str, rank: int, world: int) -> dict:
    hm = build(kind)
    if world > 1:
        for block in (hm.primary[2], hm.primary[3]):
            fully_shard(block)  # each block's weights sharded across the ranks, gathered for its forward
        fully_shard(hm)  # the rest: the hypernetwork, the unsharded base layers
    sharded = sorted(n for n, p in hm.named_parameters() if type(p).__name__ == "DTensor")
    opt = torch.optim.SGD([p for p in hm.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(3):
        x, y, lam = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g), torch.rand(8, generator=g)
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        loss = nn.functional.cross_entropy(hm(x[mine], lam=lam[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if step < 2:
            opt.step()
    grads = {}
    for n, p in hm.named_parameters():
        if p.grad is not None:
            gr = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n] = gr.flatten().tolist()
    return {"losses": losses, "grads": grads, "sharded": sharded}


def main() -> None:
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = {kind: run(kind, rank, world) for kind in ("hyper", "lora")}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
