"""Frame Streams (fstrm), the transport of dnstap: data frames and the control handshake.

A data frame is a 32-bit big-endian length and the payload.  A control frame is an escape (a
zero length), the control frame's length, its type, and fields (only CONTENT_TYPE exists).  A
bidirectional writer sends READY (with the content types it offers), reads ACCEPT (with the one
the reader takes), sends START, data frames, STOP, and reads FINISH.  A file is
unidirectional: START, data frames, STOP.  Spec: https://farsightsec.github.io/fstrm/

Written here rather than taken from the `fstrm` package on PyPI: that one raises bare
Exceptions on a bad frame, re-joins its whole buffer on every read and has no bound on a
control frame's length, and the protocol is these five frames.  Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ACCEPT = 0x01
START = 0x02
STOP = 0x03
READY = 0x04
FINISH = 0x05
CONTROL_NAMES = {ACCEPT: "ACCEPT", START: "START", STOP: "STOP", READY: "READY", FINISH: "FINISH"}

FIELD_CONTENT_TYPE = 0x01
CONTROL_FRAME_MAX = 512  # the spec's limit on a control frame's length
DNSTAP_CONTENT_TYPE = b"protobuf:dnstap.Dnstap"

_LENGTH = struct.Struct("!I")
_CONTROL_HEAD = struct.Struct("!III")  # escape, length, type
_FIELD_HEAD = struct.Struct("!II")  # field type, length


class FstrmError(Exception):
    """The peer sent something that is not the Frame Streams it should."""


@dataclass(frozen=True)
class ControlFrame:
    kind: int
    content_types: tuple[bytes, ...] = ()

    @property
    def name(self) -> str:
        return CONTROL_NAMES.get(self.kind, f"type {self.kind}")


def control_frame(kind: int, content_types: tuple[bytes, ...] = ()) -> bytes:
    """A control frame with its escape, ready to write."""
    fields = b"".join(_FIELD_HEAD.pack(FIELD_CONTENT_TYPE, len(t)) + t for t in content_types)
    return _CONTROL_HEAD.pack(0, 4 + len(fields), kind) + fields


FRAME_LENGTH = _LENGTH.pack  # a data frame's length prefix (encoders that join frames themselves)


def data_frame(payload: bytes) -> bytes:
    return FRAME_LENGTH(len(payload)) + payload


def parse_control(body: bytes) -> ControlFrame:
    """A control frame's body (after the escape and length): its type and content types."""
    if len(body) < 4:
        raise FstrmError(f"control frame of {len(body)} bytes has no type")
    (kind,) = _LENGTH.unpack_from(body)
    types = []
    at = 4
    while at < len(body):
        if len(body) - at < _FIELD_HEAD.size:
            raise FstrmError("control frame ends inside a field header")
        field, length = _FIELD_HEAD.unpack_from(body, at)
        at += _FIELD_HEAD.size
        if length > len(body) - at:
            raise FstrmError(f"control field of {length} bytes runs past the frame")
        if field == FIELD_CONTENT_TYPE:
            types.append(body[at : at + length])
        at += length  # unknown fields are skipped, as the spec asks
    return ControlFrame(kind, tuple(types))


class ControlReader:
    """Collects bytes from a reader and yields the control frames in them.

    A writer only ever receives control frames (ACCEPT, FINISH); a data frame here is an error,
    and so is a control frame longer than the spec allows (a reader cannot make us buffer more).
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[ControlFrame]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 8:
            escape, length = struct.unpack_from("!II", self._buffer)
            if escape != 0:
                raise FstrmError(f"a data frame of {escape} bytes where a control frame was expected")
            if length > CONTROL_FRAME_MAX:
                raise FstrmError(f"control frame of {length} bytes (at most {CONTROL_FRAME_MAX})")
            if len(self._buffer) < 8 + length:
                break
            frames.append(parse_control(self._buffer[8 : 8 + length]))
            self._buffer = self._buffer[8 + length :]
        return frames


def expect(frame: ControlFrame, kind: int, content_type: bytes | None = None) -> None:
    """Raise FstrmError unless frame is `kind` (and, when given, offers content_type)."""
    if frame.kind != kind:
        raise FstrmError(f"expected {CONTROL_NAMES[kind]}, got {frame.name}")
    if content_type is not None and frame.content_types and content_type not in frame.content_types:
        offered = b", ".join(frame.content_types).decode("ascii", "replace")
        raise FstrmError(f"{frame.name} does not accept {content_type.decode()} (offers {offered})")
