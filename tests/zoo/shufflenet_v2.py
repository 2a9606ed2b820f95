"""ShuffleNetV2 (Ma et al. 2018), MCU-sized for 16x16 inputs: stride-1 units split the channels with
chunk, stride-2 units run two branches; both concatenate and shuffle (5-D view + transpose)."""
import torch
from torch import nn


def channel_shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _conv_bn(cin, cout, k, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


class _Unit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.left = nn.Sequential(*_conv_bn(cin, cin, 3, 2, cin, relu=False), *_conv_bn(cin, half, 1))
            right_in = cin
        else:
            self.left = None
            right_in = half
        self.right = nn.Sequential(*_conv_bn(right_in, half, 1), *_conv_bn(half, half, 3, stride, half, relu=False),
                                   *_conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            y = torch.cat([a, self.right(b)], dim=1)
        else:
            y = torch.cat([self.left(x), self.right(x)], dim=1)
        return channel_shuffle(y)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes=10, width=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, width[0], 3))
        self.stage = nn.Sequential(_Unit(width[0], width[1], 2), _Unit(width[1], width[1], 1),
                                   _Unit(width[1], width[2], 2), _Unit(width[2], width[2], 1))
        self.head = nn.Sequential(*_conv_bn(width[2], 64, 1))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.head(self.stage(self.stem(x))).mean(dim=(2, 3)))
