"""YOLOv3-tiny-like, MCU-sized: conv + BatchNorm + LeakyReLU(0.1) stacks with max pooling, and two
detection heads, the second after a nearest 2x upsample concatenated with a backbone feature map.
``YoloV3TinyBackbone`` is the same backbone with a classifier head (trainable on digits)."""
import torch
from torch import nn


def _conv(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1))


class YoloV3TinyBackbone(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stage1 = nn.Sequential(_conv(in_channels, 8), nn.MaxPool2d(2))    # 16 -> 8
        self.stage2 = nn.Sequential(_conv(8, 16), nn.MaxPool2d(2))             # -> 4
        self.stage3 = _conv(16, 32)
        self.stage4 = nn.Sequential(nn.MaxPool2d(2), _conv(32, 64), _conv(64, 32, 1))   # -> 2
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class YoloV3Tiny(YoloV3TinyBackbone):
    """Two heads: (anchors * (5 + classes)) channels on the 2x2 and the 4x4 grids."""

    def __init__(self, num_classes: int = 2, anchors: int = 3, in_channels: int = 1):
        super().__init__(num_classes, in_channels)
        out = anchors * (5 + num_classes)
        self.head1 = nn.Sequential(_conv(32, 64), nn.Conv2d(64, out, 1))
        self.lateral = _conv(32, 16, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head2 = nn.Sequential(_conv(48, 32), nn.Conv2d(32, out, 1))

    def forward(self, x):
        route = self.stage3(self.stage2(self.stage1(x)))
        deep = self.stage4(route)
        y1 = self.head1(deep)
        y2 = self.head2(torch.cat([self.up(self.lateral(deep)), route], 1))
        return y1, y2
