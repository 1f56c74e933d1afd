"""Small models for the vision experiments. Each is a plain ``nn.Sequential`` (so dattri's and
kronfluence's module hooks find its layers) and takes images or flat vectors as its data come."""

from __future__ import annotations

import torch
from torch import nn


def logistic_regression(d_in: int, n_classes: int) -> nn.Sequential:
    """Multinomial logistic regression, ``(B, ...) -> (B, n_classes)``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, n_classes))


def mlp(d_in: int, n_classes: int, hidden: int = 64) -> nn.Sequential:
    """One hidden layer with a tanh (smooth, so its Hessian exists everywhere)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def small_cnn(in_channels: int = 1, n_classes: int = 10, width: int = 8, image_size: int = 28) -> nn.Sequential:
    """Two conv layers and a linear head; no BatchNorm, so it can be vectorised across copies."""
    s = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * s * s, n_classes),
    )


def _conv_bn(c_in, c_out, kernel_size=3, stride=1, padding=1):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Mul(nn.Module):
    """Multiplies its input by a fixed number (``weight``, not trained)."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    def forward(self, x):
        return x * self.weight

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def resnet9(n_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Sequential:
    """A Myrtle-style ResNet-9 (the DAWNBench CIFAR-10 layout; not the paper's or TRAK's network, which is ``rn9``):
    conv-BatchNorm-ReLU stages of width w, 2w, 4w, 8w with two residual blocks, three max-pools, a global max-pool and a
    linear head with a bias; 6.57M weights at ``width=64``. Notebook 02's default profile has run it narrowed
    (``width=4``) on 14 x 14 single-channel images, where the pools leave 7, 3 and 1 pixels a side."""
    w = width
    return nn.Sequential(
        _conv_bn(in_channels, w), _conv_bn(w, 2 * w), nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
        _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(8 * w, 8 * w), _conv_bn(8 * w, 8 * w))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, n_classes),
    )


def rn9(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Sequential:
    """The ResNet-9 of the Daunce authors' CIFAR-10 runs, the layout of TRAK's and ffcv's CIFAR-10 examples
    (``construct_rn9``), ``(B, in_channels, H, W) -> (B, num_classes)``. With c = ``width`` (64 in the paper), each
    conv a Conv2d without bias, then BatchNorm2d and ReLU:

    conv 3x3 in_channels -> c; conv 5x5 stride 2 (padding 2) c -> 2c; residual (conv 2c -> 2c, conv 2c -> 2c);
    conv 3x3 2c -> 4c; max-pool 2; residual (conv 4c -> 4c, conv 4c -> 4c); conv 3x3 without padding 4c -> 2c;
    adaptive max-pool to 1 x 1; flatten; Linear(2c, num_classes, no bias); x 0.2.

    2,274,880 weights at ``width=64`` with 3 input channels and 10 classes; a narrower ``width`` scales every
    channel count by width / 64 (narrowed for a CPU). Images need a side of at least 6 (32 x 32 leaves 16, 8 and 6
    pixels a side before the last conv; 14 x 14 leaves 7, 3 and 1)."""
    for name, v in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"rn9: {name} must be an integer >= 1, got {v!r}")
    c = width
    return nn.Sequential(
        _conv_bn(in_channels, c),
        _conv_bn(c, 2 * c, kernel_size=5, stride=2, padding=2),
        _Residual(nn.Sequential(_conv_bn(2 * c, 2 * c), _conv_bn(2 * c, 2 * c))),
        _conv_bn(2 * c, 4 * c),
        nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(4 * c, 4 * c), _conv_bn(4 * c, 4 * c))),
        _conv_bn(4 * c, 2 * c, padding=0),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes, bias=False), Mul(0.2),
    )


def build(name: str, d_in: int, n_classes: int, **kw) -> nn.Module:
    """``"lr"``, ``"mlp"``, ``"cnn"``, ``"resnet9"`` (Myrtle-style) or ``"rn9"`` (the authors' ResNet-9)."""
    if name == "lr":
        return logistic_regression(d_in, n_classes)
    if name == "mlp":
        return mlp(d_in, n_classes, **kw)
    if name == "cnn":
        return small_cnn(n_classes=n_classes, **kw)
    if name == "resnet9":
        return resnet9(n_classes, **kw)
    if name == "rn9":
        return rn9(n_classes, **kw)
    raise ValueError(f"unknown model {name!r}; expected 'lr', 'mlp', 'cnn', 'resnet9' or 'rn9'")


def seeded(fn, seed: int, *args, **kw) -> nn.Module:
    """Build a model with a fixed initialisation."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args, **kw)


class MLPModule(nn.Module):
    """``mlp`` written as a class, the way most PyTorch models are: ``fc1``, then ``torch.tanh`` in ``forward``,
    then ``fc2``; ``(B, ...) -> (B, n_classes)``. The same function as ``mlp`` with the same weights
    (``from_sequential``); the shared-input trainer reads its ``forward`` with ``torch.fx``
    (``daunce.engines.stacked.supported``)."""

    def __init__(self, d_in: int, n_classes: int, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "MLPModule":
        """The class form of an ``mlp(...)`` model, with a copy of its weights (and their ``requires_grad``)."""
        first, last = seq[1], seq[3]
        out = cls(first.in_features, last.out_features, first.out_features)
        for mine, theirs in ((out.fc1, first), (out.fc2, last)):
            for name, p in theirs.named_parameters():
                getattr(mine, name).data.copy_(p.detach())
                getattr(mine, name).requires_grad_(p.requires_grad)
        return out.to(first.weight.device, first.weight.dtype)
