"""edgekit.quantize() leaves the caller's model as it was (issue 11, class 8)."""
import numpy as np
import torch
from torch import nn

import edgekit


def _model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def test_quantize_restores_train_and_eval_modes():
    x = np.random.default_rng(0).normal(size=(8, 1, 8, 8)).astype(np.float32)
    for setup in ("train", "eval", "mixed"):
        model = _model()
        if setup == "eval":
            model.eval()
        elif setup == "mixed":
            model.train()
            model[1].eval()  # e.g. frozen BatchNorm statistics while fine-tuning
        before = [m.training for m in model.modules()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        edgekit.quantize(model, x)
        assert [m.training for m in model.modules()] == before, setup
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # nor its weights


def test_load_restores_modes_even_when_export_fails():
    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real
    model = nn.Sequential(nn.Linear(4, 4), Unsupported()).train()
    try:
        edgekit.quantize(model, np.zeros((2, 4), np.float32))
    except edgekit.EdgekitError:  # fft is not a supported layer
        pass
    assert all(m.training for m in model.modules())
