"""The last good copy of every transferred zone, in the state directory.

Config: [server] state_dir (default /var/lib/blockd).  After each applied transfer the zone is
written as a master file, <state_dir>/<list>.rpz (to a temporary file, fsynced, then renamed
over the old copy, so a crash leaves the old copy or the new one, never half of one).  At start
blockd loads it, so it starts and blocks while the primaries are unreachable; its age (the
file's modification time) tells the refresh schedule how old it is.  Runs in worker threads.
The copy is read as list files are (blockd.bounded_read: a regular file, bounded), with bounds
that stop a device or a runaway file, never a real zone: blockd wrote the file itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from blockd.bounded_read import FileRefused, ReadLimits, open_text
from blockd.rpz import PolicyZone, parse_zone_file, render_zone_file

# A record's RDATA is at most 65535 octets: four times that as \DDD escapes, with room to spare.
STORED_COPY_LIMITS = ReadLimits(max_bytes=4 * 1024**3, max_line_bytes=1024**2)


@dataclass(frozen=True)
class StoredZone:
    zone: PolicyZone
    age: float  # seconds since it was written


def copy_path(state_dir: Path, list_name: str) -> Path:
    return state_dir / f"{list_name}.rpz"


def save(state_dir: Path, list_name: str, zone: PolicyZone) -> None:
    """Write the copy atomically.  Raises OSError."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = copy_path(state_dir, list_name)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(render_zone_file(zone))
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def load(state_dir: Path, list_name: str, origin: str, now: float | None = None) -> StoredZone | None:
    """The stored copy, or None when there is none.  Raises ValueError naming what is wrong."""
    path = copy_path(state_dir, list_name)
    try:
        with open_text(path, STORED_COPY_LIMITS) as handle:
            modified = os.fstat(handle.fileno()).st_mtime
            zone, errors = parse_zone_file(handle, str(path), origin)
    except FileNotFoundError:
        return None
    except FileRefused as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise ValueError(f"{where}: cannot read the stored copy: {exc.message}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the stored copy: {exc.strerror or exc}") from None
    if zone is None:
        raise ValueError("; ".join(str(e) for e in errors[:3]) or f"{path}: not a zone")
    return StoredZone(zone, max(0.0, (time.time() if now is None else now) - modified))
