"""The device's frame parser and message handlers, fuzzed on the host with
libFuzzer under AddressSanitizer + UndefinedBehaviorSanitizer, linked with a
real generated model. (bench/fuzz_protocol.py runs it longer for BENCHMARKS.md.)"""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgekit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def _libfuzzer_available() -> bool:
    if shutil.which("clang") is None:
        return False
    probe = subprocess.run(["clang", "-x", "c", "-fsanitize=fuzzer", "-o", "/dev/null", "-"],
                           input="int LLVMFuzzerTestOneInput(const char *d, unsigned long n){(void)d;(void)n;return 0;}",
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _libfuzzer_available(), reason="needs clang with libFuzzer (make setup)")
def test_protocol_fuzz_finds_no_crash(tmp_path):
    from fuzz_protocol import build_fuzzer, run_fuzzer

    model = __import__("torch").nn.Sequential(__import__("torch").nn.Linear(12, 5))
    q = edgekit.quantize(model, np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32))
    fuzzer = build_fuzzer(q, tmp_path)
    result = run_fuzzer(fuzzer, tmp_path / "corpus", runs=60000, seed=1)
    assert result["crashed"] is False, result["log_tail"]
    assert result["executions"] >= 60000
