"""Run inside a guest namespace: send hand-made frames out of the TAP to destinations the
guest's own kernel would never route there (127.0.0.0/8, 0.0.0.0/8, broadcast, ...), then
report what came back.

``python isolation_probe.py TAP PROBES_JSON``; PROBES_JSON is a list of
``[proto, dst, port]`` with proto ``tcp`` (a SYN), ``udp`` (a datagram) or ``icmp`` (an
echo request; port unused). The frames go to the gateway's MAC (libslirp's
52:55:0a:00:02:02), from the TAP's address and MAC, through an ``AF_PACKET`` socket,
so the stack behind the TAP sees exactly these bytes. Each probe is sent whole and then
as IPv4 fragments (the stack must reassemble before it decides).

After the probes a ping to the gateway is sent and waited for: the stack handles the
TAP's frames in order, so once that echo reply is back every probe has been handled
(a loopback connect completes inside the stack's ``connect()``). Prints one JSON object:
``{"done": bool, "replies": [[src, proto, detail], ...]}`` where detail is the TCP flags,
the ICMP type, or ``"udp"``, for every IPv4 frame the stack sent to the guest.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

GATEWAY_MAC = "52:55:0a:00:02:02"
GATEWAY = "10.0.2.2"
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SENTINEL_ID = 0x5E57


def probe_packets(src: str, proto: str, dst: str, port: int, seq: int) -> list[Packet]:
    if proto == "tcp":
        l4: Packet = TCP(sport=41000 + seq, dport=port, flags="S", seq=seq,
                         options=[("NOP", None)] * 20)
    elif proto == "udp":
        l4 = UDP(sport=41000 + seq, dport=port) / Raw(b"probe-%d " % seq * 40)
    else:
        l4 = ICMP(type=8, id=0x4100 + seq, seq=seq) / Raw(b"probe" * 40)
    whole = IP(src=src, dst=dst, id=seq * 2 + 1) / l4
    split = IP(src=src, dst=dst, id=seq * 2 + 2) / l4.copy()
    if proto == "tcp":
        split[TCP].sport += 1000  # a different 4-tuple, so the two SYNs are two attempts
    return [whole, *fragment(split, 64)]


def describe(pkt: Packet) -> list[str]:
    ip = pkt[IP]
    if TCP in ip:
        return [ip.src, "tcp", str(ip[TCP].flags)]
    if ICMP in ip and ip.frag == 0:
        return [ip.src, "icmp", str(ip[ICMP].type)]
    if UDP in ip:
        return [ip.src, "udp", "udp"]
    return [ip.src, str(ip.proto), "fragment"]


def main() -> None:
    tap, probes = sys.argv[1], json.loads(sys.argv[2])
    with open(f"/sys/class/net/{tap}/address") as f:
        mac = f.read().strip()
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    raw.bind((tap, ETH_P_IP))
    raw.settimeout(0.2)
    src = "10.0.2.100"
    for seq, (proto, dst, port) in enumerate(probes, start=1):
        for piece in probe_packets(src, proto, dst, port, seq):
            raw.send(bytes(Ether(src=mac, dst=GATEWAY_MAC) / piece))
    sentinel = IP(src=src, dst=GATEWAY) / ICMP(type=8, id=SENTINEL_ID, seq=1) / Raw(b"done")
    raw.send(bytes(Ether(src=mac, dst=GATEWAY_MAC) / sentinel))
    replies: list[list[str]] = []
    done = False
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        try:
            data, addr = raw.recvfrom(70000)
        except TimeoutError:
            continue
        if addr[2] == PACKET_OUTGOING:
            continue
        pkt = Ether(data)
        if IP not in pkt:
            continue
        if ICMP in pkt and pkt[ICMP].type == 0 and pkt[ICMP].id == SENTINEL_ID:
            done = True
            continue
        replies.append(describe(pkt))
    print(json.dumps({"done": done, "replies": replies}))


if __name__ == "__main__":
    main()
