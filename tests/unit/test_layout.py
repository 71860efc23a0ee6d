"""The Python codec's view of inc_hdr must match what a C compiler makes of
bpf/inc_proto.h, and the constants Python parses must be the compiler's."""
import json
import subprocess

from bpf import wire

PROG = r'''
#include <stdio.h>
#include <stddef.h>
#include "inc_proto.h"
#define F(f) printf("\"%s\": [%zu, %zu],", #f, offsetof(struct inc_hdr, f), sizeof(((struct inc_hdr *)0)->f));
int main(void) {
  printf("{");
  F(version) F(type) F(flags) F(op) F(job) F(gen) F(psn) F(slot) F(rank) F(numel) F(csum) F(bitmap)
  printf("\"__size\": [%zu, 0], \"INC_MAX_ELEMS\": [%d, 0], \"INC_PORT\": [%d, 0], \"INC_DROP__COUNT\": [%d, 0]}",
         sizeof(struct inc_hdr), INC_MAX_ELEMS, INC_PORT, INC_DROP__COUNT);
  return 0;
}
'''


def compiled_layout(tmp_path):
    src = tmp_path / "layout.c"
    src.write_text(PROG)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(wire.HEADER_PATH.parent), "-o", str(exe), str(src)], check=True)
    return json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def test_header_layout_matches_c(tmp_path):
    c = compiled_layout(tmp_path)
    assert c.pop("__size")[0] == wire.HDR_LEN == wire.HDR_STRUCT.size
    for name in ("INC_MAX_ELEMS", "INC_PORT", "INC_DROP__COUNT"):
        assert c.pop(name)[0] == wire.C[name]
    assert list(c) == list(wire.HDR_DTYPE.names)
    for name, (off, size) in c.items():
        dt, py_off = wire.HDR_DTYPE.fields[name][:2]
        assert (py_off, dt.itemsize) == (off, size), name


HASH_PROG = r'''
#include <stdio.h>
#include "inc_proto.h"
int main(void) {
  unsigned jobs[] = {1, 7, 1023}, sizes[] = {1, 8, 2048, 4093};
  for (int j = 0; j < 3; j++) for (int z = 0; z < 4; z++) for (unsigned p = 0; p < 300; p += 7)
    printf("%u %u %u %u\n", jobs[j], sizes[z], p * 2654435761u, inc_hash_slot(jobs[j], p * 2654435761u, 100, sizes[z]));
  return 0;
}
'''


def test_hash_slot_matches_c(tmp_path):
    import numpy as np

    src = tmp_path / "hash.c"
    src.write_text(HASH_PROG)
    exe = tmp_path / "hash"
    subprocess.run(["gcc", "-I", str(wire.HEADER_PATH.parent), "-o", str(exe), str(src)], check=True)
    rows = [list(map(int, line.split())) for line in
            subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()]
    assert len(rows) > 500
    for job, size, psn, slot in rows:
        assert int(wire.hash_slots(job, np.array([psn]), 100, size)[0]) == slot
        assert 100 <= slot < 100 + size


def test_frame_fits_xdp_linear_limit():
    # Ethernet + IPv4 + UDP + header + full payload must stay under ~3.5 KiB.
    assert 14 + wire.IP_UDP_OVERHEAD + wire.HDR_LEN + 4 * wire.MAX_ELEMS <= 3500
