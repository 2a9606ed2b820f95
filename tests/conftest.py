import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import CBuild  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, or torch's spinning OpenMP threads starve each other.
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cbuild(tmp_path_factory):
    """Kernel objects compiled once (with ASan + UBSan), models linked per test."""
    return CBuild(tmp_path_factory.mktemp("kernel_objects"), sanitize=True)


@pytest.fixture(scope="session")
def digits():
    from edgekit import datasets
    return datasets.digits()


@pytest.fixture(scope="session")
def digits_flat():
    from edgekit import datasets
    return datasets.digits(flat=True)


def _trained(make_model, x, y, epochs):
    """Seed before the model's initial weights too: under xdist the global RNG's state would
    otherwise depend on which tests ran earlier in the worker, and so would the fixture."""
    from edgekit import train
    train.seed_everything(0)
    return train.train_classifier(make_model(), x, y, epochs=epochs, show_progress=False)


@pytest.fixture(scope="session")
def trained_cnn(digits):
    from edgekit import models
    return _trained(models.DigitsCNN, digits.x_train, digits.y_train, 25)


@pytest.fixture(scope="session")
def trained_rescnn(digits):
    from edgekit import models
    return _trained(models.DigitsResCNN, digits.x_train, digits.y_train, 25)


@pytest.fixture(scope="session")
def trained_mlp(digits_flat):
    from edgekit import models
    return _trained(lambda: models.digits_mlp((128, 64)), digits_flat.x_train, digits_flat.y_train, 40)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
