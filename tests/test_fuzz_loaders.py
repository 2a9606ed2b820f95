"""The .tflite and .pt2 loaders and the C name escaping under mutated inputs, for a few seconds each
(bench/fuzz_loaders.py runs them longer): every mutant loads or is refused with an EdgekitError, no
pickle payload runs, and every escaped name compiles with -Werror and reads back exactly."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

SECONDS = float(os.environ.get("EDGEKIT_FUZZ_SECONDS", "3"))


@pytest.mark.parametrize("kind", ["tflite", "pt2"])
def test_loaders_refuse_mutants_clearly(kind, tmp_path):
    from fuzz_loaders import fuzz_loader
    stats = fuzz_loader(kind, SECONDS, seed=11, work=tmp_path)
    assert stats["runs"] >= 10
    assert stats["findings"] == [], stats["findings"][:3]
    assert not stats["payload_ran"]
    assert stats["refused"] > 0  # the mutations reach the checks


def test_name_escaping_under_random_names():
    from fuzz_loaders import fuzz_names
    stats = fuzz_names(SECONDS, seed=11, batch=150)
    assert stats["compiles"] >= 1 and stats["findings"] == [], stats["findings"][:3]
