"""torch.distributed backend "inc" (hostagent/torch_backend.py) in the real lab:
a real incd with XDP on the switch, one process per rank in its own host
namespace, Gloo as the reference over the same lab network.

This file is also the rank program: `python test_torch_backend.py ROLE JSON`
runs one rank and writes its report to the JSON's "report" file."""
from __future__ import annotations

import datetime
import json
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest
import torch  # CI installs torch: a missing torch must fail here, not skip

from netns_lab.harness import LabWithIncd

HERE = os.path.abspath(__file__)
FAIL_TIMEOUT = 2.0  # the backend's default INC_FAIL_TIMEOUT, set explicitly below


# --------------------------------------------------------------------------------------------
# rank side
# --------------------------------------------------------------------------------------------
def _init(cfg: dict, backend: str, port_offset: int = 0) -> None:
    import torch.distributed as dist

    import hostagent.torch_backend  # noqa: F401  registers "inc"

    dist.init_process_group(backend, init_method=f"tcp://{cfg['master']}:{cfg['port'] + port_offset}",
                            rank=cfg["rank"], world_size=cfg["world"], timeout=datetime.timedelta(seconds=60))


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # BatchNorm: DDP broadcasts its buffers (an int64 counter among them) every forward
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def rank_ddp(cfg: dict) -> dict:
    """The same seeded training under each variant: gloo, inc (process group),
    hook (gloo process group, gradients through a Communicator)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hostagent import Communicator
    from hostagent.torch_backend import register_inc_hook

    rank, world, out = cfg["rank"], cfg["world"], {}
    for i, variant in enumerate(cfg["variants"]):
        _init(cfg, "inc" if variant == "inc" else "gloo", i)
        model = _model(cfg["seed"] + rank)  # different on every rank: DDP's broadcast must fix that
        ddp = DDP(model)
        comm = state = None
        if variant == "hook":
            comm = Communicator(job=cfg["hook_job"], rank=rank, world=world)
            state = register_inc_hook(ddp, comm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        losses = []
        for _ in range(cfg["steps"]):
            x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out[variant] = {"losses": losses,
                        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
                        # each rank's own: updated by its own batch after DDP's broadcast of rank 0's
                        "buffers": torch.cat([b.detach().double().reshape(-1) for b in model.buffers()]).tolist()}
        if state is not None:
            state.close()
            comm.close()
        dist.destroy_process_group()
    return out


def _inputs(seed: int, r: int, n: int = 1001):
    rng = np.random.default_rng([seed, r])
    f = (rng.standard_normal(n) * 10.0 ** rng.integers(-2, 3, n)).astype(np.float32)
    i = rng.integers(-(1 << 20), 1 << 20, n).astype(np.int32)
    return f, i


def rank_collectives(cfg: dict) -> dict:
    """Each collective through torch.distributed on seeded inputs; every rank
    can make every rank's inputs, so it checks its own results: {name: [error, allowed]}."""
    import torch.distributed as dist

    _init(cfg, "inc")
    rank, world, seed = cfg["rank"], cfg["world"], cfg["seed"]
    R = dist.ReduceOp
    fs, is_ = zip(*[_inputs(seed, r) for r in range(world)])
    F, I = np.stack(fs).astype(np.float64), np.stack(is_).astype(np.int64)
    M = np.abs(F).max()
    h = int(np.ceil(np.log2(world)))
    res: dict = {}

    def check(name, got, want, allowed=0.0):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        res[name] = [float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf"), allowed]

    # fp32 sums: quantization (world * max|x| * 2^-(30 - ceil(log2 world)), docs/design.md) + fp32 rounding
    def sum_bound(exact):
        return float(world * M * 2.0 ** -(30 - h) + np.abs(exact).max() * 2.0 ** -23)

    for op, fn in (("sum", np.sum), ("max", np.max), ("min", np.min), ("avg", np.mean)):
        t = torch.from_numpy(fs[rank].copy())
        dist.all_reduce(t, op=getattr(R, op.upper()))
        want = fn(F, axis=0)
        allowed = sum_bound(want) / (world if op == "avg" else 1) if op in ("sum", "avg") else 0.0
        check(f"all_reduce_f32_{op}", t.numpy(), want, allowed)
    for op, fn in (("sum", np.sum), ("max", np.max), ("min", np.min)):
        t = torch.from_numpy(is_[rank].copy())
        dist.all_reduce(t, op=getattr(R, op.upper()))
        check(f"all_reduce_i32_{op}", t.numpy(), fn(I, axis=0))
    # dtypes the switch does not add: gathered, reduced on every rank in rank order
    big = [np.random.default_rng([seed, r, 3]).integers(-(1 << 40), 1 << 40, 50) for r in range(world)]
    t = torch.from_numpy(big[rank].copy())
    dist.all_reduce(t)
    check("all_reduce_i64_sum", t.numpy(), np.sum(big, axis=0))
    t = torch.from_numpy(F[rank].copy())
    dist.all_reduce(t, op=R.MIN)
    check("all_reduce_f64_min", t.numpy(), F.min(axis=0))
    t = torch.from_numpy(F[rank].copy())
    dist.all_reduce(t)
    check("all_reduce_f64_sum", t.numpy(), F.sum(axis=0), float(np.abs(F).sum(axis=0).max() * 2.0 ** -50))
    try:
        dist.all_reduce(torch.ones(3, dtype=torch.int32), op=R.AVG)
        res["avg_int32_refused"] = [1.0, 0.0]
    except ValueError as e:
        res["avg_int32_refused"] = [0.0 if "AVG" in str(e) else 1.0, 0.0]

    # broadcast from rank 1: bytes, exact for any dtype
    b64 = torch.from_numpy(np.random.default_rng([seed, rank, 7]).standard_normal(33))
    want64 = np.random.default_rng([seed, 1, 7]).standard_normal(33)
    dist.broadcast(b64, src=1)
    check("broadcast_f64_root1", b64.numpy(), want64)
    bi = torch.full((5, 3), rank * 1000 + 7, dtype=torch.int64)
    dist.broadcast(bi, src=1)
    check("broadcast_i64_root1", bi.numpy(), np.full((5, 3), 1007))

    # all_gather: every rank's float32 block, bit for bit
    outs = [torch.empty(3, 5) for _ in range(world)]
    dist.all_gather(outs, torch.from_numpy(fs[rank][:15].reshape(3, 5).copy()))
    check("all_gather_f32", torch.stack(outs).numpy(), np.stack([f[:15].reshape(3, 5) for f in fs]))
    big = torch.empty(world * 10, dtype=torch.int32)
    dist.all_gather_into_tensor(big, torch.from_numpy(is_[rank][:10].copy()))
    check("all_gather_into_tensor_i32", big.numpy(), np.concatenate([i[:10] for i in is_]))

    # reduce_scatter: shard `rank` of the sum
    n = 7
    chunks = [torch.from_numpy(fs[rank][j * n:(j + 1) * n].copy()) for j in range(world)]
    o = torch.empty(n)
    dist.reduce_scatter(o, chunks)
    want = F[:, rank * n:(rank + 1) * n].sum(axis=0)
    check("reduce_scatter_f32_sum", o.numpy(), want, sum_bound(want))
    o = torch.empty(n, dtype=torch.int32)
    dist.reduce_scatter_tensor(o, torch.from_numpy(is_[rank][:world * n].copy()), op=R.MAX)
    check("reduce_scatter_tensor_i32_max", o.numpy(), I[:, rank * n:(rank + 1) * n].max(axis=0))

    # reduce to the last rank
    root = world - 1
    t = torch.from_numpy(fs[rank].copy())
    dist.reduce(t, dst=root, op=R.MAX)
    if rank == root:
        check("reduce_f32_max_root_last", t.numpy(), F.max(axis=0))

    # scatter and all_to_all: bytes again
    sc = torch.empty(4, dtype=torch.int32)
    src = [torch.arange(4, dtype=torch.int32) + 100 * j for j in range(world)] if rank == 0 else None
    dist.scatter(sc, src, src=0)
    check("scatter_i32", sc.numpy(), np.arange(4) + 100 * rank)
    a2a_in = torch.arange(world * 2, dtype=torch.float32) + 1000 * rank
    a2a_out = torch.empty_like(a2a_in)
    dist.all_to_all_single(a2a_out, a2a_in)
    check("all_to_all_single_f32", a2a_out.numpy(),
          np.concatenate([np.arange(rank * 2, rank * 2 + 2) + 1000 * j for j in range(world)]))

    # barrier: nobody leaves before the last one (rank world-1, 0.4 s late) arrived
    time.sleep(0.4 * rank / max(1, world - 1))
    arrived = time.time()
    dist.barrier()
    res_times = {"arrived": arrived, "left": time.time()}

    # async_op: several queued at once, waited out of order, in issue order on the wire
    ts = [torch.from_numpy(is_[rank][:100].copy()) + k for k in range(5)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    fut = works[2].get_future()
    for w in reversed(works):
        w.wait()
    fut.wait()
    check("async_all_reduce_i32", torch.stack(ts).numpy(),
          np.stack([I[:, :100].sum(axis=0) + world * k for k in range(5)]))
    res["async_completed"] = [0.0 if all(w.is_completed() for w in works) else 1.0, 0.0]

    # the object collectives ride on all_gather/broadcast of bytes
    objs = [None] * world
    dist.all_gather_object(objs, {"rank": rank, "name": f"r{rank}"})
    res["all_gather_object"] = [0.0 if objs == [{"rank": j, "name": f"r{j}"} for j in range(world)] else 1.0, 0.0]

    # a second group, its own incd job: the job id drawn by its rank 0, handed over in the store
    members = [0, world - 1]
    sub = dist.new_group(members, backend="inc")
    if rank in members:
        t = torch.tensor([rank + 1], dtype=torch.int32)
        dist.all_reduce(t, group=sub)
        check("subgroup_all_reduce", t.numpy(), [sum(members) + len(members)])
        res["subgroup_job_differs"] = [0.0 if sub.job != dist.group.WORLD.job else 1.0, 0.0]
    dist.destroy_process_group()
    return {"checks": res, **res_times}


def rank_until_killed(cfg: dict) -> dict:
    """DDP training until a member dies; reports the error and when it came."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(cfg, "inc")
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    step, t_end = 0, time.time() + 60
    try:
        while time.time() < t_end:
            opt.zero_grad()
            F.mse_loss(ddp(torch.randn(32, 256)), torch.zeros(32, 256)).backward()
            opt.step()
            step += 1
            if step == 3:
                print("training", flush=True)
            if cfg.get("raise_at") == step:  # the victim's own bug: an uncaught exception
                print(f"raising {time.time()}", flush=True)
                raise ValueError("the victim's training code failed")
    except RuntimeError as e:
        return {"error": str(e), "t": time.time(), "step": step}
    return {"error": None, "t": time.time(), "step": step}


ROLES = {"ddp": rank_ddp, "collectives": rank_collectives, "until_killed": rank_until_killed}


# --------------------------------------------------------------------------------------------
# test side
# --------------------------------------------------------------------------------------------
_port = iter(range(29600, 29900, 4))


@pytest.fixture(scope="module")
def lab(root):
    with LabWithIncd("tb", workers=4) as lab:
        yield lab


def _env(**extra) -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1",
               INC_FAIL_TIMEOUT=str(FAIL_TIMEOUT), INC_DATAPATH="auto")
    env.pop("INC_JOB", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(lab, tmp_path, role: str, world: int, env: dict, only: dict | None = None,
           **cfg) -> list[subprocess.Popen]:
    """All ranks of a role; `only` = {rank: extra settings of that rank}."""
    port = next(_port)
    procs = []
    for r in range(world):
        # reports go to files: stdout carries only the marks of the dead-rank test
        c = dict(cfg, **(only or {}).get(r, {}), rank=r, world=world, master=lab.addr("h1"), port=port,
                 report=str(tmp_path / f"{role}-{world}-{r}.json"))
        p = lab.popen(f"h{r + 1}", [sys.executable, HERE, role, json.dumps(c)], env=env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.report = c["report"]
        procs.append(p)
    return procs


def _finish(procs, timeout: float) -> list[dict]:
    """Each rank's report; a failed or hung rank fails the test with its stderr.
    Every process is gone afterwards."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for r, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                pytest.fail(f"rank {r} hung; stderr:\n{err[-3000:]}")
            if p.returncode != 0:
                pytest.fail(f"rank {r} exited {p.returncode}; stderr:\n{err[-3000:]}")
            with open(p.report) as f:
                outs.append(json.load(f))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_inc_matches_gloo(lab, tmp_path, world):
    procs = _start(lab, tmp_path, "ddp", world, _env(), variants=["gloo", "inc", "hook"], steps=5, seed=11,
                   hook_job=900 + world)
    res = _finish(procs, 150)
    ref = np.array(res[0]["gloo"]["params"])
    for variant in ("inc", "hook"):
        mine = [np.array(r[variant]["params"]) for r in res]
        # one sum, multicast by the switch, dequantized the same way everywhere: identical replicas
        for r in range(1, world):
            assert np.array_equal(mine[r], mine[0]), (variant, r)
        # The quantization error of a gradient average is <= max|g| * 2^-(30 - ceil(log2 world))
        # per block (~4e-9 relative): below fp32's own rounding (6e-8), so what differs from Gloo
        # is rounding (Gloo's ring adds in another order), grown over 5 momentum steps. Measured:
        # 1.5e-8 at most (an ulp or two of parameters ~0.1-1). 1e-6 + 1e-5 relative leaves room
        # for other machines and still catches a wrong reduction: parameters move up to ~0.05 in
        # these 5 steps, so a rank missing or a sum instead of an average is off by ~1e-2 or more.
        np.testing.assert_allclose(mine[0], ref, rtol=1e-5, atol=1e-6, err_msg=variant)
        for r in range(world):
            np.testing.assert_allclose(res[r][variant]["buffers"], res[r]["gloo"]["buffers"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(res[r][variant]["losses"], res[r]["gloo"]["losses"], rtol=1e-5)
    # the replicas did start different: DDP's broadcast of rank 0's parameters mattered
    assert not np.allclose(_flat_init(11), _flat_init(12))


def _flat_init(seed: int) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in _model(seed).parameters()]).numpy()


def test_collectives_through_torch_distributed(lab, tmp_path):
    world = 4
    procs = _start(lab, tmp_path, "collectives", world, _env(INC_JOB=910), seed=5)
    res = _finish(procs, 120)
    expected = {"all_reduce_f32_sum", "all_reduce_f32_max", "all_reduce_f32_min", "all_reduce_f32_avg",
                "all_reduce_i32_sum", "all_reduce_i32_max", "all_reduce_i32_min", "avg_int32_refused",
                "all_reduce_i64_sum", "all_reduce_f64_min", "all_reduce_f64_sum",
                "broadcast_f64_root1", "broadcast_i64_root1", "all_gather_f32", "all_gather_into_tensor_i32",
                "reduce_scatter_f32_sum", "reduce_scatter_tensor_i32_max", "scatter_i32",
                "all_to_all_single_f32", "async_all_reduce_i32", "async_completed", "all_gather_object"}
    assert set(res[1]["checks"]) == expected
    assert "reduce_f32_max_root_last" in res[world - 1]["checks"]
    for r in (0, world - 1):
        assert {"subgroup_all_reduce", "subgroup_job_differs"} <= set(res[r]["checks"])
    for r, rep in enumerate(res):
        bad = {k: v for k, v in rep["checks"].items() if not v[0] <= v[1]}
        assert not bad, f"rank {r}: {bad}"
    # the float sums were not exact by luck of a loose bound: it is tight
    assert max(rep["checks"]["all_reduce_f32_sum"][1] for rep in res) < 1e-3
    assert min(rep["left"] for rep in res) >= max(rep["arrived"] for rep in res)
    st = lab.incd.status()
    assert not [j for j in st["jobs"] if j["job"] == 910], "the job should end with destroy_process_group"


@pytest.mark.parametrize("how", ["kill", "exception"])
def test_dead_rank_fails_the_others(lab, tmp_path, how):
    """kill -9, or an uncaught exception in the victim's code: the backend then
    leaves as a crash (not as done), so the others fail instead of waiting."""
    world, victim, job = 4, 2, 911 if how == "kill" else 912
    procs = _start(lab, tmp_path, "until_killed", world, _env(INC_JOB=job),
                   only={victim: {"raise_at": 6}} if how == "exception" else None)
    try:
        deadline = time.monotonic() + 90
        waiting = {p.stdout.fileno(): p for p in procs}
        got = {fd: b"" for fd in waiting}  # read raw: a buffered readline could sit on a 2nd line
        t_dead = None
        while waiting and t_dead is None:
            left = deadline - time.monotonic()
            assert left > 0, "ranks did not start training"
            ready, _, _ = select.select(list(waiting), [], [], left)
            for fd in ready:
                chunk = os.read(fd, 4096)
                assert chunk, f"a rank exited early: {waiting[fd].stderr.read()[-3000:]}"
                got[fd] += chunk
                for line in got[fd].decode().splitlines():
                    if line.startswith("raising "):
                        t_dead = float(line.split()[1])
                if how == "kill" and b"training\n" in got[fd]:
                    del waiting[fd]
        if how == "kill":
            t_dead = time.time()
            procs[victim].kill()  # SIGKILL: no goodbye to incd
        err = procs[victim].communicate(timeout=30)[1]
        if how == "exception":
            assert procs[victim].returncode == 1 and "the victim's training code failed" in err, err[-2000:]
        reps = _finish([p for r, p in enumerate(procs) if r != victim], 30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rep in reps:
        err = rep["error"]
        assert err and "failed" in err and f"rank {victim}" in err, rep
        # incd tells the survivors at once when the victim's control connection closes; at the
        # latest they notice within the fail timeout. 3 s for 3 loaded ranks on 2 cores.
        assert rep["t"] - t_dead < FAIL_TIMEOUT + 3.0, rep
    st = lab.incd.status()
    assert not [j for j in st["jobs"] if j["job"] == job]


if __name__ == "__main__":
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    cfg = json.loads(sys.argv[2])
    rep = ROLES[sys.argv[1]](cfg)
    with open(cfg["report"] + ".part", "w") as f:
        json.dump(rep, f)
    os.rename(cfg["report"] + ".part", cfg["report"])
