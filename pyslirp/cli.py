"""Command-line front end: slirp4netns-compatible argument parsing and dispatch.

Theory of operation
-------------------
``pyslirp [OPTION]... PID|PATH [TAPNAME]`` is meant to be dropped in wherever
slirp4netns 1.2.0 is invoked (podman, rootlesskit, scripts), so the parser
mirrors slirp4netns's ``getopt_long`` behaviour rather than argparse's:

* GNU permutation: options may follow the positionals; ``--`` ends options.
* Long options may be abbreviated to any unique prefix (``--conf``), take
  their argument as ``--mtu=9000`` or ``--mtu 9000`` (the next word is taken
  even if it starts with ``-``); short options cluster (``-cm9000``).
* Options act in order: ``--help`` exits 0 as soon as it is seen, so an error
  *before* it wins and anything *after* it is never looked at.
* Numbers are read as ``strtol(…, 10)`` with a full-match check, so
  ``" 12"``, ``"+12"`` and ``"010"`` are 12, 12 and 10; ``"0x10"`` and
  ``"12abc"`` are errors.
* Error messages use slirp4netns's (and glibc getopt's) wording, prefixed
  ``pyslirp:``, on one stderr line; the exit status is 1, as slirp4netns's
  ``EXIT_FAILURE``. ``--help``/``--version`` print to stdout and exit 0.

Deliberate differences from slirp4netns:

* On a bad command line slirp4netns also dumps the whole usage to stdout; we
  print only the one-line reason (stdout stays clean for callers that read it).
* TAPNAME is optional (default ``tap0``), as slirp4netns's usage line says
  but its 1.2.0 code does not allow.
* ``--netns-type`` accepts only ``pid`` and ``path`` (slirp4netns treats any
  other word as ``path``); the missing-path error names the path.
* CIDR, MTU and MAC are checked while parsing, not after: the MTU must also
  satisfy :class:`~pyslirp.stack.config.NetConfig` (68..65521, the IPv4
  minimum), which slirp4netns leaves to the kernel's ``SIOCSIFMTU``.
* ``-6``/``--enable-ipv6`` serves IPv6 beside IPv4 on the link (NDP,
  router advertisements for SLAAC, ICMPv6 echo, stateless DHCPv6; see
  docs/ipv6.md) and forwards TCP and UDP over IPv6 (fd00::2 is the host's
  ::1, fd00::3 the DNS forwarder), relays ICMPv6 echo and errors,
  reassembles IPv6 fragments and, through the API socket, serves IPv6 port
  forwards (pyslirp.api). ``--cidr6=PREFIX/64`` (ours; slirp4netns has none)
  picks the prefix instead of fd00::/64; only /64 is accepted (SLAAC needs
  it), and only with ``-6``.
* ``--outbound-addr6=IFNAME`` looks up IFNAME (slirp4netns 1.2 looks up
  ``--outbound-addr``'s value instead); an unknown interface or one without
  an address of the family is a usage error naming it. Both options are
  resolved once, at start-up, as slirp4netns does.
* ``--enable-sandbox``/``--enable-seccomp``: see ``pyslirp.runtime.sandbox``
  and ``pyslirp.runtime.seccomp``; seccomp additionally blocks module
  loading, ``pivot_root``, kexec and the new mount API.
* Options slirp4netns has but pyslirp does not implement (the deprecated
  ``--no-host-loopback`` and ``--create-sandbox``) are unknown options, so nobody
  silently gets less isolation or a different network than asked for.
* ``--target-type`` takes ``netns`` (the default) and pyslirp's own
  ``qemu-stream``/``qemu-dgram`` (serve a VM: the positional is the Unix
  socket QEMU's ``-netdev stream``/``dgram`` connects to, see
  ``pyslirp.runtime.qemu``); slirp4netns's experimental ``bess`` is refused.
  The namespace-only options (``-c``, ``--netns-type``, ``--userns-path``,
  ``--macaddress``, TAPNAME) are errors with a QEMU target.
* ``WARNING: too many arguments`` goes to stderr through logging, not stdout.

``pyslirp run [OPTION]... [--] CMD [ARG]...`` takes the network-shaping
subset of the options (``--configure`` is implied) and stops at the first
non-option, so the command's own options are never ours.

:func:`main` parses, sets up logging (``pyslirp: LEVEL: message`` on stderr)
and hands :class:`Options` to ``pyslirp.runtime.main``, which is imported only
then so ``--help`` stays fast and independent of the runtime.

Start-up order
--------------
podman waits for the TAP and the ready byte before it starts the container,
so ``pyslirp [OPTION]... PID TAPNAME`` does first what those need and imports
the engine (asyncio, uvloop, the stack: most of the start-up time) after:

1. parse the command line with nothing but this module, ``ipaddress`` and
   ``pyslirp.wire.netparams`` (no ``logging``, ``dataclasses``, ``typing`` or
   ``pyslirp.stack``: the stack's defaults are looked up only when an option
   needs them, and ``--help`` builds its text on demand);
2. open the TAP (``pyslirp.runtime.tap``: fork, setns, TUNSETIFF, ``-c``);
3. with ``--api-socket``, bind and listen on it (``pyslirp.api_listen``):
   podman connects right after the ready byte, and its connection waits in
   the backlog until the API server accepts it;
4. write the ready byte: from now on the guest's frames wait in the TAP's
   queue until the engine reads them;
5. set up logging, import the engine, build the stack, apply
   ``--enable-sandbox``/``--enable-seccomp`` and serve.

With ``--enable-sandbox`` or ``--enable-seccomp``, step 4 comes after them
instead, as in slirp4netns: whoever has the byte may check the process's
capabilities, root and filter (tests/e2e/test_hardening.py does), and the
sandbox needs the engine imported first (nothing can be imported after it).
So podman's flags get the TAP early but the ready byte only after the
engine is loaded, and that path is shortened instead: step 2 only forks the
TAP helper, logging and the engine are imported while it works (the two
run side by side on two CPUs), then the TAP is collected; the preload
before the sandbox is a short explicit list (``runtime/sandbox.py``). On
both paths the cyclic garbage collector is off from here until the ready
byte (the imports' collections free next to nothing). A sandbox that kept
the Python installation visible, so that the engine could load after the
byte, was weighed and not taken: its root would no longer hold only
``/etc`` and ``/run`` (what slirp4netns and tests/e2e/test_hardening.py
promise), and the libraries' directories would have to be mounted
executable. tests/test_startup_imports.py holds the modules imported before
steps 2 and 4 to tests/startup_imports.json, and what the hardened start
must not import.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from pyslirp import __version__
from pyslirp.wire import netparams
from pyslirp.wire.netparams import (
    DEFAULT_CIDR,
    DEFAULT_DNS_PORT,
    DEFAULT_MTU,
    MAX_MTU,
    NetParamError,
)

# Not typing.TYPE_CHECKING: importing typing costs start-up time ("Start-up order").
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import socket
    from collections.abc import Iterator
    from typing import Any, Literal

    from pyslirp.runtime.spec import ServeSpec
    from pyslirp.runtime.tap import PendingTap, TapHandle
    from pyslirp.stack.config import NetConfig

#: pyslirp.logsetup's PROG, DEFAULT_LOG_LEVEL and LOG_LEVELS names (that module imports
#: logging, which waits until the TAP is open; tests/test_cli.py checks they agree).
PROG = "pyslirp"
DEFAULT_LOG_LEVEL = "info"
LOG_LEVEL_NAMES = ("debug", "info", "warning", "error")
DEFAULT_TAPNAME = "tap0"
DEFAULT_NETNS_TYPE = "pid"
MAX_BUSY_POLL_US = 1_000_000
#: ``--max-buffered`` suffixes (binary multiples).
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
#: slirp4netns's hard ceiling ("MTU must be a positive integer (< 65522)").
SLIRP_MAX_MTU = MAX_MTU
#: What ``-v`` reports in slirp4netns's SLIRP_CONFIG_VERSION_MAX line.
SLIRP_CONFIG_VERSION_MAX = 4
_INT_MAX = 2**31 - 1



def __getattr__(name: str) -> object:
    """``USAGE`` and ``DEFAULT_BUSY_POLL_US`` need the stack's defaults: built on first use."""
    if name == "USAGE":
        return usage_text()
    if name == "DEFAULT_BUSY_POLL_US":
        from pyslirp.stack.config import DEFAULT_BUSY_POLL

        return round(DEFAULT_BUSY_POLL * 1e6)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def usage_text() -> str:
    """``--help``'s text (imports the stack's defaults, which the start path does not need)."""
    from pyslirp.stack.config import (
        DEFAULT_BUSY_POLL,
        DEFAULT_CIDR6,
        DEFAULT_MAX_BUFFERED,
        MIN_MAX_BUFFERED,
    )
    return _USAGE.format(
        PROG=PROG, DEFAULT_MTU=DEFAULT_MTU, SLIRP_MAX_MTU=SLIRP_MAX_MTU,
        DEFAULT_CIDR=DEFAULT_CIDR, DEFAULT_NETNS_TYPE=DEFAULT_NETNS_TYPE, _DNS=DEFAULT_DNS_PORT,
        DEFAULT_CIDR6=DEFAULT_CIDR6, _LOG=DEFAULT_LOG_LEVEL,
        DEFAULT_BUSY_POLL_US=round(DEFAULT_BUSY_POLL * 1e6),
        DEFAULT_MAX_BUFFERED_M=DEFAULT_MAX_BUFFERED >> 20,
        MIN_MAX_BUFFERED_M=MIN_MAX_BUFFERED >> 20)


_USAGE = """\
Usage: {PROG} [OPTION]... PID|PATH [TAPNAME]
       {PROG} run [RUN-OPTION]... [--] COMMAND [ARG]...
       {PROG} shim install [--shared-engine] DIR  (write DIR/slirp4netns, which execs {PROG};
                                   see 'shim --help')
       {PROG} kubevirt-sidecar [--help]  (KubeVirt's slirp network binding hook sidecar)
       {PROG} stats --api-socket PATH | --cni-rundir DIR CONTAINERID[:IFNAME] [--json]
User-mode networking for unprivileged network namespaces.

-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating {PROG}
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default={DEFAULT_MTU}, max={SLIRP_MAX_MTU})
-6, --enable-ipv6        enable IPv6 (TCP, UDP, DNS, port forwarding; NDP, RA, DHCPv6)
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default={DEFAULT_CIDR})
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default={DEFAULT_NETNS_TYPE})
--userns-path=PATH       specify user namespace path
--enable-sandbox         create a new mount namespace (and drop all caps except \
CAP_NET_BIND_SERVICE if running as the root)
--enable-seccomp         enable seccomp to limit syscalls
--outbound-addr=IPv4     sets outbound ipv4 address (or interface name) to bound to
--outbound-addr6=IPv6    sets outbound ipv6 address (or interface name) to bound to
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
-h, --help               show this help and exit
-v, --version            show version and exit

{PROG} additions:
--dns-upstream=HOST[:PORT]
                         forward DNS to HOST (IPv4, or [IPv6] with a port) instead of the
                         nameservers in /etc/resolv.conf; repeatable (default port={_DNS})
--cidr6=PREFIX/64        IPv6 prefix with -6 (default={DEFAULT_CIDR6}; gateway ::2, DNS ::3)
--pcap=FILE              write every frame on the link to FILE (pcap format)
--log-level=LEVEL        specify log verbosity ([debug|info|warning|error], default={_LOG})
--no-offload             open the TAP without vnet header and offloads (plain frames)
--busy-poll=USEC         after handling traffic, keep polling for USEC microseconds before
                         sleeping: lower latency where waking up is slow (VMs); 0 turns it
                         off (default={DEFAULT_BUSY_POLL_US})
--max-buffered=BYTES     bytes all TCP connections may hold buffered together (suffix K, M
                         or G: binary multiples); as it fills, windows toward the guest
                         close and host sockets are no longer read
                         (default={DEFAULT_MAX_BUFFERED_M}M, min={MIN_MAX_BUFFERED_M}M)
--target-type=TYPE       netns (default), or serve a VM: qemu-stream|qemu-dgram, where PATH
                         is the Unix socket for QEMU's -netdev stream|dgram
                         (pyslirp --target-type=qemu-stream [OPTION]... SOCKET)

{PROG} run: run COMMAND in new namespaces served by {PROG}, exit with its status.
RUN-OPTIONs: -m/--mtu, --cidr, --disable-host-loopback, --disable-dns, --macaddress,
             --dns-upstream, --pcap, --log-level, --no-offload, --busy-poll,
             --max-buffered, -h/--help
             (--configure is implied)
"""


#: What the API server imports on first use (replies are JSON text), for the sandbox.
_API_PRELOAD = ("json", "json.decoder", "json.encoder")


class UsageError(Exception):
    """The command line is wrong; ``str(exc)`` is the one-line reason (no program prefix)."""


class InfoRequested(Exception):
    """``--help`` or ``--version`` was given; ``text`` goes to stdout and the exit status is 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Options:
    """Everything ``pyslirp.runtime.main`` needs to serve a namespace or run a command.

    A plain class (no dataclass: "Start-up order"); every field has its default
    from :meth:`__init__`. ``None`` for ``busy_poll_us``, ``max_buffered`` and
    ``cidr6`` means the stack's default (pyslirp.stack.config).
    """

    __slots__ = ("subcommand", "target", "netns_type", "tapname", "configure", "mtu", "cidr",
                 "disable_host_loopback", "disable_dns", "userns_path", "macaddress",
                 "ready_fd", "exit_fd", "api_socket", "target_type", "dns_upstreams", "pcap",
                 "log_level", "offload", "busy_poll_us", "max_buffered", "enable_ipv6",
                 "cidr6", "enable_sandbox", "enable_seccomp", "outbound_addr",
                 "outbound_addr6", "command", "extra_args")

    def __init__(self, subcommand: Literal["serve", "run"] = "serve",
                 configure: bool = False) -> None:
        self.subcommand = subcommand
        #: The PID (normalised decimal text) or the netns path; "" for ``run``.
        self.target = ""
        self.netns_type: Literal["pid", "path"] = "pid"
        self.tapname = DEFAULT_TAPNAME
        self.configure = configure
        self.mtu = DEFAULT_MTU
        self.cidr = ipaddress.IPv4Network(DEFAULT_CIDR)
        self.disable_host_loopback = False
        self.disable_dns = False
        self.userns_path: str | None = None
        #: The TAP's MAC address (``--macaddress``); None lets the kernel choose.
        self.macaddress: bytes | None = None
        #: ``-r``/``-e``: None when not given (slirp4netns's -1).
        self.ready_fd: int | None = None
        self.exit_fd: int | None = None
        #: ``-a``/``--api-socket``: where to serve slirp4netns's JSON API (None: nowhere).
        self.api_socket: str | None = None
        #: ``--target-type``: a namespace's TAP, or a QEMU socket back end at ``target``.
        self.target_type: Literal["netns", "qemu-stream", "qemu-dgram"] = "netns"
        #: ``--dns-upstream`` in order given, as (address text, port); empty means resolv.conf.
        self.dns_upstreams: list[tuple[str, int]] = []
        self.pcap: str | None = None
        self.log_level = DEFAULT_LOG_LEVEL
        #: False with ``--no-offload``: no vnet header, no TSO/checksum offload.
        self.offload = True
        #: ``--busy-poll``: microseconds the loop keeps polling after work (0 = off).
        self.busy_poll_us: int | None = None
        #: ``--max-buffered``: the stack-wide TCP buffer budget in bytes.
        self.max_buffered: int | None = None
        #: ``-6``/``--enable-ipv6``; ``--cidr6`` (only with it).
        self.enable_ipv6 = False
        self.cidr6: ipaddress.IPv6Network | None = None
        #: ``--enable-sandbox`` / ``--enable-seccomp`` (pyslirp.runtime.sandbox / .seccomp).
        self.enable_sandbox = False
        self.enable_seccomp = False
        #: ``--outbound-addr[6]`` resolved to an address (an interface name becomes its address).
        self.outbound_addr: str | None = None
        self.outbound_addr6: str | None = None
        #: ``run``: the command and its arguments.
        self.command: list[str] = []
        #: Positionals after TAPNAME; slirp4netns warns about them and carries on.
        self.extra_args: list[str] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Options({fields})"

    @property
    def pid(self) -> int | None:
        """The target PID for ``--netns-type=pid``, else None."""
        if self.subcommand == "serve" and self.target_type == "netns" and \
                self.netns_type == "pid" and self.target:
            return int(self.target)
        return None

    def serve_spec(self, *, ready_signalled: bool = False,
                   api_listener: socket.socket | None = None) -> ServeSpec:
        """What the runtime is to serve for these options (raises ConfigError).

        ``ready_signalled``: the ready byte is written already, the runtime must not.
        ``api_listener``: the ``--api-socket`` socket, bound and listening already.
        """
        from pyslirp.runtime.spec import Hardening, ServeSpec

        api = None
        if self.api_socket:
            from pyslirp.api import api_socket
            api = api_socket(self.api_socket, api_listener)
        userns = self.userns_path or (f"/proc/{self.pid}/ns/user" if self.pid else None)
        return ServeSpec(
            net=self.net_config(), target_type=self.target_type, target=str(self.target),
            netns_type=self.netns_type, tapname=self.tapname, configure=self.configure,
            userns_path=self.userns_path, macaddress=self.macaddress, offload=self.offload,
            ready_fd=None if ready_signalled else self.ready_fd, exit_fd=self.exit_fd,
            dns_upstreams=tuple(self.dns_upstreams), pcap=self.pcap,
            outbound_addr=self.outbound_addr, outbound_addr6=self.outbound_addr6,
            hardening=Hardening(sandbox=self.enable_sandbox, seccomp=self.enable_seccomp,
                                userns_path=userns, preload=_API_PRELOAD if api else ()),
            api=api, command=tuple(self.command))

    def net_config(self) -> NetConfig:
        """A fresh :class:`NetConfig` for these options (raises ConfigError if inconsistent)."""
        from pyslirp.stack.config import NetConfig

        # None: the stack's default, so NetConfig is not given the keyword at all.
        optional: dict[str, Any] = {}
        if self.busy_poll_us is not None:
            optional["busy_poll"] = self.busy_poll_us / 1e6
        if self.max_buffered is not None:
            optional["max_buffered"] = self.max_buffered
        if self.cidr6 is not None:
            optional["network6"] = self.cidr6
        return NetConfig(
            network=self.cidr,
            mtu=self.mtu,
            guest_mac=self.macaddress,
            disable_host_loopback=self.disable_host_loopback,
            disable_dns=self.disable_dns,
            dns_upstreams=list(self.dns_upstreams),
            vnet_hdr=self.offload,
            offload=self.offload,
            enable_ipv6=self.enable_ipv6,
            **optional,
        )


# --- getopt_long, the way glibc does it ---------------------------------------------------

class _Opt:
    """One getopt_long table entry."""

    __slots__ = ("long", "short", "has_arg", "shadowed")

    def __init__(self, long: str, short: str | None, has_arg: bool,
                 shadowed: bool = False) -> None:
        self.long = long
        self.short = short
        self.has_arg = has_arg
        #: An option slirp4netns lacks that shares a prefix with one it has: it must not
        #: make that option's abbreviations ambiguous (``--cid`` still means ``--cidr``).
        self.shadowed = shadowed


_COMMON_OPTS = (
    _Opt("mtu", "m", True),
    _Opt("cidr", None, True),
    _Opt("disable-host-loopback", None, False),
    _Opt("disable-dns", None, False),
    _Opt("macaddress", None, True),
    _Opt("dns-upstream", None, True),
    _Opt("pcap", None, True),
    _Opt("log-level", None, True),
    _Opt("no-offload", None, False),
    _Opt("busy-poll", None, True),
    _Opt("max-buffered", None, True),
    _Opt("help", "h", False),
)
_SERVE_OPTS = (
    _Opt("configure", "c", False),
    _Opt("exit-fd", "e", True),
    _Opt("ready-fd", "r", True),
    *_COMMON_OPTS,
    _Opt("enable-ipv6", "6", False),
    _Opt("cidr6", None, True, shadowed=True),
    _Opt("enable-sandbox", None, False),
    _Opt("enable-seccomp", None, False),
    _Opt("outbound-addr", None, True),
    _Opt("outbound-addr6", None, True),
    _Opt("api-socket", "a", True),
    _Opt("netns-type", None, True),
    _Opt("userns-path", None, True),
    _Opt("target-type", None, True),
    _Opt("version", "v", False),
)
_RUN_OPTS = _COMMON_OPTS


def _getopt(argv: list[str], table: tuple[_Opt, ...], positionals: list[str], *,
            permute: bool) -> Iterator[tuple[_Opt, str | None]]:
    """Yield (option, argument) in command-line order, appending non-options to ``positionals``.

    A generator so the caller acts on each option before the next is even
    looked at: that is what makes ``--help --bogus`` print help, as getopt does.
    With ``permute`` false, scanning stops at the first non-option.
    """
    shorts = {o.short: o for o in table if o.short}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positionals.extend(argv[i:])
            return
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            opt = _match_long(name, arg, table)
            if opt.has_arg:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"option '--{opt.long}' requires an argument")
                    value = argv[i]
                    i += 1
                yield opt, value
            else:
                if eq:
                    raise UsageError(f"option '--{opt.long}' doesn't allow an argument")
                yield opt, None
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                sopt = shorts.get(ch)
                if sopt is None:
                    raise UsageError(f"invalid option -- '{ch}'")
                if not sopt.has_arg:
                    yield sopt, None
                    continue
                if j < len(arg):
                    value = arg[j:]
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError(f"option requires an argument -- '{ch}'")
                yield sopt, value
                break
        else:
            positionals.append(arg)
            if not permute:
                positionals.extend(argv[i:])
                return


def _match_long(name: str, arg: str, table: tuple[_Opt, ...]) -> _Opt:
    for opt in table:
        if opt.long == name:
            return opt
    candidates = [opt for opt in table if opt.long.startswith(name)] if name else []
    if len(candidates) == 1:
        return candidates[0]
    unshadowed = [opt for opt in candidates if not opt.shadowed]
    if len(unshadowed) == 1:
        return unshadowed[0]
    if candidates:
        possibilities = " ".join(f"'--{o.long}'" for o in candidates)
        raise UsageError(f"option '--{name}' is ambiguous; possibilities: {possibilities}")
    raise UsageError(f"unrecognized option '{arg}'")


# --- value parsers ------------------------------------------------------------------------

# strtol(s, &end, 10) with *end == '\0': C-locale isspace, optional sign, decimal digits.
# Checked by hand, not with a regular expression: ``re`` costs start-up time.
_C_SPACE = " \t\n\v\f\r"
_ASCII_DIGITS = frozenset("0123456789")


def _strtol(text: str) -> int | None:
    """The integer slirp4netns would read from ``text``, or None where it reports an error."""
    body = text.lstrip(_C_SPACE)
    digits = body[1:] if body[:1] in ("+", "-") else body
    if not digits or not _ASCII_DIGITS.issuperset(digits):
        return None
    value = int(body)
    # strtol sets ERANGE beyond a long; anything past an int is nonsense for our fields anyway.
    return value if -_INT_MAX - 1 <= value <= _INT_MAX else None


def _parse_fd(text: str, what: str) -> int:
    value = _strtol(text)
    if value is None or value < 0:
        raise UsageError(f"{what} must be a non-negative integer")
    return value


def _parse_mtu(text: str) -> int:
    value = _strtol(text)
    if value is None or not 0 < value <= SLIRP_MAX_MTU:
        raise UsageError(f"MTU must be a positive integer (< {SLIRP_MAX_MTU + 1})")
    return value


def _parse_cidr(text: str) -> ipaddress.IPv4Network:
    """:func:`netparams.parse_cidr` with slirp4netns's message for the first rule broken."""
    try:
        network, prefix = netparams.parse_cidr(text)
    except NetParamError as exc:
        raise UsageError(_cidr_message(text, exc)) from None
    return ipaddress.IPv4Network((network, prefix))


def _cidr_message(text: str, exc: NetParamError) -> str:
    if exc.kind == netparams.ADDRESS:
        return f"invalid network address: {text.partition('/')[0]}"
    if exc.kind == netparams.PREFIX:
        return f"prefix length needs to be 1-25 (--cidr={text})"
    if exc.kind == netparams.HOST_BITS:
        network, prefix = netparams.parse_cidr(text, strict=False)
        return (f"CIDR needs to be a network address like {netparams.format_ipv4(network)}/"
                f"{prefix}, not like {text}")
    return f"invalid CIDR: {text}"


def _parse_mac(text: str) -> bytes:
    try:
        return netparams.parse_mac(text)
    except NetParamError as exc:
        # slirp4netns's words lead ('"zz" is an invalid MAC address.'); ours add why.
        raise UsageError(f'"{text}" is an invalid MAC address ({exc})') from None


def _parse_dns_upstream(text: str) -> tuple[str, int]:
    """``A.B.C.D``, ``A.B.C.D:PORT``, ``[V6]``, ``[V6]:PORT`` or a bare IPv6 address."""
    try:
        return netparams.parse_dns_upstream(text)
    except NetParamError as exc:
        raise UsageError(f"invalid --dns-upstream '{text}': {exc}") from None


def _parse_outbound(text: str, version: Literal[4, 6]) -> str:
    """``--outbound-addr[6]``: an address of that family, or an interface holding one.

    slirp4netns looks the name up with getifaddrs(3) and takes the first
    address of the family; so do we (pyroute2 would cost more to import).
    """
    option = "--outbound-addr" if version == 4 else "--outbound-addr6"
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if addr.version != version:
            raise UsageError(f"{option}={text}: not an IPv{version} address")
        _check_bindable(option, text, str(addr))
        return str(addr)
    from pyslirp.runtime.ifaddrs import interface_addresses

    if not text:
        raise UsageError(f"{option} needs an IPv{version} address or an interface name")
    found = interface_addresses(text, version)
    if found is None:
        raise UsageError(f"{option}={text}: no such interface (expected an IPv{version} "
                         "address or an interface name)")
    if not found:
        raise UsageError(f"{option}={text}: interface {text} has no IPv{version} address")
    return found[0]


def _check_bindable(option: str, text: str, addr: str) -> None:
    """slirp4netns takes any address and every connection then fails; we say so up front."""
    import socket

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((addr, 0))
        except OSError as exc:
            raise UsageError(f"{option}={text}: cannot bind to it: {exc.strerror} (not an "
                             "address of this host?)") from None


def _path_error(path: str) -> str | None:
    """Why ``path`` can't be used (strerror), or None if it exists (access(F_OK) semantics)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


# --- version ------------------------------------------------------------------------------

def git_commit() -> str:
    """``git describe`` of the source tree pyslirp runs from, or "unknown" outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # An installed copy (no .git beside the package) needs no git process: -v stays fast.
    if not os.path.exists(os.path.join(root, ".git")):
        return "unknown"
    import subprocess

    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        # An installed copy may sit inside somebody else's repository: that commit isn't ours.
        if os.path.realpath(top) != os.path.realpath(root):
            return "unknown"
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out or "unknown"


def version_text() -> str:
    """``-v`` output in slirp4netns's line layout (runc-style, machine-parsable)."""
    return (f"{PROG} version {__version__}\n"
            f"commit: {git_commit()}\n"
            f"libslirp: {PROG}-{__version__}\n"
            f"SLIRP_CONFIG_VERSION_MAX: {SLIRP_CONFIG_VERSION_MAX}\n"
            f"libseccomp: {_libseccomp_version()}\n")


def _libseccomp_version() -> str:
    """slirp4netns prints the libseccomp it links; ours is loaded only if installed."""
    try:
        from pyslirp.runtime.seccomp import libseccomp_version
    except (ImportError, OSError):  # pragma: no cover - ctypes always imports on Linux
        return "(not used)"
    return libseccomp_version() or "(not installed; built-in BPF filter)"


# --- parse_args ---------------------------------------------------------------------------

def parse_args(argv: list[str]) -> Options:
    """Parse a command line (without the program name) into checked :class:`Options`.

    Raises :class:`UsageError` for a bad command line and :class:`InfoRequested`
    for ``--help``/``--version``.
    """
    if argv and argv[0] == "run":
        return _parse_run(argv[1:])
    opts = Options()
    positionals: list[str] = []
    texts = _LaterChecked()
    for opt, value in _getopt(argv, _SERVE_OPTS, positionals, permute=True):
        if not _serve_option(opts, opt.long, value, texts):
            texts.cidr, texts.mac = _common_option(opts, opt.long, value, texts.cidr, texts.mac)
    if texts.cidr6 is not None:
        if not opts.enable_ipv6:
            raise UsageError("--cidr6 applies only with -6/--enable-ipv6")
        from pyslirp.stack.config import ConfigError, parse_cidr6  # a rare option: pay here
        try:
            opts.cidr6 = parse_cidr6(texts.cidr6)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    # The checks slirp4netns makes after its getopt loop, in its order.
    if texts.mac is not None and not opts.configure:
        raise UsageError("--macaddr cannot be specified when --configure or -c is not specified")
    if opts.target_type != "netns":
        _finish_qemu(opts, positionals, texts.mac)
        _finish(opts, texts.cidr, None)
        return opts
    _finish_target(opts, positionals)
    _finish(opts, texts.cidr, texts.mac)
    return opts


class _LaterChecked:
    """Option texts checked after the loop, in slirp4netns's order (CIDR, MAC) or ours."""

    __slots__ = ("cidr", "mac", "cidr6")

    def __init__(self) -> None:
        self.cidr: str | None = None
        self.mac: str | None = None
        self.cidr6: str | None = None


def _serve_option(opts: Options, name: str, value: str | None,
                  texts: _LaterChecked) -> bool:
    """Apply an option only the serving form has; False if it is a common one."""
    if name == "configure":
        opts.configure = True
    elif name == "exit-fd":
        opts.exit_fd = _parse_fd(_val(value), "exit-fd")
    elif name == "ready-fd":
        opts.ready_fd = _parse_fd(_val(value), "ready-fd")
    elif name == "enable-ipv6":
        opts.enable_ipv6 = True
    elif name == "cidr6":
        texts.cidr6 = _val(value)
    elif name == "enable-sandbox":
        opts.enable_sandbox = True
    elif name == "enable-seccomp":
        opts.enable_seccomp = True
    elif name == "outbound-addr":
        opts.outbound_addr = _parse_outbound(_val(value), 4)
    elif name == "outbound-addr6":
        opts.outbound_addr6 = _parse_outbound(_val(value), 6)
    elif name == "netns-type":
        if value == "pid":
            opts.netns_type = "pid"
        elif value == "path":
            opts.netns_type = "path"
        else:
            raise UsageError('--netns-type must be either "pid" or "path"')
    elif name == "userns-path":
        path = _val(value)
        if _path_error(path) is not None:
            raise UsageError(f"userns path doesn't exist: {path}")
        opts.userns_path = path
    elif name == "target-type":
        if value not in ("netns", "qemu-stream", "qemu-dgram"):
            raise UsageError("--target-type must be one of netns, qemu-stream, qemu-dgram "
                             f"(not '{value}')")
        opts.target_type = value  # type: ignore[assignment]
    elif name == "api-socket":
        # slirp4netns takes any string (an empty one fails at bind time); we say so now.
        if not value:
            raise UsageError("--api-socket needs a path")
        opts.api_socket = value
    elif name == "version":
        raise InfoRequested(version_text())
    else:
        return False
    return True


def _finish_target(opts: Options, positionals: list[str]) -> None:
    """PID|PATH [TAPNAME] [extra...] for ``--target-type=netns``."""
    if not positionals:
        raise UsageError(f"missing PID|PATH argument (see '{PROG} --help')")
    target = positionals[0]
    if opts.netns_type == "pid":
        pid = _strtol(target)
        if pid is None or pid <= 0:
            raise UsageError("PID must be a positive integer")
        opts.target = str(pid)
    else:
        why = _path_error(target)
        if why is not None:
            raise UsageError(f"existing path expected when --netns-type=path: {target}: {why}")
        opts.target = target
    if len(positionals) > 1:
        opts.tapname = _parse_tapname(positionals[1])
    opts.extra_args = positionals[2:]


def _finish_qemu(opts: Options, positionals: list[str], mac_text: str | None) -> None:
    """``--target-type=qemu-*``: one positional, the socket; no namespace options."""
    if opts.netns_type != DEFAULT_NETNS_TYPE or opts.userns_path is not None:
        raise UsageError("--netns-type and --userns-path apply only to --target-type=netns")
    if opts.configure or mac_text is not None:
        raise UsageError("--configure and --macaddress apply only to --target-type=netns "
                         "(a VM configures its own NIC by DHCP)")
    if not positionals or not positionals[0]:
        raise UsageError(f"missing SOCKET argument for --target-type={opts.target_type}")
    if len(positionals) > 1:
        raise UsageError(f"--target-type={opts.target_type} takes one SOCKET argument, "
                         f"not also '{positionals[1]}'")
    opts.target = positionals[0]


def _parse_run(argv: list[str]) -> Options:
    opts = Options(subcommand="run", configure=True)
    positionals: list[str] = []
    cidr_text: str | None = None
    mac_text: str | None = None
    for opt, value in _getopt(argv, _RUN_OPTS, positionals, permute=False):
        cidr_text, mac_text = _common_option(opts, opt.long, value, cidr_text, mac_text)
    if not positionals:
        raise UsageError(f"missing command to run ({PROG} run [RUN-OPTION]... [--] COMMAND "
                         "[ARG]...)")
    opts.command = positionals
    _finish(opts, cidr_text, mac_text)
    return opts


def _common_option(opts: Options, name: str, value: str | None, cidr_text: str | None,
                   mac_text: str | None) -> tuple[str | None, str | None]:
    """Apply an option shared by both forms; CIDR and MAC text are returned for later checks."""
    if name == "help":
        raise InfoRequested(usage_text())
    if name == "mtu":
        opts.mtu = _parse_mtu(_val(value))
    elif name == "cidr":
        cidr_text = _val(value)
    elif name == "disable-host-loopback":
        opts.disable_host_loopback = True
    elif name == "disable-dns":
        opts.disable_dns = True
    elif name == "macaddress":
        mac_text = _val(value)
    elif name == "dns-upstream":
        opts.dns_upstreams.append(_parse_dns_upstream(_val(value)))
    elif name == "pcap":
        if not value:
            raise UsageError("--pcap needs a file name")
        opts.pcap = value
    elif name == "log-level":
        level = _val(value).lower()
        if level not in LOG_LEVEL_NAMES:
            raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVEL_NAMES)} "
                             f"(not '{value}')")
        opts.log_level = level
    elif name == "no-offload":
        opts.offload = False
    elif name == "busy-poll":
        text = _val(value)
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_BUSY_POLL_US:
            raise UsageError(f"--busy-poll must be microseconds from 0 to {MAX_BUSY_POLL_US} "
                             f"(not '{value}')")
        opts.busy_poll_us = int(text)
    elif name == "max-buffered":
        size = _parse_size("--max-buffered", _val(value))
        from pyslirp.stack.config import MIN_MAX_BUFFERED  # a rare option: pay here

        if size < MIN_MAX_BUFFERED:
            raise UsageError(f"--max-buffered must be at least {MIN_MAX_BUFFERED >> 20}M "
                             f"(not '{value}')")
        opts.max_buffered = size
    else:  # pragma: no cover - every table entry is handled above
        raise AssertionError(name)
    return cidr_text, mac_text


def _finish(opts: Options, cidr_text: str | None, mac_text: str | None) -> None:
    """Checks slirp4netns makes after parsing (CIDR, MAC) plus the stack's own (NetConfig)."""
    if cidr_text is not None:
        opts.cidr = _parse_cidr(cidr_text)
    if mac_text is not None:
        opts.macaddress = _parse_mac(mac_text)
    # NetConfig's own checks, made without importing the stack ("Start-up order");
    # the runtime builds the NetConfig later, and tests/test_cli.py checks both agree.
    try:
        netparams.check_mtu(opts.mtu)
    except NetParamError as exc:
        raise UsageError(str(exc)) from None
    if opts.enable_ipv6:
        from pyslirp.wire.ipv6 import MIN_MTU as IPV6_MIN_MTU

        if opts.mtu < IPV6_MIN_MTU:
            raise UsageError(f"MTU {opts.mtu} is too small for IPv6 (at least "
                             f"{IPV6_MIN_MTU}, RFC 8200)")


def _parse_tapname(text: str) -> str:
    # The kernel's IFNAMSIZ is 16 with the NUL; slirp4netns silently truncates, which
    # would leave the caller looking for an interface that isn't there.
    try:
        return netparams.check_ifname(text)
    except NetParamError as exc:
        if exc.kind == netparams.RESERVED:  # slirp4netns would fail later, in the kernel
            raise UsageError(f"invalid TAPNAME '{text}': {exc}") from None
        raise UsageError(f"invalid TAPNAME '{text}': must be 1-15 bytes without '/' or "
                         "spaces") from None


def _parse_size(option: str, text: str) -> int:
    """BYTES with an optional K/M/G suffix (binary multiples)."""
    import re  # only for this rare option: re costs start-up time

    match = re.fullmatch(r"([0-9]+)([KMG]?)", text.strip().upper())
    if match is None or not text.isascii():
        raise UsageError(f"{option} must be a byte count, optionally with a K, M or G suffix "
                         f"(not '{text}')")
    return int(match.group(1)) * _SIZE_SUFFIXES[match.group(2)]


def _val(value: str | None) -> str:
    if value is None:  # pragma: no cover - _getopt always supplies an argument when required
        raise AssertionError("option argument missing")
    return value


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The ``pyslirp`` console entry point; returns the process exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "shim":
        from pyslirp.shim import main as shim_main

        return shim_main(argv[1:])
    if argv and argv[0] == "cni":
        # `pyslirp cni install DIR`: the CNI plugin's own small parser (pyslirp.cni).
        from pyslirp.cni.install import main as cni_main
        return cni_main(argv[1:])
    if argv and argv[0] == "stats":
        from pyslirp.stats import main as stats_main  # a client: no runtime, no logging set-up

        return stats_main(argv[1:])
    if argv and argv[0] == "kubevirt-sidecar":
        # Its own parser and dependencies (grpcio), loaded only when asked for.
        from pyslirp.kubevirt.sidecar import main as sidecar_main

        return sidecar_main(argv[1:])
    try:
        opts = parse_args(argv)
    except InfoRequested as info:
        sys.stdout.write(info.text)
        sys.stdout.flush()
        return 0
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        if opts.subcommand == "serve" and opts.target_type == "netns":
            return _serve_namespace(opts, argv)
        return _serve_other(opts)
    except KeyboardInterrupt:
        # The runtime handles SIGINT once its loop runs; this covers the moments before.
        return 128 + 2


def _start_logging(opts: Options) -> logging.Logger:
    """Logging on stderr at the asked level, and the warnings about the command line."""
    import logging

    from pyslirp.logsetup import setup_logging

    setup_logging(opts.log_level)
    log = logging.getLogger(PROG)
    for warning in _command_line_warnings(opts):
        log.warning("%s", warning)
    return log


def _command_line_warnings(opts: Options) -> list[str]:
    """What the command line is warned about at start (by logging, or by the shared
    mode's caller, which sets up no logging)."""
    warnings = []
    if opts.extra_args:
        warnings.append("too many arguments")
    return warnings


def _serve_namespace(opts: Options, argv: list[str]) -> int:
    """slirp4netns's job, in the "Start-up order" of the module doc: TAP, ready, engine.

    With ``PYSLIRP_SHARED_ENGINE=1`` the TAP and API socket go to the shared engine
    instead (pyslirp.cni.shared_shim) and the engine is never imported here.
    """
    import gc

    from pyslirp.runtime.ready import trap_stop_signals, write_ready

    shared = os.environ.get("PYSLIRP_SHARED_ENGINE", "")
    if shared not in ("", "0", "1"):
        print(f"{PROG}: PYSLIRP_SHARED_ENGINE must be 1 (shared engine) or 0 (one process "
              f"per namespace), not {shared!r}", file=sys.stderr)
        return 1
    # Imports make garbage that is nearly all live: collecting during start-up costs
    # ~8 ms and frees next to nothing. The server's loop turns the collector back on
    # after the ready byte (runtime/malloc.py's freeze_startup_objects).
    gc.disable()
    trap_stop_signals()  # a caller may stop us before the engine's loop runs
    # With --enable-sandbox/--enable-seccomp the byte waits for them, as slirp4netns's
    # does (a caller may check the hardening as soon as it has the byte), and they wait
    # for the engine: so it is imported while the forked helper makes the TAP. The
    # shared mode never imports the engine.
    hardened = opts.enable_sandbox or opts.enable_seccomp
    engine_first = hardened and shared != "1"
    pending = _start_tap(opts)
    log: logging.Logger | None = None
    serve: Any = None
    if engine_first and not isinstance(pending, str):
        log = _start_logging(opts)
        serve = _load_engine(log)
    tap = pending if isinstance(pending, str) else _finish_tap(pending)
    if isinstance(tap, str):
        (log or _start_logging(opts)).error("%s", tap)
        return 1
    if engine_first and serve is None:  # the engine failed to load (logged)
        tap.close()
        return 1
    listener = None
    if opts.api_socket is not None:  # slirp4netns's order: TAP, API socket, ready
        from pyslirp.api_listen import bind_unix

        try:
            listener = bind_unix(opts.api_socket)
        except OSError as exc:
            tap.close()
            (log or _start_logging(opts)).error("%s", exc)
            return 1
    if shared == "1":
        return _hand_over(opts, argv, tap, listener)
    problem = None if hardened else write_ready(opts.ready_fd)
    if log is None:
        log = _start_logging(opts)
    if problem:
        log.warning("%s", problem)
    if serve is None:
        serve = _load_engine(log)
        if serve is None:
            tap.close()
            return 1
    return int(serve(opts.serve_spec(ready_signalled=not hardened, api_listener=listener),
                     tap=tap))


def _hand_over(opts: Options, argv: list[str], tap: TapHandle, listener: Any) -> int:
    """``PYSLIRP_SHARED_ENGINE=1``: the TAP and the API socket go to the shared engine."""
    from pyslirp.cni import shared_shim  # after the TAP: tests/startup_imports.json

    for warning in _command_line_warnings(opts):  # logging's format, without logging
        print(f"{PROG}: WARNING: {warning}", file=sys.stderr)
    return shared_shim.serve_shared(argv, tap, listener, ready_fd=opts.ready_fd,
                                    exit_fd=opts.exit_fd, sandbox=opts.enable_sandbox,
                                    log_info=opts.log_level in ("debug", "info"))


def _load_engine(log: logging.Logger) -> Any:
    """``pyslirp.runtime.main.serve_namespace``, or None (logged) if the runtime is missing."""
    try:
        from pyslirp.runtime.main import serve_namespace
    except ImportError as exc:
        log.error("the runtime is not available: %s", exc)
        return None
    return serve_namespace


def _start_tap(opts: Options) -> PendingTap | str:
    """Fork the helper that opens the TAP for ``opts``, or the one-line reason it cannot."""
    from pyslirp.runtime.tap import ConfigureSpec, start_open_tap

    # slirp4netns sets MTU and MAC only with --configure; without it the TAP is left as is.
    configure = ConfigureSpec.for_network(opts.cidr, opts.enable_ipv6) if opts.configure \
        else None
    try:
        return start_open_tap(opts.target, opts.netns_type, tapname=opts.tapname,
                              userns_path=opts.userns_path,
                              mtu=opts.mtu if opts.configure else None, configure=configure,
                              mac=opts.macaddress if opts.configure else None,
                              vnet_hdr=opts.offload, offload=opts.offload)
    except (OSError, RuntimeError, ValueError) as exc:
        return str(exc)


def _finish_tap(pending: PendingTap) -> TapHandle | str:
    """The TAP the helper made, or the one-line reason it could not."""
    try:
        return pending.wait()
    except (OSError, RuntimeError, ValueError) as exc:
        return str(exc)


def _serve_other(opts: Options) -> int:
    """``pyslirp run`` and the QEMU back ends: no TAP to open first."""
    log = _start_logging(opts)
    try:
        from pyslirp.runtime.main import run_command
    except ImportError as exc:
        log.error("the runtime is not available: %s", exc)
        return 1
    spec = opts.serve_spec()
    if opts.subcommand == "run":
        return run_command(spec)
    from pyslirp.runtime.qemu import serve_qemu

    return serve_qemu(spec)
