"""Socket filters that drop a flooding client's datagrams in the kernel (classic BPF).

A Python reactor cannot drop datagrams as fast as one client can send them: past some rate
the socket's receive queue stays full and the kernel drops everyone's queries alike.  So a
client far over its rate (blockd.limits) is blocked for a while below the socket, as dnsdist's
dynamic blocks do with eBPF: a classic BPF program attached with SO_ATTACH_FILTER compares each
datagram's source address, masked to the client prefix, with the blocked clients and drops the
matches before they are queued.  Replacing the program is atomic.

The program reads the IP header through SKF_NET_OFF (so it works on IPv4 and dual-stack IPv6
sockets alike), and uses no jump longer than a few instructions, so it holds any number of
clients up to MAX_BLOCKED.  Pure: builds bytes; blockd.services attaches them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
MAX_BLOCKED = 1024  # clients blocked at once: the program stays far below cBPF's 4096 instructions

_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_NET_OFF = -0x100000  # SKF_NET_OFF: loads relative to the network header

# Opcodes (linux/bpf_common.h)
_LD_B_ABS = 0x30
_LD_W_ABS = 0x20
_ALU_RSH_K = 0x74
_ALU_AND_K = 0x54
_JMP_JEQ_K = 0x15
_JMP_JA = 0x05
_RET_K = 0x06
_ACCEPT = 0xFFFFFFFF
_DROP = 0


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return _INSN.pack(code, jt, jf, k & 0xFFFFFFFF)


def _words(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[int, int]]:
    """(value, mask) of each 32-bit word of the network's address that its prefix covers."""
    address = network.network_address.packed
    prefix = network.prefixlen
    words = []
    for index in range(0, (prefix + 31) // 32):
        bits = min(32, prefix - 32 * index)
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        (value,) = struct.unpack_from("!I", address, 4 * index)
        words.append((value & mask, mask))
    return words


def _match(words: list[tuple[int, int]], offset: int) -> list[bytes]:
    """Drop if every word matches; fall through to the next block otherwise."""
    code: list[bytes] = []
    for index, (value, mask) in enumerate(words):
        code.append(_insn(_LD_W_ABS, _NET_OFF + offset + 4 * index))
        if mask != 0xFFFFFFFF:
            code.append(_insn(_ALU_AND_K, mask))
        remaining = words[index + 1 :]
        # Past this block: the other words' loads/ands/compares, then the drop.
        skip = sum(3 if m != 0xFFFFFFFF else 2 for _, m in remaining) + 1
        code.append(_insn(_JMP_JEQ_K, value, jt=0, jf=skip))
    code.append(_insn(_RET_K, _DROP))
    return code


def drop_program(blocked: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bytes:
    """A filter dropping datagrams from the blocked networks and accepting the rest."""
    if len(blocked) > MAX_BLOCKED:
        raise ValueError(f"at most {MAX_BLOCKED} blocked clients, not {len(blocked)}")
    v4 = [_match(_words(n), 12) for n in blocked if n.version == 4]
    v6 = [_match(_words(n), 8) for n in blocked if n.version == 6]
    v4_code = [insn for block in v4 for insn in block] + [_insn(_RET_K, _ACCEPT)]
    v6_code = [insn for block in v6 for insn in block] + [_insn(_RET_K, _ACCEPT)]
    head = [
        _insn(_LD_B_ABS, _NET_OFF),  # version and IHL
        _insn(_ALU_RSH_K, 4),
        _insn(_JMP_JEQ_K, 6, jt=0, jf=1),
        _insn(_JMP_JA, len(v4_code)),  # IPv6: past the IPv4 part
    ]
    return b"".join(head + v4_code + v6_code)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, program: bytes) -> None:
    """Replace the socket's filter with program (atomically).  Raises OSError."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _INSN.size, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(memoryview(fprog)))


def detach(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass  # no filter attached
