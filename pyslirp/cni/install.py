"""``pyslirp cni install DIR``: put a working ``slirp`` executable into a CNI plugin directory.

The file written is a three-line Python script whose shebang is the
interpreter running this command (so the engine it starts finds pyslirp's
dependencies) with ``-IS`` (isolated, no site: the plugin needs only the
standard library, and skipping site-packages saves startup time), and which
imports :mod:`pyslirp.cni.plugin` from where this package is installed. It is
written to a temporary name and renamed, so a runtime never runs half a file.
"""

from __future__ import annotations

import os
import sys

from pyslirp.cni.plugin import package_root

SCRIPT = """#!{python} -IS
# CNI plugin "slirp" from pyslirp, written by `pyslirp cni install`.
import sys; sys.path.insert(0, {root!r})
from pyslirp.cni.plugin import main; sys.exit(main())
"""


def script_text(python: str | None = None) -> str:
    return SCRIPT.format(python=python or sys.executable, root=package_root())


def install(directory: str, python: str | None = None) -> str:
    """Write ``DIR/slirp``; returns its path. Raises OSError with the cause."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "slirp")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(script_text(python))
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``pyslirp cni install DIR``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "install":
        print("usage: pyslirp cni install DIR", file=sys.stderr)
        return 2
    try:
        path = install(argv[1])
    except OSError as exc:
        print(f"pyslirp cni install: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
