"""Domain-name normalisation shared by list parsing, config and the query path.

A *key* is the form every lookup uses: lowercase ASCII A-labels joined by ".", no trailing
dot.  Wire names with bytes that cannot appear in such a key (a "." or "\\" inside a label,
non-ASCII bytes) are escaped so they can never collide with a listed name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from blockd.excerpt import excerpt

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_SAFE_LABEL_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_*")
_UNSAFE_BYTE = re.compile(rb"[^a-z0-9_*.-]")


class InvalidNameError(ValueError):
    """A domain name in a list or config that blockd cannot use."""


def normalize(text: str) -> str:
    """Turn a user-supplied name into a key: lowercase, no trailing dot, IDN to A-labels.

    Raises InvalidNameError with a short reason when the name is not a usable domain name.
    """
    name = text.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise InvalidNameError("empty domain name")
    if not name.isascii():
        try:
            name = name.lower().encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidNameError(f"invalid internationalised name {excerpt(text)}: {exc}") from None
    name = name.lower()
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"name longer than {MAX_NAME_LENGTH} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise InvalidNameError(f"empty label in {excerpt(text)}")
        if len(label) > MAX_LABEL_LENGTH:
            raise InvalidNameError(f"label longer than {MAX_LABEL_LENGTH} characters in {excerpt(text)}")
        if not _LABEL_RE.match(label):
            raise InvalidNameError(f"invalid character in {excerpt(text)}")
    if labels[-1].isdigit():
        raise InvalidNameError(f"{excerpt(text)} looks like an IP address, not a domain name")
    return name


def key_from_wire_labels(labels: list[bytes]) -> str:
    """The lookup key for a name read off the wire (labels without length bytes)."""
    joined = b".".join(labels).lower()
    # Common case in one C-level scan: only key characters, and no "." inside a label.
    if _UNSAFE_BYTE.search(joined) is None and joined.count(b".") == max(len(labels) - 1, 0):
        return joined.decode("ascii")
    out = []
    for label in labels:
        lowered = label.lower()
        if all(byte in _SAFE_LABEL_BYTES for byte in lowered):
            out.append(lowered.decode("ascii"))
        else:
            out.append(_escape_label(lowered))
    return ".".join(out)


def _escape_label(label: bytes) -> str:
    # Escape like presentation format (RFC 1035 5.1) so "a.b" inside one label never
    # equals the two labels "a" and "b", and non-ASCII bytes never equal an A-label.
    parts = []
    for byte in label:
        if byte in _SAFE_LABEL_BYTES:
            parts.append(chr(byte))
        elif 0x21 <= byte <= 0x7E and byte not in (0x2E, 0x5C):
            parts.append(chr(byte))
        else:
            parts.append(f"\\{byte:03d}")
    return "".join(parts)


def ancestors(key: str) -> Iterator[str]:
    """Yield key and each parent domain, most specific first ("a.b.c", "b.c", "c")."""
    name = key
    while True:
        yield name
        dot = name.find(".")
        if dot < 0:
            return
        name = name[dot + 1 :]


_ESCAPED_BYTE = re.compile(r"\\(\d{3})")


def key_to_wire(key: str) -> bytes:
    """A lookup key (or an entry such as "*.name") as a wire-format name: the inverse of
    key_from_wire_labels (a "." inside a label is escaped there, so splitting on "." is safe)."""
    if not key:
        return b"\0"
    out = bytearray()
    for label in key.split("."):
        raw = _ESCAPED_BYTE.sub(lambda m: chr(int(m.group(1))), label).encode("latin-1")
        out.append(len(raw))
        out += raw
    out.append(0)
    return bytes(out)
