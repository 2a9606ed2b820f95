"""Blocks several zoo architectures share."""
from torch import nn


class SqueezeExcitation(nn.Module):
    """torchvision's squeeze-excitation: global pool -> 1x1 -> activation -> 1x1 -> gate -> multiply.
    MobileNetV3 uses ReLU and Hardsigmoid, EfficientNet SiLU and Sigmoid."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU, scale_activation=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x
