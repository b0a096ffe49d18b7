"""Dropping root once the listeners are bound: [server] user and group.

Started as root with server.user set, blockd binds every DNS listener while still root (port 53:
DNSService.privilegedStartService), then, before any other service starts, becomes that user:
setgroups to the one group (not the user's other groups: blockd needs none), setgid, setuid (real,
effective and saved ids).  Everything else is opened by the user, as it is reopened later (the
pidfile and the reload status, the query log after logrotate, transferred zones' copies in
server.state_dir), so the same directories work at start and a year later.  A problem shows at
start rather than at the first reload: after the drop blockd checks that the user can read the
config, every list and Python's own modules (imported lazily), and write where it writes; the
start error names the key.

Capabilities: none, or CAP_NET_ADMIN alone when [egress] enabled (its routes and rules over
netlink): PR_SET_KEEPCAPS keeps the permitted set across setuid, capset then leaves that one
capability.  Linux keeps capabilities per thread and capset changes only the caller's, so the drop
runs while the process has one thread; the query-log, dnstap and netlink threads start after it
and inherit the reduced set.  no_new_privs is set as well: blockd executes nothing, and nothing it
could execute would gain a privilege back.

Not root and server.user set: a start error (unless blockd already runs as that user, as under
systemd's User=): the key says whose files these are, and running as another account, which may
read what that user may not, is a mistake to report rather than a warning to scroll past.

Config keys: server.user, server.group.  Metrics: none.  The decisions (drop_to, needed_access)
are pure over a System; LinuxSystem is the ctypes adapter (prctl, capset: no compiled
dependency; python-prctl would need libcap's headers to build).
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blockd.config import Config

CAP_NET_ADMIN = 12  # linux/capability.h

READ = os.R_OK
WRITE = os.W_OK | os.X_OK  # create and remove files in a directory


class PrivilegeError(Exception):
    """A start-up problem of server.user / server.group; the message names the key."""


@dataclass(frozen=True)
class Account:
    user: str
    uid: int
    group: str
    gid: int


def resolve(user: str, group: str | None) -> Account:
    """The account for server.user and server.group (None: the user's primary group)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"server.user: no such user {user!r}") from None
    if group is None:
        gid = entry.pw_gid
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        return Account(user, entry.pw_uid, name, gid)
    try:
        found = grp.getgrnam(group)
    except KeyError:
        raise PrivilegeError(f"server.group: no such group {group!r}") from None
    return Account(user, entry.pw_uid, found.gr_name, found.gr_gid)


def kept_capabilities(config: Config) -> frozenset[int]:
    """What the daemon still needs once bound: CAP_NET_ADMIN for [egress] only."""
    return frozenset({CAP_NET_ADMIN}) if config.egress.enabled else frozenset()


def capability_mask(capabilities: Iterable[int]) -> int:
    mask = 0
    for capability in capabilities:
        mask |= 1 << capability
    return mask


def capability_sets(status: str) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb of a /proc/<pid>/status text, as bit masks."""
    sets = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            sets[key] = int(value.strip(), 16)
    return sets


# -- the drop (pure over a System) -------------------------------------------------------------


class System(Protocol):
    """The process's credentials as drop_to changes them (LinuxSystem; a recording fake in tests)."""

    def geteuid(self) -> int: ...

    def thread_count(self) -> int: ...

    def set_keepcaps(self, keep: bool) -> None: ...

    def setgroups(self, gids: list[int]) -> None: ...

    def setresgid(self, gid: int) -> None: ...

    def setresuid(self, uid: int) -> None: ...

    def set_capabilities(self, mask: int) -> None:
        """Permitted and effective = mask; inheritable (and so ambient) empty."""

    def set_no_new_privs(self) -> None: ...

    def credentials(self) -> tuple[set[int], set[int], int, int]:
        """(real/effective/saved uids, the same gids, permitted mask, effective mask) of this thread."""


def drop_to(account: Account, keep: frozenset[int], system: System) -> bool:
    """Become account, keeping only the capabilities in keep.  True when dropped, False when the
    process already runs as that user (nothing to do); PrivilegeError otherwise."""
    euid = system.geteuid()
    if euid != 0:
        if euid == account.uid:
            return False
        raise PrivilegeError(
            f"server.user: blockd runs as uid {euid}, not root, and cannot become {account.user!r} "
            f"(uid {account.uid}): start it as root or as {account.user}, or remove server.user"
        )
    threads = system.thread_count()
    if threads != 1:  # a thread started earlier would keep root's capabilities
        raise PrivilegeError(f"server.user: cannot drop privileges with {threads} threads running")
    mask = capability_mask(keep)
    try:
        system.set_keepcaps(bool(mask))  # else setuid empties the permitted set
        system.setgroups([account.gid])
        system.setresgid(account.gid)  # the group first: after setuid it could no longer be changed
        system.setresuid(account.uid)
        system.set_capabilities(mask)  # setuid emptied the effective set; keep only what is needed
        system.set_keepcaps(False)
        system.set_no_new_privs()
    except OSError as exc:
        raise PrivilegeError(
            f"server.user: cannot become {account.user}:{account.group}: {exc.strerror or exc}"
        ) from None
    uids, gids, permitted, effective = system.credentials()
    if uids != {account.uid} or gids != {account.gid} or permitted != mask or effective != mask:
        # Never expected; but a daemon that is half root must not serve.
        raise PrivilegeError(
            f"server.user: after the drop uids {sorted(uids)} gids {sorted(gids)} "
            f"capabilities {permitted:#x}/{effective:#x}, expected {account.uid} {account.gid} {mask:#x}"
        )
    return True


# -- what the user must be able to reach -------------------------------------------------------


def needed_access(config: Config, config_path: Path | None, module_dirs: Iterable[Path]) -> list[tuple[str, Path, int]]:
    """(key, path, READ or WRITE) for everything the daemon reads or writes after the drop.

    module_dirs: where Python's modules come from (modules are imported lazily, e.g. by a reload).
    """
    checks: list[tuple[str, Path, int]] = []
    if config_path is not None:
        checks.append(("the config file", config_path, READ))
    for name, listed in config.lists.items():
        if listed.path is not None:
            checks.append((f"lists.{name}.path", listed.path, READ))
        if listed.tsig is not None:
            checks.append((f"lists.{name}.tsig", listed.tsig, READ))
    for name, group in config.groups.items():
        checks += [(f"groups.{name}.block_answer_prefixes", path, READ) for path in group.block_answer_prefixes]
    checks += [("egress.prefixes", path, READ) for path in config.egress.prefixes]
    if config.server.pidfile is not None:
        checks.append(("server.pidfile", config.server.pidfile.parent, WRITE))
    if config.log.path != "-":
        checks.append(("log.path", Path(config.log.path).parent, WRITE))
    if config.dnstap.target is not None and config.dnstap.target.startswith("file:"):
        checks.append(("dnstap.file", Path(config.dnstap.target[len("file:") :]).parent, WRITE))
    if any(listed.zone is not None for listed in config.lists.values()):
        checks.append(("server.state_dir", config.server.state_dir, WRITE))
    checks += [("Python's modules", path, READ | os.X_OK) for path in module_dirs]
    return checks


def module_roots(modules: Iterable[object], search_path: Iterable[str]) -> list[Path]:
    """The entries of sys.path that hold a loaded module: where later imports come from too."""
    files = [file for module in modules if isinstance(file := getattr(module, "__file__", None), str)]
    roots = []
    for entry in dict.fromkeys(search_path):
        if entry and os.path.isdir(entry):
            prefix = os.path.join(entry, "")
            if any(file.startswith(prefix) for file in files):
                roots.append(Path(entry))
    return roots


def existing(checks: Iterable[tuple[str, Path, int]], exists: Callable[[Path], bool]) -> list[tuple[str, Path, int]]:
    """The checks with each directory not there yet replaced by its nearest existing parent (blockd
    creates it: that parent must be writable).  Run while still root, which sees every path."""
    settled = []
    for key, path, mode in checks:
        target = path
        if mode == WRITE:
            while not exists(target) and target.parent != target:
                target = target.parent
        settled.append((key, target, mode))
    return settled


def access_problems(checks: Iterable[tuple[str, Path, int]], access: Callable[[Path, int], bool]) -> list[str]:
    """What the process (after the drop) cannot do, one "read PATH (key)" per failed check."""
    failed = [(key, path, mode) for key, path, mode in checks if not access(path, mode)]
    return [f"{'write in' if mode == WRITE else 'read'} {path} ({key})" for key, path, mode in failed]


# -- Linux ---------------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # 64-bit sets, as two 32-bit halves
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38


class LinuxSystem:
    """The calling thread's credentials, through os and libc (prctl(2), capset(2))."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def geteuid(self) -> int:
        return os.geteuid()

    def thread_count(self) -> int:
        return len(os.listdir("/proc/self/task"))

    def set_keepcaps(self, keep: bool) -> None:
        self._prctl(PR_SET_KEEPCAPS, int(keep))

    def setgroups(self, gids: list[int]) -> None:
        os.setgroups(gids)

    def setresgid(self, gid: int) -> None:
        os.setresgid(gid, gid, gid)

    def setresuid(self, uid: int) -> None:
        os.setresuid(uid, uid, uid)

    def set_capabilities(self, mask: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for index in range(2):
            half = (mask >> (32 * index)) & 0xFFFFFFFF
            data[index].effective = data[index].permitted = half
        if self._libc.capset(ctypes.byref(header), data) != 0:
            self._raise("capset")

    def set_no_new_privs(self) -> None:
        self._prctl(PR_SET_NO_NEW_PRIVS, 1)

    def credentials(self) -> tuple[set[int], set[int], int, int]:
        sets = capability_sets(Path("/proc/thread-self/status").read_text())
        return set(os.getresuid()), set(os.getresgid()), sets["CapPrm"], sets["CapEff"]

    def _prctl(self, option: int, value: int) -> None:
        zero = ctypes.c_ulong(0)
        if self._libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero) != 0:
            self._raise("prctl")

    def _raise(self, call: str) -> None:
        number = ctypes.get_errno()
        raise OSError(number, f"{call}: {os.strerror(number)}")
