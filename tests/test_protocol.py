"""The framed protocol: Python codec against the device's C code, over real processes and sockets."""
import socket
import struct
import subprocess
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgekit
from edgekit.device import protocol as P
from edgekit.device.profile import profile


@given(st.binary(max_size=1200))
@settings(max_examples=300)
def test_cobs_round_trip(data):
    enc = P.cobs_encode(data)
    assert 0 not in enc
    assert P.cobs_decode(enc) == data


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=512))
@settings(max_examples=200)
def test_frame_round_trip_and_corruption_is_detected(msg_type, seq, payload):
    frame = P.encode_frame(msg_type, seq, payload)
    assert frame.endswith(b"\x00") and 0 not in frame[:-1]
    assert P.decode_frame(frame[:-1]) == (msg_type, seq, payload)
    damaged = bytearray(frame[:-1])
    damaged[len(damaged) // 2] ^= 0x5A
    assert P.decode_frame(bytes(damaged)) != (msg_type, seq, payload) or damaged == frame[:-1]


@pytest.fixture(scope="module")
def host_runner(tmp_path_factory):
    """A host build serving the protocol on a TCP port: the same C runtime as the devices."""
    out = tmp_path_factory.mktemp("serve") / "out"
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = np.random.default_rng(0).normal(size=(32, 20)).astype(np.float32)
    q = edgekit.quantize(model, x)
    edgekit.generate(q, out)
    edgekit.build(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(out / "model_runner"), "--listen", str(port)], stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield out, f"socket://127.0.0.1:{port}", q, x
    proc.kill()
    proc.wait()


def test_host_runner_profiles_bit_exact(host_runner):
    out, url, q, x = host_runner
    report = profile(url, x, project_dir=out, show_progress=False)
    assert report["bit_exact"] and report["unit"] == "nanoseconds" and report["runs"] == 32


def test_repeated_invoke_is_answered_from_the_cache(host_runner):
    """A retried INVOKE (same sequence number) must not run the model again on a consumed input."""
    out, url, q, x = host_runner
    with P.DeviceLink(url) as link:
        info = link.identify()
        link.set_input(0, bytes(info.input_sizes[0]))
        seq = (link.sequence + 1) & 0xFF
        frame = P.encode_frame(P.INVOKE, seq)
        answers = []
        for _ in range(2):
            link.serial.write(frame)
            deadline = time.monotonic() + 2
            raw = link._read_frame(deadline)
            answers.append(P.decode_frame(raw))
        assert answers[0] == answers[1] and answers[0][0] == P.INVOKE | P.RESPONSE
        assert link.stats_()["invocations"] == 1
        link.sequence = seq
        with pytest.raises(P.DeviceError, match="no new input"):
            link.invoke()  # a new request without a new input is refused, not run on garbage


def test_device_rejects_out_of_range_requests(host_runner):
    out, url, q, x = host_runner
    with P.DeviceLink(url) as link:
        info = link.identify()
        with pytest.raises(P.DeviceError, match="out of bounds"):
            link.request(P.SET_INPUT, struct.pack("<BI", 0, info.input_sizes[0]) + b"\x01")
        with pytest.raises(P.DeviceError, match="out of bounds"):
            link.request(P.GET_OUTPUT, struct.pack("<BIH", 3, 0, 1))
        with pytest.raises(P.DeviceError, match="unknown message type"):
            link.request(0x55)
        assert link.identify().fingerprint == q.fingerprint()  # still serving


def test_a_firmware_without_a_bootloader_says_so(host_runner, monkeypatch):
    """The host runner has no bootloader to return to: it refuses BOOTLOADER, keeps serving, and
    `edgekit flash` to it says that the firmware answered but cannot return by itself."""
    from edgekit.boards import load_board
    from edgekit.device import flash
    from edgekit.device.stm32boot import BootloaderTimeout

    out, url, q, x = host_runner
    with P.DeviceLink(url) as link:
        assert link.enter_bootloader() is False
        assert link.identify().num_inputs == 1
    monkeypatch.setattr(flash, "SYNC_ATTEMPTS", 2)
    with pytest.raises(BootloaderTimeout, match="firmware answers, but this board cannot return"):
        # a board whose bootloader is the chip's ROM: no RESET fallback (that is for edgekit's bootloader)
        flash.flash_serial(load_board("nucleo-f446re"), b"\0" * 64, 0x08000000, url, show_progress=False)
