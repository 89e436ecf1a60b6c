"""Container images made on this machine, with no image registry: what the containerd test
(tests/cni/test_containerd.py) and the KubeVirt image test (tests/kubevirt/test_image.py) use.

- ``busybox_image``: a busybox-static root (tests/podmanutil.py) as a one-layer image,
  ``podman import``-ed and ``podman save``-d as a docker archive (which ``ctr images
  import`` reads).
- ``base_image_tarball``: a minimal Debian root with python3 made by debootstrap from the
  Debian mirror apt uses here. It takes minutes, so the tarball is cached outside the clone
  (``PYSLIRP_TEST_CACHE``, default /var/cache/pyslirp-tests/), under a name derived from
  everything that goes into it (suite, variant, packages, mirror, the trimming recipe): a
  changed input builds a new one, an unchanged one is reused. A hit is only trusted after
  ``podman import`` of the tarball into the test's own storage gave an image.
- ``shadowed``: a command run with the test's own directories mounted over fixed paths
  (go-cni's /etc/cni/net.d, KubeVirt's /var/run/kubevirt-hooks) in a mount namespace of
  its own, so the machine's directories are never written.
- ``Podman``: a podman with its storage under the test's directory (``--root``/``--runroot``)
  and the flags this machine needs (docs/testing.md), so the machine's own images and
  containers are never seen or changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("PYSLIRP_TEST_CACHE", "/var/cache/pyslirp-tests"))

BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
# python3-venv: the Containerfile installs into a venv (Debian's python3 refuses a
# system-wide pip install, PEP 668); its pip is removed again after the install.
BASE_PACKAGES = ("python3", "python3-venv")
# What is cut from the debootstrapped root before it becomes the base image: nothing a
# program in it reads at run time. Part of the cache key, so a change rebuilds.
BASE_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
             "usr/share/lintian", "var/cache/apt", "var/lib/apt/lists", "var/log")
PODMAN_FLAGS = ("--runtime=runc", "--cgroup-manager=cgroupfs")
RUN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def require_tools(*tools: str, apt: str) -> None:
    """Skip when a tool is missing; fail under CI=true, which installs them (``apt``
    names the Debian packages)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (apt-get install {apt})"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# Runs a command in a mount namespace of its own in which each OURS=TARGET argument
# before "--" has the test's directory OURS mounted over TARGET. A TARGET that does not
# exist is made in an overlay on its nearest existing parent (upper layer below $WORK).
# The mounts live as long as the namespace's last process (e.g. an engine ctr's plugin
# started) and are seen by nobody else.
SHADOW = r"""
set -e
shadow() {
    if [ ! -d "$2" ]; then
        parent=$(dirname "$2")
        while [ ! -d "$parent" ]; do parent=$(dirname "$parent"); done
        layer=$(mktemp -d "$WORK/overlay.XXXXXX")  # its own: an earlier one may be in use
        mkdir "$layer/upper" "$layer/work"
        mount -t overlay overlay \
            -o "lowerdir=$parent,upperdir=$layer/upper,workdir=$layer/work" "$parent"
        mkdir -p "$2"
    fi
    mount --bind "$1" "$2"
}
while [ "$1" != -- ]; do shadow "${1%%=*}" "${1#*=}"; shift; done
shift
exec "$@"
"""


def shadowed(work: Path, mounts: dict[str, Path], argv: list[str]) -> list[str]:
    """``argv`` run with ``mounts`` (TARGET: OURS) in a private mount namespace."""
    pairs = [f"{ours}={target}" for target, ours in mounts.items()]
    return ["env", f"WORK={work}", "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", SHADOW, "shadow", *pairs, "--", *argv]


class Podman:
    """podman on storage of its own below ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.argv = ["podman", "--root", str(work / "root"), "--runroot", str(work / "runroot"),
                     "--storage-driver", "overlay", *PODMAN_FLAGS]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True,
                 stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.argv, *args], capture_output=True, text=stdin is None,
                              input=stdin, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {proc.stderr!s}")
        return proc

    def image_exists(self, ref: str) -> bool:
        return self("image", "exists", ref, check=False).returncode == 0

    def import_tarball(self, tarball: Path, ref: str) -> str:
        """``podman import``; returns the image id (checked to be there)."""
        image_id = self("import", str(tarball), ref, timeout=600).stdout.strip().splitlines()[-1]
        assert self.image_exists(ref), f"podman import of {tarball} left no image {ref}"
        return image_id

    def image_size(self, ref: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())

    def close(self) -> None:
        """Remove every container and image of this storage, then the storage itself
        (lazily unmounting whatever podman left mounted below ``work``)."""
        self("rm", "-af", "-t", "0", check=False, timeout=120)
        self("rmi", "-af", check=False, timeout=120)
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                text=True).stdout.split()
        for m in sorted((m for m in mounts if m.startswith(str(self.work))), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)


# ---------------------------------------------------------------- busybox


def busybox_image(podman: Podman, rootfs: Path, ref: str, archive: Path) -> Path:
    """The busybox tree at ``rootfs`` as image ``ref``, saved as a docker archive."""
    layer = archive.with_suffix(".rootfs.tar")
    with tarfile.open(layer, "w") as tar:
        tar.add(rootfs, arcname=".")
    podman.import_tarball(layer, ref)
    podman("save", "--format", "docker-archive", "-o", str(archive), ref)
    layer.unlink()
    return archive


# ---------------------------------------------------------------- the sidecar image

#: The Python of BASE_PACKAGES' python3 (bookworm): the wheels must be built for it.
BASE_PYTHON = (3, 11)


def sidecar_requirements(pyproject: Path) -> list[str]:
    """What building kubevirt/Containerfile from the sources installs: the build backend,
    the dependencies and the ``kubevirt`` extra, read from pyproject.toml."""
    meta = tomllib.loads(pyproject.read_text())
    return [*meta["build-system"]["requires"], *meta["project"]["dependencies"],
            *meta["project"]["optional-dependencies"]["kubevirt"]]


def wheelhouse(pyproject: Path, dest: Path) -> Path:
    """Binary wheels of :func:`sidecar_requirements` for BASE_PYTHON, fetched by this
    Python's pip (its cache makes a repeat quick). Only binary wheels: nothing is compiled,
    and pyslirp itself is built inside the image from the sources."""
    if sys.version_info[:2] != BASE_PYTHON:
        raise RuntimeError(f"the wheels are made with this Python ({sys.version_info[:2]}), "
                           f"which must be the base image's {BASE_PYTHON}")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                           "--disable-pip-version-check", "--only-binary=:all:", "--wheel-dir",
                           str(dest), *sidecar_requirements(pyproject)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{proc.stderr[-3000:]}")
    return dest


# ---------------------------------------------------------------- Debian base


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The URL of the Debian archive apt uses here (deb822 ``*.sources`` or one-line
    ``sources.list``) for BASE_SUITE: debootstrap fetches from the same place."""
    files = sorted((sources / "sources.list.d").glob("*.sources"))
    for path in files:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if BASE_SUITE in fields.get("Suites", "").split() and \
                    "deb" in fields.get("Types", "").split() and fields.get("Enabled") != "no":
                return fields["URIs"].split()[0]
    lists = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.exists():
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{BASE_SUITE}\s", path.read_text(),
                          re.M)
            if m:
                return m.group(1)
    raise RuntimeError(f"no Debian archive for {BASE_SUITE} in {sources}/sources.list*")


def base_key(mirror: str) -> str:
    recipe = {"suite": BASE_SUITE, "variant": BASE_VARIANT, "packages": sorted(BASE_PACKAGES),
              "mirror": mirror, "trim": sorted(BASE_TRIM)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (test runs of other checkouts share the cache)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def base_image_tarball(rebuild: bool = False) -> Path:
    """The cached tarball of the Debian base root, made first if it is not there (or
    ``rebuild``)."""
    mirror = debian_mirror()
    tarball = CACHE / f"debian-{BASE_SUITE}-python3-{base_key(mirror)}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        if rebuild:
            tarball.unlink(missing_ok=True)
        if not tarball.exists():
            _build_base(mirror, tarball)
    return tarball


def base_image(podman: Podman) -> str:
    """The Debian base imported into ``podman``'s storage; returns its reference. A cached
    tarball that podman cannot import is made anew, once."""
    tarball = base_image_tarball()
    ref = f"localhost/pyslirp-test-base:{tarball.stem.rsplit('-', 1)[-1]}"
    try:
        podman.import_tarball(tarball, ref)
    except AssertionError:
        podman.import_tarball(base_image_tarball(rebuild=True), ref)
    return ref


def _build_base(mirror: str, tarball: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="base-", dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        proc = subprocess.run(
            ["debootstrap", f"--variant={BASE_VARIANT}", f"--include={','.join(BASE_PACKAGES)}",
             BASE_SUITE, str(root), mirror], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            log = root / "debootstrap" / "debootstrap.log"
            detail = log.read_text()[-3000:] if log.exists() else proc.stderr[-3000:]
            raise RuntimeError(f"debootstrap {BASE_SUITE} from {mirror} failed:\n{detail}")
        for rel in BASE_TRIM:
            target = root / rel
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        partial = Path(tmp) / "base.tar"
        # Numeric owners as they are in the tree: the image's files stay root's.
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf",
                        str(partial), "."], check=True, timeout=600)
        partial.rename(tarball)  # atomic: a tarball in the cache is always complete
