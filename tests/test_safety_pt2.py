"""Pickled code in a .pt2 (issue 11, class 2): edgekit inspects the archive before torch deserializes
anything, refuses every member that would need unpickling or native code, and says why. The payloads
are real: the same files given straight to torch.export.load do run them."""
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.frontends.pt2_archive import check_archive
from edgekit.frontends.pytorch import load_exported

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


class _Payload:
    """Unpickling this creates the file ``marker``: the stand-in for any code an attacker runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def plain_pt2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pt2")
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 4),)), d / "plain.pt2")
    return d / "plain.pt2"


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a .pt2, letting ``change(members)`` edit {name: bytes} (keys include the root folder)."""
    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    root = next(iter(members)).split("/", 1)[0]
    change(members, root)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def _pickled_weight(members, root, marker):
    cfg_name = f"{root}/data/weights/model_weights_config.json"
    cfg = json.loads(members[cfg_name])
    fqn = next(iter(cfg["config"]))
    cfg["config"][fqn]["use_pickle"] = True
    members[cfg_name] = json.dumps(cfg).encode()
    members[f"{root}/data/weights/{cfg['config'][fqn]['path_name']}"] = pickle.dumps(_Payload(marker))


def _sample_inputs(members, root, marker):
    """torch.export.load tries weights_only=True on sample inputs, then falls back to full unpickling."""
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    members[f"{root}/data/sample_inputs/model.pt"] = buf.getvalue()


def _opaque_constant(members, root, marker):
    cfg_name = f"{root}/data/constants/model_constants_config.json"
    cfg = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}}}
    members[cfg_name] = json.dumps(cfg).encode()
    members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))


def _legacy_weights(members, root, marker):
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    members[f"{root}/data/weights/model.pt"] = buf.getvalue()


def _aoti(members, root, marker):
    members[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF not really"


def _old_format(members, root, marker):
    members["version"] = b"8.0"
    members["serialized_state_dict.pt"] = pickle.dumps(_Payload(marker))


ATTACKS = {"pickled weight": _pickled_weight, "sample inputs": _sample_inputs, "opaque constant": _opaque_constant,
           "legacy weight file": _legacy_weights, "AOTInductor library": _aoti, "pre-2.8 layout": _old_format}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_malicious_pt2_is_refused_before_anything_runs(attack, plain_pt2, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m, r: ATTACKS[attack](m, r, marker))
    with pytest.raises(EdgekitError, match="refused before loading") as info:
        load_exported(evil)
    assert "unpickle" in str(info.value) or "plain torch.export.save" in str(info.value)
    assert not marker.exists(), f"{attack}: the payload ran"


def test_the_command_line_refuses_a_malicious_pt2(plain_pt2, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m, r: _pickled_weight(m, r, marker))
    for command in (["inspect", str(evil)], ["generate", str(evil), "--calib", str(evil), "-o", str(tmp_path / "o")]):
        proc = subprocess.run(EDGEKIT + command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert "refused before loading" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "unpickle" in proc.stderr or "native code" in proc.stderr or "plain torch.export.save" in proc.stderr
        assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "o").exists()


def test_the_payloads_are_real(plain_pt2, tmp_path):
    """Without edgekit's check, torch.export.load runs the pickled-weight and sample-input payloads:
    the refusals above are not refusals of harmless files."""
    for attack in ("pickled weight", "sample inputs"):
        marker = tmp_path / f"PWNED-{attack.replace(' ', '_')}"
        evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m, r: ATTACKS[attack](m, r, marker))
        try:
            torch.export.load(str(evil))
        except Exception:
            pass  # the payload runs while loading; what torch does afterwards does not matter
        assert marker.exists(), attack


def test_plain_archives_still_load(plain_pt2, tmp_path):
    program = load_exported(plain_pt2)
    x = torch.randn(1, 4)
    assert program.module()(x).shape == (1, 3)


def test_corrupted_weights_fail_the_crc_check(plain_pt2, tmp_path):
    """A flipped byte inside a stored weight: the zip CRC says so, naming the member."""
    data = bytearray(plain_pt2.read_bytes())
    with zipfile.ZipFile(plain_pt2) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("weight_0"))
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0x40  # inside the stored weight bytes
    bad = tmp_path / "crc.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(EdgekitError, match="damaged.*weight_0"):
        load_exported(bad)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10**9), flip=st.integers(min_value=0, max_value=10**9),
       bit=st.integers(0, 7))
def test_truncated_or_flipped_archives_fail_clearly(plain_pt2, cut, flip, bit):
    """Any truncation, and any single flipped bit, is an EdgekitError (or loads a checked plain archive)."""
    data = plain_pt2.read_bytes()
    cut_data = data[:cut % len(data)]
    flipped = bytearray(data)
    flipped[flip % len(data)] ^= 1 << bit
    for blob in (cut_data, bytes(flipped)):
        try:
            check_archive(blob)
        except EdgekitError as exc:
            assert "\n" not in str(exc)
