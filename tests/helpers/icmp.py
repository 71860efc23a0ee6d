"""ICMP echo from inside a lab namespace: the test machines have no `ping`
binary, so a raw socket in a tiny program run in the host."""
from __future__ import annotations

import sys

PING = r'''
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
dst, count = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, ok = os.getpid() & 0xffff, 0
for seq in range(count):
    body = struct.pack("!HH", ident, seq) + b"inc-lab!"
    sock.sendto(struct.pack("!BBH", 8, 0, csum(b"\x08\x00\x00\x00" + body)) + body, (dst, 0))
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 0xF) * 4
        if addr[0] == dst and data[ihl] == 0 and data[ihl + 4:ihl + 8] == body[:4]:
            ok += 1
            break
print(ok)
sys.exit(0 if ok == count else 1)
'''


def ping(lab, src: str, dst_host: str, count: int = 1):
    """count echoes from src to dst_host, a second each at most: the finished
    process (stdout: how many were answered; exit 0 if all were)."""
    return lab.run(src, [sys.executable, "-c", PING, lab.addr(dst_host), str(count)],
                   capture_output=True, text=True, timeout=30)
