"""A TCP proxy that damages the link on purpose: it sits between edgekit and
QEMU's serial socket and drops, corrupts or delays bytes (seeded, so a failing
run repeats), or stops forwarding altogether (a device that went silent)."""
from __future__ import annotations

import random
import socket
import threading
import time


class FaultProxy:
    def __init__(self, target_port: int, *, seed: int = 0, drop: float = 0.0, corrupt: float = 0.0,
                 delay: float = 0.0, delay_seconds: float = 0.02, blackhole: bool = False):
        self.target_port = target_port
        self.rng = random.Random(seed)
        self.drop, self.corrupt, self.delay, self.delay_seconds = drop, corrupt, delay, delay_seconds
        self.blackhole = blackhole
        self.counts = {"forwarded": 0, "dropped": 0, "corrupted": 0, "delayed": 0}
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.closing = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def set(self, **faults) -> None:
        with self.lock:
            for k, v in faults.items():
                setattr(self, k, v)

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            device = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, device):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, device]
            threading.Thread(target=self._pump, args=(client, device), daemon=True).start()
            threading.Thread(target=self._pump, args=(device, client), daemon=True).start()

    def _damage(self, data: bytes) -> bytes:
        out = bytearray()
        with self.lock:
            if self.blackhole:
                self.counts["dropped"] += len(data)
                return b""
            for b in data:
                r = self.rng.random()
                if r < self.drop:
                    self.counts["dropped"] += 1
                    continue
                if r < self.drop + self.corrupt:
                    self.counts["corrupted"] += 1
                    b ^= self.rng.randrange(1, 256)
                out.append(b)
            delay = self.rng.random() < self.delay
            if delay:
                self.counts["delayed"] += 1
            self.counts["forwarded"] += len(out)
        if delay:
            time.sleep(self.delay_seconds)
        return bytes(out)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                data = self._damage(data)
                if data:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closing = True
        for s in [self.server] + self.sockets:
            try:
                s.close()
            except OSError:
                pass
