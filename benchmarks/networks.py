"""Whole networks for bench_modules.py --networks: a training step (forward, loss, backward,
optimizer step) of a model with nn.BatchNorm against the same model converted with
batchrenorm_cuda.convert_batchnorm (its defaults, as a new user converts), eager and compiled.

Each builder returns (model, optimizer factory, input, target, loss function); the model is
built with nn.BatchNorm and the same seed, so both variants start from the same weights.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import Callable, Dict, Tuple

import torch
from torch import nn

import batchrenorm_cuda as brn


def cnn4(batch: int = 8):
    """Issue 22's case: 4 x (Conv3x3 -> norm -> ReLU), channels 32/64/128/128, 32x32 input,
    cross-entropy, SGD with momentum."""
    torch.manual_seed(0)
    layers, c_in = [], 3
    for c in (32, 64, 128, 128):
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return model, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), x, y, \
        nn.functional.cross_entropy


class _Basic(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = (nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
                     if stride != 1 or c_in != c else nn.Identity())

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


def resnet18ish(batch: int = 4, width: int = 16):
    """ResNet-18's stack (stem, 4 stages of 2 basic blocks, 20 norm layers) at a quarter of its
    width and on 32x32 input, so that a step takes tens of ms on one CPU core."""
    torch.manual_seed(0)
    w = width
    blocks = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    c_in = w
    for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
        blocks += [_Basic(c_in, c, 1 if i == 0 else 2), _Basic(c, c, 1)]
        c_in = c
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return model, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4), x, \
        y, nn.functional.cross_entropy


def crossq_critic(batch: int = 512, width: int = 512, obs_act: int = 23):
    """CrossQ's critic (README): Linear -> norm -> ReLU twice, then Linear(1), on the joint
    batch of (s, a) and (s', a'), trained with Adam on a squared TD error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(obs_act, width), nn.BatchNorm1d(width, eps=1e-3), nn.ReLU(),
                          nn.Linear(width, width), nn.BatchNorm1d(width, eps=1e-3), nn.ReLU(),
                          nn.Linear(width, 1))
    x = torch.randn(batch, obs_act)
    y = torch.randn(batch, 1)
    return model, lambda p: torch.optim.Adam(p, lr=3e-4), x, y, nn.functional.mse_loss


NETWORKS: Dict[str, Callable[[], Tuple]] = {
    "cnn4 b8": lambda: cnn4(8),
    "resnet18/4 b2": lambda: resnet18ish(2),
    "resnet18/4 b8": lambda: resnet18ish(8),
    "crossq critic 512x512": lambda: crossq_critic(),
}


def instances(name: str, compiled: bool, placements: int = 1):
    """({label: [(model, callable, optimizer), ...]}, input, target, loss function) for the
    labels "brn" (converted with convert_batchnorm), "bn" and "bn_copy": the control, nn.BatchNorm
    against itself (A/A), whose ratio is what the measurement alone moves. Each label has
    `placements` instances (deep copies: the same weights).

    Why several: where the parameters, gradients and optimizer state sit in memory moves a whole
    step by up to +-1.5 % on this CPU, and it is fixed for one instance (an A/A pair of
    ResNet-18/4 b2 instances measured 1.4 % apart over 150 paired rounds, benchmarks/NOTES.md,
    issue 22); taking several in turn averages it. Compiled, the instances of one label share its
    graphs (their guards see the same code and values), so this costs no compile."""
    model, make_opt, x, y, loss_fn = NETWORKS[name]()
    builders = {"brn": lambda: brn.convert_batchnorm(copy.deepcopy(model)),
                "bn": lambda: copy.deepcopy(model), "bn_copy": lambda: copy.deepcopy(model)}
    # Built in turn across labels, so that no label gets all the early allocations.
    built = {label: [] for label in builders}
    for _ in range(placements):
        for label, build in builders.items():
            net = build().train()
            built[label].append((net, torch.compile(net) if compiled else net,
                                 make_opt(net.parameters())))
    return built, x, y, loss_fn


def train_step(fn, opt, x, y, loss_fn, marks=None):
    """One training step: forward, loss, backward, optimizer step. If `marks` is a list, the
    perf_counter times after the forward, the backward and the optimizer step are appended to it
    (compiled_breakdown.py's phases)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(fn(x), y)
    if marks is not None:
        marks.append(time.perf_counter())
    loss.backward()
    if marks is not None:
        marks.append(time.perf_counter())
    opt.step()
    if marks is not None:
        marks.append(time.perf_counter())
    return loss


def training_steps(name: str, compiled: bool, placements: int = 1):
    """{label: step}: zero-argument callables doing one training step each (forward, loss,
    backward, optimizer step) of instances()'s models, taking their instances in turn."""
    built, x, y, loss_fn = instances(name, compiled, placements)
    steps = {}
    for label, models in built.items():
        turn = itertools.cycle(models)

        def step(turn=turn):
            _, fn, opt = next(turn)
            return train_step(fn, opt, x, y, loss_fn)

        step.models = [net for net, _, _ in models]  # for the tests
        steps[label] = step
    return steps
