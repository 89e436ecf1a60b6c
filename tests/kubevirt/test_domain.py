"""The binding's pure part: which NICs a VMI gives us, and how the domain XML changes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from xml.dom import minidom

import pytest

from pyslirp.kubevirt.domain import (
    QEMU_NS,
    HookError,
    Port,
    SlirpInterface,
    edit_domain,
    slirp_interfaces,
)

SOCK = "/var/run/kubevirt-hooks/pyslirp/default.sock"


def vmi(interfaces: list[dict[str, Any]], networks: list[dict[str, Any]] | None = None) -> bytes:
    return json.dumps({"spec": {
        "domain": {"devices": {"interfaces": interfaces}},
        "networks": networks if networks is not None else [{"name": "default", "pod": {}}],
    }}).encode()


def slirp(**extra: Any) -> dict[str, Any]:
    return {"name": "default", "binding": {"name": "slirp"}, **extra}


def qemu_args(xml: bytes) -> list[str]:
    doc = minidom.parseString(xml)
    return [a.getAttribute("value") for a in doc.getElementsByTagNameNS(QEMU_NS, "arg")]


def validate(xml: bytes, tmp_path: Path) -> None:
    if shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None:
        pytest.fail("virt-xml-validate needs libvirt-clients and libxml2-utils (test-all)")
    path = tmp_path / "domain.xml"
    path.write_bytes(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the VMI -------------------------------------------------------------------------------

def test_fixture_vmi(vmi_json: bytes) -> None:
    [iface] = slirp_interfaces(vmi_json)
    assert iface == SlirpInterface(
        "default", "virtio-net-pci", "02:42:ac:11:00:02", iface.network,
        (Port("tcp", 8080), Port("udp", 5353), Port("tcp", 2222)), 65520, iface.network6)
    assert str(iface.network) == "10.0.2.0/24" and iface.guest_address == "10.0.2.15"
    # IPv6 on, as QEMU's -netdev user under KubeVirt's own slirp binding: fd00::/64.
    assert str(iface.network6) == "fd00::/64"


def test_ipv6_prefix_from_the_pod_network_or_off() -> None:
    raw = vmi([slirp()], [{"name": "default", "pod": {"vmIPv6NetworkCIDR": "fd12:3::/64"}}])
    [iface] = slirp_interfaces(raw)
    assert str(iface.network6) == "fd12:3::/64"
    [off] = slirp_interfaces(raw, ipv6=False)
    assert off.network6 is None


@pytest.mark.parametrize(("cidr6", "message"), [
    ("fd10:0:2::/120", "interface default: vmIPv6NetworkCIDR: invalid IPv6 prefix "
                       "'fd10:0:2::/120': the prefix length must be 64"),
    ("fd00::1/64", "has host bits set"),
    ("10.0.2.0/24", "invalid IPv6 prefix '10.0.2.0/24'"),
    (64, "vmIPv6NetworkCIDR 64 is not an IPv6 prefix"),
])
def test_bad_ipv6_prefix(cidr6: Any, message: str) -> None:
    raw = vmi([slirp()], [{"name": "default", "pod": {"vmIPv6NetworkCIDR": cidr6}}])
    with pytest.raises(HookError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slirp_interfaces(raw)
    assert slirp_interfaces(raw, ipv6=False)  # not looked at with IPv6 off


def test_ipv6_needs_a_1280_byte_link() -> None:
    with pytest.raises(HookError, match="a link MTU of 1000 is too small for IPv6"):
        slirp_interfaces(vmi([slirp()]), virtio_mtu=1000)
    [iface] = slirp_interfaces(vmi([slirp()]), virtio_mtu=1000, ipv6=False)
    assert iface.mtu == 1000


def test_model_cidr_and_plugin_name() -> None:
    raw = vmi([{"name": "default", "binding": {"name": "userspace"}, "model": "e1000"}],
              [{"name": "default", "pod": {"vmNetworkCIDR": "10.11.12.0/24"}}])
    [iface] = slirp_interfaces(raw, plugin="userspace")
    assert (iface.driver, str(iface.network), iface.mac) == ("e1000", "10.11.12.0/24", None)
    assert iface.mtu == 1500  # an e1000 has no way to learn a bigger one
    assert iface.guest_address == "10.11.12.15"
    with pytest.raises(HookError, match="binding {name: slirp}"):
        slirp_interfaces(raw)


def test_only_the_pod_network_counts() -> None:
    raw = vmi([slirp(), {"name": "blue", "binding": {"name": "slirp"}}],
              [{"name": "default", "pod": {}},
               {"name": "blue", "multus": {"networkName": "blue"}}])
    assert [i.name for i in slirp_interfaces(raw)] == ["default"]


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "the VMI is not valid JSON"),
    (b"[]", "the VMI is not a JSON object"),
    (vmi([slirp()], []), r"the VMI has no pod network \(spec.networks\[\].pod\)"),
    (vmi([{"name": "default", "masquerade": {}}]),
     r"no interface of the VMI's pod network \('default'\) has binding {name: slirp}"),
    (vmi([slirp(name="other")]), "no interface of the VMI's pod network"),
    (vmi([slirp(ports=[{"port": 80}, {"port": 80, "protocol": "TCP"}])]),
     "interface default: port 80/TCP is declared twice"),
    (vmi([slirp(ports=[{"port": 0}])]), r"interface default: port 0 is not a port number"),
    (vmi([slirp(ports=[{"port": "80"}])]), "port '80' is not a port number"),
    (vmi([slirp(ports=[{"port": 80, "protocol": "SCTP"}])]), "protocol 'SCTP' is not TCP or UDP"),
    (vmi([slirp(model="virtio-gpu")]), "model 'virtio-gpu' is not supported"),
    (vmi([slirp(macAddress="02:42:ac:11:00")]), "macAddress '02:42:ac:11:00' is not a MAC"),
    (vmi([slirp()], [{"name": "default", "pod": {"vmNetworkCIDR": "10.0.2.1/24"}}]),
     "vmNetworkCIDR '10.0.2.1/24' is not an IPv4 network"),
    (vmi([slirp()], [{"name": "default", "pod": {"vmNetworkCIDR": "10.0.2.0/28"}}]),
     "must have a prefix of /1 to /25"),
    (vmi([slirp(name="Bad_Name")], [{"name": "Bad_Name", "pod": {}}]),
     "interface name 'Bad_Name' is not a DNS label"),
])
def test_bad_vmi(raw: bytes, message: str) -> None:
    with pytest.raises(HookError, match=message):
        slirp_interfaces(raw)


def test_virtio_mtu_is_configurable() -> None:
    [iface] = slirp_interfaces(vmi([slirp()]), virtio_mtu=9000)
    assert iface.mtu == 9000
    [plain] = slirp_interfaces(vmi([slirp()]), virtio_mtu=1500)
    out = edit_domain(b"<domain/>", [(plain, SOCK)])
    assert b"host_mtu" not in out  # 1500 is the device's own default: nothing to say


def test_same_port_for_tcp_and_udp_is_two_ports() -> None:
    [iface] = slirp_interfaces(vmi([slirp(ports=[{"port": 53, "protocol": "UDP"},
                                                 {"port": 53}])]))
    assert iface.ports == (Port("udp", 53), Port("tcp", 53))


# --- the domain ----------------------------------------------------------------------------

def test_fixture_domain_gets_netdev_and_device(domain_xml: bytes, vmi_json: bytes,
                                               tmp_path: Path) -> None:
    [iface] = slirp_interfaces(vmi_json)
    out = edit_domain(domain_xml, [(iface, SOCK)])
    assert qemu_args(out) == [
        "-netdev", f"stream,id=pyslirp-default,server=off,addr.type=unix,addr.path={SOCK}",
        "-device", '{"driver":"virtio-net-pci","netdev":"pyslirp-default",'
                   '"id":"pyslirp-default","mac":"02:42:ac:11:00:02","host_mtu":65520}',
    ]
    validate(out, tmp_path)
    # Everything else is as it was: same elements, same text, same namespaces.
    before, after = minidom.parseString(domain_xml), minidom.parseString(out)
    for doc in (before, after):
        for cl in doc.getElementsByTagNameNS(QEMU_NS, "commandline"):
            cl.parentNode.removeChild(cl)
    assert [n.toxml() for n in before.documentElement.childNodes if n.nodeType == 1] == \
        [n.toxml() for n in after.documentElement.childNodes if n.nodeType == 1]
    assert after.getElementsByTagNameNS("http://kubevirt.io", "uid")[0].firstChild.data == \
        "0b1f2a4c-7d9e-4b1a-9c55-8f0e1d2c3b4a"


def test_editing_twice_changes_nothing_more(domain_xml: bytes, vmi_json: bytes) -> None:
    plan = [(slirp_interfaces(vmi_json)[0], SOCK)]
    once = edit_domain(domain_xml, plan)
    assert edit_domain(once, plan) == once


def test_existing_commandline_and_other_prefix_are_kept(tmp_path: Path) -> None:
    xml = (b'<domain type="kvm" xmlns:q="http://libvirt.org/schemas/domain/qemu/1.0">'
           b"<name>vm</name><memory>131072</memory><os><type>hvm</type></os>"
           b'<q:commandline><q:arg value="-s"/><q:env name="A" value="1"/></q:commandline>'
           b"</domain>")
    [iface] = slirp_interfaces(vmi([slirp(model="e1000")]))
    out = edit_domain(xml, [(iface, SOCK)])
    assert b"xmlns:qemu" not in out and out.count(b"<q:commandline>") == 1
    assert qemu_args(out)[0] == "-s" and qemu_args(out)[1] == "-netdev"
    assert b'<q:env name="A" value="1"/>' in out
    validate(out, tmp_path)


def test_stale_arguments_for_the_nic_are_replaced(domain_xml: bytes, vmi_json: bytes) -> None:
    [iface] = slirp_interfaces(vmi_json)
    old = edit_domain(domain_xml, [(iface, "/old/path.sock")])
    new = edit_domain(old, [(iface, SOCK)])
    assert new == edit_domain(domain_xml, [(iface, SOCK)])
    assert b"/old/path.sock" not in new


def test_namespace_declared_when_missing() -> None:
    [iface] = slirp_interfaces(vmi([slirp()]))
    out = edit_domain(b'<domain type="kvm"><name>x</name></domain>', [(iface, SOCK)])
    doc = minidom.parseString(out)
    assert doc.documentElement.getAttribute("xmlns:qemu") == QEMU_NS
    assert len(doc.getElementsByTagNameNS(QEMU_NS, "arg")) == 4


@pytest.mark.parametrize(("xml", "message"), [
    (b"<domain><name>x</name>", "the domain XML does not parse"),
    (b"", "the domain XML does not parse"),
    (b"<network/>", "the domain XML's root is <network>, not <domain>"),
    (b'<!DOCTYPE domain [<!ENTITY a "b">]><domain/>', "has a DOCTYPE"),
    (b'<domain xmlns:qemu="urn:other"/>', "binds the prefix 'qemu' to 'urn:other'"),
])
def test_bad_domain(xml: bytes, message: str) -> None:
    [iface] = slirp_interfaces(vmi([slirp()]))
    with pytest.raises(HookError, match=message):
        edit_domain(xml, [(iface, SOCK)])
