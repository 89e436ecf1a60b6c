"""The resolv.conf watcher hands every nameserver to the DNS forwarder, link-local ones
with their zone included (the DNS sockets connect with the zone's scope id)."""

from __future__ import annotations

from pathlib import Path

from pyslirp.runtime.main import ResolvConfWatcher


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[str, int]], list[str]]] = []

    def set_dns(self, upstreams: list[tuple[str, int]], search: list[str]) -> None:
        self.calls.append((list(upstreams), list(search)))


def test_nameservers_with_a_zone_are_kept(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search corp.test\nnameserver fe80::1%lo\nnameserver 127.0.0.1\n"
                      "nameserver ::1\n")
    server = _Recorder()
    ResolvConfWatcher(server, str(resolv)).check()  # type: ignore[arg-type]
    assert server.calls == [([("fe80::1%lo", 53), ("127.0.0.1", 53), ("::1", 53)],
                             ["corp.test"])]
