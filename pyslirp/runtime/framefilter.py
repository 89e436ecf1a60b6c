"""Flood frames dropped by the kernel before pyslirp reads them (a socket filter).

Theory of operation
-------------------
A guest flooding from one UDP socket to ever new destinations sends frames
far faster than admission lets them in (:mod:`pyslirp.stack.admission`). The
stack refuses them from the raw bytes (``UdpEngine.shed``), but each still
costs a TAP ``read`` (~1 us) and sits in the TAP's queue ahead of every other
flow's frames: there a download's ACKs wait behind the flood, and when the
queue is full (Linux's tun has no flow control: the guest's ``sendto`` never
blocks, the frame is dropped) they are dropped with it.

A TAP accepts a classic BPF socket filter (``TUNATTACHFILTER``; classic
filters need no privilege, as ``SO_ATTACH_FILTER``) that the kernel runs on
each frame the guest sends, before it is queued (``tun_net_xmit``): a frame
it refuses is dropped there, on the sender's CPU, and counted among the TAP's
transmit drops. While :attr:`pyslirp.stack.udp.UdpEngine.flood_filter` says
flows flood (or :attr:`pyslirp.stack.tcp.TcpEngine.syn_flood_filter` that the
guest floods SYNs), :func:`flood_program` compiles them (the stack decides
what, this module only how) and :func:`attach` puts it on the fd; the flood's
frames pass with probability ``keep`` (the BPF random number, ``SKF_AD_RANDOM``)
so the stack keeps spending admission tokens and measuring the flood. The
filter sees the frame from its Ethernet header (no virtio-net header: that is
added by ``read``). A filter cost is a few loads and compares per frame; a
frame of any other kind leaves it within the first seven instructions.

QEMU's ``-netdev dgram`` socket takes the same program as an ordinary socket
filter (``SO_ATTACH_FILTER``, :func:`attach_socket`): the kernel runs it on
each datagram QEMU sends, before it is queued on our socket. (A stream, QEMU's
``-netdev stream``, has no frames for a filter to see: it sheds after the read.)
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct

from pyslirp.stack.tcp import SynFloodFilter
from pyslirp.stack.udp import FloodFilter

#: _IOW('T', 213 / 214, struct sock_fprog) on 64-bit Linux.
TUNATTACHFILTER = 0x401054D5
TUNDETACHFILTER = 0x401054D6
#: asm-generic/socket.h (the socket module does not name them).
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_LD_LEN = 0x80
_JA = 0x05
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_AND_K = 0x54
_RET_K = 0x06
#: ``ld #rand``: SKF_AD_OFF (-0x1000) + SKF_AD_RANDOM (56), as the u32 the kernel reads.
_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF
_KEEP_ALL = 0xFFFFFFFF
#: IPv4 flags_frag bits that make a packet a fragment (MF and the offset).
_FRAGMENT_BITS = 0x3FFF
_DHCP_SERVER_PORT = 67
_MULTICAST = 0xE0000000
_PROTO_TCP = 6
_PROTO_UDP = 17
_SYN, _RST, _ACK = 0x02, 0x04, 0x10

_INSN = struct.Struct("=HBBI")
#: struct sock_fprog: unsigned short len, then (aligned) the instructions' address.
_FPROG = struct.Struct("@HP")

_Insn = tuple[int, int | str, int | str, int | str]


def flood_program(udp: FloodFilter | None, syn: SynFloodFilter | None) -> bytes:
    """The classic BPF program (packed ``struct sock_filter`` entries) for both filters.

    Layout: the checks every covered frame passes (IPv4, no options, not a
    fragment), each followed by its own ``ret`` so that no jump is long (classic
    BPF jumps reach 255 instructions), then a dispatch on the protocol to the SYN
    part and the UDP part, each ending in its own pass and drop. A load past the
    frame's end would end the program with 0, a drop: each part first checks that
    the frame holds the whole UDP or TCP header, as the stack's own shedding does,
    and passes shorter ones (malformed, for the stack to count)."""
    code: list[_Insn | str] = [
        (_LD_LEN, 0, 0, 0), (_JGE_K, 1, 0, 24), (_RET_K, 0, 0, _KEEP_ALL),
        (_LD_H_ABS, 0, 0, 12), (_JEQ_K, 1, 0, 0x0800), (_RET_K, 0, 0, _KEEP_ALL),
        (_LD_B_ABS, 0, 0, 14), (_JEQ_K, 1, 0, 0x45), (_RET_K, 0, 0, _KEEP_ALL),
        (_LD_H_ABS, 0, 0, 20), (_JSET_K, 0, 1, _FRAGMENT_BITS), (_RET_K, 0, 0, _KEEP_ALL),
        (_LD_B_ABS, 0, 0, 23),
    ]
    if syn is not None:
        code.append((_JEQ_K, "syn", 0, _PROTO_TCP))
    if udp is not None:
        code.append((_JEQ_K, "udp", 0, _PROTO_UDP))
    code.append((_RET_K, 0, 0, _KEEP_ALL))
    if syn is not None:
        code += ["syn", *_syn_part(syn)]
    if udp is not None:
        code += ["udp", *_udp_part(udp)]
    return _assemble(code)


def _sample(keep: float, prefix: str) -> list[_Insn | str]:
    """Pass with probability ``keep``, else drop; the labels PREFIX-pass and -drop."""
    return [(_LD_W_ABS, 0, 0, _RANDOM),
            (_JGE_K, f"{prefix}-drop", f"{prefix}-pass", min(_KEEP_ALL, round(keep * 2.0 ** 32))),
            f"{prefix}-pass", (_RET_K, 0, 0, _KEEP_ALL),
            f"{prefix}-drop", (_RET_K, 0, 0, 0)]


def _syn_part(spec: SynFloodFilter) -> list[_Insn | str]:
    code: list[_Insn | str] = [
        (_LD_LEN, 0, 0, 0), (_JGE_K, 0, "syn-pass", 54),                      # TCP header
        (_LD_W_ABS, 0, 0, 26), (_JEQ_K, 0, "syn-pass", _u32(spec.guest_ip)),   # source
        (_LD_B_ABS, 0, 0, 47), (_AND_K, 0, 0, _SYN | _RST | _ACK),             # flags
        (_JEQ_K, 0, "syn-pass", _SYN),
        (_LD_W_ABS, 0, 0, 30),                                                 # destination
    ]
    code += [(_JEQ_K, f"dst{n}", 0, _u32(dst)) for n, dst in enumerate(spec.destinations)]
    code.append((_JA, 0, 0, "syn-pass"))
    for n, dst in enumerate(spec.destinations):
        code += [f"dst{n}", (_LD_H_ABS, 0, 0, 36)]                             # its port
        code += [(_JEQ_K, "syn-pass", 0, port) for addr, port in spec.spared if addr == dst]
        code.append((_JA, 0, 0, "syn-sample"))
    return code + ["syn-sample", *_sample(spec.keep, "syn")]


def _udp_part(spec: FloodFilter) -> list[_Insn | str]:
    by_ip: dict[bytes, list[int]] = {}
    for key in spec.flows:
        by_ip.setdefault(key[:4], []).append(int.from_bytes(key[4:6], "big"))
    code: list[_Insn | str] = [(_LD_LEN, 0, 0, 0), (_JGE_K, 0, "udp-pass", 42),  # UDP header
                               (_LD_W_ABS, 0, 0, 26)]                          # source
    code += [(_JEQ_K, f"ip{n}", 0, _u32(ip)) for n, ip in enumerate(by_ip)]
    code.append((_JA, 0, 0, "udp-pass"))
    for n, ports in enumerate(by_ip.values()):
        code += [f"ip{n}", (_LD_H_ABS, 0, 0, 34)]                              # its port
        code += [(_JEQ_K, "udp-flow", 0, port) for port in ports]
        code.append((_JA, 0, 0, "udp-pass"))
    code += ["udp-flow", (_LD_W_ABS, 0, 0, 30)]                                # destination
    code += [(_JEQ_K, "udp-pass", 0, _u32(addr)) for addr in spec.spared]
    code += [(_JGE_K, "udp-pass", 0, _MULTICAST),
             (_LD_H_ABS, 0, 0, 36), (_JEQ_K, "udp-pass", 0, _DHCP_SERVER_PORT)]
    return code + _sample(spec.keep, "udp")


def _u32(address: bytes) -> int:
    return int.from_bytes(address, "big")


def _assemble(code: list[_Insn | str]) -> bytes:
    """Resolve labels (a str entry marks the next instruction) into jump offsets."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for at, (op, jt, jf, k) in enumerate(insns):
        if op == _JA:
            out += _INSN.pack(op, 0, 0, _offset(labels, at, k, 0xFFFFFFFF))
        else:
            assert isinstance(k, int)
            out += _INSN.pack(op, _offset(labels, at, jt, 0xFF), _offset(labels, at, jf, 0xFF),
                              k)
    return bytes(out)


def _offset(labels: dict[str, int], at: int, target: int | str, limit: int) -> int:
    """The jump from instruction ``at`` to ``target`` (a label, or already an offset)."""
    if isinstance(target, int):
        return target
    delta = labels[target] - at - 1
    if not 0 <= delta <= limit:
        raise ValueError(f"BPF jump to {target} out of range: {delta}")
    return delta


def attach(fd: int, program: bytes) -> None:
    """Put ``program`` on the TAP ``fd`` (replacing any); OSError if the kernel refuses."""
    insns = array.array("B", program)  # the kernel copies it before the call returns
    address, _ = insns.buffer_info()
    fcntl.ioctl(fd, TUNATTACHFILTER, _FPROG.pack(len(program) // _INSN.size, address))


def attach_socket(sock: socket.socket, program: bytes) -> None:
    """Put ``program`` on a datagram socket (replacing any); OSError if refused."""
    insns = array.array("B", program)
    address, _ = insns.buffer_info()
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    _FPROG.pack(len(program) // _INSN.size, address))


def detach_socket(sock: socket.socket) -> None:
    """Take the filter off ``sock``; OSError if it had none."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


def detach(fd: int) -> None:
    """Take the filter off the TAP ``fd``; OSError if it had none or the fd is gone."""
    fcntl.ioctl(fd, TUNDETACHFILTER, _FPROG.pack(0, 0))
