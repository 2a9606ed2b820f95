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


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: the nearest multiple of 8, never more than 10 % below v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn_relu6(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (skipped at ratio 1), 3x3 depthwise, linear 1x1 projection;
    the residual add when the stride is 1 and the width stays."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        layers = [_conv_bn_relu6(cin, hidden, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 architecture written out (its compiled ops do not load against every
    torch build): the same inverted-residual settings, channel rounding, last 1280-wide 1x1 conv,
    global average pool, dropout and classifier. ``width`` is torchvision's width_mult; the input
    size is free (224x224 for the standard model)."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # expansion t, channels c, repeats n, first stride s

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        layers = [_conv_bn_relu6(in_channels, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
