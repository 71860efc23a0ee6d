#!/usr/bin/env python3
"""DistributedDataParallel training with torch.distributed backend "inc"
(hostagent/torch_backend.py) against Gloo, same seed, same lab.

Brings up its own lab (N workers) and incd, runs one process per rank in the
worker namespaces (Gloo over the same lab network, rank 0's address as the
rendezvous), and tears everything down, also on failure or Ctrl-C.

(i)  accuracy: an MLP on scikit-learn's bundled digits (8x8 images, 10
     classes; split 80/20 with the seed): training loss and test accuracy per
     epoch for both backends, one plot. Needs scikit-learn (`make train-ddp`
     installs it and torch; or the `train` extra).
(ii) throughput: an MLP whose gradients are tens of MB on synthetic data:
     median iteration time with DDP, the same iteration without DDP on the same
     ranks (compute), the exposed communication share 1 - compute/iteration,
     and one allreduce of a gradient-sized buffer alone. Table and plot.

Saves the JSON (--out) and docs/figures/train_ddp_loss.png and
train_ddp_throughput.png (--fig-dir; needs matplotlib). Root only. Exit 4
when the final test accuracies differ by more than 0.5 percentage points.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from netns_lab.benchkit import log, pyplot, save_json
from netns_lab.plan import MTU_DEFAULT, MTU_JUMBO

ROOT = Path(__file__).resolve().parent.parent

BACKENDS = ("gloo", "inc")
TARGET_PP = 0.5  # final test accuracies this close (percentage points), else exit 4


# ---------------------------------------------------------------------------------------------
# one rank (run inside a worker namespace as: train_ddp.py _rank JSON)
# ---------------------------------------------------------------------------------------------
def rank_main(cfg: dict) -> dict:
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hostagent.torch_backend  # noqa: F401  registers "inc"

    torch.set_num_threads(1)  # the ranks share the machine's cores
    rank, world, backend = cfg["rank"], cfg["world"], cfg["backend"]
    dist.init_process_group(backend, init_method=f"tcp://{cfg['master']}:{cfg['port']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    say = (lambda msg: print(f"progress: {backend}: {msg}", file=sys.stderr, flush=True)) if rank == 0 \
        else (lambda msg: None)
    out: dict = {"backend": backend}
    if getattr(dist.group.WORLD, "datapath", None):
        out["datapath"] = dist.group.WORLD.datapath

    # (i) digits
    if cfg["epochs"]:
        d = np.load(cfg["data"])
        xtr, ytr = torch.from_numpy(d["xtr"]), torch.from_numpy(d["ytr"])
        xte, yte = torch.from_numpy(d["xte"]), torch.from_numpy(d["yte"])
        torch.manual_seed(cfg["seed"])
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                    torch.nn.ReLU(), torch.nn.Linear(64, 10))
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg["lr"], momentum=0.9)
        g = torch.Generator().manual_seed(cfg["seed"])  # the same permutation on every rank
        per_rank = len(xtr) // world  # equal shards: every rank runs the same number of steps
        losses, accs, step_losses = [], [], []
        t0 = time.perf_counter()
        for epoch in range(cfg["epochs"]):
            idx = torch.randperm(len(xtr), generator=g)[rank * per_rank:(rank + 1) * per_rank]
            tot = torch.zeros(2)
            model.train()
            for b in range(0, per_rank, cfg["batch"]):
                j = idx[b:b + cfg["batch"]]
                opt.zero_grad()
                loss = F.cross_entropy(ddp(xtr[j]), ytr[j])
                loss.backward()
                opt.step()
                tot += torch.tensor([loss.item() * len(j), len(j)])
                step_losses.append(loss.item())
            dist.all_reduce(tot)  # the epoch's mean loss over all ranks' samples
            losses.append(float(tot[0] / tot[1]))
            model.eval()
            with torch.no_grad():
                accs.append(float((model(xte).argmax(1) == yte).float().mean()))
            if epoch % 5 == 4 or epoch == cfg["epochs"] - 1:
                say(f"epoch {epoch + 1}/{cfg['epochs']} loss {losses[-1]:.4f} test acc {100 * accs[-1]:.2f}%")
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        out["digits"] = {"train_loss": losses, "test_acc": accs, "rank0_step_loss": step_losses,
                         "time_s": time.perf_counter() - t0, "params": params.tolist()}

    # (ii) throughput
    if cfg["iters"]:
        import copy

        width, depth, batch = cfg["width"], cfg["depth"], cfg["tbatch"]
        torch.manual_seed(cfg["seed"])
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        big = torch.nn.Sequential(*layers[:-1])
        local = copy.deepcopy(big)  # the same work without DDP: compute only
        ddp = DDP(big)
        nets = {"ddp": ddp, "local": local}
        opts = {k: torch.optim.SGD(n.parameters(), lr=1e-4) for k, n in nets.items()}
        x, y = torch.randn(batch, width), torch.randn(batch, width)
        grad_bytes = sum(p.numel() * 4 for p in big.parameters())
        say(f"throughput: {sum(p.numel() for p in big.parameters()) / 1e6:.1f} M parameters, "
            f"{grad_bytes / 2**20:.1f} MiB of gradients per iteration")

        def step(kind: str) -> float:
            dist.barrier()  # all ranks start together
            t = time.perf_counter()
            opts[kind].zero_grad()
            F.mse_loss(nets[kind](x), y).backward()
            opts[kind].step()
            return time.perf_counter() - t

        for _ in range(cfg["warmup"]):
            step("ddp"), step("local")
        times = {"ddp": [], "local": [], "allreduce": []}
        for i in range(cfg["iters"]):
            times["ddp"].append(step("ddp"))
            times["local"].append(step("local"))
            say(f"iteration {i + 1}/{cfg['iters']}: {1e3 * times['ddp'][-1]:.0f} ms "
                f"(compute {1e3 * times['local'][-1]:.0f} ms)")
        flat = torch.randn(grad_bytes // 4)
        for i in range(cfg["warmup"] + cfg["iters"]):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(flat)
            if i >= cfg["warmup"]:
                times["allreduce"].append(time.perf_counter() - t)
        # the slowest rank's time per iteration: that is how long the step took for the job
        per_rank = {}
        for k, v in times.items():
            mine = torch.tensor(v, dtype=torch.float32)
            got = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(got, mine)
            per_rank[k] = torch.stack(got).max(0).values.tolist()
        out["throughput"] = {"grad_bytes": grad_bytes, "batch_per_rank": batch, "width": width,
                             "depth": depth, "times_s": per_rank}
    dist.destroy_process_group()
    return out


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def digits_file(path: Path, seed: int) -> dict:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise RuntimeError("scikit-learn is needed for the digits run (.venv/bin/pip install scikit-learn), "
                           "or pass --epochs 0") from None
    import numpy as np

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split((x / 16.0).astype(np.float32), y.astype(np.int64), test_size=0.2,
                                          random_state=seed, stratify=y)
    np.savez(path, xtr=xtr, ytr=ytr, xte=xte, yte=yte)
    return {"train": len(xtr), "test": len(xte)}


def run_backend(lab, backend: str, cfg: dict, port: int, timeout: float) -> dict:
    """All ranks of one backend at once; rank 0's report (its progress lines are shown)."""
    world = cfg["world"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs, errs = [], []
    for r in range(world):
        c = dict(cfg, rank=r, backend=backend, master=lab.addr("h1"), port=port)
        procs.append(lab.popen(f"h{r + 1}", [sys.executable, __file__, "_rank", json.dumps(c)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errs.append([])

    def drain(r, stream):
        for line in stream:
            errs[r].append(line)
            if line.startswith("progress: "):
                log("  " + line[len("progress: "):].rstrip())

    readers = [threading.Thread(target=drain, args=(r, p.stderr), daemon=True) for r, p in enumerate(procs)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        for r, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{backend}: rank {r} did not finish in {timeout:.0f} s") from None
            readers[r].join(5)  # the pipe closes when the rank exits
            if p.returncode != 0:
                tail = "".join(l for l in errs[r] if not l.startswith("progress: "))[-2000:]
                raise RuntimeError(f"{backend}: rank {r} exited {p.returncode}:\n{tail}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    try:
        return json.loads(Path(cfg["report"]).read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{backend}: no report from rank 0 ({e})") from None


def run(args) -> dict:
    from netns_lab.harness import LabWithIncd

    cfg = {"world": args.workers, "seed": args.seed, "epochs": args.epochs, "batch": args.batch,
           "lr": args.lr, "iters": args.iters, "warmup": args.warmup, "width": args.width,
           "depth": args.depth, "tbatch": args.tbatch}
    result = {"what": "DDP training, backend inc vs gloo", "workers": args.workers, "seed": args.seed,
              "config": cfg, "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                          "loadavg_before": os.getloadavg()},  # other work on the machine skews the times
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.epochs:
            cfg["data"] = str(Path(tmp) / "digits.npz")
            result["digits_split"] = digits_file(Path(cfg["data"]), args.seed)
        log(f"lab: {args.workers} workers, incd on the switch (INC_DATAPATH={args.datapath}, "
            f"INC_FRAME={args.frame})")
        os.environ["INC_DATAPATH"] = args.datapath
        os.environ["INC_FRAME"] = args.frame
        if args.frame == "jumbo":  # 16 frames in flight; the links at the MTU the frames need
            os.environ["INC_WINDOW"] = str(16 * 20)
        with LabWithIncd("ddp", workers=args.workers, mtu=MTU_JUMBO if args.frame == "jumbo" else MTU_DEFAULT) as lab:
            reports = {}
            for i, backend in enumerate(BACKENDS):
                t0 = time.time()
                log(f"{backend}: {args.workers} ranks")
                cfg["report"] = str(Path(tmp) / f"{backend}.json")  # rank 0 writes it
                reports[backend] = run_backend(lab, backend, cfg, 29700 + i, args.timeout)
                log(f"{backend}: done in {time.time() - t0:.1f} s")
    result["datapath"] = reports["inc"].get("datapath")
    result["frame"] = args.frame
    if args.epochs:
        import numpy as np

        d = {b: reports[b]["digits"] for b in BACKENDS}
        pg, pi = np.array(d["gloo"].pop("params")), np.array(d["inc"].pop("params"))
        result["digits"] = d
        result["digits_summary"] = {
            "final_test_acc": {b: d[b]["test_acc"][-1] for b in BACKENDS},
            "acc_diff_pp": 100 * abs(d["inc"]["test_acc"][-1] - d["gloo"]["test_acc"][-1]),
            "final_loss": {b: d[b]["train_loss"][-1] for b in BACKENDS},
            "max_param_diff": float(np.abs(pg - pi).max()),
            "max_abs_param": float(np.abs(pg).max()),
        }
        result["digits_summary"]["within_target"] = result["digits_summary"]["acc_diff_pp"] <= TARGET_PP
    if args.iters:
        rows = []
        for b in BACKENDS:
            t = reports[b]["throughput"]
            ts = t["times_s"]
            it, comp, ar = (statistics.median(ts[k]) for k in ("ddp", "local", "allreduce"))
            rows.append({"backend": b, "grad_bytes": t["grad_bytes"], "iter_s": it, "compute_s": comp,
                         "comm_share": max(0.0, 1 - comp / it), "allreduce_s": ar,
                         "samples_per_s": args.workers * t["batch_per_rank"] / it, "times_s": ts})
        result["throughput"] = rows
    return result


def table(result: dict) -> str:
    lines = []
    if "digits_summary" in result:
        s = result["digits_summary"]
        lines.append(f"digits MLP, {result['workers']} workers, {result['config']['epochs']} epochs "
                     f"(train {result['digits_split']['train']}, test {result['digits_split']['test']}):")
        for b in BACKENDS:
            lines.append(f"  {b:>5}: test accuracy {100 * s['final_test_acc'][b]:6.2f} %, "
                         f"final train loss {s['final_loss'][b]:.5f}, {result['digits'][b]['time_s']:.1f} s")
        lines.append(f"  difference {s['acc_diff_pp']:.2f} percentage points; largest parameter difference "
                     f"{s['max_param_diff']:.2e} (largest |parameter| {s['max_abs_param']:.2f})")
    if "throughput" in result:
        r0 = result["throughput"][0]
        lines.append(f"throughput, {r0['grad_bytes'] / 2**20:.1f} MiB of gradients per iteration "
                     f"(inc data path: {result.get('datapath')}):")
        lines.append(f"  {'backend':>7} {'iter ms':>8} {'compute ms':>10} {'comm share':>10} "
                     f"{'allreduce ms':>12} {'samples/s':>9}")
        for r in result["throughput"]:
            lines.append(f"  {r['backend']:>7} {1e3 * r['iter_s']:>8.0f} {1e3 * r['compute_s']:>10.0f} "
                         f"{100 * r['comm_share']:>9.0f}% {1e3 * r['allreduce_s']:>12.0f} {r['samples_per_s']:>9.0f}")
    return "\n".join(lines)


def plots(result: dict, fig_dir: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        log("matplotlib is not installed: no figures")
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    style = {"gloo": dict(color="tab:blue", lw=2.5, alpha=0.6), "inc": dict(color="tab:red", ls="--", lw=1.5)}
    if "digits" in result:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for k in BACKENDS:
            d = result["digits"][k]
            ep = range(1, len(d["train_loss"]) + 1)
            a.plot(ep, d["train_loss"], label=k, **style[k])
            b.plot(ep, [100 * v for v in d["test_acc"]], label=k, **style[k])
        a.set(yscale="log", xlabel="epoch", ylabel="training loss (mean over all ranks)")
        b.set(xlabel="epoch", ylabel="test accuracy (%)")
        s = result["digits_summary"]
        b.set_title(f"final: gloo {100 * s['final_test_acc']['gloo']:.2f} %, "
                    f"inc {100 * s['final_test_acc']['inc']:.2f} %", fontsize=10)
        a.set_title(f"digits MLP, DDP, {result['workers']} workers", fontsize=10)
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        made.append(fig_dir / "train_ddp_loss.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if "throughput" in result:
        rows = result["throughput"]
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [r["backend"] for r in rows]
        comp = [1e3 * r["compute_s"] for r in rows]
        comm = [1e3 * (r["iter_s"] - r["compute_s"]) for r in rows]
        ax.bar(names, comp, 0.5, label="compute (same iteration without DDP)", color="tab:gray")
        ax.bar(names, comm, 0.5, bottom=comp, label="exposed communication", color="tab:orange")
        ax.hlines([1e3 * r["allreduce_s"] for r in rows], [i - 0.25 for i in range(len(rows))],
                  [i + 0.25 for i in range(len(rows))], colors="k", lw=2, zorder=3,
                  label="one allreduce of the gradients alone")
        for i, r in enumerate(rows):
            ax.text(i, 1e3 * r["iter_s"], f"{1e3 * r['iter_s']:.0f} ms\n({100 * r['comm_share']:.0f} % comm)",
                    ha="center", va="bottom", fontsize=9)
        ax.set(ylabel="ms per iteration (median, slowest rank)",
               title=f"DDP iteration, {rows[0]['grad_bytes'] / 2**20:.0f} MiB gradients, {result['workers']} workers, "
                     f"{os.cpu_count()} cores")
        ax.title.set_fontsize(10)
        ax.set_ylim(0, 1.3 * max(1e3 * r["iter_s"] for r in rows))
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        made.append(fig_dir / "train_ddp_throughput.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_rank":
        cfg = json.loads(sys.argv[2])
        rep = rank_main(cfg)
        if cfg["rank"] == 0:
            tmp = Path(cfg["report"] + ".part")
            tmp.write_text(json.dumps(rep))
            tmp.rename(cfg["report"])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="ranks, one per lab host (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40, help="digits epochs; 0 skips the digits run "
                   "(default %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="digits batch per rank (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="digits SGD learning rate, momentum 0.9 "
                   "(default %(default)s)")
    p.add_argument("--iters", type=int, default=12, help="timed throughput iterations; 0 skips "
                   "them (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default %(default)s)")
    p.add_argument("--width", type=int, default=2048, help="throughput MLP width (default %(default)s)")
    p.add_argument("--depth", type=int, default=2, help="throughput MLP layers: depth x width^2 parameters "
                   "(default %(default)s: 32 MiB of gradients)")
    p.add_argument("--tbatch", type=int, default=64, help="throughput batch per rank (default %(default)s)")
    p.add_argument("--datapath", choices=["auto", "xdp", "socket"], default="auto",
                   help="the inc ranks' data path (INC_DATAPATH; default %(default)s)")
    p.add_argument("--frame", choices=["std", "jumbo"], default="std",
                   help="the inc ranks' frames (INC_FRAME); jumbo runs the lab, Gloo included, at MTU 65535")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per backend before giving up")
    p.add_argument("--out", default=str(ROOT / "results" / "train_ddp.json"), help="JSON output file")
    p.add_argument("--fig-dir", default=str(ROOT / "docs" / "figures"), help="where the PNGs go")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("train_ddp: must run as root (namespaces, XDP)", file=sys.stderr)
        return 1
    if not 2 <= args.workers <= 16:
        print("train_ddp: --workers must be in 2..16", file=sys.stderr)
        return 1
    try:
        result = run(args)
    except RuntimeError as e:
        print(f"train_ddp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out = save_json(args.out, result)
    figs = plots(result, Path(args.fig_dir))
    print(json.dumps(result, indent=1) if args.json else table(result))
    log(f"saved {out}" + "".join(f", {f}" for f in figs))
    return 0 if result.get("digits_summary", {}).get("within_target", True) else 4


if __name__ == "__main__":
    sys.exit(main())
