"""One rank of tests/lab/test_communicator.py, run as a script inside a lab
host: every collective of hostagent.Communicator on numpy arrays and CPU torch
tensors, each checked against numpy on the inputs of all ranks (regenerated
from their seeds). Prints one JSON object: {check: [ok, detail]}."""
import json
import sys

import numpy as np
import torch

from hostagent import CommError, Communicator
from hostagent.inputs import check_sum


def rng(rank: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(1000 * salt + rank)


def main() -> None:
    job, rank, world, mode, datapath = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    out = {}

    def check(name, ok, detail=""):
        out[name] = [bool(ok), str(detail)]

    with Communicator(job, rank, world, mode=mode, datapath=datapath, timeout=20) as c:
        n = 3001  # not a whole number of packets
        ints = [rng(r, 1).integers(-10**6, 10**6, n).astype(np.int32) for r in range(world)]
        flts = [rng(r, 2).standard_normal(n).astype(np.float32) for r in range(world)]
        y = c.allreduce(ints[rank])
        check("sum_int32", y.dtype == np.int32 and np.array_equal(y, np.sum(ints, axis=0, dtype=np.int64)))
        y = c.allreduce(flts[rank])
        ok, err = check_sum(y, flts, c.s.params.elems)
        check("sum_float32", ok and y.dtype == np.float32, err)
        small = [f[:100] for f in flts]  # few packets for all ranks together: raw bits, summed by every rank
        y = c.allreduce(small[rank])
        check("sum_float32_small", np.array_equal(y, np.sum(np.stack(small).astype(np.float64), axis=0).astype(np.float32)))
        y = c.allreduce(flts[rank], op="avg")
        ok, err = check_sum(y * np.float32(world), flts, c.s.params.elems)
        check("avg_float32", ok, err)
        for op, f in (("max", np.max), ("min", np.min)):
            check(f"{op}_int32", np.array_equal(c.allreduce(ints[rank], op=op), f(ints, axis=0)))
            check(f"{op}_float32", np.array_equal(c.allreduce(flts[rank], op=op), f(flts, axis=0)))
        big = np.full(5, 2**30, dtype=np.int32)  # the sum does not fit: numpy gets it exactly as int64
        y = c.allreduce(big)
        check("sum_int32_widened", y.dtype == np.int64 and np.all(y == world * 2**30), y)

        root = world - 1
        src = rng(root, 3).standard_normal((7, 11))  # float64: any dtype goes bit for bit
        y = c.broadcast(src if rank == root else np.zeros_like(src), root=root)
        check("broadcast_float64", y.dtype == np.float64 and np.array_equal(y, src))
        y = c.reduce(ints[rank], root=1)
        check("reduce_root1", np.array_equal(y, np.sum(ints, axis=0, dtype=np.int64)) if rank == 1 else y is None)
        halves = [rng(r, 4).standard_normal(9).astype(np.float16) for r in range(world)]
        y = c.allgather(halves[rank])
        check("allgather_float16", y.shape == (world, 9) and y.dtype == np.float16 and np.array_equal(y, np.stack(halves)))
        rs = [rng(r, 5).integers(-99, 99, (world * 3, 2)).astype(np.int32) for r in range(world)]
        y = c.reduce_scatter(rs[rank])
        check("reduce_scatter_int32", np.array_equal(y, np.sum(rs, axis=0)[rank * 3:(rank + 1) * 3]))
        table = rng(1, 6).integers(0, 2**31, (world, 4)).astype(np.int64)
        y = c.scatter(table if rank == 1 else np.zeros_like(table), root=1)
        check("scatter_int64", np.array_equal(y, table[rank]))
        mail = [np.arange(world * 2, dtype=np.int32).reshape(world, 2) + 100 * r for r in range(world)]
        y = c.alltoall(mail[rank])
        check("alltoall", np.array_equal(y, np.stack([mail[j][rank] for j in range(world)])))
        c.barrier()

        # torch tensors: in place, bfloat16 through float32
        t = torch.from_numpy(flts[rank].copy())
        r = c.allreduce(t, op="max")
        check("torch_max_inplace", r is t and np.array_equal(t.numpy(), np.max(flts, axis=0)))
        b = torch.from_numpy(flts[rank][:64].copy()).to(torch.bfloat16)
        c.allreduce(b)
        expect = np.sum([torch.from_numpy(f[:64]).to(torch.bfloat16).float().numpy() for f in flts], axis=0)
        err = float(np.max(np.abs(b.float().numpy() - expect)))
        check("torch_bfloat16_sum", b.dtype == torch.bfloat16 and err <= 2**-7 * np.max(np.abs(expect)) + 1e-3, err)
        t = torch.full((3, 3), float(rank), dtype=torch.float32)
        c.broadcast(t, root=2 % world)
        check("torch_broadcast_inplace", bool(torch.all(t == float(2 % world))))
        try:
            c.allreduce(np.zeros(3, np.float64))
            check("float64_refused", False, "no error")
        except CommError as e:
            check("float64_refused", "float32, int32" in str(e), e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
