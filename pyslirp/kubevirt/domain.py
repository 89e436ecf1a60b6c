"""What the slirp binding does to a VM: read the VMI, point QEMU's NIC at a pyslirp stack.

Theory of operation
-------------------
KubeVirt's network binding plugins are sidecars: virt-launcher hands the
plugin the libvirt domain XML it is about to define and the
VirtualMachineInstance as JSON (hook point ``OnDefineDomain``), and defines
whatever XML comes back. This module is the pure part of that (no sockets,
no processes), in two steps:

1. :func:`slirp_interfaces` reads the VMI: ``spec.networks`` names the pod
   network (the one with a ``pod`` member; ``pod.vmNetworkCIDR`` picks the
   virtual network, 10.0.2.0/24 by default, ``pod.vmIPv6NetworkCIDR`` the
   IPv6 prefix, a /64, fd00::/64 by default), ``spec.domain.devices.
   interfaces`` the NICs. A NIC on the pod network whose ``binding.name`` is
   the plugin's name (``NETWORK_BINDING_PLUGIN_NAME``, default ``slirp``) is
   ours: its ``model``, ``macAddress`` and ``ports`` (``port``, ``protocol``
   TCP by default or UDP) become a :class:`SlirpInterface`. Everything is
   checked here, before anything is started or edited: a VMI without such a
   NIC, a port declared twice, an unknown model, a bad MAC or CIDR are
   :class:`HookError` with a message naming the field.
2. :func:`edit_domain` adds, per NIC, a QEMU ``-netdev stream`` connecting
   to the stack's Unix socket and a ``-device`` of the requested model with
   the requested MAC, as ``<qemu:commandline>`` arguments (the way KubeVirt's
   own slirp sidecar passed ``-netdev user``; libvirt has no interface type
   for an arbitrary stream back end). The document is edited in place with
   minidom, so everything else in it, namespace prefixes included, comes
   back as it was. It is idempotent: if the two argument pairs are already
   there in order, nothing changes; stale pairs for the same NIC (another
   socket path) are replaced.

Model names are KubeVirt's (``virtio``, ``e1000``, ``e1000e``, ``igb``,
``rtl8139``, ``ne2k_pci``, ``pcnet``), mapped to QEMU device drivers. Unlike
QEMU's own slirp (``-netdev user``), a stream back end works with any of
them, so virtio, KubeVirt's default, stays virtio.

MTU: the link between the VM and its stack is private to them (everything
leaves through the pod's sockets), so a virtio NIC gets a 65,520-byte MTU by
default, as passt gives VMs: QEMU announces it to the guest driver
(``host_mtu``, VIRTIO_NET_F_MTU) and the stack's DHCP offers it. Every frame
costs the stack the same Python work whatever its size, so this is the
largest single throughput lever (a 64 MiB download took half the time in a
TCG guest). Other models have no way to learn an MTU from the device and
stay at 1,500.

IPv6 is on unless the sidecar is told otherwise (``--disable-ipv6``): KubeVirt's
own slirp binding gave the VM QEMU's ``-netdev user`` without any IPv6 option,
and QEMU's user networking answers IPv6 by default (router advertisements for
its prefix, the host at prefix::2, DNS at ::3), so a VM on the slirp binding had
IPv6 towards the pod. The stack does the same (``pyslirp -6``): the guest's
kernel takes a SLAAC address from the RAs. The prefix is slirp4netns's and
pyslirp's fd00::/64 rather than QEMU's site-local fec0::/64 (deprecated by RFC
3879); ``vmIPv6NetworkCIDR`` picks another (only a /64: SLAAC needs one, and
KubeVirt documents the field for its masquerade binding, whose default /120 it is
not).

Not done: PCI addresses, boot order and ACPI index from the VMI (KubeVirt's
slirp sidecar ignored them too); more than the pod network (slirp is
user-mode networking in the pod, there is nothing else to bind to).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any
from xml.dom import minidom
from xml.parsers.expat import ExpatError

from pyslirp.stack.config import ConfigError, parse_cidr6

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_CIDR = "10.0.2.0/24"
#: As pyslirp -6's and slirp4netns's (pyslirp.stack.config.DEFAULT_CIDR6).
DEFAULT_CIDR6 = "fd00::/64"
DEFAULT_PLUGIN_NAME = "slirp"
#: The MTU a virtio NIC gets (``virtio_mtu`` of :func:`slirp_interfaces`).
DEFAULT_VIRTIO_MTU = 65520
ETHERNET_MTU = 1500
#: RFC 8200's minimum link MTU for IPv6 (pyslirp.wire.ipv6.MIN_MTU).
IPV6_MIN_MTU = 1280
VIRTIO_DRIVER = "virtio-net-pci"
#: KubeVirt interface models -> QEMU device drivers.
MODELS = {
    "": VIRTIO_DRIVER,
    "virtio": VIRTIO_DRIVER,
    "e1000": "e1000",
    "e1000e": "e1000e",
    "igb": "igb",
    "rtl8139": "rtl8139",
    "ne2k_pci": "ne2k_pci",
    "pcnet": "pcnet",
}
#: What KubeVirt allows for interface names (a DNS label), which also keeps
#: QEMU ids and socket file names safe.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_MAC = re.compile(r"[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}")
_XMLNS = "http://www.w3.org/2000/xmlns/"


class HookError(ValueError):
    """The hook's input is wrong; the message says what, for the gRPC error."""


@dataclass(frozen=True, slots=True)
class Port:
    protocol: str  # "tcp" or "udp"
    port: int


@dataclass(frozen=True, slots=True)
class SlirpInterface:
    """One VMI NIC served by a pyslirp stack."""

    name: str
    #: The QEMU device driver (already mapped from KubeVirt's model name).
    driver: str
    mac: str | None
    network: ipaddress.IPv4Network
    ports: tuple[Port, ...]
    #: The link MTU: the stack's ``--mtu`` and, for virtio, QEMU's ``host_mtu``.
    mtu: int = ETHERNET_MTU
    #: The IPv6 prefix the stack serves (``-6 --cidr6``); None: IPv6 off.
    network6: ipaddress.IPv6Network | None = None

    @property
    def netdev_id(self) -> str:
        return f"pyslirp-{self.name}"

    @property
    def guest_address(self) -> str:
        """Where forwarded ports go: the first DHCP address, which the VM's only NIC gets."""
        return str(self.network.network_address + 15)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def slirp_interfaces(vmi_json: bytes, plugin: str = DEFAULT_PLUGIN_NAME,
                     virtio_mtu: int = DEFAULT_VIRTIO_MTU,
                     ipv6: bool = True) -> list[SlirpInterface]:
    """The VMI's pod-network NICs bound to ``plugin``; HookError if there is none or one is bad.

    A virtio NIC's link gets ``virtio_mtu``, any other 1500. With ``ipv6`` each
    NIC's stack serves IPv6 too (see the module doc).
    """
    try:
        vmi = json.loads(vmi_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HookError(f"the VMI is not valid JSON: {exc}") from None
    if not isinstance(vmi, dict):
        raise HookError("the VMI is not a JSON object")
    networks = _get(vmi, "spec", "networks") or []
    interfaces = _get(vmi, "spec", "domain", "devices", "interfaces") or []
    if not isinstance(networks, list) or not isinstance(interfaces, list):
        raise HookError("the VMI's spec.networks and spec.domain.devices.interfaces "
                        "must be lists")
    pod = [n for n in networks if isinstance(n, dict) and isinstance(n.get("pod"), dict)]
    if not pod:
        raise HookError("the VMI has no pod network (spec.networks[].pod)")
    found = []
    for network in pod:
        for iface in interfaces:
            if not isinstance(iface, dict) or iface.get("name") != network.get("name"):
                continue
            if _get(iface, "binding", "name") == plugin:
                found.append(_interface(iface, network, virtio_mtu, ipv6))
    if not found:
        names = ", ".join(repr(n.get("name")) for n in pod)
        raise HookError(f"no interface of the VMI's pod network ({names}) has "
                        f"binding {{name: {plugin}}}")
    return found


def _interface(iface: dict[str, Any], network: dict[str, Any],
               virtio_mtu: int, ipv6: bool) -> SlirpInterface:
    name = iface.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HookError(f"interface name {name!r} is not a DNS label (a-z, 0-9, '-')")
    where = f"interface {name}"
    model = iface.get("model", "")
    if not isinstance(model, str) or model not in MODELS:
        raise HookError(f"{where}: model {model!r} is not supported "
                        f"(one of {', '.join(m for m in MODELS if m)})")
    mac = iface.get("macAddress") or None
    if mac is not None and (not isinstance(mac, str) or not _MAC.fullmatch(mac)):
        raise HookError(f"{where}: macAddress {mac!r} is not a MAC address")
    cidr = _get(network, "pod", "vmNetworkCIDR") or DEFAULT_CIDR
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except (ValueError, TypeError) as exc:
        raise HookError(f"{where}: vmNetworkCIDR {cidr!r} is not an IPv4 network: {exc}") \
            from None
    if not 1 <= net.prefixlen <= 25:
        raise HookError(f"{where}: vmNetworkCIDR {cidr} must have a prefix of /1 to /25")
    net6 = _network6(where, network) if ipv6 else None
    ports: list[Port] = []
    raw_ports = iface.get("ports") or []
    if not isinstance(raw_ports, list):
        raise HookError(f"{where}: ports must be a list")
    for raw in raw_ports:
        number = raw.get("port") if isinstance(raw, dict) else None
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            raise HookError(f"{where}: port {number!r} is not a port number (1-65535)")
        protocol = raw.get("protocol") or "TCP"
        if protocol not in ("TCP", "UDP"):
            raise HookError(f"{where}: port {number}: protocol {protocol!r} is not TCP or UDP")
        port = Port(protocol.lower(), number)
        if port in ports:
            raise HookError(f"{where}: port {number}/{protocol} is declared twice")
        ports.append(port)
    driver = MODELS[model]
    mtu = virtio_mtu if driver == VIRTIO_DRIVER else ETHERNET_MTU
    if net6 is not None and mtu < IPV6_MIN_MTU:
        raise HookError(f"{where}: a link MTU of {mtu} is too small for IPv6 (at least "
                        f"{IPV6_MIN_MTU}); raise --virtio-mtu or run with --disable-ipv6")
    return SlirpInterface(name, driver, mac.lower().replace("-", ":") if mac else None,
                          net, tuple(ports), mtu, net6)


def _network6(where: str, network: dict[str, Any]) -> ipaddress.IPv6Network:
    """``pod.vmIPv6NetworkCIDR`` by pyslirp's ``--cidr6`` rule (a unicast /64)."""
    cidr6 = _get(network, "pod", "vmIPv6NetworkCIDR") or DEFAULT_CIDR6
    if not isinstance(cidr6, str):
        raise HookError(f"{where}: vmIPv6NetworkCIDR {cidr6!r} is not an IPv6 prefix")
    try:
        return parse_cidr6(cidr6)
    except ConfigError as exc:
        raise HookError(f"{where}: vmIPv6NetworkCIDR: {exc}") from None


# ---- the domain XML -----------------------------------------------------------------------

def qemu_args(iface: SlirpInterface, socket_path: str) -> list[tuple[str, str]]:
    """The ``-netdev``/``-device`` pairs that connect ``iface`` to its stack's socket."""
    netdev = (f"stream,id={iface.netdev_id},server=off,addr.type=unix,"
              f"addr.path={socket_path.replace(',', ',,')}")
    device: dict[str, str | int] = {"driver": iface.driver, "netdev": iface.netdev_id,
                                    "id": iface.netdev_id}
    if iface.mac:
        device["mac"] = iface.mac
    if iface.driver == VIRTIO_DRIVER and iface.mtu != ETHERNET_MTU:
        device["host_mtu"] = iface.mtu
    return [("-netdev", netdev), ("-device", json.dumps(device, separators=(",", ":")))]


def _parse(domain_xml: bytes) -> Any:  # minidom's stubs are stricter than the DOM
    try:
        doc = minidom.parseString(domain_xml)
    except (ExpatError, ValueError) as exc:
        raise HookError(f"the domain XML does not parse: {exc}") from None
    if doc.doctype is not None:
        raise HookError("the domain XML has a DOCTYPE; libvirt domain XML never does")
    root: Any = doc.documentElement
    if root.namespaceURI is not None or root.localName != "domain":
        raise HookError(f"the domain XML's root is <{root.tagName}>, not <domain>")
    return doc


def _qemu_prefix(root: Any) -> str:
    """The prefix bound to libvirt's QEMU namespace on <domain>, binding ``qemu`` if none is."""
    attrs: Any = root.attributes
    for i in range(attrs.length):
        attr = attrs.item(i)
        if attr.name.startswith("xmlns:") and attr.value == QEMU_NS:
            return str(attr.name[6:])
    if root.hasAttribute("xmlns:qemu"):
        raise HookError("the domain XML binds the prefix 'qemu' to "
                        f"{root.getAttribute('xmlns:qemu')!r}, not {QEMU_NS}")
    root.setAttributeNS(_XMLNS, "xmlns:qemu", QEMU_NS)
    return "qemu"


def _is_ours(iface: SlirpInterface, option: str, value: str) -> bool:
    if option == "-netdev":
        return f",id={iface.netdev_id}," in f",{value},"
    if option == "-device":
        return f'"netdev":"{iface.netdev_id}"' in value.replace(" ", "")
    return False


def edit_domain(domain_xml: bytes, plan: list[tuple[SlirpInterface, str]]) -> bytes:
    """The domain with QEMU's NICs for ``plan`` ((interface, socket path) pairs) in place."""
    doc = _parse(domain_xml)
    root: Any = doc.documentElement
    prefix = _qemu_prefix(root)
    commandline: Any = next((c for c in root.childNodes
                        if c.nodeType == c.ELEMENT_NODE and c.namespaceURI == QEMU_NS
                        and c.localName == "commandline"), None)
    if commandline is None:
        commandline = doc.createElementNS(QEMU_NS, f"{prefix}:commandline")
        last = root.lastChild
        if last is not None and last.nodeType == last.TEXT_NODE and not last.data.strip() \
                and last.previousSibling is not None \
                and last.previousSibling.previousSibling is not None \
                and last.previousSibling.previousSibling.nodeType == last.TEXT_NODE:
            # Indented like its siblings (virt-launcher's XML is tab-indented).
            indent = last.previousSibling.previousSibling.data
            root.insertBefore(doc.createTextNode(indent), last)
            root.insertBefore(commandline, last)
        else:
            root.appendChild(commandline)
    for iface, socket_path in plan:
        wanted = [v for pair in qemu_args(iface, socket_path) for v in pair]
        args: list[Any] = [a for a in commandline.childNodes
                if a.nodeType == a.ELEMENT_NODE and a.namespaceURI == QEMU_NS
                and a.localName == "arg"]
        values = [a.getAttribute("value") for a in args]
        if any(values[i:i + len(wanted)] == wanted for i in range(len(values))):
            continue  # already there, exactly: change nothing
        # Drop what an earlier call left for this NIC (say, another socket path).
        for i in range(len(args) - 1):
            if _is_ours(iface, values[i], values[i + 1]):
                commandline.removeChild(args[i])
                commandline.removeChild(args[i + 1])
                values[i + 1] = ""  # the pair is gone; don't match its value again
        for value in wanted:
            arg = doc.createElementNS(QEMU_NS, f"{prefix}:arg")
            arg.setAttribute("value", value)
            commandline.appendChild(arg)
    return root.toxml().encode()
