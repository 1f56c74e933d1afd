"""The Daunce authors' ResNet-9 (``models.rn9``, TRAK's and ffcv's ``construct_rn9`` layout) against the
Myrtle-style ``models.resnet9``."""

import pytest
import torch
from torch import nn

from daunce.experiments import models


def _n_weights(model):
    return sum(p.numel() for p in model.parameters())


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_rn9_at_width_64_has_the_published_layout_and_weight_count():
    net = models.rn9(num_classes=10, width=64, in_channels=3)
    # convs without bias (3x3 3->64, 5x5 64->128, 2 x 3x3 128->128, 3x3 128->256, 2 x 3x3 256->256, 3x3 256->128),
    # a BatchNorm (weight and bias) after each, and Linear(128, 10) without bias
    convs = 9 * (3 * 64 + 2 * 128 * 128 + 128 * 256 + 2 * 256 * 256 + 256 * 128) + 25 * 64 * 128
    bn = 2 * (64 + 128 + 2 * 128 + 256 + 2 * 256 + 128)
    assert _n_weights(net) == convs + bn + 128 * 10 == 2_274_880
    assert 2_200_000 <= _n_weights(net) <= 2_350_000
    assert _n_weights(models.resnet9(10, 64, 3)) == 6_573_130  # the Myrtle-style layout is another network
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias is None) for c in _convs(net)]
    assert shapes == [(3, 64, (3, 3), (1, 1), (1, 1), True), (64, 128, (5, 5), (2, 2), (2, 2), True),
                      (128, 128, (3, 3), (1, 1), (1, 1), True), (128, 128, (3, 3), (1, 1), (1, 1), True),
                      (128, 256, (3, 3), (1, 1), (1, 1), True), (256, 256, (3, 3), (1, 1), (1, 1), True),
                      (256, 256, (3, 3), (1, 1), (1, 1), True), (256, 128, (3, 3), (1, 1), (0, 0), True)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [64, 128, 128, 128, 256, 256, 256, 128]
    head = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(head) == 1 and head[0].bias is None and head[0].in_features == 128
    assert isinstance(net[-1], models.Mul) and net[-1].weight == 0.2
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 1
    assert isinstance(net[-4], nn.AdaptiveMaxPool2d)


def test_rn9_forward_shapes_scale_and_residual():
    torch.manual_seed(0)
    net = models.rn9(width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    assert out.shape == (3, 10)
    # the output is 0.2 x the head's: the head alone (the last layer removed) gives five times the logits
    torch.testing.assert_close(net[:-1](x) * 0.2, out)
    small = models.rn9(num_classes=7, width=4, in_channels=1).eval()  # notebook 02's 14 x 14 single-channel images
    assert small(torch.randn(2, 1, 14, 14)).shape == (2, 7)
    # a narrower width scales every channel count by width / 64
    assert [c.out_channels for c in _convs(small)] == [4, 8, 8, 8, 16, 16, 16, 8]
    assert [c.in_channels for c in _convs(small)][0] == 1
    assert _n_weights(small) == 9 * (4 + 2 * 64 + 8 * 16 + 2 * 256 + 16 * 8) + 25 * 4 * 8 \
        + 2 * (4 + 8 + 16 + 16 + 32 + 8) + 8 * 7
    # the residual blocks add their input: zeroing the inner convs' BatchNorm scales leaves the identity
    block = net[2]
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    h = torch.rand(2, 16, 8, 8)
    torch.testing.assert_close(block(h), h)
    assert isinstance(models.build("rn9", 0, 10, width=4, in_channels=1), nn.Sequential)


def test_rn9_refuses_bad_sizes():
    with pytest.raises(ValueError, match="rn9: width must be an integer >= 1, got 0"):
        models.rn9(width=0)
    with pytest.raises(ValueError, match="rn9: num_classes must be an integer >= 1, got 2.5"):
        models.rn9(num_classes=2.5)
