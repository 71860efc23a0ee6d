"""The Python codec's view of inc_hdr and of the KV tuple must match what a C
compiler makes of bpf/inc_proto.h, and every INC_ constant of every header
under bpf/ must be known to Python (bpf.wire) with the compiler's value."""
import json
import re
import subprocess

import numpy as np

import bpf
from bpf import kv_wire, wire

PROG = r'''
#include <stdio.h>
#include <stddef.h>
#include "inc_proto.h"
#define F(f) printf("\"%s\": [%zu, %zu],", #f, offsetof(struct inc_hdr, f), sizeof(((struct inc_hdr *)0)->f));
int main(void) {
  printf("{");
  F(version) F(type) F(flags) F(op) F(job) F(gen) F(psn) F(slot) F(rank) F(numel) F(csum) F(bitmap)
  printf("\"__size\": [%zu, 0], \"INC_MAX_ELEMS\": [%d, 0], \"INC_PORT\": [%d, 0], \"INC_DROP__COUNT\": [%d, 0],",
         sizeof(struct inc_hdr), INC_MAX_ELEMS, INC_PORT, INC_DROP__COUNT);
  printf("\"__kv_tuple\": [%zu, %zu, %zu, %zu]}", sizeof(struct inc_kv_tuple), offsetof(struct inc_kv_tuple, key_lo),
         offsetof(struct inc_kv_tuple, key_hi), offsetof(struct inc_kv_tuple, value));
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
    size, key_lo, key_hi, value = c.pop("__kv_tuple")
    assert size == kv_wire.TUPLE_DTYPE.itemsize == 4 * wire.KV_TUPLE_WORDS
    assert (key_lo, key_hi) == (kv_wire.TUPLE_DTYPE.fields["key"][1], kv_wire.TUPLE_DTYPE.fields["key"][1] + 4)
    assert value == kv_wire.TUPLE_DTYPE.fields["value"][1]
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


def _gcc_out(tmp_path, name: str, text: str, *args: str) -> str:
    src = tmp_path / name
    src.write_text(text)
    return subprocess.run(["gcc", "-I", str(bpf.source_dir()), *args, str(src)],
                          check=True, capture_output=True, text=True).stdout


def header_constants(tmp_path) -> set[str]:
    """Every INC_ name with a value that a header under bpf/ gives: the
    object-like #defines as the preprocessor sees them (include guards and
    function-like macros left out), and the enum entries."""
    headers = sorted(p.name for p in bpf.source_dir().glob("*.h"))
    macros = _gcc_out(tmp_path, "all.c", "".join(f'#include "{h}"\n' for h in headers), "-dM", "-E")
    names = {m.group(1) for m in re.finditer(r"^#define (INC_\w+)[ \t]+\S", macros, re.M)}
    for h in headers:
        text = re.sub(r"/\*.*?\*/", "", bpf.source(h).read_text(), flags=re.S)
        for body in re.findall(r"\benum\s+\w*\s*\{(.*?)\}", text, re.S):
            names |= {m.group(1) for m in re.finditer(r"(?:^|,)\s*(INC_\w+)", body)}
    return names


def test_every_header_constant_is_known_with_the_compilers_value(tmp_path):
    names = header_constants(tmp_path)
    assert {"INC_MAX_ELEMS", "INC_DROP_BAD_CSUM", "INC_KV_ROWS", "INC_POOL_SLOTS"} <= names
    missing = names - set(wire.C)
    assert not missing, f"INC_ constants Python does not know (a header not in wire.HEADERS?): {sorted(missing)}"
    assert set(wire.C) == names
    prog = "".join(f'#include "{h}"\n' for h in wire.HEADERS) + "#include <stdio.h>\nint main(void) {\n"
    prog += "".join(f'  printf("%s %lld\\n", "{n}", (long long)({n}));\n' for n in sorted(names)) + "  return 0;\n}\n"
    exe = tmp_path / "consts"
    _gcc_out(tmp_path, "consts.c", prog, "-o", str(exe))
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    compiled = {name: int(v) for name, v in (line.split() for line in out.splitlines())}
    assert compiled == {n: wire.C[n] for n in names}
    for n, v in compiled.items():  # one namespace: wire.MAX_ELEMS is INC_MAX_ELEMS
        assert getattr(wire, n[len("INC_"):]) == v, n


def test_parser_resolves_names_and_expressions_or_refuses():
    c = wire.parse_c_header("#define INC_A 0x10u\n#define INC_B (INC_A << 2) + 1\n#define INC_C INC_B\n"
                            "enum e { INC_E0, INC_E1 = INC_A, INC_E2 };\n")
    assert c == {"INC_A": 16, "INC_B": 65, "INC_C": 65, "INC_E0": 0, "INC_E1": 16, "INC_E2": 17}
    import pytest

    with pytest.raises(ValueError, match="INC_D"):
        wire.parse_c_header("#define INC_D sizeof(struct inc_hdr)\n")


def test_switch_compiles_as_one_text_with_each_header_once():
    """bcc rewrites map calls only in the text it is given (bpf/bcc_unit.py)."""
    from bpf.bcc_unit import one_unit

    text = one_unit("inc_switch.bpf.c")
    assert not re.search(r'^\s*#\s*include\s+"', text, re.M)
    pasted = re.findall(r'^#line 1 "([^"]+)"$', text, re.M)
    assert pasted[0] == "inc_switch.bpf.c" and len(pasted) == len(set(pasted))
    assert {"inc_maps.h", "mode_modulo.h", "mode_hash.h", "mode_kv.h", *wire.HEADERS} <= set(pasted)
    assert text.count("BPF_TABLE(\"percpu_array\", int, struct kv_scratch") == 1  # maps declared once


def test_hash_slots_of_a_run_are_consecutive_and_runs_scatter():
    """A job's PSNs in flight must not land on each other: a run of HASH_RUN
    PSNs takes consecutive slots (wrapping in the region); runs start at
    hashed bases, so two jobs' runs do not march in step."""
    size, off = 2048, 100
    psns = np.arange(10 * wire.HASH_RUN, dtype=np.uint32)
    s = wire.hash_slots(7, psns, off, size).astype(np.int64) - off
    runs = s.reshape(10, wire.HASH_RUN)
    assert ((runs - runs[:, :1]) % size == np.arange(wire.HASH_RUN)).all()
    assert len(set(runs[:, 0].tolist())) == 10
    other = wire.hash_slots(8, psns, off, size).astype(np.int64) - off
    assert (other.reshape(10, -1)[:, 0] != runs[:, 0]).all()
    assert ((s >= 0) & (s < size)).all()
