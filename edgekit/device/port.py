"""Opening a serial port from any pyserial URL, with edgekit's errors."""
from __future__ import annotations

from ..errors import EdgekitError


def open_port(port, error: type[EdgekitError] = EdgekitError, baudrate: int = 115200, parity: str | None = None):
    """(serial object, display name) for a URL like /dev/ttyACM0 or socket://host:port, or an open object."""
    if not isinstance(port, str):
        return port, getattr(port, "name", str(port))
    import serial

    options = {"baudrate": baudrate, "timeout": 0.05}
    if parity:
        options["parity"] = parity
    try:
        return serial.serial_for_url(port, **options), port
    except (serial.SerialException, OSError, ValueError) as exc:
        raise error(f"cannot open {port}: {exc}") from None


class PortUser:
    """Closing and the with-statement for classes holding ``self.serial``."""

    serial = None

    def close(self) -> None:
        try:
            self.serial.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
