"""A GRU keyword spotter: nn.GRU(batch_first) over (N, L, C) frames, then a Linear classifier.

TFLite has no int8 GRU: edgekit unrolls it per time step into FULLY_CONNECTED, LOGISTIC, TANH, MUL,
SUB and ADD, as TFLite's converter does.
head="last": output[:, -1]; head="all": every step flattened; head="sequence": the GRU's output itself."""
from torch import nn


class GRUKWS(nn.Module):
    def __init__(self, channels: int = 8, hidden: int = 16, classes: int = 4, steps: int = 16, layers: int = 1,
                 head: str = "last"):
        super().__init__()
        self.head = head
        self.gru = nn.GRU(channels, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden * (steps if head == "all" else 1), classes)

    def forward(self, x):
        y, _ = self.gru(x)
        if self.head == "sequence":
            return y
        if self.head == "all":
            return self.fc(y.flatten(1))
        return self.fc(y[:, -1])
