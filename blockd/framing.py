"""DNS over TCP framing (RFC 1035 4.2.2, RFC 7766): each message behind a two-byte length.

Shared by the TCP listener and the upstream TCP client.  Pure: no I/O.
"""

from __future__ import annotations

import struct

_LENGTH = struct.Struct("!H")


def frame(message: bytes) -> bytes:
    """A message as written on a TCP stream."""
    return _LENGTH.pack(len(message)) + message


class FrameReader:
    """Splits a byte stream into whole messages, keeping an incomplete tail for the next read."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Every message completed by data, in order."""
        buffer = self._buffer + data if self._buffer else data
        messages = []
        at = 0
        size = len(buffer)
        while size - at >= 2:
            (length,) = _LENGTH.unpack_from(buffer, at)
            end = at + 2 + length
            if end > size:
                break
            messages.append(buffer[at + 2 : end])
            at = end
        self._buffer = buffer[at:]
        return messages

    @property
    def buffered(self) -> int:
        """Bytes held of a message not yet complete."""
        return len(self._buffer)
