"""M5 (Dai et al. 2017, as in torchaudio's speech-command tutorial), MCU-sized: raw audio (N, 1, L);
a wide strided first Conv1d, Conv1d + BatchNorm1d + MaxPool1d stages, average pooling over the whole
signal, permute to (N, 1, C), a Linear on that rank-3 tensor and log_softmax over its last dim."""
import torch
import torch.nn.functional as F
from torch import nn


class M5(nn.Module):
    def __init__(self, classes=4, stride=4, channels=16):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 16, stride=stride)
        self.bn1 = nn.BatchNorm1d(channels)
        self.pool1 = nn.MaxPool1d(4)
        self.conv2 = nn.Conv1d(channels, channels, 3)
        self.bn2 = nn.BatchNorm1d(channels)
        self.pool2 = nn.MaxPool1d(2)
        self.conv3 = nn.Conv1d(channels, 2 * channels, 3)
        self.bn3 = nn.BatchNorm1d(2 * channels)
        self.fc1 = nn.Linear(2 * channels, classes)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.avg_pool1d(x, x.shape[-1])
        x = x.permute(0, 2, 1)
        x = self.fc1(x)
        return F.log_softmax(x, dim=2)


def m5_loss(model, xb, yb):
    """M5 answers (N, 1, classes) log-probabilities: the negative log-likelihood of the one step."""
    return F.nll_loss(model(xb)[:, 0], yb)
