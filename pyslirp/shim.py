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

``--shared-engine`` writes a shim that sets ``PYSLIRP_SHARED_ENGINE=1`` before
the ``exec``: every namespace it is started for is then served by the calling
user's one engine (:mod:`pyslirp.cni.shared_shim`, docs/shared-engine.md), and
``--rundir RUNDIR`` also fixes that engine's runtime directory
(``PYSLIRP_RUNDIR``; default: the CNI plugin's, ``/run/pyslirp`` for root).
Callers run the shim unchanged: they never learn which mode serves them.

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
Usage: pyslirp shim install [--force] [--name NAME] [--shared-engine [--rundir RUNDIR]] DIR
       pyslirp shim show [--shared-engine [--rundir RUNDIR]]
Write DIR/NAME (default NAME: slirp4netns), an executable that execs pyslirp with its
arguments, for rootlesskit --slirp4netns-binary, podman's network_cmd_path or PATH.
--shared-engine: every namespace is served by one engine of the calling user instead of
a process of its own (PYSLIRP_SHARED_ENGINE=1; see docs/shared-engine.md); --rundir:
that engine's runtime directory (PYSLIRP_RUNDIR).
"""


def script(python: str | None = None, *, shared_engine: bool = False,
           rundir: str | None = None) -> str:
    """The shim's text for the interpreter ``python`` (default: the one running now).

    ``shared_engine``: the shim asks for the shared mode; ``rundir``: its engine's
    runtime directory (only with ``shared_engine``; an absolute path).
    """
    interpreter = python or sys.executable
    env = ""
    if rundir is not None:
        if not shared_engine or not os.path.isabs(rundir):
            raise ValueError("--rundir needs --shared-engine and an absolute path")
        env = f"export PYSLIRP_RUNDIR={shlex.quote(rundir)}\n"
    if shared_engine:
        env = f"export PYSLIRP_SHARED_ENGINE=1\n{env}"
        mode = "one shared engine serves every namespace (docs/shared-engine.md)"
    else:
        mode = "one pyslirp process per namespace"
    return (f"#!/bin/sh\n"
            f"{MARKER} {__version__}: runs pyslirp where slirp4netns is expected;\n"
            f"# {mode}.\n"
            f"# exec, so the PID the caller holds is pyslirp itself.\n"
            f"{env}"
            f"exec {shlex.quote(interpreter)} -I -m pyslirp \"$@\"\n")


def install(directory: str, *, name: str = NAME, force: bool = False,
            python: str | None = None, shared_engine: bool = False,
            rundir: str | None = None) -> str:
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
    text = script(python, shared_engine=shared_engine, rundir=rundir)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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
    if argv[0] not in ("install", "show"):
        print(f"pyslirp shim: unknown command '{argv[0]}'\n{USAGE}", end="", file=sys.stderr)
        return 1
    parsed = _parse_options(argv[1:])
    if isinstance(parsed, str):
        print(f"pyslirp shim: {parsed}", file=sys.stderr)
        return 1
    options, positionals = parsed
    try:
        if argv[0] == "show":
            if positionals or options["force"] or options["name"] != NAME:
                print(f"pyslirp shim: show takes only --shared-engine and --rundir\n{USAGE}",
                      end="", file=sys.stderr)
                return 1
            sys.stdout.write(script(shared_engine=bool(options["shared"]),
                                    rundir=options["rundir"]))  # type: ignore[arg-type]
            return 0
        name = str(options["name"])
        if len(positionals) != 1 or not name or "/" in name:
            print(f"pyslirp shim: install needs one DIR and a plain NAME\n{USAGE}", end="",
                  file=sys.stderr)
            return 1
        path = install(positionals[0], name=name, force=bool(options["force"]),
                       shared_engine=bool(options["shared"]),
                       rundir=options["rundir"])  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        print(f"pyslirp shim: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _parse_options(rest: list[str]) -> tuple[dict[str, object], list[str]] | str:
    """(options, positionals) of ``install``/``show``, or the reason they are wrong."""
    options: dict[str, object] = {"force": False, "name": NAME, "shared": False,
                                  "rundir": None}
    positionals: list[str] = []
    rest = list(rest)
    while rest:
        arg = rest.pop(0)
        key, eq, value = arg.partition("=")
        if arg == "--force":
            options["force"] = True
        elif arg == "--shared-engine":
            options["shared"] = True
        elif key in ("--name", "--rundir"):
            if not eq:
                if not rest:
                    return f"option '{key}' needs a value"
                value = rest.pop(0)
            options[key[2:]] = value
        elif arg.startswith("-"):
            return f"unknown option '{arg}'"
        else:
            positionals.append(arg)
    return options, positionals
