"""The API socket: slirp4netns's protocol byte for byte, and the Unix-socket server.

The expected replies in :data:`PARSE_CASES` and :data:`SESSION` were recorded
from slirp4netns 1.2.0; :func:`test_tables_match_real_slirp4netns` replays them
against the real binary (in namespaces of its own) wherever it is installed,
so the tables cannot drift from what slirp4netns does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyslirp import api
from pyslirp.api import ApiHandler, ApiServer, JsonError, JsonIncomplete, parse_json

ENTRIES_EMPTY = b'{"entries":[]}'
CANNOT = b'{"error":{"desc":"bad request: cannot parse JSON"}}'
NOT_OBJECT = b'{"error":{"desc":"bad request: json_object() failed"}}'
NO_EXECUTE = b'{"error":{"desc":"bad request: no execute found"}}'
UNKNOWN = b'{"error":{"desc":"bad request: unknown execute"}}'
TOO_LARGE = b'{"error":{"desc":"bad request: too large message"}}'
ADD_FAILED = b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'
LIST = b'{"execute":"list_hostfwd"}'


def bad(execute: str, field: str) -> bytes:
    return b'{"error":{"desc":"bad request: %s: bad arguments.%s"}}' % (execute.encode(),
                                                                       field.encode())


def listed(x: str) -> bytes:
    """A list_hostfwd request with ``x`` as the value of an extra member."""
    return b'{"execute":"list_hostfwd","x":' + x.encode("latin-1") + b"}"


#: (request, reply) against a fresh slirp4netns (no forwards yet): parson's rules.
PARSE_CASES: list[tuple[bytes, bytes]] = [
    (LIST, ENTRIES_EMPTY),
    (LIST + b"\n", ENTRIES_EMPTY),
    (b"", CANNOT),
    (b"garbage", CANNOT),
    (b"[1]", NOT_OBJECT),
    (b'"x"', NOT_OBJECT),
    (b"true", NOT_OBJECT),
    (b"{}", NO_EXECUTE),
    (b'{"execute":1}', NO_EXECUTE),
    (b'{"execute":null}', NO_EXECUTE),
    (b'{"arguments":{"execute":"list_hostfwd"}}', NO_EXECUTE),
    (b'{"execute":"foo"}', UNKNOWN),
    (b'{"execute":"LIST_HOSTFWD"}', UNKNOWN),
    (b'{"execute":"list_hostfwd "}', UNKNOWN),
    (LIST + b" trailing", ENTRIES_EMPTY),
    (LIST + b"}}}", ENTRIES_EMPTY),
    (b'  \n\t\v\f\r{"execute":"list_hostfwd"}', ENTRIES_EMPTY),
    (b'\xef\xbb\xbf{"execute":"list_hostfwd"}', ENTRIES_EMPTY),
    (b'{ "execute" : "list_hostfwd" , "arguments" : null }', ENTRIES_EMPTY),
    (b'{"execute":"list_hostfwd","execute":"foo"}', CANNOT),
    (b'{ "a":1, "b":1, "a":2,"execute":"list_hostfwd"}', CANNOT),
    (b'{"execute":"list\\u005fhostfwd"}', ENTRIES_EMPTY),
    (b'{"execute":"list_hostfwd\\u0000zz"}', ENTRIES_EMPTY),
    (b'{"exe\\u0000cute":"list_hostfwd"}', CANNOT),
    (b"\x00" + LIST, CANNOT),
    (LIST + b"\x00garbage", ENTRIES_EMPTY),
    (b'{"execute":"list_hostfwd"\x00}', CANNOT),
    (b'{"execute":"list_hostfwd",}', CANNOT),
    (b"{'execute':'list_hostfwd'}", CANNOT),
    (b'{"execute":"list_hostfwd"/*c*/}', CANNOT),
    (b'{"execute":"list_hostfwd"', CANNOT),
    (listed("NaN"), CANNOT),
    (listed("Infinity"), CANNOT),
    (listed("-inf"), CANNOT),
    (listed("-infinity"), CANNOT),
    (listed("-nan"), CANNOT),
    (listed("1e999"), CANNOT),
    (listed("1e-999"), ENTRIES_EMPTY),
    (listed("01"), CANNOT),
    (listed("-01"), CANNOT),
    (listed("0e5"), CANNOT),
    (listed("-0"), ENTRIES_EMPTY),
    (listed("-0.5"), ENTRIES_EMPTY),
    (listed("0.5"), ENTRIES_EMPTY),
    (listed("1."), ENTRIES_EMPTY),
    (listed("1.e5"), ENTRIES_EMPTY),
    (listed(".5"), CANNOT),
    (listed("+1"), CANNOT),
    (listed("-0x1"), CANNOT),
    (listed("-"), CANNOT),
    (listed("1e"), CANNOT),
    (listed("1e+"), CANNOT),
    (listed('"a\tb"'), CANNOT),
    (listed('"a\x01b"'), CANNOT),
    (listed('"\x7f"'), ENTRIES_EMPTY),
    (listed('"\xff"'), ENTRIES_EMPTY),
    (listed('"\xc3\xa9"'), ENTRIES_EMPTY),
    (listed('"\\x"'), CANNOT),
    (listed('"\\U0041"'), CANNOT),
    (listed('"\\u00zz"'), CANNOT),
    (listed('"\\uABCD"'), ENTRIES_EMPTY),
    (listed('"\\/\\b\\f\\n\\r\\t\\"\\\\"'), ENTRIES_EMPTY),
    (listed('"\\ud800"'), CANNOT),
    (listed('"\\udc00"'), CANNOT),
    (listed('"\\ud83d\\ude00"'), ENTRIES_EMPTY),
    (listed('"\\ud83dx"'), CANNOT),
    (listed("TRUE"), CANNOT),
    (listed("truex"), CANNOT),
    (listed("nul"), CANNOT),
    (listed("[1,2,{\"a\":[]}]"), ENTRIES_EMPTY),
    (listed("[1,]"), CANNOT),
    (listed("[,]"), CANNOT),
    (listed("[ ]"), ENTRIES_EMPTY),
    (listed("{ }"), ENTRIES_EMPTY),
    (listed('{"a":1},"y":{"a":1}'), ENTRIES_EMPTY),
    (listed("[" * 2000 + "]" * 2000), ENTRIES_EMPTY),
    (LIST + b" " * (4095 - len(LIST)), ENTRIES_EMPTY),
    (LIST + b" " * (4096 - len(LIST)), TOO_LARGE),
]


def js(value: str) -> str:
    """A plain value becomes a JSON string; one starting with '=' is raw JSON."""
    return value[1:] if value.startswith("=") else f'"{value}"'


def add(proto: str = "tcp", host_addr: str | None = "127.0.0.1", host_port: str = "{P1}",
        guest_addr: str | None = None, guest_port: str = "80") -> str:
    """An add_hostfwd request; ports are raw JSON, empty ones left out."""
    args = [f'"proto":{js(proto)}']
    if host_addr is not None:
        args.append(f'"host_addr":{js(host_addr)}')
    if host_port:
        args.append(f'"host_port":{host_port}')
    if guest_addr is not None:
        args.append(f'"guest_addr":{js(guest_addr)}')
    if guest_port:
        args.append(f'"guest_port":{guest_port}')
    return '{"execute":"add_hostfwd","arguments":{' + ",".join(args) + "}}"


def entry(i: int, proto: str, host: str, hport: str, guest: str, gport: int) -> str:
    return (f'{{"id":{i},"proto":"{proto}","host_addr":"{host}","host_port":{hport},'
            f'"guest_addr":"{guest}","guest_port":{gport}}}')


def remove(id_json: str | None) -> str:
    if id_json is None:
        return '{"execute":"remove_hostfwd"}'
    return '{"execute":"remove_hostfwd","arguments":{"id":' + id_json + "}}"


_E1 = entry(1, "tcp", "127.0.0.1", "{P1}", "10.0.2.100", 80)
_E2 = entry(2, "udp", "127.0.0.1", "{P1}", "10.0.2.100", 80)
_E3 = entry(3, "tcp", "127.0.0.1", "{P2}", "10.0.2.15", 8080)
_E4 = entry(4, "tcp", "0.0.0.0", "{P3}", "10.0.2.100", 80)
_E5 = entry(5, "udp", "0.0.0.0", "{P4}", "10.0.2.100", 53)
_E6 = entry(6, "tcp", "127.0.0.1", "{P5}", "10.0.2.100", 22)

#: An ordered exchange (request, reply) with a fresh slirp4netns; {Pn} are free ports.
SESSION: list[tuple[str, str]] = [
    ('{"execute":"list_hostfwd"}', '{"entries":[]}'),
    (add(), '{"return":{"id":1}}'),
    (add(), ADD_FAILED.decode()),
    (add(guest_port="81"), ADD_FAILED.decode()),
    (add(host_addr="0.0.0.0"), ADD_FAILED.decode()),
    (add(proto="udp"), '{"return":{"id":2}}'),
    (add(proto="udp", guest_port="81"), ADD_FAILED.decode()),
    (add(proto="sctp"), bad("add_hostfwd", "proto").decode()),
    (add(proto="TCP"), bad("add_hostfwd", "proto").decode()),
    (add(proto="tcp ", host_port="{P2}"), bad("add_hostfwd", "proto").decode()),
    (add(host_addr="1.2.3", host_port="{P2}"), bad("add_hostfwd", "host_addr").decode()),
    (add(host_addr="127.0.0.01", host_port="{P2}"), bad("add_hostfwd", "host_addr").decode()),
    (add(host_addr="127.0.0.256", host_port="{P2}"), bad("add_hostfwd", "host_addr").decode()),
    (add(host_addr=" 127.0.0.1", host_port="{P2}"), bad("add_hostfwd", "host_addr").decode()),
    (add(host_port=""), bad("add_hostfwd", "host_port").decode()),
    (add(host_port='"{P2}"'), bad("add_hostfwd", "host_port").decode()),
    (add(host_port="0.5"), bad("add_hostfwd", "host_port").decode()),
    (add(host_port="true"), bad("add_hostfwd", "host_port").decode()),
    (add(host_port="{P2}", guest_addr="x"), bad("add_hostfwd", "guest_addr").decode()),
    (add(host_port="{P2}", guest_addr="10.0.2"), bad("add_hostfwd", "guest_addr").decode()),
    (add(host_port="{P2}", guest_port=""), bad("add_hostfwd", "guest_port").decode()),
    (add(host_port="{P2}", guest_port="0"), bad("add_hostfwd", "guest_port").decode()),
    (add(host_port="{P2}", guest_port='"80"'), bad("add_hostfwd", "guest_port").decode()),
    # Checks run in slirp4netns's order: host_addr before host_port before guest_addr ...
    (add(host_addr="x", host_port="0", guest_addr="y", guest_port="0"),
     bad("add_hostfwd", "host_addr").decode()),
    (add(host_port="{P2}.5", guest_addr="y", guest_port="0"),
     bad("add_hostfwd", "guest_addr").decode()),
    (add(host_port="{P2}", guest_addr="y", guest_port="0"),
     bad("add_hostfwd", "guest_addr").decode()),
    # Strings compare up to a \u0000, ports truncate toward zero.
    (add(proto='="tcp\\u0000zz"', host_addr='="127.0.0.1\\u0000zz"', host_port="{P2}.9",
         guest_addr="10.0.2.15", guest_port="8080.99"), '{"return":{"id":3}}'),
    # host_addr "" or not a string means 0.0.0.0; guest_addr "" the configured address.
    (add(host_addr="", host_port="{P3}", guest_addr=""), '{"return":{"id":4}}'),
    (add(proto="udp", host_addr="=5", host_port="{P4}", guest_port="53"),
     '{"return":{"id":5}}'),
    ('{"execute":"list_hostfwd"}', '{"entries":[' + ",".join([_E1, _E2, _E3, _E4, _E5]) + "]}"),
    (remove("99"), bad("remove_hostfwd", "id").decode()),
    (remove("0"), bad("remove_hostfwd", "id").decode()),
    (remove(None), bad("remove_hostfwd", "id").decode()),
    (remove('"1"'), bad("remove_hostfwd", "id").decode()),
    (remove("1.7"), '{"return":{}}'),
    (remove("1"), bad("remove_hostfwd", "id").decode()),
    ('{"execute":"list_hostfwd"}', '{"entries":[' + ",".join([_E2, _E3, _E4, _E5]) + "]}"),
    # The port is free again, and ids are never reused.
    (add(host_port="{P5}", guest_port="22"), '{"return":{"id":6}}'),
    (add(), '{"return":{"id":7}}'),
    (remove("7"), '{"return":{}}'),
    (remove("2"), '{"return":{}}'),
    ('{"execute":"list_hostfwd"}', '{"entries":[' + ",".join([_E3, _E4, _E5, _E6]) + "]}"),
    ('{"execute":"remove_hostfwd","arguments":{"id":3},"x":1}', '{"return":{}}'),
    ('{"execute":"remove_hostfwd","arguments":{"id":4}}', '{"return":{}}'),
    ('{"execute":"remove_hostfwd","arguments":{"id":5}}', '{"return":{}}'),
    ('{"execute":"remove_hostfwd","arguments":{"id":6}}', '{"return":{}}'),
    ('{"execute":"list_hostfwd"}', '{"entries":[]}'),
]

#: pyslirp's extensions: (request, slirp4netns 1.2.0's refusal). Requests slirp4netns
#: refuses are the only ones whose answers may differ (see test_extensions_*).
GET_STATS = b'{"execute":"get_stats"}'
ANY_PORT = add(host_port="0").encode()
EXTENSIONS: list[tuple[bytes, bytes]] = [
    (GET_STATS, UNKNOWN),
    (ANY_PORT, bad("add_hostfwd", "host_port")),
    (add(proto="udp", host_port="0.0").encode(), bad("add_hostfwd", "host_port")),
    (add(host_port="-0").encode(), bad("add_hostfwd", "host_port")),
    # pyslirp answers the next check's error here (guest_addr): port 0 passes its own.
    (add(host_port="0", guest_addr="y", guest_port="0").encode(),
     bad("add_hostfwd", "host_port")),
    *[(r.encode(), bad("add_hostfwd", field)) for r, field in (
        (add(host_addr="::1", host_port="18090"), "host_addr"),
        (add(proto="udp", host_addr="::", host_port="18090"), "host_addr"),
        (add(host_addr="::", host_port="18090", guest_addr="fd00::100"), "host_addr"),
        (add(host_addr="2001:db8::1", host_port="18090", guest_addr="10.0.2.100"), "host_addr"),
        (add(host_port="18090", guest_addr="fd00::100"), "guest_addr"),
    )],
]
#: The IPv6 ones among them (pyslirp with -6 serves them; see test_ipv6_*).
IPV6_EXTENSIONS = [(r, refusal) for r, refusal in EXTENSIONS if b"::" in r]
#: What a fake stack's get_stats answers in these tests.
FAKE_STATS = b'{"return":{"counters":{},"flows":{"tcp":0}}}'

#: Requests that crash slirp4netns 1.2.0 (it strcmp()s a NULL proto): ours answer instead.
CRASHERS: list[tuple[bytes, bytes]] = [
    (b'{"execute":"add_hostfwd"}', bad("add_hostfwd", "proto")),
    (b'{"execute":"add_hostfwd","arguments":[]}', bad("add_hostfwd", "proto")),
    (b'{"execute":"add_hostfwd","arguments":{"host_port":8080,"guest_port":80}}',
     bad("add_hostfwd", "proto")),
    (add(proto="=6", host_port="8080").encode(), bad("add_hostfwd", "proto")),
    (add(proto="=null", host_port="8080").encode(), bad("add_hostfwd", "proto")),
]

#: Ports slirp4netns would bind by their low 16 bits (or at random): refused here.
PORT_RANGE: list[tuple[bytes, bytes]] = [
    (add(host_port="-1").encode(), bad("add_hostfwd", "host_port")),
    (add(host_port="65536").encode(), bad("add_hostfwd", "host_port")),
    (add(host_port="1e10").encode(), bad("add_hostfwd", "host_port")),
    (add(host_port="8080", guest_port="-80").encode(), bad("add_hostfwd", "guest_port")),
    (add(host_port="8080", guest_port="70000").encode(), bad("add_hostfwd", "guest_port")),
]


def session_ports(base: int) -> dict[str, str]:
    return {f"{{P{i}}}": str(base + i) for i in range(1, 6)}


def substitute(text: str, ports: dict[str, str]) -> bytes:
    for key, value in ports.items():
        text = text.replace(key, value)
    return text.encode()


class FakeForwarder:
    """Records forwards; a port is busy as the kernel would say (same proto, overlapping addr);
    port 0 gets the next of 40001, 40002, ..."""

    def __init__(self) -> None:
        self.active: list[tuple[str, str, int, str, int]] = []
        self.calls: list[tuple[str, ...]] = []
        self.next_free = 40001

    def add(self, proto: str, host_addr: str, host_port: int, guest_addr: str,
            guest_port: int) -> int:
        self.calls.append(("add", proto, host_addr, str(host_port), guest_addr, str(guest_port)))
        if host_port == 0:
            host_port, self.next_free = self.next_free, self.next_free + 1
        for p, a, port, _g, _gp in self.active:
            if p == proto and port == host_port and "0.0.0.0" in (a, host_addr) or (
                    p == proto and port == host_port and a == host_addr):
                raise OSError(errno.EADDRINUSE, "Address already in use")
        self.active.append((proto, host_addr, host_port, guest_addr, guest_port))
        return host_port

    def remove(self, proto: str, host_addr: str, host_port: int) -> None:
        self.calls.append(("remove", proto, host_addr, str(host_port)))
        for item in self.active:
            if item[:3] == (proto, host_addr, host_port):
                self.active.remove(item)
                return
        raise AssertionError("removed a forward that was not there")


GUEST6 = "fd00::5055:aff:fe00:264"


def ipv6_on(guest6: str | None = GUEST6) -> api.Ipv6Forwarding:
    """-6 with the default prefix; forwards without a guest address go to ``guest6``."""
    import ipaddress

    addr = None if guest6 is None else socket.inet_pton(socket.AF_INET6, guest6)
    return api.Ipv6Forwarding(ipaddress.IPv6Network("fd00::/64"), frozenset(
        socket.inet_pton(socket.AF_INET6, a) for a in ("fd00::2", "fd00::3")), lambda: addr)


def handler() -> ApiHandler:
    """A handler with every extension on: the tables must hold with them."""
    return ApiHandler(FakeForwarder(), "10.0.2.100", stats=lambda: FAKE_STATS, ipv6=ipv6_on())


# ---- the protocol function -------------------------------------------------------------

@pytest.mark.parametrize(("request_", "reply"), PARSE_CASES,
                         ids=[repr(r[:48]) for r, _ in PARSE_CASES])
def test_parse_cases(request_: bytes, reply: bytes) -> None:
    assert handler().reply_for(request_, final=True) == reply


def test_session_byte_for_byte() -> None:
    h = handler()
    ports = session_ports(18080)
    for request, reply in SESSION:
        assert h.reply_for(substitute(request, ports), final=True) == substitute(reply, ports), \
            request


def test_session_drives_the_forwarder() -> None:
    fwd = FakeForwarder()
    h = ApiHandler(fwd, "10.0.2.100")
    for request, _ in SESSION:
        h.reply_for(substitute(request, session_ports(18080)), final=True)
    assert fwd.active == []
    assert fwd.calls[0] == ("add", "tcp", "127.0.0.1", "18081", "10.0.2.100", "80")
    assert ("add", "tcp", "127.0.0.1", "18082", "10.0.2.15", "8080") in fwd.calls
    assert ("add", "tcp", "0.0.0.0", "18083", "10.0.2.100", "80") in fwd.calls
    assert ("remove", "tcp", "127.0.0.1", "18081") in fwd.calls
    # A request that fails validation never reaches the forwarder.
    assert not any(c[0] == "add" and c[2] not in ("127.0.0.1", "0.0.0.0") for c in fwd.calls)


@pytest.mark.parametrize(("request_", "reply"), CRASHERS + PORT_RANGE)
def test_requests_slirp4netns_mishandles_get_an_error(request_: bytes, reply: bytes) -> None:
    h = handler()
    assert h.reply_for(request_, final=True) == reply
    assert h.forwards == [] and h.next_id == 1


def test_get_stats_answers_what_the_stack_says_and_only_when_served() -> None:
    asked = []

    def stats() -> bytes:
        asked.append(1)
        return FAKE_STATS
    h = ApiHandler(FakeForwarder(), "10.0.2.100", stats=stats)
    assert h.reply_for(GET_STATS, final=True) == FAKE_STATS
    assert h.reply_for(b'{"execute":"get_stats","arguments":{"x":1}}\n', final=True) == FAKE_STATS
    assert len(asked) == 2
    # A handler without a stack behind it answers as slirp4netns does.
    assert ApiHandler(FakeForwarder(), "10.0.2.100").reply_for(GET_STATS, final=True) == UNKNOWN


def test_host_port_0_gets_a_free_port_and_says_which() -> None:
    fwd = FakeForwarder()
    h = ApiHandler(fwd, "10.0.2.100")
    assert h.reply_for(ANY_PORT, final=True) == b'{"return":{"id":1,"host_port":40001}}'
    assert h.reply_for(add(proto="udp", host_port="-0", guest_port="53").encode(),
                       final=True) == b'{"return":{"id":2,"host_port":40002}}'
    # A fixed port keeps slirp4netns's answer byte for byte.
    assert h.reply_for(add(host_port="8080").encode(), final=True) == b'{"return":{"id":3}}'
    assert h.reply_for(LIST, final=True) == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":40001,'
        b'"guest_addr":"10.0.2.100","guest_port":80},'
        b'{"id":2,"proto":"udp","host_addr":"127.0.0.1","host_port":40002,'
        b'"guest_addr":"10.0.2.100","guest_port":53},'
        b'{"id":3,"proto":"tcp","host_addr":"127.0.0.1","host_port":8080,'
        b'"guest_addr":"10.0.2.100","guest_port":80}]}')
    # Removing it closes the port the forward really has.
    assert h.reply_for(remove("1").encode(), final=True) == b'{"return":{}}'
    assert fwd.calls[-1] == ("remove", "tcp", "127.0.0.1", "40001")


@pytest.mark.parametrize("host_port", ["", '"0"', "0.5", "-0.5", "false", "null"])
def test_only_the_number_0_asks_for_a_free_port(host_port: str) -> None:
    h = handler()
    assert h.reply_for(add(host_port=host_port).encode(), final=True) == \
        bad("add_hostfwd", "host_port")
    assert h.forwards == []


def test_host_port_0_checks_the_rest_as_any_request_does() -> None:
    assert handler().reply_for(add(host_port="0", guest_addr="y", guest_port="0").encode(),
                               final=True) == bad("add_hostfwd", "guest_addr")


def test_default_guest_addr_follows_the_configured_network() -> None:
    h = ApiHandler(FakeForwarder(), "10.0.3.100")
    assert h.reply_for(add(host_port="8080").encode(), final=True) == b'{"return":{"id":1}}'
    assert h.reply_for(LIST, final=True) == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":8080,'
        b'"guest_addr":"10.0.3.100","guest_port":80}]}')


# ---- IPv6 forwards (pyslirp's extension, with -6) -------------------------------------------

def test_ipv6_requests_slirp4netns_refuses_are_served_with_ipv6() -> None:
    fwd = FakeForwarder()
    h = ApiHandler(fwd, "10.0.2.100", ipv6=ipv6_on())
    assert len(IPV6_EXTENSIONS) == 5
    for i, (request, _refusal) in enumerate(IPV6_EXTENSIONS, 1):
        assert h.reply_for(request, final=True) == b'{"return":{"id":%d}}' % i, request
    assert fwd.calls == [
        ("add", "tcp", "::1", "18090", "", "80"),
        ("add", "udp", "::", "18090", "", "80"),
        ("add", "tcp", "::", "18090", "fd00::100", "80"),
        ("add", "tcp", "2001:db8::1", "18090", "10.0.2.100", "80"),
        ("add", "tcp", "127.0.0.1", "18090", "fd00::100", "80")]
    assert h.reply_for(LIST, final=True) == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"::1","host_port":18090,'
        b'"guest_addr":"fd00::5055:aff:fe00:264","guest_port":80},'
        b'{"id":2,"proto":"udp","host_addr":"::","host_port":18090,'
        b'"guest_addr":"fd00::5055:aff:fe00:264","guest_port":80},'
        b'{"id":3,"proto":"tcp","host_addr":"::","host_port":18090,'
        b'"guest_addr":"fd00::100","guest_port":80},'
        b'{"id":4,"proto":"tcp","host_addr":"2001:db8::1","host_port":18090,'
        b'"guest_addr":"10.0.2.100","guest_port":80},'
        b'{"id":5,"proto":"tcp","host_addr":"127.0.0.1","host_port":18090,'
        b'"guest_addr":"fd00::100","guest_port":80}]}')
    assert h.reply_for(remove("3").encode(), final=True) == b'{"return":{}}'
    assert fwd.calls[-1] == ("remove", "tcp", "::", "18090")


def test_ipv6_addresses_are_written_as_inet_ntop_does() -> None:
    fwd = FakeForwarder()
    h = ApiHandler(fwd, "10.0.2.100", ipv6=ipv6_on())
    assert h.reply_for(add(host_addr="0:0:0:0:0:0:0:1", host_port="8080",
                           guest_addr="FD00:0::0064").encode(), final=True) == \
        b'{"return":{"id":1}}'
    assert fwd.calls[0] == ("add", "tcp", "::1", "8080", "fd00::64", "80")


def test_without_a_known_guest_ipv6_address_the_listing_shows_an_empty_one() -> None:
    h = ApiHandler(FakeForwarder(), "10.0.2.100", ipv6=ipv6_on(None))
    assert h.reply_for(add(host_addr="::1", host_port="8080").encode(), final=True) == \
        b'{"return":{"id":1}}'
    assert h.reply_for(LIST, final=True) == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"::1","host_port":8080,'
        b'"guest_addr":"","guest_port":80}]}')


def _why(field: str, reason: str) -> bytes:
    return b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.%s: %s"}}' % (
        field.encode(), reason.encode())


@pytest.mark.parametrize(("request_", "reply"), [
    (add(host_addr="::1", host_port="8080"),
     _why("host_addr", "IPv6 is not enabled (--enable-ipv6)")),
    (add(host_port="8080", guest_addr="fd00::100"),
     _why("guest_addr", "IPv6 is not enabled (--enable-ipv6)")),
])
def test_ipv6_addresses_without_ipv6_are_refused_saying_why(request_: str, reply: bytes) -> None:
    h = ApiHandler(FakeForwarder(), "10.0.2.100")
    assert h.reply_for(request_.encode(), final=True) == reply
    assert h.forwards == []


@pytest.mark.parametrize(("request_", "reply"), [
    (add(host_port="8080", guest_addr="fd01::100"),
     _why("guest_addr", "fd01::100 is outside the guest's prefix fd00::/64")),
    (add(host_addr="::", host_port="8080", guest_addr="10.0.2.100:80"),
     bad("add_hostfwd", "guest_addr")),
    (add(host_port="8080", guest_addr="fd00::2"),
     _why("guest_addr", "fd00::2 is pyslirp's own address, not the guest's")),
    (add(host_port="8080", guest_addr="fd00::3"),
     _why("guest_addr", "fd00::3 is pyslirp's own address, not the guest's")),
    (add(host_addr="::ffff:127.0.0.1", host_port="8080"),
     _why("host_addr", "::ffff:127.0.0.1 is IPv4-mapped; use the IPv4 address")),
    (add(host_addr="fe80::1%lo", host_port="8080"), bad("add_hostfwd", "host_addr")),
    (add(host_addr="[::1]", host_port="8080"), bad("add_hostfwd", "host_addr")),
    (add(host_addr=":::1", host_port="8080"), bad("add_hostfwd", "host_addr")),
    (add(host_addr="::1", host_port="0.5"), bad("add_hostfwd", "host_port")),
    # slirp4netns's order of checks: host_addr first.
    (add(host_addr="::1%x", host_port="0.5", guest_addr="fd01::1"),
     bad("add_hostfwd", "host_addr")),
    (add(host_addr="::1", host_port="8080", guest_addr="fd01::1", guest_port="0"),
     _why("guest_addr", "fd01::1 is outside the guest's prefix fd00::/64")),
    (add(host_addr="::1", host_port="8080", guest_addr="fd00::100", guest_port="0"),
     bad("add_hostfwd", "guest_port")),
])
def test_bad_ipv6_addresses_are_refused_saying_why(request_: str, reply: bytes) -> None:
    h = handler()
    assert h.reply_for(request_.encode(), final=True) == reply
    assert h.forwards == []


def test_ipv6_forward_on_a_taken_port_gets_slirp4netns_s_failure() -> None:
    h = handler()
    assert h.reply_for(add(host_addr="::1", host_port="8080").encode(), final=True) == \
        b'{"return":{"id":1}}'
    assert h.reply_for(add(host_addr="::1", host_port="8080").encode(), final=True) == ADD_FAILED


def test_incomplete_request_waits_for_more_unless_final() -> None:
    h = handler()
    for cut in range(1, len(LIST)):
        partial = LIST[:cut]
        assert h.reply_for(partial, final=False) is None, partial
        assert h.reply_for(partial, final=True) == CANNOT
    assert h.reply_for(LIST, final=False) == ENTRIES_EMPTY


@pytest.mark.parametrize("partial", [
    b'{"execute":"list_hostfwd","x":"\\', b'{"execute":"list_hostfwd","x":"\\u00',
    b'{"execute":"list_hostfwd","x":"\\ud83d', b'{"execute":"list_hostfwd","x":"\\ud83d\\',
    b'{"execute":"list_hostfwd","x":tr', b'{"execute":"list_hostfwd","x":[', b" ",
    b'{"execute":"list_hostfwd","x":12',
])
def test_incomplete_forms(partial: bytes) -> None:
    assert handler().reply_for(partial, final=False) is None


@pytest.mark.parametrize("broken", [
    b'{"execute":"list_hostfwd",}', b'{"execute" "list_hostfwd"}', b"x", b'{"a":1,"a":',
    b'{"execute":"list_hostfwd"\x00', b'{"x":"\\ud83dx', b'{"x":"\\u00zz', b'{"x":trux',
])
def test_broken_requests_are_answered_at_once(broken: bytes) -> None:
    assert handler().reply_for(broken, final=False) == CANNOT


def test_parse_json_values() -> None:
    assert parse_json(b'{"a":[1,-2.5,{"b":null}],"c":"x\\u00e9\\ud83d\\ude00","d":true}') == {
        b"a": [1.0, -2.5, {b"b": None}], b"c": "xé😀".encode(), b"d": True}
    assert parse_json(b"  []  junk") == []
    with pytest.raises(JsonIncomplete):
        parse_json(b'{"a":1')
    with pytest.raises(JsonError):
        parse_json(b"[" * 2050 + b"1" + b"]" * 2050)
    assert parse_json(b"[" * 2048 + b"1" + b"]" * 2048) is not None


# ---- the Unix socket ---------------------------------------------------------------------

class Running:
    """An ApiServer on its own uvloop loop in a thread; requests from the test thread."""

    def __init__(self, path: Path, timeout: float = 30.0, max_clients: int = 64) -> None:
        import uvloop

        self.path = str(path)
        self.loop = uvloop.new_event_loop()
        self.forwarder = FakeForwarder()
        self.handler = ApiHandler(self.forwarder, "10.0.2.100")
        self.server = ApiServer(self.loop, self.path, self.handler, timeout=timeout,
                                max_clients=max_clients)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.path)
        return s

    def request(self, data: bytes, half_close: bool = True) -> bytes:
        with self.connect() as s:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            return read_all(s)

    def stop(self) -> None:
        done = threading.Event()

        def close() -> None:
            self.server.close()
            self.loop.stop()
            done.set()
        self.loop.call_soon_threadsafe(close)
        done.wait(10)
        self.thread.join(10)
        self.loop.close()


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out  # unread request bytes beyond 4096 make the kernel report a reset
        if not chunk:
            return out
        out += chunk


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Running]:
    running = Running(tmp_path / "api.sock")
    yield running
    running.stop()


def test_socket_is_owner_only_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    running = Running(path)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        running.stop()
    assert not path.exists()


def test_stale_socket_is_replaced_but_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    running = Running(path)
    try:
        assert running.request(LIST) == ENTRIES_EMPTY
    finally:
        running.stop()
    regular = tmp_path / "file"
    regular.write_text("precious")
    with pytest.raises(api.ApiError, match="not a socket"):
        Running(regular)
    assert regular.read_text() == "precious"


def test_close_leaves_a_newer_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    first = Running(path)
    second = Running(path)  # a second instance took the path over
    try:
        first.stop()
        assert path.exists()
        assert second.request(LIST) == ENTRIES_EMPTY
    finally:
        second.stop()


def test_too_long_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(api.ApiError, match="api socket"):
        Running(tmp_path / ("x" * 120))


@pytest.mark.parametrize("ending", [b"", b"\n"])
@pytest.mark.parametrize("half_close", [True, False])
def test_request_forms(served: Running, ending: bytes, half_close: bool) -> None:
    assert served.request(LIST + ending, half_close=half_close) == ENTRIES_EMPTY


def test_reply_is_one_write(served: Running) -> None:
    for port in range(8000, 8040):
        served.request(add(host_port=str(port)).encode())
    with served.connect() as s:
        s.sendall(LIST)  # no half-close: the first recv must see the whole reply
        select.select([s], [], [], 10)
        first = s.recv(1 << 20)
        rest = read_all(s)
    assert first.startswith(b'{"entries":[{"id":1,') and first.endswith(b"]}")
    assert len(first) > 3000 and rest == b""


def test_session_over_the_socket(served: Running) -> None:
    ports = session_ports(18080)
    for request, reply in SESSION:
        assert served.request(substitute(request, ports)) == substitute(reply, ports), request


@pytest.mark.parametrize(("request_", "reply"), [c for c in PARSE_CASES if c[0]][::4])
def test_parse_cases_over_the_socket(served: Running, request_: bytes, reply: bytes) -> None:
    assert served.request(request_) == reply


def test_request_split_across_writes(served: Running) -> None:
    with served.connect() as s:
        s.sendall(LIST[:10])
        time.sleep(0.05)
        s.sendall(LIST[10:])
        assert read_all(s) == ENTRIES_EMPTY


def test_too_large_request(served: Running) -> None:
    assert served.request(LIST + b" " * 10000) == TOO_LARGE
    assert served.request(LIST + b" " * 10000, half_close=False) == TOO_LARGE


def test_broken_request_without_half_close_is_answered_before_the_timeout(
        served: Running) -> None:
    # The server's timeout is 30 s and the client's 10 s: only an immediate answer passes.
    assert served.request(b'{"execute":,}', half_close=False) == CANNOT


def test_silent_client_does_not_block_others_and_times_out(tmp_path: Path) -> None:
    running = Running(tmp_path / "api.sock", timeout=0.5)
    try:
        silent = running.connect()
        partial = running.connect()
        partial.sendall(b'{"execute":"list_hos')
        assert running.request(LIST, half_close=False) == ENTRIES_EMPTY
        assert running.request(add(host_port="8080").encode()) == b'{"return":{"id":1}}'
        # Timed out, each gets the answer to what it sent: nothing / half a request.
        assert read_all(silent) == CANNOT
        assert read_all(partial) == CANNOT
        silent.close()
        partial.close()
        assert running.server.clients == {}
    finally:
        running.stop()


def test_concurrent_requests(served: Running) -> None:
    n = 60
    results: dict[int, bytes] = {}
    # Everyone connects first, then all send at once.
    socks = [served.connect() for _ in range(n)]
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        s = socks[i]
        barrier.wait()
        s.sendall(add(host_port=str(20000 + i)).encode())
        s.shutdown(socket.SHUT_WR)
        results[i] = read_all(s)
        s.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = sorted(int(r.split(b":")[-1].rstrip(b"}")) for r in results.values())
    assert ids == list(range(1, n + 1))
    listing = served.request(LIST)
    assert listing.count(b'"id":') == n


def test_more_clients_than_the_limit_wait_in_the_backlog(tmp_path: Path) -> None:
    running = Running(tmp_path / "api.sock", max_clients=2)
    try:
        idle = [running.connect() for _ in range(2)]
        with running.connect() as third:
            third.sendall(LIST)
            third.shutdown(socket.SHUT_WR)
            third.settimeout(0.3)
            with pytest.raises(TimeoutError):
                third.recv(100)  # not served while two others hold the slots
            idle[0].close()  # the server notices the EOF, answers it and frees a slot
            third.settimeout(10)
            assert read_all(third) == ENTRIES_EMPTY
        idle[1].close()
    finally:
        running.stop()


def test_client_that_disconnects_early_is_forgotten(served: Running) -> None:
    for _ in range(20):
        s = served.connect()
        s.sendall(b'{"exec')
        s.close()
    assert served.request(LIST) == ENTRIES_EMPTY
    deadline = time.monotonic() + 10
    while served.server.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.server.clients == {}


# ---- the tables against the real slirp4netns ---------------------------------------------

def ask_unix(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


@pytest.fixture
def real_slirp4netns(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """slirp4netns 1.2.0 with an API socket, in a host and a guest namespace of our own."""
    with _slirp4netns(tmp_path) as running:
        yield running


@contextlib.contextmanager
def _slirp4netns(tmp_path: Path,
                 *options: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    from tests.nsutil import NetNS, skip_unless_capable, unix_listening, wait_for

    skip_unless_capable()
    binary = shutil.which("slirp4netns")
    if binary is None:
        pytest.skip("slirp4netns is not installed")
    path = tmp_path / "s4n.sock"
    with NetNS("s4nhost") as host, NetNS("s4nguest") as guest:
        host.run(["ip", "link", "set", "lo", "up"])
        holder = guest.popen(["sleep", "infinity"], stdin=subprocess.DEVNULL)
        want = os.stat(guest.path).st_ino
        wait_for(lambda: _net_ino(holder.pid) == want, what="the holder to join the guest")
        with open(tmp_path / "s4n.log", "wb") as log:
            proc = host.popen([binary, "-c", *options, "--api-socket", str(path),
                               str(holder.pid), "tap0"], stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL)
            # Not path.exists(): the file is there from bind(), before slirp4netns listens.
            wait_for(lambda: unix_listening(proc.pid, path) or proc.poll() is not None,
                     what="slirp4netns's API socket")
            assert proc.poll() is None, (tmp_path / "s4n.log").read_text()
            yield path, proc
            assert proc.poll() is None, "slirp4netns died"


@pytest.mark.e2e
def test_tables_match_real_slirp4netns(
        real_slirp4netns: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """Replays PARSE_CASES and SESSION against slirp4netns 1.2.0."""
    path, _proc = real_slirp4netns
    for raw, expected in PARSE_CASES:
        assert ask_unix(path, raw) == expected, raw
    ports = session_ports(18080)
    for request, reply in SESSION:
        assert ask_unix(path, substitute(request, ports)) == substitute(reply, ports), request
    # pyslirp's extensions are requests slirp4netns refuses: no client of it relies on them.
    for raw, refusal in EXTENSIONS:
        assert ask_unix(path, raw) == refusal, raw


@pytest.mark.e2e
def test_ipv6_requests_are_refused_by_slirp4netns_even_with_enable_ipv6(tmp_path: Path) -> None:
    """What pyslirp -6 serves (test_ipv6_*) is an extension: slirp4netns 1.2.0 -6 refuses it."""
    with _slirp4netns(tmp_path, "--enable-ipv6") as (path, _proc):
        for raw, refusal in IPV6_EXTENSIONS:
            assert ask_unix(path, raw) == refusal, raw
        ports = session_ports(18080)
        for request, reply in SESSION:
            assert ask_unix(path, substitute(request, ports)) == substitute(reply, ports), \
                request


_FUZZ_TEMPLATES = [
    b'{"execute":"list_hostfwd"}',
    b'{"execute":"list_hostfwd","x":[1,-2.5e3,{"a":null,"b":true,"c":false}],'
    b'"s":"a\\u00e9\\n\\ud83d\\ude00"}',
    b'{"execute":"remove_hostfwd","arguments":{"id":99}}',
    b' {"arguments":{"id":1.5,"z":"\\/"},"execute":"remove_hostfwd"} ',
    b'{"execute":"nope","arguments":[0.5,1e2,"x"]}',
]
_FUZZ_BYTES = b'{}[]",:\\ u0123456789abcdefABCDEFeEtrunlsx.-+\t\n\x0b\x00\x01\x7f\xff\xc3'


def _mutate(rng: random.Random, template: bytes) -> bytes:
    s = bytearray(template)
    for _ in range(rng.randint(1, 3)):
        op, pos = rng.random(), rng.randrange(len(s) + 1)
        byte = _FUZZ_BYTES[rng.randrange(len(_FUZZ_BYTES))]
        if op < 0.4 and s:
            s[min(pos, len(s) - 1)] = byte
        elif op < 0.7:
            s.insert(pos, byte)
        elif s:
            del s[min(pos, len(s) - 1)]
    return bytes(s)


@pytest.mark.e2e
def test_mutated_requests_get_slirp4netns_s_replies(
        real_slirp4netns: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """Differential fuzzing of the parser: 3000 seeded mutations of harmless requests
    (23000 agreed when this was written)."""
    path, proc = real_slirp4netns
    rng = random.Random(20261122)
    ours = handler()
    mismatches = []
    previous = None
    for _ in range(3000):
        request = _mutate(rng, rng.choice(_FUZZ_TEMPLATES))
        if b"add_hostfwd" in request:  # could crash slirp4netns (NULL proto)
            continue
        try:
            theirs = ask_unix(path, request)
        except ConnectionRefusedError:
            assert proc.poll() is None, f"slirp4netns died after the request {previous!r}"
            raise
        previous = request
        if theirs != ours.reply_for(request, final=True):
            mismatches.append((request, theirs))
    assert mismatches == []


def _net_ino(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def test_out_of_fds_pauses_accepting_instead_of_spinning(tmp_path: Path) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    server = ApiServer(loop, str(tmp_path / "api.sock"), handler())
    real = server._sock
    assert real is not None
    calls = []

    class OutOfFds:
        def accept(self) -> Any:
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")

        def fileno(self) -> int:
            assert real is not None
            return real.fileno()

        def close(self) -> None:
            assert real is not None
            real.close()

    server._sock = OutOfFds()  # type: ignore[assignment]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(tmp_path / "api.sock"))
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:  # the loop may start late when busy
            loop.run_until_complete(asyncio.sleep(0.01))
        loop.run_until_complete(asyncio.sleep(0.3))
        assert 1 <= len(calls) <= 3
        server._sock = real
        c.sendall(LIST)
        c.shutdown(socket.SHUT_WR)
        c.settimeout(10)
        # Read while the loop runs: however long the machine takes, the reply comes.
        assert loop.run_until_complete(loop.run_in_executor(None, read_all, c)) == ENTRIES_EMPTY
    server.close()
    loop.close()


# ---- nobody else gets in; a dribbled request costs what one write does ----------------------

def test_another_user_cannot_connect() -> None:
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="pyslirp-api-test-"))
    shared.chmod(0o755)  # anyone may search it: only the socket's mode keeps them out
    old = os.umask(0)  # the widest a caller could have
    try:
        running = Running(shared / "api.sock")
    finally:
        os.umask(old)
    try:
        code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
                "    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", code, str(shared / "api.sock")],
                              capture_output=True, text=True, timeout=30, cwd="/")
        assert proc.stdout.strip() == "refused", proc.stdout + proc.stderr
        assert running.request(LIST) == ENTRIES_EMPTY  # its owner still can
    finally:
        running.stop()
        shutil.rmtree(shared)


def test_request_sent_a_byte_at_a_time_is_parsed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read goes on parsing where the last stopped: work grows with bytes, not bytes²."""
    request = b'{"execute":"list_hostfwd","pad":[1'
    request += b",1" * ((api.MAX_REQUEST - 1 - len(request) - 2) // 2) + b"]}"
    request = request[:-2] + b" " * (api.MAX_REQUEST - 1 - len(request)) + b"]}"
    assert len(request) == api.MAX_REQUEST - 1  # the largest request there is
    scans = 0
    budget = 4 * len(request)  # re-parsing from the start each read would need ~1000 times more
    real_skip_ws = api._skip_ws

    def counting_skip_ws(s: bytes, i: int) -> int:
        nonlocal scans
        scans += 1
        if scans > budget:
            raise AssertionError(f"more than {budget} whitespace scans for {len(request)} bytes")
        return real_skip_ws(s, i)

    monkeypatch.setattr(api, "_skip_ws", counting_skip_ws)
    loop = asyncio.new_event_loop()
    server = ApiServer(loop, str(tmp_path / "api.sock"), handler())
    ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ours.connect(str(tmp_path / "api.sock"))
        server._on_accept()
        [client] = server.clients.values()
        for byte in request:  # one read per byte: the server's handler, called as the loop would
            ours.send(bytes([byte]))
            server._on_readable(client)
        ours.settimeout(5)
        assert read_all(ours) == ENTRIES_EMPTY
        print(f"{scans} whitespace scans for {len(request)} bytes")
    finally:
        ours.close()
        server.close()
        loop.close()


@pytest.mark.parametrize("seed", range(3))
def test_reading_in_pieces_answers_as_parsing_everything_so_far_would(seed: int) -> None:
    """After every read the incremental parser is where a parse of all the bytes so far is."""
    rng = random.Random(seed)
    requests = [c[0] for c in PARSE_CASES if c[0]] + [
        b'{"execute":"list_hostfwd","x":[1.5e3,-0.5,"\\ud83d\\ude00",true,{"y":null}]}',
        b'{"execute":"list_hostfwd","x":12', b'\xef\xbb\xbf' + LIST, LIST + b"\0junk"]
    for request in requests:
        if seed == 0 and len(request) < 300:
            cuts = list(range(1, len(request)))  # a byte at a time
        else:
            cuts = sorted(rng.sample(range(1, len(request)), min(len(request) - 1, 5)))
        pieces = [request[a:b] for a, b in zip([0, *cuts], [*cuts, len(request)], strict=True)]
        reading = api.Request(handler())
        so_far = b""
        for piece in pieces:
            so_far += piece
            got = reading.feed(piece, final=False)
            assert got == handler().reply_for(so_far, final=False), (request, so_far)
            if got is not None:
                break
        else:
            assert reading.feed(b"", final=True) == handler().reply_for(so_far, final=True)
