"""An IMU / accelerometer activity classifier: Conv1d + BatchNorm1d + MaxPool1d twice over 6 channels
(accelerometer + gyroscope), global max and average pooling, a Linear head."""
import torch
from torch import nn


class IMUCNN(nn.Module):
    def __init__(self, channels=6, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 24, 5, padding=2), nn.BatchNorm1d(24), nn.ReLU(), nn.MaxPool1d(2),
        )
        self.gmp = nn.AdaptiveMaxPool1d(1)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        y = self.features(x)
        return self.fc(torch.cat([self.gmp(y), self.gap(y)], dim=1).flatten(1))
