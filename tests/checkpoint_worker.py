"""One process of the resume tests (tests/test_checkpoint.py): a small CNN with Batch Renorm
layers trained with SGD (momentum, weight decay) on data drawn from each step's own seed.

    python tests/checkpoint_worker.py train OUTDIR [--rank R --world W --port P]
        trains TOTAL steps, saving a checkpoint (model and optimizer state_dicts) after STOP
        steps, mid-schedule, and the final state at the end;
    python tests/checkpoint_worker.py resume OUTDIR [...]
        a fresh process: builds the model with the constructor's default schedule, loads the
        checkpoint (which restores the schedule) and trains the remaining steps.
With --world 2 the norm layers are SyncBatchRenorm over gloo and the gradients are averaged
across the ranks with all_reduce.
"""
import argparse
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import batchrenorm_cuda as brn

SCHEDULE = dict(r_max=2.0, d_max=1.0, warmup_steps=2, r_max_ramp_steps=4, d_max_ramp_steps=3)
TOTAL, STOP = 9, 4  # the checkpoint falls inside both ramps


def build(sync: bool, schedule: dict) -> nn.Module:
    torch.manual_seed(0)

    def norm(c, **kw):
        return brn.SyncBatchRenorm(c, **kw, **schedule) if sync else brn.BatchRenorm2d(
            c, **kw, **schedule)

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8, momentum=0.1), nn.ReLU(),
                         nn.Conv2d(8, 6, 3), norm(6, momentum=None), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 5))


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 8, 8, generator=g) * 2 + 0.5, torch.randn(4, 5, generator=g)


def train(model, opt, steps, world: int, rank: int) -> None:
    model.train()
    for step in steps:
        x, target = batch(step, rank)
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()


def state(model, opt) -> dict:
    norms = [m for m in model.modules() if isinstance(m, brn.modules._BatchRenorm)]
    return dict(model=model.state_dict(), opt=opt.state_dict(),
                schedule=[{k: getattr(m, k) for k in SCHEDULE} for m in norms],
                bounds=[m.clip_bounds() for m in norms])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "resume"))
    parser.add_argument("outdir")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sync = args.world > 1
    if sync:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=args.rank, world_size=args.world,
                                timeout=timedelta(seconds=60))
    path = os.path.join(args.outdir, f"{args.mode}_rank{args.rank}.pt")
    ckpt = os.path.join(args.outdir, f"checkpoint_rank{args.rank}.pt")
    if args.mode == "train":
        model = build(sync, SCHEDULE)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        train(model, opt, range(STOP), args.world, args.rank)
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict()), ckpt)
        train(model, opt, range(STOP, TOTAL), args.world, args.rank)
    else:
        model = build(sync, {})  # the defaults: the checkpoint must bring the schedule back
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        saved = torch.load(ckpt)  # weights_only: plain tensors and metadata
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_state_dict(saved["model"])
        assert any("replaces the constructor's" in str(w.message) for w in caught), caught
        opt.load_state_dict(saved["opt"])
        train(model, opt, range(STOP, TOTAL), args.world, args.rank)
    torch.save(state(model, opt), path)
    if sync:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
