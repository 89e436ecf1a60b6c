"""The ``slirp`` CNI plugin executable: one short-lived process per CNI verb.

Theory of operation
-------------------
A CNI runtime (libcni in podman, containerd, CRI-O, cnitool) runs the plugin
once per verb with the request in environment variables (``CNI_COMMAND``,
``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``)
and the network configuration as JSON on stdin, and reads one JSON document
(a result or an error) from stdout (CNI spec 1.1.0, "Execution Protocol",
"Result Types" and "Error" sections). Logs go to stderr only.

A Python interpreter that imports an event loop and the stack costs ~22 MB and
tens of milliseconds, too much per container. So this module is deliberately
small: it imports only ``os``, ``sys``, ``_socket`` and ``_json`` (no ``typing``,
no ``ipaddress``, not even ``json``, whose ``re`` import is half of a bare
interpreter's startup: :func:`loads`/:func:`dumps` below are a strict RFC 8259
parser and a compact encoder built on ``_json``'s C string scanner), validates the request
itself, and hands the work to ONE engine daemon (:mod:`pyslirp.cni.daemon`) per
runtime directory over a Unix socket, starting it on demand. The daemon serves
every container's TAP from one loop, writes one state file per attachment and
exits when the last attachment is deleted.

State files (``RUNDIR/attachments/NETWORK:CONTAINERID:IFNAME.json``, written
atomically by the daemon) name the daemon by pid + process start time
(``/proc/PID/stat`` field 22) + boot id, so a reused pid is never mistaken for
the engine. Verbs therefore work when the engine died:

* DEL of an attachment whose engine is gone starts a fresh engine, which
  removes the TAP if it is still there and deletes the state file; DEL of an
  unknown attachment succeeds without starting anything;
* CHECK reports the dead engine as an error;
* GC removes every attachment of the network not in
  ``cni.dev/valid-attachments``, live or stale.

Nobody else gets in: the runtime directory (``/tmp/pyslirp-UID`` is a name
any local user can take first) must be a directory of our uid with no group
or other access, made 0700 when missing (:func:`prepare_runtime_dir`); its
files are opened with ``O_NOFOLLOW`` and must be ours (:func:`open_private`);
the engine on ``engine.sock`` must run as our uid or root (``SO_PEERCRED``,
:func:`connect_engine`). The engine applies the same checks from its side.

Results are built in the 1.1.0 shape and converted to the version the
configuration asks for (``ips[].version`` before 1.0.0; no interface ``mtu``
before 1.1.0). With ``"ipv6": true`` (``cidr6`` picks the /64, fd00::/64 by
default) the result also lists the static IPv6 address prefix + 0x100 (the
engine sets it, with a default route via prefix + 2), and DNS at prefix + 3.
What this module deliberately does not do: IPAM (an ``ipam`` section is
rejected) and any packet work.

Error codes: the spec's 1 (incompatible version), 2 (unsupported field),
4 (invalid environment variable), 6 (undecodable JSON), 7 (invalid
configuration), 11 (try again later), 50 (STATUS: ADD would fail now), plus
the plugin's own :data:`ERR_ENGINE` and following.
"""

from __future__ import annotations

import _socket as socket  # the C module: `socket` pulls in enum, ~8 ms of startup
import os
import sys
from _json import encode_basestring_ascii as _encode_str
from _json import scanstring as _scanstring

from pyslirp.procfs import process_start_time
from pyslirp.runtime.unixsock import peer_credentials as peer_credentials
from pyslirp.wire import netparams
from pyslirp.wire.netparams import DEFAULT_CIDR, DEFAULT_MTU, MAX_MTU, MIN_MTU, NetParamError

#: As slirp4netns's and ``pyslirp -6``'s (pyslirp.stack.config.DEFAULT_CIDR6).
DEFAULT_CIDR6 = "fd00::/64"
#: IPv6 needs a link MTU of at least 1280 (RFC 8200 5; pyslirp.wire.ipv6.MIN_MTU).
IPV6_MIN_MTU = 1280

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - typing costs ~10 ms of startup; mypy only
    from typing import Any, TextIO

CURRENT_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

# Well-known error codes (CNI spec 1.1.0, "Error").
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_NOT_AVAILABLE_EXISTING = 51
# The plugin's own codes (100 and up).
ERR_ENGINE = 100            #: the engine could not be started or reached
ERR_NO_ATTACHMENT = 101     #: CHECK of an attachment that does not exist
ERR_ENGINE_GONE = 102       #: the engine serving the attachment died
ERR_CHECK_FAILED = 103      #: interface, address or route missing or wrong
ERR_SETUP_FAILED = 104      #: the TAP could not be created or configured
ERR_EXISTS = 105            #: ADD of an attachment that already exists
ERR_UNSAFE = 106            #: the runtime directory, a file in it or the engine is not trusted

#: Top-level configuration keys and what they mean to us.
KNOWN_KEYS = frozenset({
    "cniVersion", "name", "type", "mtu", "dns", "cidr", "ipv6", "cidr6", "disableHostLoopback",
    "macAddress", "dnsUpstreams", "runtimeDir", "capabilities", "runtimeConfig", "args",
    "prevResult",
    "cni.dev/valid-attachments",
})
#: runtimeConfig keys that would change behaviour and that we cannot honour.
UNSUPPORTED_RUNTIME_KEYS = frozenset({"ips", "ipRanges", "bandwidth", "infinibandGUID",
                                      "deviceID", "cgroupPath"})

#: How long a verb waits for the engine to start listening, and for its answer.
ENGINE_START_TIMEOUT = 20.0
ENGINE_REPLY_TIMEOUT = 60.0

#: engine.log is moved to engine.log.1 when an engine starts and finds it bigger.
LOG_ROTATE_BYTES = 4 << 20

DAEMON_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from pyslirp.cni.daemon import main; sys.exit(main(sys.argv[2:]))")


# ------------------------------------------------------------------ JSON without `json`

_WS = " \t\n\r"
_DIGITS = "0123456789"


def loads(text: str) -> Any:
    """Parse one JSON document (RFC 8259, strict: no NaN, no trailing data).

    Errors raise ValueError. Strings go through ``_json.scanstring``, the C
    routine ``json`` itself uses, so escapes and surrogates behave the same.
    """
    value, end = _value(text, _skip(text, 0), 0)
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data at offset {end}")
    return value


def _skip(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _value(s: str, i: int, depth: int) -> tuple[Any, int]:
    if depth > 200:
        raise ValueError("JSON nested too deeply")
    if i >= len(s):
        raise ValueError("unexpected end of JSON")
    c = s[i]
    if c == '"':
        return _scanstring(s, i + 1, True)
    if c == "{":
        obj: dict[str, Any] = {}
        i = _skip(s, i + 1)
        if s[i:i + 1] == "}":
            return obj, i + 1
        while True:
            if s[i:i + 1] != '"':
                raise ValueError(f"expected a property name at offset {i}")
            key, i = _scanstring(s, i + 1, True)
            i = _skip(s, i)
            if s[i:i + 1] != ":":
                raise ValueError(f"expected ':' at offset {i}")
            obj[key], i = _value(s, _skip(s, i + 1), depth + 1)
            i = _skip(s, i)
            c = s[i:i + 1]
            if c == "}":
                return obj, i + 1
            if c != ",":
                raise ValueError(f"expected ',' or '}}' at offset {i}")
            i = _skip(s, i + 1)
    if c == "[":
        arr: list[Any] = []
        i = _skip(s, i + 1)
        if s[i:i + 1] == "]":
            return arr, i + 1
        while True:
            item, i = _value(s, i, depth + 1)
            arr.append(item)
            i = _skip(s, i)
            c = s[i:i + 1]
            if c == "]":
                return arr, i + 1
            if c != ",":
                raise ValueError(f"expected ',' or ']' at offset {i}")
            i = _skip(s, i + 1)
    for word, val in (("true", True), ("false", False), ("null", None)):
        if s.startswith(word, i):
            return val, i + len(word)
    return _number(s, i)


def _number(s: str, i: int) -> tuple[Any, int]:
    n = len(s)
    j = i + (s[i] == "-")

    def digits(k: int) -> int:
        start = k
        while k < n and s[k] in _DIGITS:
            k += 1
        if k == start:
            raise ValueError(f"invalid JSON value at offset {i}")
        return k

    if j < n and s[j] == "0":
        j += 1
    else:
        j = digits(j)
    is_float = False
    if j < n and s[j] == ".":
        j = digits(j + 1)
        is_float = True
    if j < n and s[j] in "eE":
        j += 1
        if j < n and s[j] in "+-":
            j += 1
        j = digits(j)
        is_float = True
    text = s[i:j]
    return (float(text) if is_float else int(text)), j


def dumps(value: Any) -> str:
    """Compact JSON for dicts, lists, strings, ints, floats, booleans and None."""
    if isinstance(value, str):
        return str(_encode_str(value))
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("NaN and infinities are not JSON")
        return float.__repr__(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_encode_str(str(k))}: {dumps(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


class CniError(Exception):
    """An error the plugin reports as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# ------------------------------------------------------------------ runtime directory


def _in_initial_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return True
    return fields[:3] == ["0", "0", "4294967295"]


def runtime_dir(environ: dict[str, str], conf: dict[str, Any] | None = None) -> str:
    """Where the engine's socket and the state files live.

    The configuration's ``runtimeDir`` wins (it reaches every verb: runtimes
    such as podman run DEL from a cleanup process with a scrubbed
    environment), then ``PYSLIRP_RUNDIR``; otherwise root in the initial user
    namespace uses ``/run/pyslirp``, anyone else (including root inside a
    rootless runtime's user namespace) ``$XDG_RUNTIME_DIR/pyslirp``.
    """
    configured = (conf or {}).get("runtimeDir")
    if configured is not None:
        if not isinstance(configured, str) or not configured.startswith("/"):
            raise CniError(ERR_INVALID_CONFIG,
                           f"invalid runtimeDir {configured!r}: expected an absolute path")
        return configured
    override = environ.get("PYSLIRP_RUNDIR")
    if override:
        return override
    xdg = environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 and (_in_initial_userns() or not xdg):
        return "/run/pyslirp"
    if xdg:
        return os.path.join(xdg, "pyslirp")
    return f"/tmp/pyslirp-{os.geteuid()}"


def attachments_dir(rundir: str) -> str:
    return os.path.join(rundir, "attachments")


def socket_path(rundir: str) -> str:
    return os.path.join(rundir, "engine.sock")


def state_path(rundir: str, network: str, container_id: str, ifname: str) -> str:
    # ':' cannot occur in any of the three (names and ids are checked below).
    return os.path.join(attachments_dir(rundir), f"{network}:{container_id}:{ifname}.json")


_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000


def _check_private_dir(path: str) -> None:
    """``path`` must be a real directory of our uid that nobody else may enter.

    Anyone who can write into the runtime directory (or owns it) can plant
    symlinks where our files go, state files that the engine acts on, or a
    socket that impersonates the engine; anyone who can read it learns the
    containers. So it must be ours, mode 0700 or stricter, and not a symlink.
    """
    st = os.lstat(path)
    euid = os.geteuid()
    mode = st.st_mode & 0o7777
    what = f"{path} (owner uid {st.st_uid}, mode {mode:04o})"
    if st.st_mode & _S_IFMT != _S_IFDIR:
        kind = "a symbolic link" if st.st_mode & _S_IFMT == _S_IFLNK else "not a directory"
        raise CniError(ERR_UNSAFE, f"unsafe runtime directory {what}: it is {kind}; "
                       f"expected a directory of uid {euid} with mode 0700")
    if st.st_uid != euid:
        raise CniError(ERR_UNSAFE, f"unsafe runtime directory {what}: it belongs to another "
                       f"user; expected a directory of uid {euid} (this plugin's user) with "
                       "mode 0700 (remove it, or set runtimeDir)")
    if st.st_mode & 0o077:
        raise CniError(ERR_UNSAFE, f"unsafe runtime directory {what}: group or others have "
                       "access; expected mode 0700 (chmod 700 it)")


def prepare_runtime_dir(rundir: str, create: bool) -> bool:
    """Check (and with ``create`` make, mode 0700) ``rundir`` and its ``attachments``.

    Returns False when ``rundir`` does not exist and ``create`` is false:
    nothing can be recorded there. Raises :class:`CniError` (ERR_UNSAFE) for a
    directory that someone else owns or may enter. Missing parents are made
    with the default mode; they are the runtime's or the administrator's choice.
    """
    if create:
        parent = os.path.dirname(rundir.rstrip("/"))
        if parent:
            os.makedirs(parent, exist_ok=True)
    for path in (rundir, attachments_dir(rundir)):
        if create:
            try:  # noqa: SIM105 - contextlib is outside this module's import budget
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        try:
            _check_private_dir(path)
        except FileNotFoundError:
            if path == rundir:
                return False
    return True


def _symlink_refused(path: str, exc: OSError) -> CniError | OSError:
    """O_NOFOLLOW's ELOOP as a clear error; any other failure unchanged."""
    try:
        is_link = os.lstat(path).st_mode & _S_IFMT == _S_IFLNK
    except OSError:
        is_link = False
    if is_link:
        return CniError(ERR_UNSAFE, f"{path} is a symbolic link: refusing to follow it "
                        "(remove it)")
    return exc


def open_private(path: str, flags: int) -> int:
    """Open a file of the runtime directory: never through a symlink, only if it is ours.

    ``flags`` may include ``O_CREAT`` (the file is made mode 0600); the result
    is a regular file owned by our uid, or CniError (ERR_UNSAFE) naming it.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        raise _symlink_refused(path, exc) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & _S_IFMT != _S_IFREG or st.st_uid != os.geteuid():
            raise CniError(ERR_UNSAFE, f"unsafe file {path} (owner uid {st.st_uid}, mode "
                           f"{st.st_mode & 0o7777:04o}): expected a regular file of uid "
                           f"{os.geteuid()} (remove it)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(path: str) -> dict[str, Any] | None:
    """The state file at ``path``: None if there is none, {} if it is not to be used.

    Only a regular file of our own uid, opened without following a symlink,
    is read: anything else planted there is "unreadable", which DEL and GC
    remove (the entry, never what a symlink points to) without acting on it.
    """
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except (OSError, CniError):
        return {}  # unreadable or not ours: treated as stale by everyone
    try:
        chunks = []
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        state = loads(b"".join(chunks).decode())
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return state if isinstance(state, dict) else {}


def write_state(path: str, state: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old file, the new file, or none.

    The temporary is created with O_EXCL|O_NOFOLLOW: whatever already has its
    name (a crashed writer's leftover, something planted) is removed, never
    written through.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:
        os.unlink(tmp)  # unlink removes a symlink itself, not its target
        fd = os.open(tmp, flags, 0o600)
    try:
        # No fsync: the runtime directory is a tmpfs (/run, $XDG_RUNTIME_DIR) that does
        # not outlive a reboot, and rename() is atomic against our own crashes.
        os.write(fd, dumps(state).encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def list_states(rundir: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        names = os.listdir(attachments_dir(rundir))
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names):
        if name.endswith(".json"):
            path = os.path.join(attachments_dir(rundir), name)
            state = read_state(path)
            if state is not None:
                out.append((path, state))
    return out


# ------------------------------------------------------------------ engine identity


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def own_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start": process_start_time(pid), "boot": boot_id()}


def identity_alive(ident: Any) -> bool:
    """Whether the process named by ``ident`` (pid, start time, boot id) still runs."""
    if not isinstance(ident, dict):
        return False
    pid = ident.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if ident.get("boot") != boot_id():
        return False
    start = process_start_time(pid)
    return start is not None and start == ident.get("start")


# ------------------------------------------------------------------ validation


def _is_name(text: Any) -> bool:
    """CNI's rule for container ids and network names: ^[A-Za-z0-9][A-Za-z0-9_.-]*$."""
    if not isinstance(text, str) or not text or not text.isascii():
        return False
    if not text[0].isalnum():
        return False
    return all(c.isalnum() or c in "_.-" for c in text)


def _ifname_problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return "must be a string"
    try:
        netparams.check_ifname(name)
    except NetParamError as exc:
        return str(exc)
    return None


def netns_problem(path: Any) -> str | None:
    """A network namespace path: absolute (the engine's cwd is not the runtime's), existing."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        return "must be an absolute path"
    if not os.path.exists(path):
        return "does not exist"
    return None


NAME_RULE = "must start with an alphanumeric character, then alphanumerics, '_', '.' or '-'"


def request_problem(op: Any, request: dict[str, Any]) -> str | None:
    """What is wrong with the names and paths of an engine request, by the plugin's rules.

    The engine applies this to every request it receives, so a client other
    than this plugin cannot make it use a path outside the runtime directory
    (names become file names there) or a netns the plugin would have refused.
    """
    network = request.get("network")
    if op == "add":
        settings = request.get("settings")
        network = settings.get("network") if isinstance(settings, dict) else None
    if op in ("add", "del", "check", "gc") and not _is_name(network):
        return f"invalid network name {network!r}: {NAME_RULE}"
    if op in ("add", "del", "check"):
        cid = request.get("containerID")
        if not _is_name(cid):
            return f"invalid containerID {cid!r}: {NAME_RULE}"
        problem = _ifname_problem(request.get("ifname"))
        if problem:
            return f"invalid ifname {request.get('ifname')!r}: {problem}"
    if op in ("add", "check"):
        problem = netns_problem(request.get("netns"))
        if problem:
            return f"invalid netns {request.get('netns')!r}: {problem}"
    if op == "stats":
        cid = request.get("containerID")
        if not _is_name(cid):
            return f"invalid containerID {cid!r}: {NAME_RULE}"
        ifname = request.get("ifname")
        problem = None if ifname is None else _ifname_problem(ifname)
        if problem:
            return f"invalid ifname {ifname!r}: {problem}"
    if op == "gc":
        valid = request.get("valid")
        if not isinstance(valid, list) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                for v in valid):
            return "invalid valid-attachments list: expected [[containerID, ifname], ...]"
    return None


def _parse_ipv4(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return netparams.parse_ipv4(text)
    except NetParamError:
        return None


_ipv4_text = netparams.format_ipv4


def _parse_cidr(text: Any) -> tuple[int, int]:
    """``a.b.c.d/n`` with n in 1..25 (room for .2, .3, .15.. and .100) and no host bits."""
    if not isinstance(text, str):
        raise CniError(ERR_INVALID_CONFIG, f"invalid cidr {text!r}: expected a.b.c.d/prefix")
    try:
        return netparams.parse_cidr(text)
    except NetParamError as exc:
        if exc.kind == netparams.PREFIX:
            problem = "prefix must be 1..25"
        elif exc.kind == netparams.HOST_BITS:
            problem = "host bits are set"
        else:
            problem = "expected a.b.c.d/prefix"
        raise CniError(ERR_INVALID_CONFIG, f"invalid cidr {text!r}: {problem}") from None


def _parse_cidr6(text: Any) -> int:
    """``cidr6``: a /64 network address of a unicast prefix (netparams' rule for --cidr6)."""
    syntax = "expected an IPv6 PREFIX/64 such as fd00::/64"
    if not isinstance(text, str):
        raise CniError(ERR_INVALID_CONFIG, f"invalid cidr6 {text!r}: {syntax}")
    try:
        return netparams.parse_cidr6(text)[0]
    except NetParamError as exc:
        problem = syntax if exc.kind == netparams.SYNTAX else str(exc)
        raise CniError(ERR_INVALID_CONFIG, f"invalid cidr6 {text!r}: {problem}") from None


def _parse_ipv6_settings(conf: dict[str, Any], mtu: int) -> dict[str, Any]:
    """``ipv6`` and ``cidr6``: the static IPv6 address, gateway and DNS of the attachment.

    The plugin sets the address itself (prefix + 0x100, like IPv4's + 100) so
    that the result can name it: a SLAAC address is only known once the
    container's kernel has made it.
    """
    ipv6 = conf.get("ipv6", False)
    if not isinstance(ipv6, bool):
        raise CniError(ERR_INVALID_CONFIG, f"invalid ipv6 {ipv6!r}: expected true/false")
    if not ipv6:
        if "cidr6" in conf:
            raise CniError(ERR_INVALID_CONFIG, "invalid cidr6: it applies only with "
                           '"ipv6": true')
        return {"ipv6": False}
    if mtu < IPV6_MIN_MTU:
        raise CniError(ERR_INVALID_CONFIG, f"invalid mtu {mtu}: IPv6 needs at least "
                       f"{IPV6_MIN_MTU} (RFC 8200)")
    net6 = _parse_cidr6(conf.get("cidr6", DEFAULT_CIDR6))
    return {"ipv6": True, "cidr6": f"{netparams.format_ipv6(net6)}/{netparams.CIDR6_PREFIXLEN}",
            "address6": netparams.format_ipv6(net6 + 0x100),
            "gateway6": netparams.format_ipv6(net6 + 2),
            "dns6": netparams.format_ipv6(net6 + 3)}


def _parse_mac(text: Any, field: str) -> str:
    """A unicast MAC as the canonical ``xx:xx:xx:xx:xx:xx`` the engine and results use."""
    syntax = "expected xx:xx:xx:xx:xx:xx"
    if not isinstance(text, str):
        raise CniError(ERR_INVALID_CONFIG, f"invalid {field} {text!r}: {syntax}")
    try:
        return netparams.format_mac(netparams.parse_mac(text))
    except NetParamError as exc:
        problem = syntax if exc.kind == netparams.SYNTAX else str(exc)
        raise CniError(ERR_INVALID_CONFIG, f"invalid {field} {text!r}: {problem}") from None


def _parse_upstream(text: Any) -> list[Any]:
    if not isinstance(text, str):
        raise CniError(ERR_INVALID_CONFIG, f"invalid dnsUpstreams entry {text!r}")
    try:
        host, port = netparams.parse_dns_upstream(text)
    except NetParamError as exc:
        raise CniError(ERR_INVALID_CONFIG,
                       f"invalid dnsUpstreams entry {text!r}: {exc}") from None
    return [host, port]


def _str_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CniError(ERR_INVALID_CONFIG, f"invalid {field}: expected a list of strings")
    return list(value)


def parse_version(conf: dict[str, Any]) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "missing cniVersion in the network configuration")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"incompatible CNI version: config is {version!r}, plugin supports "
                       f"{', '.join(SUPPORTED_VERSIONS)}")
    return version


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def parse_port_mappings(value: Any, network: str = "", ipv6: bool = False) -> list[dict[str, Any]]:
    """``runtimeConfig.portMappings`` as the portmap plugin reads it.

    ``hostIP`` is "" (every address: both families on an ``"ipv6": true``
    network), an IPv4 address, or with ``ipv6`` an IPv6 one (:func:`_host_ip6`),
    returned in its canonical spelling.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise CniError(ERR_INVALID_CONFIG, "invalid runtimeConfig.portMappings: expected a list")
    out = []
    for i, m in enumerate(value):
        where = f"runtimeConfig.portMappings[{i}]"
        if not isinstance(m, dict):
            raise CniError(ERR_INVALID_CONFIG, f"invalid {where}: expected an object")
        host_port, cont_port = m.get("hostPort"), m.get("containerPort")
        for name, port in (("hostPort", host_port), ("containerPort", cont_port)):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise CniError(ERR_INVALID_CONFIG, f"invalid {where}.{name}: {port!r}")
        proto = str(m.get("protocol") or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise CniError(ERR_INVALID_CONFIG, f"invalid {where}.protocol: {proto!r}")
        host_ip = m.get("hostIP") or ""
        if not isinstance(host_ip, str):
            raise CniError(ERR_INVALID_CONFIG, f"invalid {where}.hostIP: {host_ip!r} "
                           "(expected an IPv4 or IPv6 address)")
        if host_ip and ":" in host_ip:
            host_ip = _host_ip6(host_ip, f"{where}.hostIP", network, ipv6)
        elif host_ip and _parse_ipv4(host_ip) is None:
            raise CniError(ERR_INVALID_CONFIG, f"invalid {where}.hostIP: {host_ip!r} "
                           "(expected an IPv4 or IPv6 address)")
        out.append({"hostPort": host_port, "containerPort": cont_port, "protocol": proto,
                    "hostIP": host_ip})
    return out


def _host_ip6(text: str, field: str, network: str, ipv6: bool) -> str:
    """An IPv6 ``hostIP``: a host address to bind (``::``, ``::1``, one of the host's), as
    ``inet_ntop`` spells it; only on a network that serves IPv6."""
    try:
        canonical = netparams.parse_ipv6(text)
    except NetParamError:
        raise CniError(ERR_INVALID_CONFIG, f"invalid {field}: {text!r} (expected an IPv4 "
                       "or IPv6 address, without brackets)") from None
    if not ipv6:
        raise CniError(ERR_INVALID_CONFIG, f"invalid {field}: {text!r} is an IPv6 address, "
                       f"but network {network} serves IPv4 only (set \"ipv6\": true)")
    # The canonical text is lower case without leading zeros: a 4-digit first group
    # fe80..febf is link-local (fe80::/10), ff.. multicast; "::ffff:X:Y" IPv4-mapped.
    first = canonical.split(":")[0]
    if "%" in canonical:
        problem = "a zone (%IFNAME) is not served"
    elif len(first) == 4 and first[:3] in ("fe8", "fe9", "fea", "feb"):
        problem = "link-local host addresses are not served (they need a zone)"
    elif len(first) == 4 and first.startswith("ff"):
        problem = "a multicast address is no host address"
    elif canonical.startswith("::ffff:") and canonical.count(":") == 4:
        problem = "it is IPv4-mapped; use the IPv4 address"
    else:
        return canonical
    raise CniError(ERR_INVALID_CONFIG, f"invalid {field}: {text!r}: {problem}")


def parse_settings(conf: dict[str, Any], args: dict[str, str]) -> dict[str, Any]:
    """Validate the ``slirp`` configuration; return what the engine needs for ADD."""
    for key in conf:
        if key == "ipam":
            raise CniError(ERR_UNSUPPORTED_FIELD, "unsupported field ipam: the slirp plugin "
                           "assigns its own address (set cidr instead)")
        if key not in KNOWN_KEYS:
            raise CniError(ERR_UNSUPPORTED_FIELD,
                           f"unsupported field {key!r} in the slirp network configuration")
    if conf.get("type") != "slirp":
        raise CniError(ERR_INVALID_CONFIG, f"invalid type {conf.get('type')!r}: expected 'slirp'")
    name = conf.get("name")
    if not _is_name(name):
        raise CniError(ERR_INVALID_CONFIG, f"invalid name {name!r}: expected a network name "
                       "matching [A-Za-z0-9][A-Za-z0-9_.-]*")
    mtu = conf.get("mtu", DEFAULT_MTU)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_MTU <= mtu <= MAX_MTU:
        raise CniError(ERR_INVALID_CONFIG, f"invalid mtu {mtu!r}: must be an integer in "
                       f"{MIN_MTU}..{MAX_MTU}")
    cidr = conf.get("cidr", DEFAULT_CIDR)
    net, prefix = _parse_cidr(cidr)
    v6 = _parse_ipv6_settings(conf, mtu)
    disable_loopback = conf.get("disableHostLoopback", False)
    if not isinstance(disable_loopback, bool):
        raise CniError(ERR_INVALID_CONFIG,
                       f"invalid disableHostLoopback {disable_loopback!r}: expected true/false")
    mac = None
    if conf.get("macAddress") is not None:
        mac = _parse_mac(conf["macAddress"], "macAddress")
    dns_conf = conf.get("dns", {})
    if not isinstance(dns_conf, dict):
        raise CniError(ERR_INVALID_CONFIG, "invalid dns: expected an object")
    dns: dict[str, Any] = {}
    for key, value in dns_conf.items():
        if key == "domain":
            if not isinstance(value, str):
                raise CniError(ERR_INVALID_CONFIG, "invalid dns.domain: expected a string")
            if value:
                dns[key] = value
        elif key in ("nameservers", "search", "options"):
            dns[key] = _str_list(value, f"dns.{key}")
        else:
            raise CniError(ERR_UNSUPPORTED_FIELD, f"unsupported field dns.{key}")
    ours = [_ipv4_text(net + 3)] + ([v6["dns6"]] if v6["ipv6"] else [])
    dns["nameservers"] = ours + [n for n in dns.get("nameservers", []) if n not in ours]
    upstreams = [_parse_upstream(u) for u in _str_list(conf.get("dnsUpstreams", []),
                                                       "dnsUpstreams")]
    runtime = conf.get("runtimeConfig", {})
    if not isinstance(runtime, dict):
        raise CniError(ERR_INVALID_CONFIG, "invalid runtimeConfig: expected an object")
    for key, value in runtime.items():
        if key in UNSUPPORTED_RUNTIME_KEYS and value:
            raise CniError(ERR_UNSUPPORTED_FIELD, f"unsupported field runtimeConfig.{key}: "
                           "the slirp plugin cannot honour it")
    if runtime.get("mac"):
        mac = _parse_mac(runtime["mac"], "runtimeConfig.mac")
    if args.get("MAC"):
        mac = _parse_mac(args["MAC"], "CNI_ARGS MAC")
    ports = parse_port_mappings(runtime.get("portMappings"), str(name), v6["ipv6"])
    return {
        "network": name, "mtu": mtu, "cidr": cidr, "prefix": prefix,
        "address": _ipv4_text(net + 100), "gateway": _ipv4_text(net + 2),
        "disableHostLoopback": disable_loopback, "mac": mac, "dns": dns,
        "dnsUpstreams": upstreams, "portMappings": ports,
        "search": list(dns.get("search", [])), **v6,
    }


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``K=V;K=V``. Unknown keys are an error unless IgnoreUnknown is set."""
    args: dict[str, str] = {}
    if not text:
        return args
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"invalid CNI_ARGS item {item!r}: expected KEY=VALUE")
        args[key] = value
    ignore = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    for key in args:
        if key not in ("IgnoreUnknown", "MAC") and not ignore:
            raise CniError(ERR_UNSUPPORTED_FIELD, f"unsupported CNI_ARGS key {key!r} "
                           "(set IgnoreUnknown=1 to ignore it)")
    return args


# ------------------------------------------------------------------ results


def shape_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """Convert a 1.1.0-shaped result to ``version``'s shape."""
    out = loads(dumps(result))
    out["cniVersion"] = version
    v = _version_tuple(version)
    if v < (1, 1, 0):
        for iface in out.get("interfaces", []):
            for key in ("mtu", "socketPath", "pciID"):
                iface.pop(key, None)
        for route in out.get("routes", []):
            for key in ("mtu", "advmss", "priority", "table", "scope"):
                route.pop(key, None)
    if v < (1, 0, 0):
        for ip in out.get("ips", []):
            ip["version"] = "6" if ":" in ip.get("address", "") else "4"
    return out


def _normalize_prev(prev: Any) -> dict[str, Any]:
    """A previous plugin's result in the 1.1.0 shape (``ips[].version`` dropped)."""
    if not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "invalid prevResult: expected an object")
    out = loads(dumps(prev))
    out.pop("cniVersion", None)
    for ip in out.get("ips", []) or []:
        if isinstance(ip, dict):
            ip.pop("version", None)
    return out


def merge_result(prev: dict[str, Any] | None, ours: dict[str, Any]) -> dict[str, Any]:
    """Append our interface, address and route to a previous plugin's result (chaining)."""
    if not prev:
        return ours
    merged = _normalize_prev(prev)
    interfaces = merged.setdefault("interfaces", [])
    base = len(interfaces)
    interfaces.extend(ours["interfaces"])
    for ip in ours["ips"]:
        ip = dict(ip)
        ip["interface"] = base + ip["interface"]
        merged.setdefault("ips", []).append(ip)
    merged.setdefault("routes", []).extend(ours["routes"])
    dns = merged.get("dns") or {}
    names = list(dns.get("nameservers", []))
    for n in ours["dns"].get("nameservers", []):
        if n not in names:
            names.append(n)
    dns.update({k: v for k, v in ours["dns"].items() if k != "nameservers"})
    dns["nameservers"] = names
    merged["dns"] = dns
    return merged


# ------------------------------------------------------------------ talking to the engine


def trusted_uid(uid: int) -> bool:
    """Whom the plugin and the engine trust on engine.sock: their own uid, or root."""
    return uid in (os.geteuid(), 0)


def connect_engine(rundir: str) -> socket.socket | None:
    """A connection to the engine; None if none listens; ERR_UNSAFE for an impostor.

    The engine's peer credentials must name our uid or root: someone else
    listening on engine.sock could answer ADD with a result of their choosing.
    """
    path = socket_path(rundir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        pid, uid, _gid = peer_credentials(sock)
    except OSError:
        sock.close()
        return None
    if not trusted_uid(uid):
        sock.close()
        raise CniError(ERR_UNSAFE, f"refusing the engine on {path}: it runs as uid {uid} "
                       f"(pid {pid}), not as uid {os.geteuid()} (this plugin's user) or root")
    return sock


def _exchange(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any] | None:
    """One request, one reply; None when the engine closed without answering."""
    try:
        sock.settimeout(ENGINE_REPLY_TIMEOUT)
        sock.sendall(dumps(request).encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except TimeoutError:
        raise CniError(ERR_TRY_AGAIN, f"the pyslirp engine did not answer within "
                       f"{ENGINE_REPLY_TIMEOUT:g} s") from None
    except OSError:
        return None
    finally:
        sock.close()
    if not chunks:
        return None
    try:
        reply = loads(b"".join(chunks).decode())
    except ValueError:
        raise CniError(ERR_ENGINE, "the pyslirp engine sent an undecodable reply") from None
    return reply if isinstance(reply, dict) else None


def engine_python(environ: dict[str, str]) -> str:
    return environ.get("PYSLIRP_PYTHON") or sys.executable


def package_root() -> str:
    """The directory that holds the ``pyslirp`` package this file belongs to."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _open_log(rundir: str) -> int:
    """engine.log for appending (rotated first when big), never through a symlink."""
    log_path = os.path.join(rundir, "engine.log")
    try:
        st = os.lstat(log_path)
        if st.st_mode & _S_IFMT == _S_IFREG and st.st_size > LOG_ROTATE_BYTES:
            os.replace(log_path, log_path + ".1")  # one old generation is enough
    except OSError:
        pass
    return open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


def spawn_engine(rundir: str, environ: dict[str, str]) -> None:
    """Start the engine in its own session, stdio detached, no inherited descriptors."""
    prepare_runtime_dir(rundir, create=True)
    python = engine_python(environ)
    argv = [python, "-c", DAEMON_BOOT, package_root(), "--rundir", rundir]
    env = {k: v for k, v in environ.items() if not k.startswith("CNI_")}
    log = _open_log(rundir)  # here, so that a refused log file is the plugin's clear error
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            try:
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)  # the grandchild is orphaned: nobody has to reap it
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(log, 2)
                # Whatever the runtime left open (its pipes to us above all) must not live on.
                os.closerange(3, 65536)
                os.execve(python, argv, env)
            finally:
                os._exit(127)
    finally:
        os.close(log)
    os.waitpid(pid, 0)


def engine_request(rundir: str, environ: dict[str, str], request: dict[str, Any],
                   start: bool = True) -> dict[str, Any] | None:
    """Send ``request`` to the engine, starting it when ``start`` and none listens.

    Returns None when no engine listens and ``start`` is false.
    """
    import time  # only on this path: it is cheap, but most verbs never get here

    deadline = time.monotonic() + ENGINE_START_TIMEOUT
    while True:
        sock = connect_engine(rundir)
        if sock is not None:
            reply = _exchange(sock, request)
            if reply is not None:
                return reply
            # Closed without an answer: the engine was going idle. Nothing was done; retry.
        elif not start:
            return None
        else:
            _start_engine(rundir, environ, deadline)
        if time.monotonic() > deadline:
            raise CniError(ERR_ENGINE, f"the pyslirp engine did not start within "
                           f"{ENGINE_START_TIMEOUT:g} s; see {rundir}/engine.log")


def _start_engine(rundir: str, environ: dict[str, str], deadline: float) -> None:
    """Start an engine and wait until it listens, unless another plugin already did.

    Plugins run in parallel for different containers (20 ADDs at once on a
    fresh node); an flock on ``RUNDIR/spawn.lock`` makes one of them start the
    engine while the others wait for it, instead of 20 engines racing for the
    engine lock.
    """
    import fcntl
    import time

    prepare_runtime_dir(rundir, create=True)
    lock = open_private(os.path.join(rundir, "spawn.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = connect_engine(rundir)
        if sock is not None:
            sock.close()  # started by whoever held the lock before us
            return
        spawn_engine(rundir, environ)
        delay = 0.002
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            sock = connect_engine(rundir)
            if sock is not None:
                sock.close()
                return
    finally:
        os.close(lock)


def _reply_ok(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise CniError(int(reply.get("code", ERR_ENGINE)), str(reply.get("msg", "engine error")),
                       str(reply.get("details", "")))
    return reply


# ------------------------------------------------------------------ verbs


def _require_env(environ: dict[str, str], names: tuple[str, ...]) -> None:
    for name in names:
        if not environ.get(name):
            raise CniError(ERR_INVALID_ENV, f"required environment variable {name} is not set")


def _container_env(environ: dict[str, str], need_netns: bool) -> tuple[str, str, str]:
    _require_env(environ, ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH")
                 + (("CNI_NETNS",) if need_netns else ()))
    cid = environ["CNI_CONTAINERID"]
    if not _is_name(cid):
        raise CniError(ERR_INVALID_ENV, f"invalid CNI_CONTAINERID {cid!r}: {NAME_RULE}")
    ifname = environ["CNI_IFNAME"]
    problem = _ifname_problem(ifname)
    if problem:
        raise CniError(ERR_INVALID_ENV, f"invalid CNI_IFNAME {ifname!r}: {problem}")
    netns = environ.get("CNI_NETNS", "")
    problem = netns_problem(netns) if need_netns else None
    if problem:
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS {netns!r} {problem}")
    return cid, ifname, netns


def cmd_add(conf: dict[str, Any], version: str, environ: dict[str, str]) -> dict[str, Any]:
    cid, ifname, netns = _container_env(environ, need_netns=True)
    settings = parse_settings(conf, parse_cni_args(environ.get("CNI_ARGS", "")))
    prev = conf.get("prevResult")
    if prev is not None:
        _normalize_prev(prev)  # validate before any work
    rundir = runtime_dir(environ, conf)
    prepare_runtime_dir(rundir, create=True)
    # "caller": the runtime that ran us; the engine may take over host ports it reserved
    # (pyslirp.runtime.adopt), and only ever from it and its descendants.
    reply = engine_request(rundir, environ, {
        "op": "add", "containerID": cid, "ifname": ifname, "netns": netns,
        "settings": settings, "caller": os.getppid()})
    assert reply is not None
    result = _reply_ok(reply)["result"]
    return shape_result(merge_result(prev, result), version)


def cmd_del(conf: dict[str, Any], environ: dict[str, str]) -> None:
    cid, ifname, _netns = _container_env(environ, need_netns=False)
    name = conf.get("name")
    if not _is_name(name):
        raise CniError(ERR_INVALID_CONFIG, f"invalid name {name!r}")
    rundir = runtime_dir(environ, conf)
    if not prepare_runtime_dir(rundir, create=False):
        return  # no runtime directory: nothing was ever attached here
    request = {"op": "del", "network": name, "containerID": cid, "ifname": ifname}
    state = read_state(state_path(rundir, str(name), cid, ifname))
    # Nothing recorded: no engine needs starting (DEL is idempotent), but a running
    # one is asked anyway in case it serves an attachment whose state write failed.
    reply = engine_request(rundir, environ, request, start=state is not None)
    if reply is not None:
        _reply_ok(reply)


def _expected_from_prev(prev: Any, ifname: str, netns: str) -> dict[str, Any]:
    prev = _normalize_prev(prev)
    interfaces = prev.get("interfaces") or []
    index = None
    for i, iface in enumerate(interfaces):
        if isinstance(iface, dict) and iface.get("name") == ifname and \
                iface.get("sandbox") in (netns, "", None):
            index = i
            break
    if index is None:
        raise CniError(ERR_INVALID_CONFIG, f"prevResult has no interface {ifname!r} in {netns}")
    iface = interfaces[index]
    addrs = [ip.get("address") for ip in prev.get("ips") or []
             if isinstance(ip, dict) and ip.get("interface") == index]
    gateways = [ip.get("gateway") for ip in prev.get("ips") or []
                if isinstance(ip, dict) and ip.get("interface") == index and ip.get("gateway")]
    return {"mac": iface.get("mac"), "addresses": addrs, "gateways": gateways}


def cmd_check(conf: dict[str, Any], version: str, environ: dict[str, str]) -> None:
    if _version_tuple(version) < (0, 4, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"config version {version} does not allow CHECK (needs 0.4.0 or later)")
    cid, ifname, netns = _container_env(environ, need_netns=True)
    parse_settings(conf, parse_cni_args(environ.get("CNI_ARGS", "")))
    if "prevResult" not in conf:
        raise CniError(ERR_INVALID_CONFIG, "CHECK needs prevResult in the network configuration")
    expected = _expected_from_prev(conf["prevResult"], ifname, netns)
    rundir = runtime_dir(environ, conf)
    prepare_runtime_dir(rundir, create=False)
    name = str(conf["name"])
    state = read_state(state_path(rundir, name, cid, ifname))
    if state is None:
        raise CniError(ERR_NO_ATTACHMENT, f"no slirp attachment for container {cid} "
                       f"interface {ifname} in network {name}")
    if not identity_alive(state.get("engine")):
        raise CniError(ERR_ENGINE_GONE, f"the pyslirp engine serving container {cid} "
                       f"interface {ifname} is gone (pid {state.get('engine', {}).get('pid')})")
    reply = engine_request(rundir, environ, {
        "op": "check", "network": name, "containerID": cid, "ifname": ifname,
        "netns": netns, "expected": expected}, start=False)
    if reply is None:
        raise CniError(ERR_ENGINE_GONE, f"the pyslirp engine serving container {cid} "
                       f"interface {ifname} is gone (it does not answer)")
    _reply_ok(reply)


def cmd_gc(conf: dict[str, Any], version: str, environ: dict[str, str]) -> None:
    if _version_tuple(version) < (1, 1, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"config version {version} does not allow GC (needs 1.1.0)")
    name = conf.get("name")
    if not _is_name(name):
        raise CniError(ERR_INVALID_CONFIG, f"invalid name {name!r}")
    valid_raw = conf.get("cni.dev/valid-attachments")
    if not isinstance(valid_raw, list):
        raise CniError(ERR_INVALID_CONFIG,
                       "GC needs cni.dev/valid-attachments: a list of {containerID, ifname}")
    valid = []
    for item in valid_raw:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) or \
                not isinstance(item.get("ifname"), str):
            raise CniError(ERR_INVALID_CONFIG, f"invalid cni.dev/valid-attachments entry {item!r}")
        valid.append([item["containerID"], item["ifname"]])
    rundir = runtime_dir(environ, conf)
    if not prepare_runtime_dir(rundir, create=False):
        return  # no runtime directory: nothing to collect
    keep = {(c, i) for c, i in valid}
    doomed = [s for _p, s in list_states(rundir)
              if s.get("network") == name and (s.get("containerID"), s.get("ifname")) not in keep]
    unreadable = [p for p, s in list_states(rundir) if not s]
    request = {"op": "gc", "network": name, "valid": valid}
    reply = engine_request(rundir, environ, request, start=bool(doomed or unreadable))
    if reply is not None:
        _reply_ok(reply)


def cmd_status(conf: dict[str, Any], version: str, environ: dict[str, str]) -> None:
    if _version_tuple(version) < (1, 1, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"config version {version} does not allow STATUS (needs 1.1.0)")
    parse_settings(conf, {})
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise CniError(ERR_NOT_AVAILABLE, f"cannot open /dev/net/tun: {exc.strerror}") from None
    rundir = runtime_dir(environ, conf)
    try:
        prepare_runtime_dir(rundir, create=True)
    except OSError as exc:
        raise CniError(ERR_NOT_AVAILABLE, f"cannot create the runtime directory {rundir}: "
                       f"{exc.strerror}") from None
    except CniError as exc:
        raise CniError(ERR_NOT_AVAILABLE, exc.msg) from None
    if not os.access(rundir, os.W_OK):
        raise CniError(ERR_NOT_AVAILABLE, f"the runtime directory {rundir} is not writable")
    python = engine_python(environ)
    if not os.access(python, os.X_OK):
        raise CniError(ERR_NOT_AVAILABLE, f"the engine's Python {python} is not executable")


def version_info() -> dict[str, Any]:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")


def run(environ: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """Execute one CNI request; returns (exit status, JSON document to print or None)."""
    version = CURRENT_VERSION
    try:
        command = environ.get("CNI_COMMAND", "")
        if not command:
            raise CniError(ERR_INVALID_ENV, "required environment variable CNI_COMMAND is not set")
        if command not in COMMANDS:
            raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}: expected one of "
                           f"{', '.join(COMMANDS)}")
        if command == "VERSION":
            return 0, version_info()
        try:
            conf = loads(stdin.decode()) if stdin.strip() else None
        except ValueError as exc:
            raise CniError(ERR_DECODE, f"cannot decode the network configuration: {exc}") \
                from None
        if not isinstance(conf, dict):
            raise CniError(ERR_DECODE, "the network configuration on stdin is not a JSON object")
        version = parse_version(conf)
        if command == "ADD":
            return 0, cmd_add(conf, version, environ)
        if command == "DEL":
            cmd_del(conf, environ)
        elif command == "CHECK":
            cmd_check(conf, version, environ)
        elif command == "GC":
            cmd_gc(conf, version, environ)
        else:
            cmd_status(conf, version, environ)
        return 0, None
    except CniError as exc:
        error: dict[str, Any] = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
        if exc.details:
            error["details"] = exc.details
        return 1, error
    except OSError as exc:  # e.g. the runtime directory cannot be created
        where = f" ({exc.filename})" if exc.filename else ""
        return 1, {"cniVersion": version, "code": ERR_IO,
                   "msg": f"I/O failure: {exc.strerror or exc}{where}"}
    except Exception as exc:  # noqa: BLE001 - the runtime must get JSON, not a traceback
        return 1, {"cniVersion": version, "code": ERR_ENGINE,
                   "msg": f"internal error in the slirp plugin: {type(exc).__name__}: {exc}"}


def main(stdin: Any = None, stdout: TextIO | None = None) -> int:
    data = (stdin or sys.stdin.buffer).read()
    status, doc = run(dict(os.environ), data)
    out = stdout or sys.stdout
    if doc is not None:
        out.write(dumps(doc) + "\n")
        out.flush()
    if status and doc is not None:
        sys.stderr.write(f"slirp: {doc.get('msg')}\n")
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
