"""One torchrun rank of the exit check (tests/torchrun_loop.py): a small CNN with SyncBatchRenorm
under DistributedDataParallel on gloo, a few SGD steps and an eval forward, then
destroy_process_group() and a normal exit, the way a user's script ends.

    torchrun --nproc-per-node 2 tests/torchrun_worker.py [--layer sync|plain|bn]
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import batchrenorm_cuda as brn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", choices=("sync", "plain", "bn"), default="sync")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    norm = {"sync": lambda c: brn.SyncBatchRenorm(c, warmup_steps=0, r_max_ramp_steps=0,
                                                  d_max_ramp_steps=0),
            "plain": lambda c: brn.BatchRenorm2d(c), "bn": nn.BatchNorm2d}[args.layer]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # A last training forward whose graph is still alive at exit (no backward), as when a
    # script ends with its loss in a global variable, then an eval forward.
    out = ddp(torch.randn(4, 3, 8, 8, generator=g))
    ddp.eval()
    with torch.no_grad():
        ddp(torch.randn(2, 3, 8, 8, generator=g))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done: loss {float(loss):.4f}, out {tuple(out.shape)}, pid {os.getpid()}",
          flush=True)


if __name__ == "__main__":
    main()
