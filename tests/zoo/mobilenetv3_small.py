"""MobileNetV3-small, MCU-sized (16x16 inputs, a few blocks): Hardswish, ReLU, squeeze-excitation
(global pool -> 1x1 -> ReLU -> 1x1 -> Hardsigmoid -> multiply), inverted residuals, as torchvision's
mobilenet_v3_small lays them out (its SqueezeExcitation, its block order)."""
from torch import nn

from .blocks import SqueezeExcitation


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.Hardswish):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, expanded, cout, k, stride, se: bool, act):
        super().__init__()
        layers = []
        if expanded != cin:
            layers.append(_conv_bn_act(cin, expanded, 1, act=act))
        layers.append(_conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, max(8, expanded // 4)))
        layers.append(_conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        self.features = nn.Sequential(
            _conv_bn_act(in_channels, 16, 3, 2),                       # 16x16 -> 8x8
            InvertedResidual(16, 16, 16, 3, 2, True, re),              # -> 4x4
            InvertedResidual(16, 48, 24, 3, 1, False, re),
            InvertedResidual(24, 64, 24, 3, 1, False, re),
            InvertedResidual(24, 64, 32, 5, 2, True, hs),              # -> 2x2
            InvertedResidual(32, 96, 32, 5, 1, True, hs),
            _conv_bn_act(32, 96, 1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))
