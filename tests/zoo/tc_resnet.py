"""TC-ResNet (Choi et al. 2019), MCU-sized: temporal convolutions over MFCC frames, the features as
channels (N, C, L); residual blocks of Conv1d + BatchNorm1d with a strided 1x1 shortcut; AvgPool1d,
MaxPool1d, AdaptiveAvgPool1d and mean(-1) on the way."""
import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 9, stride=stride, padding=4, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 9, padding=4, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.short = nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class TCResNet(nn.Module):
    def __init__(self, features=8, classes=4, width=(12, 16, 24)):
        super().__init__()
        self.stem = nn.Conv1d(features, width[0], 3, padding=1, bias=False)
        self.b1 = _Block(width[0], width[1], 2)
        self.pool = nn.MaxPool1d(2)
        self.b2 = _Block(width[1], width[2], 2)
        self.avg = nn.AvgPool1d(2)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width[2], classes)

    def forward(self, x):
        y = self.b2(self.pool(self.b1(self.stem(x))))
        y = self.avg(y)
        # two global poolings over time, joined: mean(-1) and AdaptiveAvgPool1d(1)
        return self.fc(torch.cat([y.mean(-1), self.gap(y).flatten(1)], dim=1))
