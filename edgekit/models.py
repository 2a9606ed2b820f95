"""Reference models: the shapes the demo, the tests and the benchmarks use."""
from __future__ import annotations

import torch
from torch import nn


def digits_mlp(hidden=(300, 100)) -> nn.Module:
    """The LeNet-300-100 shape on 8x8 digits: 64-300-100-10."""
    layers, width = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """The demo CNN: conv, conv, max-pool, depthwise, 1x1 conv, global mean, dense."""

    def __init__(self, c1: int = 16, c2: int = 32, c3: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(c2, c2, 3, padding=1, groups=c2)
        self.bn3 = nn.BatchNorm2d(c2)
        self.pw = nn.Conv2d(c2, c3, 1)
        self.bn4 = nn.BatchNorm2d(c3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c3, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu(self.bn3(self.dw(x)))
        x = self.relu(self.bn4(self.pw(x)))
        return self.fc(self.flatten(self.gap(x)))


class DigitsResCNN(nn.Module):
    """A CNN with the joins: residual add, channel concatenation, depthwise with a multiplier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.branch_a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.branch_b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=16), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(48, 32, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Dropout(0.1), nn.Linear(32 * 2 * 2, 10))

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.block(x))
        x = self.pool(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.head(x)


def ds_cnn_kws(num_classes: int = 12, filters: int = 64) -> nn.Module:
    """The MLPerf Tiny keyword-spotting DS-CNN: input 49x10x1 (MFCC), conv 10x4
    stride 2 'same', four depthwise-separable blocks, average pool, dense."""

    def block():
        return [nn.Conv2d(filters, filters, 3, padding=1, groups=filters), nn.BatchNorm2d(filters), nn.ReLU(),
                nn.Conv2d(filters, filters, 1), nn.BatchNorm2d(filters), nn.ReLU()]

    # TF's 'same' for a 10x4 kernel with stride 2 on 49x10 pads 4 rows above, 5 below, 1 column each
    # side; torch pads symmetrically, so the pad is explicit (edgekit folds it into the convolution).
    layers = [nn.ZeroPad2d((1, 1, 4, 5)), nn.Conv2d(1, filters, (10, 4), stride=2), nn.BatchNorm2d(filters),
              nn.ReLU()]
    for _ in range(4):
        layers += block()
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(filters, num_classes)]
    return nn.Sequential(*layers)
