"""edgekit's framed serial protocol, host side (the device side is
``firmware_templates/runtime/ek_protocol.c.j2``).

A frame is COBS-encoded and ends with 0x00. Decoded:
``type (1) | sequence (1) | payload | CRC-32 (4, little-endian, over type..payload)``.
The host numbers its requests; a response echoes the number with type | 0x80.
Every request is idempotent, so on a CRC error, a framing error or a timeout
the host resends it: a corrupted byte costs a retry, never a wrong number.
"""
from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass, field

from ..errors import EdgekitError
from .port import PortUser, open_port

VERSION = 1
MAX_PAYLOAD = 512

IDENTIFY, SET_INPUT, INVOKE, GET_OUTPUT, STATS, LAYER_COUNTS, RESET, SET_PARAM, BOOTLOADER, THREAD_COUNTS = range(1, 11)
PARAM_EXIT_THRESHOLD = 1  # SET_PARAM id: every early exit's threshold (int32, 1/256 units; 2**31 - 1: off)
PARAM_EXIT_THRESHOLD_0 = 16  # SET_PARAM id 16 + k: early exit k's own threshold
ERROR = 0x7F
RESPONSE = 0x80
ERROR_NAMES = {1: "bad CRC", 2: "unknown message type", 3: "index or range out of bounds", 4: "bad length",
               5: "malformed frame", 6: "no new input since the last inference (send the input again)"}
COUNTER_KINDS = {0: "cycles (DWT)", 1: "cycles (SysTick)", 2: "emulated instructions", 3: "nanoseconds"}


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    out = bytearray([0])
    code_at, code = 0, 1
    for b in data:
        if b == 0:
            out[code_at] = code
            code_at, code = len(out), 1
            out.append(0)
        else:
            out.append(b)
            code += 1
            if code == 0xFF:
                out[code_at] = code
                code_at, code = len(out), 1
                out.append(0)
    out[code_at] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes | None:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        i += 1
        if code == 0 or i + code - 1 > len(data):
            return None
        chunk = data[i:i + code - 1]
        if 0 in chunk:
            return None
        out += chunk
        i += code - 1
        if code != 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def encode_frame(msg_type: int, sequence: int, payload: bytes = b"") -> bytes:
    body = bytes([msg_type, sequence & 0xFF]) + payload
    return cobs_encode(body + struct.pack("<I", crc32(body))) + b"\x00"


def decode_frame(encoded: bytes) -> tuple[int, int, bytes] | None:
    """(type, sequence, payload), or None when the frame is malformed or its CRC is wrong."""
    raw = cobs_decode(encoded)
    if raw is None or len(raw) < 6:
        return None
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if crc32(body) != crc:
        return None
    return body[0], body[1], body[2:]


@dataclass
class DeviceInfo:
    version: int
    counter_kind: int
    num_inputs: int
    num_outputs: int
    num_layers: int
    elem_bytes: int
    clock_hz: int
    arena_bytes: int
    stack_bytes: int
    fingerprint: str
    input_sizes: list[int] = field(default_factory=list)
    output_sizes: list[int] = field(default_factory=list)
    board: str = ""

    @property
    def counter_name(self) -> str:
        return COUNTER_KINDS.get(self.counter_kind, f"counter {self.counter_kind}")


@dataclass
class LinkStats:
    requests: int = 0
    retries: int = 0
    bad_frames: int = 0
    timeouts: int = 0


class DeviceError(EdgekitError):
    """The device answered with an error, or did not answer."""


class DeviceLink(PortUser):
    """Request/response over any pyserial URL (/dev/ttyACM0, socket://host:port, rfc2217://, loop://)."""

    def __init__(self, port, timeout: float = 2.0, retries: int = 8, baudrate: int = 115200):
        self.timeout = timeout
        self.retries = retries
        # A random start: a new session's first numbers do not repeat the last session's.
        self.sequence = int.from_bytes(os.urandom(1), "little")
        self.stats = LinkStats()
        self._buffer = bytearray()
        self.serial, self.port_name = open_port(port, DeviceError, baudrate)

    def _read_frame(self, deadline: float) -> bytes | None:
        """The next 0x00-terminated chunk, or None at the deadline."""
        while True:
            end = self._buffer.find(0)
            if end >= 0:
                frame = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if frame:
                    return frame
                continue
            if time.monotonic() > deadline:
                return None
            try:
                chunk = self.serial.read(max(1, self.serial.in_waiting or 1))
            except Exception as exc:
                raise DeviceError(f"lost the connection to {self.port_name}: {exc}") from None
            if chunk:
                self._buffer += chunk
                if len(self._buffer) > 64 * 1024:  # noise without delimiters: keep the tail only
                    del self._buffer[:-4096]

    def request(self, msg_type: int, payload: bytes = b"", timeout: float | None = None) -> bytes:
        """Send a request and return the payload of its response, retrying on any transport fault."""
        if len(payload) > MAX_PAYLOAD:
            raise ValueError("payload too long")
        timeout = self.timeout if timeout is None else timeout
        self.sequence = (self.sequence + 1) & 0xFF
        seq = self.sequence
        frame = encode_frame(msg_type, seq, payload)
        self.stats.requests += 1
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                self._buffer.clear()
                try:
                    self.serial.reset_input_buffer()
                except Exception:
                    pass
            try:
                # A leading delimiter ends whatever partial frame the device holds from a lost byte.
                self.serial.write(b"\x00" + frame)
                self.serial.flush()
            except Exception as exc:
                raise DeviceError(f"cannot write to {self.port_name}: {exc}") from None
            deadline = time.monotonic() + timeout
            while True:
                raw = self._read_frame(deadline)
                if raw is None:
                    self.stats.timeouts += 1
                    break
                decoded = decode_frame(raw)
                if decoded is None:
                    self.stats.bad_frames += 1
                    break  # a damaged response: ask again
                rtype, rseq, rpayload = decoded
                if rtype == ERROR:
                    code = rpayload[0] if rpayload else 0
                    if code in (1, 5):
                        # Damage: either leftovers of an earlier frame (our answer may still come) or our
                        # request itself. Wait a little for the answer, then resend.
                        self.stats.bad_frames += 1
                        deadline = min(deadline, time.monotonic() + 0.3)
                        continue
                    if rseq != seq:
                        continue
                    raise DeviceError(f"the device refused message {msg_type}: {ERROR_NAMES.get(code, code)}")
                if rseq != seq or rtype != (msg_type | RESPONSE):
                    continue  # a stale answer to an earlier attempt
                return rpayload
        raise DeviceError(
            f"no valid answer from {self.port_name} after {self.retries + 1} tries ({timeout:g} s each, "
            f"{self.stats.bad_frames} damaged frames). Is the application running? "
            "Flash it with `edgekit flash`, or check the port and cable.")

    # -- messages ----------------------------------------------------------
    def identify(self) -> DeviceInfo:
        p = self.request(IDENTIFY)
        if len(p) < 36:
            raise DeviceError("the device's identify answer is too short: is this an edgekit firmware?")
        version, kind, n_in, n_out, n_layers, elem, clock, arena, stack = struct.unpack_from("<BBBBHHIII", p, 0)
        fingerprint = p[20:36].decode("ascii", "replace")
        off = 36
        ins = list(struct.unpack_from(f"<{n_in}I", p, off))
        off += 4 * n_in
        outs = list(struct.unpack_from(f"<{n_out}I", p, off))
        off += 4 * n_out
        return DeviceInfo(version, kind, n_in, n_out, n_layers, elem, clock, arena, stack, fingerprint, ins, outs,
                          p[off:].decode("ascii", "replace"))

    def set_input(self, index: int, data: bytes) -> None:
        chunk = MAX_PAYLOAD - 5
        for off in range(0, len(data), chunk):
            self.request(SET_INPUT, struct.pack("<BI", index, off) + data[off:off + chunk])

    def invoke(self, timeout: float = 60.0) -> tuple[int, int]:
        """Run the model once: (status, total count). The status is the exit that answered (0 for a
        model without early exits)."""
        p = self.request(INVOKE, timeout=timeout)
        status, lo, hi = struct.unpack("<iII", p[:12])
        return status, lo | (hi << 32)

    def get_output(self, index: int, nbytes: int) -> bytes:
        out = bytearray()
        while len(out) < nbytes:
            n = min(MAX_PAYLOAD, nbytes - len(out))
            p = self.request(GET_OUTPUT, struct.pack("<BIH", index, len(out), n))
            if len(p) != n:
                raise DeviceError(f"asked for {n} output bytes, got {len(p)}")
            out += p
        return bytes(out)

    def layer_counts(self, num_layers: int) -> list[int]:
        counts: list[int] = []
        step = MAX_PAYLOAD // 4
        for first in range(0, num_layers, step):
            n = min(step, num_layers - first)
            p = self.request(LAYER_COUNTS, struct.pack("<HH", first, n))
            counts += list(struct.unpack(f"<{n}I", p))
        return counts

    def stats_(self) -> dict:
        high_water, stack, arena, invocations = struct.unpack("<IIII", self.request(STATS)[:16])
        return {"stack_high_water": high_water, "stack_bytes": stack, "arena_bytes": arena,
                "invocations": invocations}

    def thread_counts(self) -> list[int] | None:
        """CPU nanoseconds of each thread in the last inference (thread 0 the caller, then the workers'
        shares), or None from a device without threads (it does not know the message)."""
        try:
            p = self.request(THREAD_COUNTS)
        except DeviceError as exc:
            if "unknown message type" in str(exc):
                return None
            raise
        n = p[0] if p else 0
        if len(p) != 1 + 8 * n:
            raise DeviceError(f"THREAD_COUNTS: {len(p)} bytes for {n} threads")
        return list(struct.unpack(f"<{n}Q", p[1:]))

    def set_param(self, param: int, value: int) -> None:
        self.request(SET_PARAM, struct.pack("<Bi", param, value))

    def set_exit_threshold(self, raw) -> None:
        """The confidence an early exit needs to answer, in the device's units of 1/256
        (``passes.exits.threshold_to_int``): one integer for every early exit, or a list with one per
        early exit (``passes.exits.EXITS_OFF`` skips that exit's head; all off: the plain network)."""
        if isinstance(raw, (list, tuple)) and len(set(int(r) for r in raw)) == 1:
            raw = int(raw[0])  # the same for all: the one-threshold parameter every firmware knows
        try:
            if isinstance(raw, (list, tuple)):
                for k, r in enumerate(raw):
                    self.set_param(PARAM_EXIT_THRESHOLD_0 + k, int(r))
            else:
                self.set_param(PARAM_EXIT_THRESHOLD, int(raw))
        except DeviceError as exc:
            if "out of bounds" in str(exc):
                if isinstance(raw, (list, tuple)):
                    raise DeviceError(f"the device refused {len(raw)} per-exit thresholds (its model has fewer "
                                      "early exits, or its firmware takes one threshold for all)") from None
                raise DeviceError("the device's model has no early exits (it refused the exit threshold)") from None
            raise

    def enter_bootloader(self) -> bool:
        """Ask the firmware to restart in its bootloader, which then waits for `edgekit flash`. True
        when it agreed; False when it answers but cannot (a board without edgekit's bootloader). Raises
        DeviceError when nothing answers."""
        try:
            self.request(BOOTLOADER)
        except DeviceError as exc:
            if "unknown message type" in str(exc):
                return False
            raise
        return True

    def reset(self) -> None:
        """Send the device back to its bootloader. Its answer may be lost as it resets: not an error."""
        retries, self.retries = self.retries, 0
        try:
            self.request(RESET, timeout=min(self.timeout, 1.0))
        except DeviceError:
            pass
        finally:
            self.retries = retries
