"""A small Linux guest for QEMU, made from Debian's packages: kernel, NIC modules, busybox.

* :func:`debian_kernel` gives the path of a Debian 12 kernel and its NIC
  modules (e1000, and virtio-net with what it needs), fetched once with
  ``apt-get download`` + ``dpkg -x`` (nothing is installed) into a cache
  directory the test runs share (``$PYSLIRP_TEST_CACHE``, default
  ``~/.cache/pyslirp-tests``); only those files are kept, under the
  package's name, so a kernel update fetches anew.
* :func:`build_initramfs` writes an uncompressed ``newc`` cpio archive (the
  format the kernel unpacks into its rootfs) holding busybox-static, the
  modules and an ``/init`` script. Written here rather than with cpio(1):
  it's 30 lines and needs nothing installed.
* :func:`qemu_command` boots it under TCG (no KVM needed) with the serial
  console in a file the test reads.

The init script does the guest's side of the test and reports on the console
with lines starting ``VM:``; see ``INIT`` below.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("PYSLIRP_TEST_CACHE",
                            Path.home() / ".cache" / "pyslirp-tests"))
BUSYBOX = "/bin/busybox"
GUEST_MAC = "52:54:00:12:34:56"
#: NIC drivers and their dependencies, in the order insmod needs them (no modprobe:
#: the package's modules.dep is made at install time, and we don't install it).
MODULES = (
    "drivers/net/ethernet/intel/e1000/e1000.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
)

#: The guest's part. Ports come on the kernel command line (vmtest_*=...).
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /etc /www /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for word in $(cat /proc/cmdline); do
    case "$word" in
    vmtest_http=*) HTTP="${word#*=}" ;;
    vmtest_fwd=*) FWD="${word#*=}" ;;
    vmtest_dns=*) DNS="${word#*=}" ;;
    vmtest_http6=*) HTTP6="${word#*=}" ;;
    esac
done
echo "VM: booted $(uname -r)"
for module in $(cat /modules/order); do
    insmod "/modules/$module" || echo "VM: insmod $module failed"
done
ip link set lo up
ip link set eth0 up
echo "VM: mac $(cat /sys/class/net/eth0/address)"
echo "VM: driver $(basename "$(readlink /sys/class/net/eth0/device/driver)")"
udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /udhcpc.script || echo "VM: no lease"
if [ "$DNS" != 0 ]; then
    echo "VM: dns $(nslookup test.pyslirp 10.0.2.3 2>&1 | tr '\n' ' ')"
fi
if wget -q -O /tmp/payload "http://10.0.2.2:$HTTP/payload"; then
    echo "VM: payload $(sha256sum /tmp/payload)"
else
    echo "VM: payload fetch failed"
fi
if [ -n "$HTTP6" ]; then
    # SLAAC from pyslirp's router advertisements: wait for a global address on eth0
    # that is no longer tentative (flag 0x40 in /proc/net/if_inet6's fifth column).
    tries=0
    while [ $tries -lt 100 ]; do
        ADDR6=$(awk '$6 == "eth0" && $4 == "00" && $5 !~ /^[4-7c-f]/ { print $1 }' \
            /proc/net/if_inet6)
        [ -n "$ADDR6" ] && break
        tries=$((tries + 1))
        sleep 0.1
    done
    echo "VM: ipv6 addr ${ADDR6:-none}"
    echo "VM: ipv6 route $(ip -6 route show default | head -n 1)"
    if ping6 -c 1 -W 5 fd00::2 >/dev/null 2>&1; then
        echo "VM: ping6 fd00::2 ok"
    else
        echo "VM: ping6 fd00::2 failed"
    fi
    if wget -q -O /tmp/payload6 "http://[fd00::2]:$HTTP6/"; then
        echo "VM: payload6 $(sha256sum /tmp/payload6)"
    else
        echo "VM: payload6 fetch failed"
    fi
fi
if [ "$FWD" = 1 ]; then
    dd if=/dev/urandom of=/www/guest.bin bs=1024 count=256 2>/dev/null
    httpd -p 8080 -h /www
    echo "VM: serving $(sha256sum /www/guest.bin)"
    # The host connects to the second forwarded port when it is done with us.
    nc -l -p 8081 >/dev/null
fi
echo "VM: done"
poweroff -f
"""

UDHCPC_SCRIPT = r"""#!/bin/busybox sh
case "$1" in
bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet"
    route add default gw "$router" dev "$interface"
    echo "nameserver $dns" > /etc/resolv.conf
    echo "VM: lease $ip mask $subnet router $router dns $dns mtu $mtu"
    echo "VM: link mtu $(cat /sys/class/net/$interface/mtu)"
    ;;
esac
"""


def _run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=600).stdout


def _kernel_package() -> str:
    """The linux-image-6.1.0-N-amd64 that Debian's linux-image-amd64 points at now."""
    for attempt in range(2):
        try:
            out = _run("apt-cache", "depends", "linux-image-amd64")
        except subprocess.CalledProcessError:
            out = ""
        m = re.search(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", out)
        if m:
            return m.group(1)
        if attempt == 0 and os.geteuid() == 0:
            _run("apt-get", "update", "-q")  # a fresh machine has no package lists yet
    raise RuntimeError("apt-cache knows no linux-image-6.1.0-*-amd64 (run apt-get update)")


def debian_kernel() -> tuple[Path, Path]:
    """(vmlinuz, directory of the :data:`MODULES`) of Debian 12's kernel, cached or fetched."""
    names = [Path(m).name for m in MODULES]
    for found in sorted(CACHE.glob("linux-image-6.1.0-*-amd64")):
        if (found / "vmlinuz").exists() and all((found / n).exists() for n in names):
            return found / "vmlinuz", found
    package = _kernel_package()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user writes the download here
        try:
            _run("apt-get", "download", "-q", package, cwd=work)
        except subprocess.CalledProcessError:
            if os.geteuid() != 0:
                raise
            # Stale package lists name a kernel the archive has replaced since.
            _run("apt-get", "update", "-q")
            package = _kernel_package()
            _run("apt-get", "download", "-q", package, cwd=work)
        dest = CACHE / package
        [deb] = work.glob("*.deb")
        _run("dpkg-deb", "-x", str(deb), str(work / "root"))
        [vmlinuz] = (work / "root" / "boot").glob("vmlinuz-*")
        [kernel_dir] = (work / "root" / "lib" / "modules").glob("*/kernel")
        staged = work / "staged"
        staged.mkdir()
        shutil.copy(vmlinuz, staged / "vmlinuz")
        for module in MODULES:
            shutil.copy(kernel_dir / module, staged / Path(module).name)
        for old in CACHE.glob("linux-image-6.1.0-*-amd64"):
            shutil.rmtree(old, ignore_errors=True)
        staged.rename(dest)
    return dest / "vmlinuz", dest


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One ``newc`` record: 110-byte ASCII header, name + NUL, data, each 4-aligned."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(path: Path, modules: Path) -> None:
    names = [Path(m).name for m in MODULES]
    files = [
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, INIT.encode()),
        ("udhcpc.script", 0o100755, UDHCPC_SCRIPT.encode()),
        ("modules", 0o040755, b""),
        ("modules/order", 0o100644, "\n".join(names).encode() + b"\n"),
        *((f"modules/{n}", 0o100644, (modules / n).read_bytes()) for n in names),
    ]
    with open(path, "wb") as f:
        for ino, (name, mode, data) in enumerate(files, start=1):
            f.write(_cpio_entry(name, mode, data, ino))
        f.write(_cpio_entry("TRAILER!!!", 0, b"", 0))


def qemu_command(vmlinuz: Path, initrd: Path, netdev: str, console: Path,
                 cmdline: str, nic: list[str] | None = None) -> list[str]:
    """QEMU for the guest; ``nic`` replaces the -netdev/-device pair (e.g. a hook's args)."""
    if nic is None:
        # romfile=: no PXE option ROM (we boot -kernel; ipxe-qemu need not be installed).
        nic = ["-netdev", netdev, "-device", f"e1000,netdev=n0,mac={GUEST_MAC},romfile="]
    return [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet loglevel=3 {cmdline}",
        "-serial", f"file:{console}", "-monitor", "none",
        *nic,
    ]


class Console:
    """The guest's serial console as it is written, read line by line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, proc: subprocess.Popen[bytes],
                 timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while True:
            # Only lines the guest has finished: a line read while the serial console
            # is still writing it (a loaded machine) would match cut short.
            text = self.text()
            m = rx.search(text, 0, text.rfind("\n") + 1)
            if m:
                return m
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({proc.returncode}) before /{pattern}/; "
                                     f"console:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no /{pattern}/ on the console within {timeout:.0f} s;"
                                     f" console:\n{self.text()}")
            time.sleep(0.2)
