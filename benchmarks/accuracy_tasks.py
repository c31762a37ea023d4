"""Data sets, batch samplers and models of the accuracy experiment (benchmarks/accuracy.py).

Everything here is built offline and is a pure function of its seed, so a run reproduces
bit for bit on the same machine and torch build.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import batchrenorm_cuda as brn

BATCH = 32

# ----------------------------------------------------------------------------------- data


def make_signals(classes: int = 100, length: int = 64, train_per_class: int = 60,
                 test_per_class: int = 20, seed: int = 1234) -> Tuple[Tensor, ...]:
    """A procedural 1-D signal task with many classes (the paper's setting needs >= 16 labels
    per batch of 32 with 2 examples each, which 10-class data cannot give).

    Each class is a template: three Gaussian bumps of random position, width and signed
    height on a length-64 line. An example is its class's template, circularly shifted by up to
    +-4 positions, scaled by a random gain in [0.7, 1.3], plus smooth noise (white noise
    convolved with a width-2 Gaussian, std 0.5) and a random offset (std 0.3). The shift and the
    gain make the task need convolutions; the offset and gain give every channel a per-example
    mean and scale, which is what normalisation layers act on. Fixed train/test split; the
    test set is standardised with the training set's statistics.
    """
    rng = np.random.default_rng(seed)
    pos = np.arange(length)
    centres = rng.uniform(0, length, size=(classes, 3))
    widths = rng.uniform(1.5, 5.0, size=(classes, 3))
    heights = rng.normal(0.0, 1.0, size=(classes, 3))
    # Circular distance, so the shift below keeps every bump whole.
    dist = np.abs(pos[None, None, :] - centres[:, :, None])
    dist = np.minimum(dist, length - dist)
    templates = (heights[:, :, None] * np.exp(-0.5 * (dist / widths[:, :, None]) ** 2)).sum(1)
    templates /= templates.std(axis=1, keepdims=True)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    kernel /= np.sqrt((kernel ** 2).sum())  # unit gain on white noise's variance

    def draw(per_class: int):
        y = np.repeat(np.arange(classes), per_class)
        n = len(y)
        shifts = rng.integers(-4, 5, size=n)
        x = np.stack([np.roll(templates[c], s) for c, s in zip(y, shifts)])
        x *= rng.uniform(0.7, 1.3, size=(n, 1))
        noise = rng.normal(0.0, 1.0, size=(n, length + len(kernel) - 1))
        x += 0.5 * np.stack([np.convolve(row, kernel, mode="valid") for row in noise])
        x += rng.normal(0.0, 0.3, size=(n, 1))
        return x.astype(np.float32), y

    x_tr, y_tr = draw(train_per_class)
    x_te, y_te = draw(test_per_class)
    mean, std = x_tr.mean(), x_tr.std()
    f = lambda a: torch.as_tensor((a - mean) / std).unsqueeze(1)  # (N, 1, length)
    i = lambda a: torch.as_tensor(a, dtype=torch.long)
    return f(x_tr), i(y_tr), f(x_te), i(y_te)


def make_tabular(classes: int = 100, features: int = 64, train_per_class: int = 80,
                 test_per_class: int = 20, class_sep: float = 2.0,
                 seed: int = 1234) -> Tuple[Tensor, ...]:
    """scikit-learn's make_classification with many classes: one Gaussian cluster per class
    on the vertices of a 32-dimensional hypercube (side 2 * class_sep), 16 redundant (linear
    combinations) and 16 pure-noise features. Fixed stratified split, standardised per feature
    with the training set's statistics."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    n = classes * (train_per_class + test_per_class)
    x, y = make_classification(n_samples=n, n_features=features, n_informative=32,
                               n_redundant=16, n_classes=classes, n_clusters_per_class=1,
                               class_sep=class_sep, flip_y=0.0, random_state=seed)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_per_class / (
        train_per_class + test_per_class), stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0)
    f = lambda a: torch.as_tensor((a - mean) / std, dtype=torch.float32)
    i = lambda a: torch.as_tensor(a, dtype=torch.long)
    return f(x_tr), i(y_tr), f(x_te), i(y_te)


# ------------------------------------------------------------------------------- batches


def batch_indices(labels: np.ndarray, steps: int, seed: int,
                  classes_per_batch: Optional[int] = None) -> np.ndarray:
    """(steps, 32) training indices.

    classes_per_batch None: i.i.d. batches, drawn without replacement from a new permutation
    each epoch. Otherwise every batch holds classes_per_batch classes x (32 / classes_per_batch)
    examples, the classes drawn at random per step and each class cycling through its own
    permutation of its examples. The same for BatchNorm and Batch Renorm at one seed.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    out = np.empty((steps, BATCH), dtype=np.int64)
    if classes_per_batch is None:
        per_epoch = n // BATCH
        for s in range(0, steps, per_epoch):
            perm = rng.permutation(n)[: per_epoch * BATCH].reshape(per_epoch, BATCH)
            out[s: s + per_epoch] = perm[: steps - s]
        return out
    if BATCH % classes_per_batch:
        raise ValueError(f"classes_per_batch must divide {BATCH}, got {classes_per_batch}")
    classes = np.unique(labels)
    per_class = BATCH // classes_per_batch
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    queues = {c: rng.permutation(pools[c]) for c in classes}
    for s in range(steps):
        rows = []
        for c in rng.choice(classes, size=classes_per_batch, replace=False):
            if len(queues[c]) < per_class:
                queues[c] = np.concatenate([queues[c], rng.permutation(pools[c])])
            rows.append(queues[c][:per_class])
            queues[c] = queues[c][per_class:]
        out[s] = np.concatenate(rows)
    return out


# --------------------------------------------------------------------------------- models


class MicroBatch(nn.Module):
    """Normalise each group of `group` consecutive examples with that group's own statistics.

    All groups of a step are normalised in one call, by laying them side by side as channels:
    (N, C, *) -> (group, N/group * C, *), so each "channel" holds one group's values of one
    channel. Every group therefore reads the running statistics as they stood at the start of
    the step (for Batch Renorm's r and d), as the paper's concurrent microbatches read the shared
    moving averages. The running statistics then end up exactly as if each group had updated
    them in turn (G updates with momentum m: the buffers decay by (1-m)^G and group k's
    statistics enter with weight m(1-m)^(G-1-k)). The step counter, which drives Batch Renorm's
    r_max/d_max schedule, advances once per step, as the paper's schedule counts training steps.
    In eval the wrapped layer runs unchanged, on its population statistics.
    """

    def __init__(self, layer: nn.Module, group: int) -> None:
        super().__init__()
        self.layer = layer
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        n, c = x.shape[0], x.shape[1]
        if not self.training or n % self.group or n == self.group:
            return layer(x)
        g, groups, rest = self.group, n // self.group, x.shape[2:]
        wide = x.reshape(groups, g, c, *rest).transpose(0, 1).reshape(g, groups * c, *rest)
        m = layer.momentum
        rm = layer.running_mean.repeat(groups)
        rv = layer.running_var.repeat(groups)
        w, b = layer.weight.repeat(groups), layer.bias.repeat(groups)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            out = nn.functional.batch_norm(wide, rm, rv, w, b, True, m, layer.eps)
        else:
            r_max, d_max = layer.clip_bounds()
            out = brn.batch_renorm(wide, rm, rv, w, b, True, m, layer.eps, r_max, d_max)
        with torch.no_grad():
            # rm (per group k) = (1-m) * old + m * stat_k; replay the G updates in order.
            decay = (1.0 - m) ** torch.arange(groups - 1, -1, -1, dtype=rm.dtype)
            for buf, new in ((layer.running_mean, rm), (layer.running_var, rv)):
                contrib = new.view(groups, c) - (1.0 - m) * buf
                buf.mul_((1.0 - m) ** groups).add_((decay[:, None] * contrib).sum(0))
            layer.num_batches_tracked.add_(1)
        return out.reshape(g, groups, c, *rest).transpose(0, 1).reshape(n, c, *rest)


class NormFactory:
    """Builds every normalisation layer of one model: the layer type is the only difference
    between a BatchNorm run and a Batch Renorm run."""

    def __init__(self, layer: str, group: Optional[int], momentum: float,
                 renorm_kwargs: Dict[str, float], cumulative_start: bool = False) -> None:
        self.layer, self.group = layer, group
        self.momentum, self.renorm_kwargs = momentum, renorm_kwargs
        self.cumulative_start = cumulative_start

    def __call__(self, channels: int) -> nn.Module:
        if self.layer == "bn":
            norm = nn.BatchNorm1d(channels, momentum=self.momentum)
        else:
            norm = brn.BatchRenorm1d(channels, momentum=self.momentum, **self.renorm_kwargs)
        outer = MicroBatch(norm, self.group) if self.group else norm
        if self.cumulative_start:
            outer.register_forward_pre_hook(_CumulativeStart(norm, self.momentum))
        return outer


class _CumulativeStart:
    """Before each training step, the layer's averaging rate becomes max(momentum, 1 / (t + 1))
    at its t-th step: its buffers hold the plain mean of the steps so far until 1 / momentum
    steps, then the exponential average (NOTES.md, issue 20, round 7). With microbatches each
    group's update uses that step's rate."""

    def __init__(self, layer: nn.Module, momentum: float) -> None:
        self.layer, self.momentum = layer, momentum

    def __call__(self, module: nn.Module, inputs) -> None:
        if self.layer.training:
            t = int(self.layer.num_batches_tracked)
            self.layer.momentum = max(self.momentum, 1.0 / (t + 1))


class ResidualBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus the identity (or a strided 1x1 conv-norm when the shape
    changes), then ReLU: ResNet's basic block in 1-D."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout), nn.ReLU(),
            nn.Conv1d(cout, cout, 3, padding=1, bias=False), norm(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), norm(cout)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet1d(norm: NormFactory, classes: int, width: int = 16) -> nn.Sequential:
    """A small 1-D ResNet: a strided stem conv-norm, four basic blocks (widths w, w, 2w, 2w;
    strides 1, 2, 1, 2), global average pooling and a linear head. Twelve normalisation
    layers (the stem's, two per block, and one in each of the three shortcuts that change the
    shape), so that a normalisation error in one layer compounds through the ones after it."""
    w = width
    return nn.Sequential(
        nn.Conv1d(1, w, 5, stride=2, padding=2, bias=False), norm(w), nn.ReLU(),
        ResidualBlock(w, w, 1, norm), ResidualBlock(w, w, 2, norm),
        ResidualBlock(w, 2 * w, 1, norm), ResidualBlock(2 * w, 2 * w, 2, norm),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * w, classes))


class ResidualMLPBlock(nn.Module):
    """linear-norm-ReLU-linear-norm plus the identity, then ReLU."""

    def __init__(self, width: int, norm: NormFactory) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width, bias=False), norm(width), nn.ReLU(),
                                  nn.Linear(width, width, bias=False), norm(width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + x)


def residual_mlp(norm: NormFactory, features: int, classes: int, width: int = 256,
                 blocks: int = 4) -> nn.Sequential:
    """An input layer and `blocks` residual blocks, each linear layer followed by a
    normalisation layer on (N, width) activations, as in CrossQ's critics: 1 + 2 * blocks
    normalisation layers."""
    return nn.Sequential(
        nn.Linear(features, width, bias=False), norm(width), nn.ReLU(),
        *[ResidualMLPBlock(width, norm) for _ in range(blocks)], nn.Linear(width, classes))


def count_norm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.BatchNorm1d, brn.BatchRenorm1d)) for m in model.modules())
