"""What the DHCP client tests share: a client hook that records the bound lease."""

from __future__ import annotations

from pathlib import Path


def lease_hook(path: Path, out: Path, when: str) -> Path:
    """Write a udhcpc/dhclient hook at ``path`` that dumps its environment to ``out``
    (atomically) when the client reports ``when`` (udhcpc: "bound", dhclient: "BOUND")."""
    path.write_text(f'#!/bin/sh\nif [ "$1" = {when} ] || [ "$reason" = {when} ]; then\n'
                    f"  env > {out}.tmp && mv {out}.tmp {out}\nfi\nexit 0\n")
    path.chmod(0o755)
    return path


def read_env(path: Path) -> dict[str, str]:
    """The environment the hook recorded, as a dict."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v.strip("'") for k, v in pairs}
