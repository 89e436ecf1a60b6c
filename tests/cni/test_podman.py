"""A real CNI runtime: podman (Debian's 4.3, CNI backend) running busybox containers on ``slirp``.

podman reads a ``containers.conf`` named by ``CONTAINERS_CONF`` with
``network_backend = "cni"`` and our plugin and configuration directories, and
keeps its storage under the test's own directory (``--root``/``--runroot``),
so nothing of the machine's podman setup is used or changed. The container is
a busybox tree (``--rootfs``): no image registry. Flags as docs/testing.md says
(runc, cgroupfs, explicit rlimits).

podman runs DEL from ``podman container cleanup``, which conmon starts with a
scrubbed environment: the network configuration's ``runtimeDir`` is what
makes ADD and DEL agree on the engine here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pyslirp.cni import install
from tests.cni.conftest import DNS_ADDR, DNS_NAME, HTTP_BODY, DnsServer, engine_pid, wait_until
from tests.e2e import servers6 as servers6_script
from tests.netutil import free_port
from tests.podmanutil import busybox_rootfs, ensure_subid_range, remove_pods, require_podman

pytestmark = pytest.mark.e2e


@pytest.fixture
def servers6() -> Iterator[dict[str, Any]]:
    """HTTP and an AAAA-answering DNS server on this namespace's ``::1`` (servers6.py)."""
    with servers6_script.running(4096) as info:
        yield info


@pytest.fixture
def podman(dns_server: DnsServer) -> Iterator[Any]:
    require_podman()
    work = tempfile.mkdtemp(prefix="pyslirp-pod-", dir="/tmp")
    os.chmod(work, 0o755)  # a --uidmap container's root (uid 200000) must reach its rootfs
    rootfs = str(busybox_rootfs(Path(work) / "rootfs",
                                ("sh", "wget", "nslookup", "ip", "cat", "grep", "httpd",
                                 "sha256sum")))
    bindir, netdir, rundir = (os.path.join(work, d) for d in ("bin", "net", "run"))
    os.makedirs(netdir)
    install.install(bindir)
    with open(os.path.join(netdir, "slirptest.conflist"), "w") as f:
        f.write('{"cniVersion": "1.0.0", "name": "slirptest", "plugins": [{"type": "slirp", '
                f'"runtimeDir": "{rundir}", "dnsUpstreams": ["127.0.0.1:{dns_server.port}"], '
                '"capabilities": {"portMappings": true}}]}')
    conf = os.path.join(work, "containers.conf")
    with open(conf, "w") as f:
        f.write(f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{bindir}", '
                f'"/usr/lib/cni"]\nnetwork_config_dir = "{netdir}"\n')
    env = {**os.environ, "CONTAINERS_CONF": conf}
    base = ["podman", "--root", os.path.join(work, "root"), "--runroot",
            os.path.join(work, "runroot"), "--runtime=runc", "--cgroup-manager=cgroupfs"]

    def run(*args: str, image: str | None = None,
            network: str = "slirptest") -> subprocess.CompletedProcess[str]:
        """``podman run`` of the busybox tree (``--rootfs``), or of ``image`` made from it."""
        where = [image] if image else ["--rootfs", rootfs]
        argv = [*base, "run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit",
               "nproc=1024:1024", "--network", network, *args[:-1], *where,
               "sh", "-c", args[-1]]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)

    def make_image(name: str) -> str:
        """The busybox tree as an image (``--userns=auto`` needs one: podman maps its files)."""
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([*base, "import", "-", name], stdin=tar.stdout, check=True, env=env,
                       capture_output=True, timeout=120)
        assert tar.wait() == 0
        return name

    def add_network(name: str, **fields: Any) -> None:
        plugin = {"type": "slirp", "runtimeDir": rundir, **fields}
        with open(os.path.join(netdir, f"{name}.conflist"), "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]}, f)

    run.rundir = rundir  # type: ignore[attr-defined]
    run.add_network = add_network  # type: ignore[attr-defined]
    run.rootfs = rootfs  # type: ignore[attr-defined]
    run.conf = conf  # type: ignore[attr-defined]
    run.env = env  # type: ignore[attr-defined]
    run.base = base  # type: ignore[attr-defined]
    run.make_image = make_image  # type: ignore[attr-defined]
    try:
        yield run
    finally:
        remove_pods(base, env, work)
        from tests.cni.conftest import stop_engine
        stop_engine(rundir)
        if not os.environ.get("PYSLIRP_KEEP_POD"):
            shutil.rmtree(work, ignore_errors=True)


def test_podman_container_on_slirp(podman: Any, http_port: int) -> None:
    script = (f"wget -q -O - http://10.0.2.2:{http_port}/ && "
              f"nslookup {DNS_NAME} 10.0.2.3 && ip -4 addr show eth0")
    proc = podman(script)
    assert proc.returncode == 0, proc.stderr
    assert HTTP_BODY.decode() in proc.stdout
    assert DNS_ADDR in proc.stdout
    assert "10.0.2.100/24" in proc.stdout
    # --rm: podman's cleanup ran DEL; the attachment and then the engine are gone.
    rundir = podman.rundir
    assert wait_until(lambda: os.listdir(os.path.join(rundir, "attachments")) == [], 30)
    assert wait_until(lambda: engine_pid(rundir) is None, 30)


def test_podman_container_on_an_ipv6_slirp_network(podman: Any,
                                                   servers6: dict[str, Any]) -> None:
    """``"ipv6": true``: podman configures nothing itself; the container has the address
    the result names, fetches from the host's ``::1`` via ``[fd00::2]`` with its IPv4
    routes gone, and resolves AAAA through ``[fd00::3]``."""
    podman.add_network("slirp6", ipv6=True, dnsUpstreams=[f"[::1]:{servers6['dns']}"])
    script = ("ip -6 addr show dev eth0 scope global && ip -6 route show default && "
              "ip -4 route flush dev eth0 && "
              f"wget -q -O - 'http://[fd00::2]:{servers6['http']}/' | sha256sum && "
              "nslookup -type=AAAA anything.test fd00::3")
    proc = podman("--cap-add=NET_ADMIN", script, network="slirp6")  # for the route flush
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "inet6 fd00::100/64 scope global" in proc.stdout
    assert "default via fd00::2 dev eth0" in proc.stdout
    assert servers6["sha256"] in proc.stdout
    assert "fd00::abcd" in proc.stdout


def _http_get_from(addr: str, port: int) -> bytes | None:
    try:
        with socket.create_connection((addr, port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := c.recv(65536):
                data += chunk
            return data
    except OSError:
        return None


UIDMAP = ("--uidmap", "0:200000:65536", "--gidmap", "0:200000:65536")
#: podman picks the range from the `containers` entry of /etc/subuid (AUTO_RANGE): the first
#: free one, at its start, since no other container runs.
AUTO = ("--userns=auto:size=65536",)
AUTO_RANGE = "containers:200000:1000000"


@pytest.mark.parametrize(("reservation", "userns"),
                         [(True, ()), (False, ()), (True, UIDMAP), (False, UIDMAP), (True, AUTO)],
                         ids=["reserved", "unreserved", "reserved-uidmap", "unreserved-uidmap",
                              "reserved-auto"])
def test_podman_publish_reaches_a_server_in_the_container(podman: Any, reservation: bool,
                                                          userns: tuple[str, ...]) -> None:
    """``podman run -p 127.0.0.1:PORT:80``: a host client reaches busybox httpd in the
    container. Rootful podman reserves the published port itself right after ADD (its
    process binds and listens, conmon keeps the socket); the engine takes that very
    socket over and serves it. With ``enable_port_reservation = false`` no reservation
    comes, and the engine knows it once the container's conmon holds none: it binds the
    port itself then, not after its fallback wait (made far longer than the test's here).
    With ``--uidmap`` conmon already holds the reservation when ADD comes. After the
    container is gone nothing listens any more."""
    if not reservation:
        with open(podman.conf, "a") as f:
            f.write("[engine]\nenable_port_reservation = false\n")
        podman.env["PYSLIRP_CNI_ADOPT_WAIT"] = "600"
    port = free_port()
    www = os.path.join(podman.rootfs, "www")
    os.makedirs(www)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("published through slirp\n")
    image = None
    name = f"pyslirp-publish-{port}"
    if userns == AUTO:
        ensure_subid_range(AUTO_RANGE)
        image = podman.make_image(f"localhost/pyslirp-busybox-{port}")
    elif userns:  # the container's root is uid 200000 outside: let it own its root file system
        subprocess.run(["chown", "-R", "200000:200000", podman.rootfs], check=True)
    with ThreadPoolExecutor(1) as pool:
        # The container serves until the test creates /www/stop in its root file system.
        running = pool.submit(podman, *userns, "--name", name, "-p", f"127.0.0.1:{port}:80",
                              "httpd -p 80 -h /www && "
                              "while [ ! -e /www/stop ]; do busybox sleep 0.1; done",
                              image=image)
        try:
            assert wait_until(lambda: b"published through slirp"
                              in (_http_get_from("127.0.0.1", port) or b"")
                              or running.done(), 120)
            assert not running.done(), running.result().stderr
            reply = _http_get_from("127.0.0.1", port)
            assert reply is not None and b"published through slirp" in reply
        finally:
            if image:  # the container has its own copy of the tree
                subprocess.run([*podman.base, "exec", name, "sh", "-c", ": > /www/stop"],
                               env=podman.env, capture_output=True, timeout=60)
            else:
                open(os.path.join(www, "stop"), "w").close()
        done = running.result()
    assert done.returncode == 0, done.stderr
    rundir = podman.rundir
    assert wait_until(lambda: os.listdir(os.path.join(rundir, "attachments")) == [], 30)
    assert wait_until(lambda: engine_pid(rundir) is None, 30)
    with socket.socket() as again:
        # Nobody listens on the port any more (the forwarded connections' TIME_WAIT
        # may linger, hence SO_REUSEADDR, which still refuses a listening socket).
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen(1)


@pytest.mark.parametrize("reservation", [True, False], ids=["reserved", "unreserved"])
@pytest.mark.parametrize(("publish", "clients"), [
    ("127.0.0.1:{port}:80", ("127.0.0.1",)),
    ("[::1]:{port}:80", ("::1",)),
    ("{port}:80", ("127.0.0.1", "::1")),
], ids=["ipv4-loopback", "ipv6-loopback", "every-address"])
def test_podman_publish_on_an_ipv6_network(podman: Any, reservation: bool, publish: str,
                                           clients: tuple[str, ...]) -> None:
    """On an ``"ipv6": true`` network ``-p [::1]:PORT:80`` reaches busybox httpd in the
    container from the host's ``[::1]``, and ``-p PORT:80`` from ``127.0.0.1`` and
    ``[::1]`` alike (as with pasta and rootful podman's own networks). With podman's
    reservation on, the engine serves podman's own socket of an IPv6 ``hostIP`` (the
    engine log says so); without it, it binds the port itself once conmon runs."""
    if not reservation:
        with open(podman.conf, "a") as f:
            f.write("[engine]\nenable_port_reservation = false\n")
        podman.env["PYSLIRP_CNI_ADOPT_WAIT"] = "600"
    podman.add_network("slirp6p", ipv6=True, capabilities={"portMappings": True})
    port = free_port()
    www = os.path.join(podman.rootfs, "www")
    os.makedirs(www)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("published over IPv6\n")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(podman, "-p", publish.format(port=port),
                              "httpd -p 80 -h /www && "
                              "while [ ! -e /www/stop ]; do busybox sleep 0.1; done",
                              network="slirp6p")
        try:
            for addr in clients:
                assert wait_until(lambda a=addr: b"published over IPv6"  # type: ignore[misc]
                                  in (_http_get_from(a, port) or b"") or running.done(), 120)
                assert not running.done(), running.result().stderr
            with open(os.path.join(podman.rundir, "engine.log")) as f:
                log = f.read()
        finally:
            open(os.path.join(www, "stop"), "w").close()
        done = running.result()
    assert done.returncode == 0, done.stderr
    if reservation:
        where = publish.format(port=port).rsplit(":", 1)[0]
        where = where if ":" in where else f"0.0.0.0:{port}"
        assert f"took over tcp port {where}" in log, log
    rundir = podman.rundir
    assert wait_until(lambda: os.listdir(os.path.join(rundir, "attachments")) == [], 30)
    for addr in clients:
        assert _http_get_from(addr, port) is None


def test_podman_publish_of_a_port_someone_else_holds_fails_cleanly(podman: Any) -> None:
    """A port held by a process outside podman's own process tree (here: the test) is
    never taken over: podman fails with "address already in use" naming the port, and
    leaves nothing behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = podman("-p", f"127.0.0.1:{port}:8080", "true")
        assert proc.returncode != 0
        assert f"127.0.0.1:{port}" in proc.stderr, proc.stderr
        assert "address already in use" in proc.stderr.lower(), proc.stderr
        rundir = podman.rundir
        assert wait_until(lambda: os.listdir(os.path.join(rundir, "attachments")) == [], 30)
        # Still ours: a connection reaches this socket, not the engine.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = taken.accept()
            conn.close()
