"""EfficientNet-B0-style, MCU-sized (16x16 inputs): MBConv blocks with SiLU, squeeze-excitation
with a SiLU squeeze and a Sigmoid gate multiplied in, residuals, as torchvision's efficientnet lays
them out (stochastic depth is the identity in eval mode, so it is left out)."""
from torch import nn

from .blocks import SqueezeExcitation


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, mid, 1)]
        layers += [_conv_bn(mid, mid, k, stride, groups=mid),
                   SqueezeExcitation(mid, max(4, cin // 4), nn.SiLU, nn.Sigmoid),
                   _conv_bn(mid, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


class EfficientNetB0Style(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, 16, 3, 2),   # 16x16 -> 8x8
            MBConv(16, 16, 3, 1, 1),
            MBConv(16, 24, 3, 2, 4),           # -> 4x4
            MBConv(24, 24, 3, 1, 4),
            MBConv(24, 32, 5, 2, 4),           # -> 2x2
            _conv_bn(32, 96, 1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(96, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))
