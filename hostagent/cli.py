"""inc-agent: a host's side of in-network aggregation."""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bpf import control, wire

from . import inputs, outfile
from .collective import AllreduceError, VectorAllreduce
from .ps import ParameterServer
from .quantize import QuantizeError
from .transport import Session, TransportError


class CliError(Exception):
    pass


def load_input(path: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CliError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(x, np.ndarray):
        raise CliError(f"cannot read {path}: an .npz archive, not one array (.npy)")
    if x.dtype not in (np.float32, np.int32):
        raise CliError(f"{path}: dtype {x.dtype} not supported (float32 or int32)")
    return x


# Bytes of memory an allreduce needs per element: the input, its quantized copy,
# packets and results (padded rows), the output.
BYTES_PER_ELEMENT = 24


def _check_memory(numel: int) -> None:
    """A clear error instead of an allocation the host cannot satisfy."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    need = numel * BYTES_PER_ELEMENT
    if need > avail:
        raise CliError(f"--numel {numel} needs about {need / 2**30:.1f} GiB of memory; "
                       f"this host has {avail / 2**30:.1f} GiB available")


def _check_limits(a) -> None:
    """The limits every member command shares (bpf.control holds them)."""
    try:
        control.check_job(a.job)
        control.check_fail_timeout(a.fail_timeout)
    except control.LimitError as e:
        raise CliError(str(e)) from None


def cmd_allreduce(a) -> int:
    if a.world < 1 or a.world > wire.MAX_WORKERS:
        raise CliError(f"--world must be in 1..{wire.MAX_WORKERS}")
    if not 0 <= a.rank < a.world:
        raise CliError(f"--rank must be in 0..{a.world - 1}")
    _check_limits(a)
    if a.iters < 1:
        raise CliError("--iters must be at least 1")
    if a.inp and a.verify:
        raise CliError("--verify recomputes every rank's seeded input, so it cannot check --in data; "
                       "compare the --out files instead")
    if a.inp:
        x = load_input(a.inp)
    else:
        if a.numel < 1:
            raise CliError("--numel must be at least 1")
        _check_memory(a.numel)
        x = inputs.make_input(a.seed, a.rank, a.numel, a.dtype)
    if a.out:
        try:
            outfile.check_writable(outfile.npy_path(a.out))
        except outfile.OutFileError as e:
            raise CliError(f"--out: {e}") from None
    say = (lambda *_: None) if (a.json or a.quiet) else (lambda m: print(m, file=sys.stderr, flush=True))

    demand = {k: v for k, v in (("deadline_s", a.deadline), ("model_bytes", a.model_bytes),
                                ("epochs", a.epochs), ("compute_s", a.compute_s)) if v is not None}
    say(f"rank {a.rank}/{a.world}: registering job {a.job} with incd ...")
    # incd refuses ranks whose vectors differ, instead of letting them hang
    with Session(a.job, a.rank, a.world, window=a.window, switch=a.switch,
                 register_timeout=a.register_timeout, progress_timeout=a.timeout,
                 shape=f"{x.size}x{x.dtype}", mode=a.mode, demand=demand, fail_timeout=a.fail_timeout,
                 datapath=a.datapath, first_psn=a.first_psn, frame=a.frame) as s:
        say(f"rank {a.rank}: data path {s.datapath} ({s.datapath_note})")
        comm = VectorAllreduce(s)
        times = []
        y = None
        verified = max_err = None
        if a.verify:  # every iteration is checked, so a resize or a loss in any of them shows
            all_in = [inputs.make_input(a.seed, r, x.size, str(x.dtype)) for r in range(a.world)]
            verified, max_err = True, 0.0
        for it in range(a.iters):
            # With --verify every iteration's inputs differ (shifted by the iteration
            # number), so a result replayed from an earlier one cannot pass.
            xi = inputs.shifted(x, it) if a.verify else x
            if it and a.barrier:  # untimed: no rank's time holds another's check of the last result
                s.reduce(np.zeros(1, dtype=np.int32))
            t0 = time.perf_counter()
            y = comm.allreduce(xi)
            times.append(time.perf_counter() - t0)
            if a.verify:
                ok, err = inputs.check_sum(y.ravel(), [inputs.shifted(v, it) for v in all_in], s.params.elems)
                verified, max_err = verified and ok, max(max_err, err)
            say(f"  iter {it + 1}/{a.iters}: {times[-1] * 1e3:.2f} ms")
        s.done()
        ctrl_lost = s.ctrl_lost
        rejoins = s.ctl.rejoins
        params = s.params
        retx = s.stats.retransmits
        resizes = s.resizes
        packets_per_iter = (s.stats.packets - (a.iters - 1 if a.barrier else 0)) / a.iters  # a barrier: 1
        datapath, datapath_note, corrupt = s.datapath, s.datapath_note, s.stats.corrupt
    if a.out:
        try:
            outfile.write_atomic(outfile.npy_path(a.out), lambda f: np.save(f, y))
        except outfile.OutFileError as e:
            raise CliError(str(e)) from None
    med = statistics.median(times)
    res = {
        "job": a.job, "rank": a.rank, "world": a.world, "numel": int(x.size), "dtype": str(x.dtype),
        "iters": a.iters, "times_s": times, "median_s": med,
        "goodput_gbps": x.nbytes * 8 / med / 1e9, "retransmits": retx,
        "packets_per_iter": packets_per_iter, "pps": packets_per_iter / med,
        "elems_per_packet": params.elems, "window": params.window, "mode": a.mode, "resizes": resizes,
        "datapath": datapath, "datapath_note": datapath_note, "corrupt": corrupt, "frame": params.frame,
        "verified": verified,
        "max_abs_err": max_err,
        "widened_to_int64": comm.widened,  # int32 sums that overflowed and were redone exactly
        "ctrl_lost": ctrl_lost,  # incd went away during the run (the results still all came)
        "rejoins": rejoins,  # times it reconnected to a restarted incd
    }
    if ctrl_lost:
        print("inc-agent: warning: lost the control connection to incd during the run; "
              "the results kept coming through the switch", file=sys.stderr)
    if a.json:
        print(json.dumps(res))
    else:
        v = "" if verified is None else (" verified" if verified else f" WRONG (max err {max_err})")
        print(f"allreduce job {a.job} rank {a.rank}/{a.world}: {x.size} x {x.dtype}, "
              f"median {med * 1e3:.2f} ms, {res['goodput_gbps']:.3f} Gbit/s, "
              f"{retx} retransmits, {datapath} data path{v}")
    return 0 if verified in (None, True) else 4


def cmd_ps(a) -> int:
    if not 1 <= a.world <= wire.MAX_WORKERS:
        raise CliError(f"--world must be in 1..{wire.MAX_WORKERS}")
    _check_limits(a)
    say = (lambda *_: None) if a.json else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"ps: registering job {a.job} ({a.mode}, {a.world} workers) with incd ...")
    ps = ParameterServer(a.job, a.world, mode=a.mode, switch=a.switch,
                         register_timeout=a.register_timeout, fail_timeout=a.fail_timeout,
                         datapath=a.datapath)
    stop = lambda *_: ps.stop.set()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(f"ps: job {a.job} gen {ps.p.gen} running, data path {ps.datapath} ({ps.datapath_note}); "
        "serving until its workers leave")
    try:
        stats = ps.serve()
    finally:
        ps.close()
    out = {"job": a.job, "mode": a.mode, "world": a.world, "end": ps.end_reason or "stopped",
           "datapath": ps.datapath, "datapath_note": ps.datapath_note, **stats.as_dict()}
    print(json.dumps(out) if a.json else
          f"ps job {a.job}: {stats.results} results from {stats.aggregates} switch aggregates "
          f"({stats.partials} partial) and {stats.singles} single packets ({stats.collisions} "
          f"collisions); {stats.results_resent} results resent; {stats.xdp_results} results from the "
          f"XDP fast path; ended: {out['end']}")
    if ps.failure:
        print(f"inc-agent: {ps.failure}", file=sys.stderr)
        return 1
    return 0


def kv_splits() -> tuple[str, ...]:
    from .words import SPLITS
    return SPLITS


def kv_chunk_kb() -> int:
    from .words import CHUNK_BYTES

    return CHUNK_BYTES >> 10


def _member_args(p, fail_help: str) -> None:
    """What every member of a job takes: where incd is and how long to wait."""
    p.add_argument("--switch", help="incd address (default: this host's default gateway)")
    p.add_argument("--key-file", help="the shared key incd was started with (--key-file there); "
                   "default: the file INC_KEY_FILE names, else none")
    p.add_argument("--job-token", help="a secret all members of the job share (8 to 256 characters): incd "
                   "lets nobody into the job without it; default: INC_JOB_TOKEN, else none")
    p.add_argument("--register-timeout", type=float, default=30.0,
                   help="how long to wait for the other members to register (default %(default)s)")
    p.add_argument("--fail-timeout", type=float, default=2.0, metavar="S", help=fail_help + " (default %(default)s)")


def _kv_job_args(p) -> None:
    """What a word count's mapper and reducer both take."""
    p.add_argument("--job", type=int, required=True)
    p.add_argument("--mappers", type=int, required=True, help="number of mappers")
    _member_args(p, "fail within about S seconds when another member of the job dies or hangs (incd "
                 "reports it); also how long this one may be silent before incd takes it for hung")


def _check_kv_job(a) -> None:
    if not 1 <= a.mappers <= wire.MAX_WORKERS:
        raise CliError(f"--mappers must be in 1..{wire.MAX_WORKERS}")
    _check_limits(a)


def cmd_kv_map(a) -> int:
    from .kv_mapper import run_mapper

    _check_kv_job(a)
    if not 0 <= a.rank < a.mappers:
        raise CliError(f"--rank must be in 0..{a.mappers - 1}")
    if not 1 <= a.window <= wire.KV_WINDOW:
        raise CliError(f"--window must be in 1..{wire.KV_WINDOW} (the switch remembers "
                       f"{wire.KV_WINDOW} psns per mapper)")
    if a.direct and a.all_via_switch:
        raise CliError("--direct and --all-via-switch exclude each other")
    if not 1 <= a.chunk_kb <= 1 << 20:
        raise CliError("--chunk-kb must be in 1..1048576")
    if a.cols is not None and not 1 <= a.cols <= 1 << 16:
        raise CliError("--cols must be in 1..65536")
    for f in a.input:
        if not Path(f).is_file():
            raise CliError(f"--input {f}: no such file")
    say = (lambda *_: None) if a.json else (lambda m: print(m, file=sys.stderr, flush=True))
    st = run_mapper(a.job, a.rank, a.mappers, a.input, window=a.window, switch=a.switch,
                    register_timeout=a.register_timeout, progress_timeout=a.timeout,
                    fail_timeout=a.fail_timeout, cols=a.cols, chunk_bytes=a.chunk_kb << 10,
                    route="direct" if a.direct else "switch" if a.all_via_switch else "owned",
                    split=a.split, say=say)
    res = dict(vars(st))
    print(json.dumps(res) if a.json else
          f"kv-map job {a.job} mapper {a.rank}/{a.mappers}: {st.words} words ({st.distinct} distinct) as "
          f"{st.tuples} tuples in {st.packets} packets; acknowledged by the switch {st.acks_switch}, by the "
          f"reducer {st.acks_reducer}; {st.retransmits} retransmits; {st.total_s:.2f} s")
    if st.collisions:
        print(f"inc-agent: warning: {st.collisions} key(s) shared by two of this mapper's words "
              "(the reducer reports them)", file=sys.stderr)
    return 0


def cmd_kv_reduce(a) -> int:
    """Also leaves the ReduceResult in a.result (scripts/kv_bench.py reads
    what was drained from it)."""
    from .kv_merge import summary_dict
    from .kv_messages import CollisionError
    from .kv_reducer import run_reducer

    _check_kv_job(a)
    try:
        outfile.check_writable(a.out)
    except outfile.OutFileError as e:
        raise CliError(f"--out: {e}") from None
    say = (lambda *_: None) if a.json else (lambda m: print(m, file=sys.stderr, flush=True))
    status = 0
    try:
        a.result = run_reducer(a.job, a.mappers, switch=a.switch, register_timeout=a.register_timeout,
                               fail_timeout=a.fail_timeout, timeout=a.timeout, say=say)
    except CollisionError as e:
        a.result = e.result
        print(f"inc-agent: {e}", file=sys.stderr)
        status = 3
    counts, s, info = a.result.counts, a.result.summary, a.result.info
    try:
        data = json.dumps(counts, ensure_ascii=False, sort_keys=True).encode("utf-8")
        outfile.write_atomic(a.out, lambda f: f.write(data))
    except outfile.OutFileError as e:
        raise CliError(str(e)) from None
    res = {**info, **summary_dict(s), "out": str(a.out), "total_count": sum(counts.values())}
    print(json.dumps(res) if a.json else
          f"kv-reduce job {a.job}: {s.words} words, {res['total_count']} occurrences; from the switch "
          f"{s.drain_total} (drained {s.drain_keys} keys), as leftovers {s.leftover_total} ({s.leftover_tuples} "
          f"tuples in {s.leftover_packets} packets, {s.dup_packets} duplicates); {len(s.collisions)} "
          f"collisions; {info['total_s']:.2f} s -> {a.out}")
    return status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inc-agent", description="Host agent for in-network aggregation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("allreduce", help="sum a vector with the other ranks through the switch",
                       description="Sum a vector with the other ranks of a job through the XDP switch. "
                       "All ranks of the job must be started with the same --job, --world, --window "
                       "and vector size.")
    a.add_argument("--job", type=int, required=True, help="job id, 1..1023, shared by all ranks")
    a.add_argument("--rank", type=int, required=True)
    a.add_argument("--world", type=int, required=True, help="number of ranks")
    a.add_argument("--numel", type=int, default=262144, help="elements (default %(default)s)")
    a.add_argument("--dtype", choices=["float32", "int32"], default="float32")
    a.add_argument("--iters", type=int, default=1)
    a.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    a.add_argument("--in", dest="inp", metavar="X.npy", help="this rank's input (float32 or int32)")
    a.add_argument("--out", metavar="Y.npy", help="write the last iteration's result here")
    a.add_argument("--verify", action="store_true", help="check the result against the seeded inputs")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--quiet", action="store_true", help="no progress lines")
    a.add_argument("--barrier", action="store_true",
                   help="an untimed barrier before each iteration after the first, as the benchmark's "
                        "Gloo ranks have (with --verify, a rank's time then never includes another's check)")
    a.add_argument("--window", type=int, default=64, help="packets in flight (default %(default)s)")
    a.add_argument("--datapath", choices=["auto", "xdp", "socket"], default="socket",
                   help="how packets leave and results arrive: xdp (host XDP programs, no socket "
                        "stack; needs root and a veth without another XDP program), socket "
                        "(UDP sockets, works anywhere; the default), auto (xdp where it can be "
                        "loaded, else socket). --json and incd status say which was used")
    a.add_argument("--frame", choices=["std", "jumbo"], default="std",
                   help="jumbo: vectors of 16000 lanes and more go in 64 KB frames of 20 slots each, the "
                        "result passed from rank to rank (needs modulo mode, the XDP data path, an MTU of "
                        f"{wire.JUMBO_IP_BYTES} on the hosts' and the switch's links, and every rank to say "
                        "the same); std: 3.2 KB packets (the default)")
    # Tests start a job near the wire psn's wrap (2^32) with this.
    a.add_argument("--first-psn", type=int, default=0, help=argparse.SUPPRESS)
    a.add_argument("--mode", choices=["modulo", "hash", "ps"], default="modulo",
                   help="modulo: switch only (NetReduce); hash: switch with a parameter server "
                   "fallback (ATP); ps: parameter server only, the switch just forwards (baseline)")
    a.add_argument("--deadline", type=float, metavar="S",
                   help="the job must finish within S seconds: incd's EDF policy sizes its memory from "
                   "--model-bytes, --epochs and --compute-s")
    a.add_argument("--model-bytes", type=int, help="bytes reduced per epoch (for the deadline sizing)")
    a.add_argument("--epochs", type=float, help="epochs the job runs (for the deadline sizing)")
    a.add_argument("--compute-s", type=float, help="compute time per epoch (for the deadline sizing)")
    a.add_argument("--timeout", type=float, default=10.0,
                   help="fail if no result arrives for this many seconds (default %(default)s)")
    _member_args(a, "fail within about S seconds when another member of the job dies or hangs (incd "
                 "reports it), or when incd is gone and no result comes; also how long this rank may be "
                 "silent before incd takes it for hung")
    a.set_defaults(fn=cmd_allreduce)
    q = sub.add_parser("ps", help="parameter server of one hash- or ps-mode job",
                       description="Serve one job as its parameter server: finish the sums the "
                       "switch could not (hash mode) or all of them (ps mode). Exits when the "
                       "job's workers have all left (status 0) or the job failed (status 1: a "
                       "worker died or hung, or incd stopped).")
    q.add_argument("--job", type=int, required=True)
    q.add_argument("--world", type=int, required=True, help="number of worker ranks")
    q.add_argument("--mode", choices=["hash", "ps"], default="hash")
    q.add_argument("--datapath", choices=["auto", "xdp", "socket"], default="socket",
                   help="hash mode: xdp answers complete aggregates in an XDP program on this host's "
                   "veth, without the socket stack (needs root and a veth without another XDP "
                   "program); socket (the default) serves everything from the PS's UDP socket; auto: "
                   "xdp where it can be loaded, else socket")
    _member_args(q, "as for allreduce: how long this PS may be silent before incd takes it for hung, "
                 "and how long it serves without packets once incd is gone")
    q.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    q.set_defaults(fn=cmd_ps)
    m = sub.add_parser("kv-map", help="word count: count words of text files and send them through the switch",
                       description="Mapper of a key-value (word count) job: tokenizes the input (lowercase; "
                       "anything but letters and digits separates words; or --split whitespace), counts words per "
                       "chunk and sends "
                       "the counts as (key, int32) tuples while it reads on: the keys that hold an "
                       "aggregator of its part of the switch through the switch, which sums them, the "
                       "rest straight to the reducer. Then sends the reducer its key -> word dictionary.")
    _kv_job_args(m)
    m.add_argument("--rank", type=int, required=True, help="this mapper's flow id, 0..mappers-1")
    m.add_argument("--input", action="append", required=True, metavar="FILE",
                   help="UTF-8 text (repeat for more files)")
    m.add_argument("--window", type=int, default=128, help="packets unacknowledged at most, 1..128 "
                   "(default %(default)s)")
    m.add_argument("--cols", type=int, help="switch columns to ask for (x packet rows = aggregators; "
                   "default: incd's, half the switch); the first mapper to register decides")
    m.add_argument("--timeout", type=float, default=10.0,
                   help="fail if no acknowledgement comes for this many seconds (default %(default)s)")
    m.add_argument("--chunk-kb", type=int, default=kv_chunk_kb(),
                   help="text counted at a time (the combiner's reach; default %(default)s)")
    m.add_argument("--split", choices=kv_splits(), default="words",
                   help="what a word is: 'words' (default), lowercased runs of letters and digits; "
                   "'whitespace', whatever lies between whitespace, case kept (as str.split() and "
                   "Hadoop's or Spark's WordCount example). All mappers of a job should agree")
    m.add_argument("--all-via-switch", action="store_true",
                   help="send every tuple through the switch, also of keys that hold no aggregator of this "
                   "mapper's part (the switch passes those on to the reducer); default: only the keys that "
                   "hold one, the hottest first, the rest straight to the reducer")
    m.add_argument("--direct", action="store_true",
                   help="switch aggregation off (a baseline): send the tuples straight to the reducer, "
                   "which then gets and sums all of them; the switch only forwards them")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(fn=cmd_kv_map)
    r = sub.add_parser("kv-reduce", help="word count: the reducer of a key-value job",
                       description="Reducer of a key-value job: adds the tuples the switch could not "
                       "absorb, collects the mappers' dictionaries, drains the switch's sums and writes "
                       "{word: count} as JSON. Exit status 3 if two words share a key (those words are "
                       "left out of the output and named).")
    _kv_job_args(r)
    r.add_argument("--out", required=True, metavar="COUNTS.json")
    r.add_argument("--timeout", type=float, default=600.0,
                   help="fail if the mappers have not all finished after this many seconds (default %(default)s)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(fn=cmd_kv_reduce)
    return p


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


def run(args) -> int:
    """Runs parsed arguments' command; its errors become a message and status 1."""
    if getattr(args, "key_file", None):
        os.environ["INC_KEY_FILE"] = args.key_file  # read where the control connection is made
    if getattr(args, "job_token", None):
        os.environ["INC_JOB_TOKEN"] = args.job_token  # read where the registration is sent
    try:
        return args.fn(args)
    except (CliError, TransportError, AllreduceError, QuantizeError) as e:
        print(f"inc-agent: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
