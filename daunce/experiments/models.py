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


def _conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def resnet9(n_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Sequential:
    """ResNet-9 as used for CIFAR-10 in the paper and in TRAK (``width=64``, the paper profile): four
    conv-BatchNorm-ReLU stages with two residual blocks, three max-pools and a global max-pool. Notebook 02's
    default profile runs it narrowed (``width=4``) on 14 x 14 single-channel images, where the pools leave 7, 3 and
    1 pixels a side."""
    w = width
    return nn.Sequential(
        _conv_bn(in_channels, w), _conv_bn(w, 2 * w), nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
        _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(8 * w, 8 * w), _conv_bn(8 * w, 8 * w))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, n_classes),
    )


def build(name: str, d_in: int, n_classes: int, **kw) -> nn.Module:
    """``"lr"``, ``"mlp"``, ``"cnn"`` or ``"resnet9"``."""
    if name == "lr":
        return logistic_regression(d_in, n_classes)
    if name == "mlp":
        return mlp(d_in, n_classes, **kw)
    if name == "cnn":
        return small_cnn(n_classes=n_classes, **kw)
    if name == "resnet9":
        return resnet9(n_classes, **kw)
    raise ValueError(f"unknown model {name!r}; expected 'lr', 'mlp', 'cnn' or 'resnet9'")


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
