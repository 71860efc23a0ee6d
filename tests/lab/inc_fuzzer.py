"""Sends random and mutated INC packets at the switch from a lab host (run
inside its namespace by tests/test_fuzz.py). Prints how many it sent as JSON.

Half the packets are plain UDP payloads from this host (random bytes, and
valid packets of the target job with one field changed and the csum redone,
bits flipped, cut short, or claiming more lanes than they carry); the rest are
whole IPv4/UDP packets from scapy's fuzz(), random header fields included,
sent on a raw socket."""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
from pathlib import Path

import numpy as np

from bpf import wire

FIELDS = [n for n in wire.HDR_DTYPE.names if n != "csum"]


def template(rng: random.Random, job: int, gen: int, world: int) -> bytearray:
    n = rng.randint(1, wire.MAX_ELEMS)
    h = np.zeros(1, wire.HDR_DTYPE)
    h[0] = (wire.VERSION, wire.T_DATA, 0, wire.OP_SUM, job, gen, rng.randrange(0, 4096), 0,
            rng.randrange(world), n, 0, 0)
    lanes = np.frombuffer(rng.randbytes(4 * n), "<i4")
    return bytearray(wire.seal_bytes(h.tobytes() + lanes.tobytes()))


def mutate(rng: random.Random, pkt: bytearray) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # one header field set at random, csum redone: passes the integrity check
        h = np.frombuffer(bytes(pkt[:wire.HDR_LEN]), wire.HDR_DTYPE).copy()
        f = rng.choice(FIELDS)
        bits = h.dtype.fields[f][0].itemsize * 8
        h[f] = rng.getrandbits(bits)
        return wire.seal_bytes(h.tobytes() + bytes(pkt[wire.HDR_LEN:]))
    if kind == 1:  # bits flipped on the way
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(pkt) * 8)
            pkt[i // 8] ^= 1 << i % 8
        return bytes(pkt)
    if kind == 2:  # cut short
        return bytes(pkt[:rng.randrange(len(pkt))])
    if kind == 3:  # claims more lanes than it carries, sealed over what it has
        cut = bytes(pkt[:wire.HDR_LEN + 4 * rng.randrange(0, (len(pkt) - wire.HDR_LEN) // 4)])
        return wire.seal_bytes(cut)
    if kind == 4:  # a result or EVICT, as if from the PS
        pkt[1] = rng.choice([wire.T_RESULT, wire.T_EVICT, 7])
        return wire.seal_bytes(bytes(pkt))
    return rng.randbytes(rng.randrange(0, 3300))  # garbage


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", required=True)
    ap.add_argument("--job", type=int, required=True)
    ap.add_argument("--gen-file", required=True, help="holds the job's current generation (re-read as it changes)")
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    sent = {"udp": 0, "raw": 0, "raw_refused": 0}
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw, fuzz

    gen = 0
    for i in range(a.count):
        if i % 50 == 0:
            try:
                gen = int(Path(a.gen_file).read_text() or gen)
            except (OSError, ValueError):
                pass
        pkt = mutate(rng, template(rng, a.job, gen, a.world))
        port = wire.PORT if rng.random() < 0.8 else rng.randint(wire.PORT_MIN, wire.PORT_MAX)
        if i % 2 == 0:
            udp.sendto(pkt, (a.switch, port))
            sent["udp"] += 1
            continue
        ip = fuzz(IP(dst=a.switch, proto=17)) / fuzz(UDP(dport=port)) / Raw(pkt)
        ip.dst = a.switch  # fuzz() would pick destinations too: only the switch gets these
        try:
            raw.sendto(bytes(ip), (a.switch, 0))
            sent["raw"] += 1
        except OSError:
            sent["raw_refused"] += 1  # the kernel refuses some headers (e.g. a length it cannot send)
    print(json.dumps(sent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
