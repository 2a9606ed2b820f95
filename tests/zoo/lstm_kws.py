"""An LSTM keyword spotter: nn.LSTM(batch_first) over (N, L, C) frames, then a Linear classifier.

head="last": the last time step's hidden state (output[:, -1]), the usual LSTM KWS head.
head="all":  every step's hidden state flattened (output.flatten(1)).
head="sequence": no classifier, the LSTM's output sequence itself."""
from torch import nn


class LSTMKWS(nn.Module):
    def __init__(self, channels: int = 8, hidden: int = 24, classes: int = 4, steps: int = 16, layers: int = 1,
                 head: str = "last"):
        super().__init__()
        self.head = head
        self.lstm = nn.LSTM(channels, hidden, num_layers=layers, batch_first=True)
        features = hidden * (steps if head == "all" else 1)
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        y, _ = self.lstm(x)
        if self.head == "sequence":
            return y
        if self.head == "all":
            return self.fc(y.flatten(1))
        return self.fc(y[:, -1])
