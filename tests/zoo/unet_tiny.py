"""A tiny U-Net for 16x16 segmentation: two encoder levels, a bottleneck, one decoder step through
ConvTranspose2d and one through Upsample (nearest, or bilinear), each concatenated with its skip connection."""
import torch
from torch import nn


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class UNetTiny(nn.Module):
    def __init__(self, cin=1, classes=2, width=8, upsample="nearest"):
        super().__init__()
        self.enc1 = _block(cin, width)
        self.enc2 = _block(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.mid = _block(2 * width, 2 * width)
        self.up2 = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, width)
        self.up1 = nn.Upsample(scale_factor=2, mode=upsample)
        self.dec1 = _block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)  # 16x16
        e2 = self.enc2(self.pool(e1))  # 8x8
        m = self.mid(self.pool(e2))  # 4x4
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))  # 8x8
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))  # 16x16
        return self.head(d1)
