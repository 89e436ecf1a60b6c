"""What the podman tests share (tests/cni/test_podman.py, tests/e2e/test_podman_slirp4netns.py):
the check that podman can run here, and a busybox root filesystem so no image registry is
needed (``podman run --rootfs``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BUSYBOX = "/bin/busybox"


def require_podman(*tools: str) -> None:
    """Skip the test when podman, runc, ``tools`` or busybox-static are missing; under
    CI=true fail instead, since CI installs them."""
    reason = None
    for tool in ("podman", "runc", *tools):
        if shutil.which(tool) is None:
            reason = f"{tool} is not installed (apt-get install podman runc util-linux)"
            break
    else:
        if not os.path.exists(BUSYBOX):
            reason = "busybox-static is not installed"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def busybox_rootfs(rootfs: Path, applets: tuple[str, ...], extra_dirs: tuple[str, ...] = ()
                   ) -> Path:
    """A minimal root at ``rootfs``: the usual mount points, busybox and the applets."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", *extra_dirs):
        (rootfs / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in applets:
        (rootfs / "bin" / applet).symlink_to("busybox")
    return rootfs


def remove_pods(podman: list[str], env: dict[str, str], work: Path | str) -> None:
    """Remove every container of this podman root (``podman`` is its argv prefix) and
    lazily unmount whatever podman left mounted below ``work``."""
    subprocess.run([*podman, "rm", "-af", "-t", "0"], capture_output=True, env=env, timeout=120)
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                            text=True).stdout.split()
    for m in sorted((m for m in mounts if m.startswith(str(work))), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def ensure_subid_range(line: str, names: tuple[str, ...] = ()) -> None:
    """Add ``line`` (NAME:START:COUNT) to /etc/subuid and /etc/subgid unless an entry for
    NAME (or one of ``names``, e.g. root's uid "0") is there already (rootlesskit as root
    needs root's; podman --userns=auto needs a ``containers`` one)."""
    wanted = {line.split(":")[0], *names}
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if not any(existing.split(":")[0] in wanted for existing in lines):
            print(f"adding '{line}' to {path}")
            with open(path, "a") as f:
                f.write(line + "\n")
