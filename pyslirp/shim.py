"""``pyslirp shim``: make pyslirp answer where callers expect a ``slirp4netns`` executable.

Theory of operation
-------------------
rootlesskit (``--slirp4netns-binary``), podman (``network_cmd_path`` in
containers.conf, or ``slirp4netns`` on PATH) and Docker rootless start
slirp4netns themselves, keep its PID, signal it and wait for it. The shim is
a two-line ``/bin/sh`` script named ``slirp4netns`` that ``exec``s the
Python interpreter pyslirp is installed in with ``-m pyslirp "$@"``: after
the ``exec`` the process the caller started *is* pyslirp (same PID, so its
SIGTERM, ``Pdeathsig`` and wait all reach the stack), and every argument
arrives unchanged. Python runs with ``-I`` so the caller's working
directory and ``PYTHON*`` environment cannot substitute another module.

``pyslirp shim install DIR`` writes ``DIR/slirp4netns`` (mode 0755; an
existing file is replaced only with ``--force``, and never one that is not
a shim unless forced); ``pyslirp shim show`` prints the script.

What it deliberately does not do: it does not edit PATH, containers.conf or
any caller's configuration, and it never touches ``/usr/bin/slirp4netns``
unless told to write there.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile

from pyslirp import __version__

NAME = "slirp4netns"
MARKER = "# pyslirp shim"
USAGE = """\
Usage: pyslirp shim install [--force] [--name NAME] DIR
       pyslirp shim show
Write DIR/NAME (default NAME: slirp4netns), an executable that execs pyslirp with its
arguments, for rootlesskit --slirp4netns-binary, podman's network_cmd_path or PATH.
"""


def script(python: str | None = None) -> str:
    """The shim's text for the interpreter ``python`` (default: the one running now)."""
    interpreter = python or sys.executable
    return (f"#!/bin/sh\n"
            f"{MARKER} {__version__}: runs pyslirp where slirp4netns is expected.\n"
            f"# exec, so the PID the caller holds is pyslirp itself.\n"
            f"exec {shlex.quote(interpreter)} -I -m pyslirp \"$@\"\n")


def install(directory: str, *, name: str = NAME, force: bool = False,
            python: str | None = None) -> str:
    """Write the shim atomically; returns its path. Raises OSError / FileExistsError."""
    path = os.path.join(directory, name)
    if os.path.lexists(path) and not force:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                head = f.read(200)
        except OSError:
            head = ""
        if MARKER not in head:
            raise FileExistsError(f"{path} exists and is not a pyslirp shim (use --force)")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(script(python))
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def main(argv: list[str]) -> int:
    """``pyslirp shim ...``; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 1
    if argv[0] == "show" and len(argv) == 1:
        sys.stdout.write(script())
        return 0
    if argv[0] != "install":
        print(f"pyslirp shim: unknown command '{argv[0]}'\n{USAGE}", end="", file=sys.stderr)
        return 1
    force = False
    name = NAME
    rest = argv[1:]
    positionals: list[str] = []
    while rest:
        arg = rest.pop(0)
        if arg == "--force":
            force = True
        elif arg == "--name" and rest:
            name = rest.pop(0)
        elif arg.startswith("--name="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            print(f"pyslirp shim: unknown option '{arg}'", file=sys.stderr)
            return 1
        else:
            positionals.append(arg)
    if len(positionals) != 1 or not name or "/" in name:
        print(f"pyslirp shim: install needs one DIR and a plain NAME\n{USAGE}", end="",
              file=sys.stderr)
        return 1
    try:
        path = install(positionals[0], name=name, force=force)
    except OSError as exc:
        print(f"pyslirp shim: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
