"""A tiny keyword transformer (KWT-style): a Linear embedding of each (N, L, C) frame, a learned class
token prepended, a learned position embedding added, pre-norm encoder layers (LayerNorm, multi-head
self-attention, a GELU MLP), a final LayerNorm and a Linear classifier on the class token.

activation="relu" is the variant TensorFlow Lite Micro can run (it has no GELU kernel)."""
import torch
from torch import nn


class KeywordTransformer(nn.Module):
    def __init__(self, channels: int = 8, steps: int = 16, dim: int = 16, heads: int = 2, layers: int = 1,
                 classes: int = 4, activation: str = "gelu"):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, steps + 1, dim) * 0.02)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position
        for layer in self.encoder:
            tokens = layer(tokens)
        return self.head(self.norm(tokens[:, 0]))
