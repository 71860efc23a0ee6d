#!/usr/bin/env python3
"""Word count benchmark (key-value mode): through the XDP switch, the same
agents with switch aggregation off, and PySpark.

A benchmark program of ~530 lines: corpus generation, the three systems'
runners and the table stay in one file so that one command reproduces a table.

Corpora (generated once, cached under --cache, reused while their parameters
are the same):
  zipf  seeded Zipf text: a vocabulary of --vocab random lowercase words, word
        of rank r drawn with probability ~ 1/r^--zipf-s, 12 words a line,
        --zipf-mb MB in all, split into one file per mapper;
  real  real English text of this machine: Vim's help files
        (/usr/share/vim/vim*/doc/*.txt), /usr/share/common-licenses/* and the
        distinct /usr/share/doc/*/copyright files (Debian packages' license and
        copyright notices), concatenated in that order and repeated up to
        --real-mb MB, split at line ends into one file per mapper.

Systems, each on the same files, each checked against collections.Counter over
the same tokenizer (hostagent.words.tokenize):
  inc      3 mappers (`inc-agent kv-map` on h1..h3) and the reducer
           (`inc-agent kv-reduce` on the ps host) in a lab, through the switch
           (the keys that hold an aggregator; the rest straight to the reducer);
  inc-all  (not by default) the same with `kv-map --all-via-switch`: every
           tuple through the switch, which passes on what it cannot absorb;
  off      the same agents, `kv-map --direct`: the tuples go straight to the
           reducer, the switch forwards them and absorbs nothing;
  pyspark  sc.textFile(files).flatMap(tokenize).map((w, 1)).reduceByKey(add)
           .collect() on local[2], in a child process (pip install pyspark:
           `make bench-kv` does it on demand).
Time: inc/off from starting the reducer to the reducer's counts written (the
processes' start, reading, tokenizing, sending, draining and writing are all
in it); pyspark the job alone (textFile to collect), the SparkContext's start
is reported apart and not counted.

Also reported for inc: the reducer's CPU time and the bytes that reached it,
the share of tuples and of word occurrences the switch
absorbed, and by key frequency (top 10 keys, 11-100, ...), from the reducer's
summary and its drained sums per key. Saves JSON (results/kv_bench.json),
prints a table. Lab, incd and Spark are torn down, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bpf import kv_wire, wire
from hostagent.words import read_chunks, tokenize

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout

MAPPERS = 3
LINE_WORDS = 12
# the agents' systems: kv-map options (pyspark is the peer outside the lab)
SYSTEMS = {"inc": [], "inc-all": ["--all-via-switch"], "off": ["--direct"], "pyspark": []}
BUCKETS = ((1, 10), (11, 100), (101, 1000), (1001, 10_000), (10_001, None))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- corpora -----------------------------------------------------------------------

def _counter_of(files: list[str]) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for f in files:
        for chunk in read_chunks(f):
            c.update(tokenize(chunk.decode("utf-8", errors="replace")))
    return c


def _finish_corpus(d: Path, meta: dict) -> dict:
    """Expected counts (collections.Counter over the files), cached with the meta."""
    files = [str(d / f"part{m}.txt") for m in range(MAPPERS)]
    t0 = time.perf_counter()
    want = _counter_of(files)
    log(f"  collections.Counter over {meta['bytes'] / 1e6:.0f} MB: {time.perf_counter() - t0:.1f}s")
    (d / "expected.json").write_text(json.dumps(want, ensure_ascii=False), encoding="utf-8")
    meta.update(words=sum(want.values()), distinct=len(want), files=files)
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _cached(d: Path, params: dict) -> dict | None:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("params") != params or not all(Path(f).is_file() for f in meta.get("files", [])) \
            or not (d / "expected.json").is_file():
        return None
    return meta


def zipf_corpus(cache: Path, mb: float, vocab: int, s: float, seed: int) -> dict:
    params = {"kind": "zipf", "mb": mb, "vocab": vocab, "s": s, "seed": seed, "mappers": MAPPERS,
              "line_words": LINE_WORDS}
    d = cache / f"zipf-{mb:g}mb-v{vocab}-s{s:g}-seed{seed}"
    meta = _cached(d, params)
    if meta:
        return meta
    log(f"generating the Zipf corpus in {d} ...")
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < vocab:  # distinct random lowercase words of 2..12 letters
        lens = rng.integers(2, 13, 4 * vocab)
        letters = rng.integers(0, 26, int(lens.sum())).astype(np.uint8) + ord("a")
        blob = letters.tobytes().decode("ascii")
        ends = np.cumsum(lens)
        for a, b in zip((ends - lens).tolist(), ends.tolist()):
            w = blob[a:b]
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == vocab:
                    break
    vocab_arr = np.array(words, dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** s)
    cdf /= cdf[-1]
    per_file = int(mb * 1e6 / MAPPERS)
    total = 0
    for m in range(MAPPERS):
        written = 0
        with open(d / f"part{m}.txt", "w", encoding="utf-8") as f:
            while written < per_file:
                n = int(min(1_200_000, max(LINE_WORDS, (per_file - written) // 6)))
                idx = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), vocab - 1)
                ws = vocab_arr[idx].tolist()
                text = "\n".join(" ".join(ws[i:i + LINE_WORDS]) for i in range(0, len(ws), LINE_WORDS)) + "\n"
                f.write(text)
                written += len(text)
        total += written
    meta = {"params": params, "name": "zipf", "bytes": total,
            "what": f"generated Zipf text: {vocab} random lowercase words (2-12 letters), rank r with "
                    f"probability ~ 1/r^{s:g}, seed {seed}, {LINE_WORDS} words a line, {MAPPERS} files"}
    return _finish_corpus(d, meta)


def real_sources() -> list[Path]:
    """Vim's help files, the common licenses, and the Debian copyright files
    (each distinct content once: several packages ship the same one)."""
    vim = sorted(p for p in Path("/usr/share").glob("vim/vim*/doc/*.txt") if p.is_file())
    lic = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    cop, seen = [], set()
    for p in sorted(Path("/usr/share/doc").glob("*/copyright")):
        if p.is_file():
            h = hashlib.sha256(p.read_bytes()).digest()
            if h not in seen:
                seen.add(h)
                cop.append(p)
    return vim + lic + cop


def real_corpus(cache: Path, mb: float) -> dict:
    srcs = real_sources()
    sig = {"kind": "real", "mb": mb, "mappers": MAPPERS, "sources": len(srcs),
           "source_bytes": sum(p.stat().st_size for p in srcs)}
    d = cache / f"real-{mb:g}mb"
    meta = _cached(d, sig)
    if meta:
        return meta
    if not srcs:
        raise RuntimeError("no Vim help, /usr/share/common-licenses/* or /usr/share/doc/*/copyright here")
    log(f"building the real-text corpus in {d} from {len(srcs)} files ...")
    d.mkdir(parents=True, exist_ok=True)
    parts = []
    for p in srcs:
        t = p.read_bytes().decode("utf-8", errors="replace")
        parts.append(t if t.endswith("\n") else t + "\n")
    once = "".join(parts)
    once_bytes = len(once.encode("utf-8"))
    reps = max(1, int(np.ceil(mb * 1e6 / once_bytes)))
    lines = once.splitlines(keepends=True)
    # the repeated text, cut at line ends into MAPPERS files of about equal size
    sizes = np.array([len(x.encode("utf-8")) for x in lines], dtype=np.int64)
    total = int(sizes.sum()) * reps
    per = total / MAPPERS
    files = [open(d / f"part{m}.txt", "w", encoding="utf-8") for m in range(MAPPERS)]
    try:
        done, m = 0, 0
        for _ in range(reps):
            cum = done + np.cumsum(sizes)
            # file index of each line: by the byte offset where the line ends
            which = np.minimum((cum - 1) // per, MAPPERS - 1).astype(int)
            for k in range(MAPPERS):
                sel = np.nonzero(which == k)[0]
                if sel.size:
                    files[k].write("".join(lines[i] for i in sel.tolist()))
            done = int(cum[-1])
    finally:
        for f in files:
            f.close()
    meta = {"params": sig, "name": "real", "bytes": total,
            "what": f"real English text of this machine, {len(srcs)} files: Vim's help "
                    f"(/usr/share/vim/vim*/doc/*.txt), /usr/share/common-licenses/* and the distinct "
                    f"/usr/share/doc/*/copyright files (Debian license and copyright notices); "
                    f"{once_bytes / 1e6:.1f} MB once (UTF-8, invalid bytes replaced), concatenated in that "
                    f"order and repeated {reps}x, split at line ends into {MAPPERS} files"}
    return _finish_corpus(d, meta)


def expected(meta: dict) -> dict:
    return json.loads((Path(meta["files"][0]).parent / "expected.json").read_text(encoding="utf-8"))


# --- inc and off: the agents in the lab ----------------------------------------------

def reducer_wrapper(argv: list[str]) -> int:
    """Runs `inc-agent kv-reduce argv[1:]` and then writes to argv[0] when it
    finished and the sums it drained from the switch, per word (the split the
    reducer's summary gives only in total)."""
    from hostagent import cli

    out, args = argv[0], argv[1:]
    a = cli.parser().parse_args(args)
    rc = cli.run(a)
    t_end = time.time()
    result = getattr(a, "result", None)  # what the reducer ended with, if it got that far
    per_word = result.drained_counts() if result is not None else {}
    Path(out).write_text(json.dumps({"rc": rc, "t_end": t_end, "drained": per_word}, ensure_ascii=False),
                         encoding="utf-8")
    return rc


def run_agents(lab, meta: dict, job: int, *, map_args: list[str], tmp: Path, timeout: float,
               cols: int | None = None) -> dict:
    from netns_lab.agents import AgentRunError, run_wordcount

    out = tmp / f"counts{job}.json"
    split = tmp / f"drained{job}.json"
    for p in (out, split):
        p.unlink(missing_ok=True)
    t0 = time.time()
    try:
        maps, red = run_wordcount(lab, job=job, files=meta["files"], out=str(out), timeout=timeout,
                                  map_args=["--timeout", "30", *map_args, *(["--cols", str(cols)] if cols else [])],
                                  reducer_cmd=[sys.executable, str(Path(__file__).resolve()), "_reduce", str(split)])
    except AgentRunError as e:
        raise RuntimeError(str(e)) from None
    sp = json.loads(split.read_text(encoding="utf-8"))
    counts = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    split.unlink()
    return {"seconds": sp["t_end"] - t0, "mappers": maps, "reducer": red, "counts": counts,
            "drained": sp["drained"]}


def hot_keys(want: dict, drained: dict) -> list[dict]:
    """Absorbed share of the occurrences by frequency rank of the key."""
    order = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(want.values())
    rows = []
    for lo, hi in BUCKETS:
        part = order[lo - 1:hi]
        if not part:
            break
        occ = sum(c for _, c in part)
        absorbed = sum(drained.get(w, 0) for w, _ in part)
        fully = sum(1 for w, c in part if drained.get(w, 0) == c)
        none = sum(1 for w, _ in part if not drained.get(w, 0))
        rows.append({"ranks": f"{lo}-{hi if hi and hi < len(order) else len(order)}", "keys": len(part),
                     "share_of_occurrences": occ / total, "absorbed_share": absorbed / occ if occ else 0.0,
                     "keys_fully_absorbed": fully, "keys_not_absorbed": none})
    return rows


def agents_row(corpus: dict, system: str, r: dict, want: dict) -> dict:
    maps, red = r["mappers"], r["reducer"]
    tuples = sum(m["tuples"] for m in maps)
    occ = red["drain_total"] + red["leftover_total"]
    row = {
        "corpus": corpus["name"], "system": system, "seconds": r["seconds"], "words": corpus["words"],
        "words_per_s": corpus["words"] / r["seconds"], "exact": r["counts"] == want,
        "tuples": tuples, "packets": sum(m["packets"] for m in maps),
        "absorbed_tuples_pct": 100.0 * (1 - red["leftover_tuples"] / tuples) if tuples else 0.0,
        "absorbed_occurrences_pct": 100.0 * red["drain_total"] / occ if occ else 0.0,
        "retransmits": sum(m["retransmits"] for m in maps),
        "mapper_map_s": max(m["map_s"] for m in maps), "mapper_send_s": max(m["send_s"] for m in maps),
        "mapper_total_s": max(m["total_s"] for m in maps),
        "mapper_cpu_s": sum(m["cpu_s"] for m in maps), "reducer_cpu_s": red["cpu_s"],
        "tuples_to_switch": sum(m["tuples_to_switch"] for m in maps),
        "padding": sum(m["padding"] for m in maps),
        "bytes_to_reducer": (wire.HDR_LEN * red["leftover_packets"]
                             + kv_wire.TUPLE_BYTES * red["leftover_tuples"]),
        "reducer": {k: red[k] for k in ("wait_s", "data_s", "drain_s", "total_s", "cpu_s", "leftover_packets",
                                        "leftover_tuples", "partial_packets", "dup_packets", "drain_keys",
                                        "drain_total", "leftover_total", "words")},
    }
    if not row["exact"]:
        diff = [w for w in set(want) | set(r["counts"]) if want.get(w) != r["counts"].get(w)]
        row["mismatched_words"] = len(diff)
        row["mismatch_examples"] = {w: [want.get(w), r["counts"].get(w)] for w in sorted(diff)[:5]}
    if system != "off":
        row["hot_keys"] = hot_keys(want, r["drained"])
    return row


# --- pyspark ----------------------------------------------------------------------------

def spark_child(argv: list[str]) -> int:
    """In a child process: word count on local[N] of argv[2:] into argv[0] (JSON)."""
    out, master, files = argv[0], argv[1], argv[2:]
    import operator

    from pyspark import SparkConf, SparkContext

    t0 = time.perf_counter()
    conf = (SparkConf().setMaster(master).setAppName("inc-kv-bench")
            .set("spark.ui.enabled", "false").set("spark.driver.memory", "4g")
            .set("spark.ui.showConsoleProgress", "false"))
    sc = SparkContext(conf=conf)
    try:
        sc.setLogLevel("ERROR")
        t1 = time.perf_counter()
        pairs = (sc.textFile(",".join(files)).flatMap(tokenize).map(lambda w: (w, 1))
                 .reduceByKey(operator.add).collect())
        t2 = time.perf_counter()
        parts = sc.textFile(",".join(files)).getNumPartitions()
        version = sc.version
    finally:
        sc.stop()
    Path(out).write_text(json.dumps({"startup_s": t1 - t0, "seconds": t2 - t1, "partitions": parts,
                                     "version": version, "counts": dict(pairs)}, ensure_ascii=False),
                         encoding="utf-8")
    return 0


def run_spark(meta: dict, master: str, tmp: Path, timeout: float) -> dict:
    out = tmp / "spark.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1", PYTHONPATH=str(ROOT))
    jh = Path("/usr/lib/jvm/java-17-openjdk-amd64")
    if "JAVA_HOME" not in env and jh.is_dir():
        env["JAVA_HOME"] = str(jh)
    errlog = tmp / "spark.stderr"
    with open(errlog, "w") as err:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_spark", str(out), master,
                              *meta["files"]], stdout=subprocess.DEVNULL, stderr=err, env=env,
                             start_new_session=True)  # its own group: the JVM goes with it
        try:
            rc = p.wait(timeout=timeout)
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        finally:
            try:  # nothing of this Spark (JVM, Python workers) outlives it
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if rc != 0 or not out.is_file():
        tail = errlog.read_text(errors="replace").strip().splitlines()[-8:]
        raise RuntimeError(f"pyspark exit {rc}: " + " | ".join(tail))
    r = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    return r


# --- the run --------------------------------------------------------------------------

def run(args) -> dict:
    systems = args.systems.split(",")
    bad = set(systems) - set(SYSTEMS)
    if bad:
        raise RuntimeError(f"unknown systems {sorted(bad)} ({', '.join(SYSTEMS)})")
    if "pyspark" in systems:
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise RuntimeError("pyspark is not installed (make bench-kv installs it), or leave it out: "
                               "--systems inc,off") from None
    cache = Path(args.cache)
    corpora = []
    for name in args.corpora.split(","):
        if name == "zipf":
            corpora.append(zipf_corpus(cache, args.zipf_mb, args.vocab, args.zipf_s, args.seed))
        elif name == "real":
            corpora.append(real_corpus(cache, args.real_mb))
        else:
            raise RuntimeError(f"unknown corpus {name!r} (zipf, real)")
    for c in corpora:
        log(f"corpus {c['name']}: {c['bytes'] / 1e6:.1f} MB, {c['words']} words, {c['distinct']} distinct: {c['what']}")
    tmp = cache / "run"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    lab = incd = None
    job = 700
    need_lab = any(s != "pyspark" for s in systems)
    try:
        if need_lab:
            from incd.process import IncdProcess
            from netns_lab.topology import Lab

            lab = Lab(args.lab_name, workers=MAPPERS, ps=True, mtu=args.mtu)
            lab.up()
            incd = IncdProcess(args.lab_name + "-incd", lab=args.lab_name).start()
            log(f"lab: {MAPPERS} mappers (h1..h{MAPPERS}) + reducer (ps), MTU {args.mtu}; incd on the switch")
        for c in corpora:
            want = expected(c)
            for rep in range(args.repeat):
                for system in systems:
                    t = time.time()
                    if system == "pyspark":
                        r = run_spark(c, args.spark_master, tmp, args.timeout)
                        row = {"corpus": c["name"], "system": "pyspark", "seconds": r["seconds"],
                               "words": c["words"], "words_per_s": c["words"] / r["seconds"],
                               "exact": r["counts"] == want, "startup_s": r["startup_s"],
                               "partitions": r["partitions"], "master": args.spark_master,
                               "version": r["version"]}
                    else:
                        r = run_agents(lab, c, job, map_args=SYSTEMS[system], tmp=tmp, timeout=args.timeout,
                                       cols=args.cols)
                        job += 1
                        row = agents_row(c, system, r, want)
                    row["rep"] = rep
                    rows.append(row)
                    extra = (f", absorbed {row['absorbed_tuples_pct']:.1f}% of tuples / "
                             f"{row['absorbed_occurrences_pct']:.1f}% of occurrences" if "absorbed_tuples_pct" in row
                             else "")
                    log(f"  {c['name']:>5} {system:>7} #{rep}: {row['seconds']:7.2f} s  "
                        f"{'exact' if row['exact'] else 'WRONG'}{extra}  ({time.time() - t:.1f}s)")
    finally:
        if incd is not None:
            incd.stop()
        if lab is not None:
            lab.down()
    summary = summarize(rows, corpora)
    return {"what": "word count: inc (through the switch) vs the same agents without switch aggregation "
                    "(kv-map --direct) vs PySpark reduceByKey",
            "mappers": MAPPERS, "mtu": args.mtu, "cols": args.cols, "spark_master": args.spark_master, "repeat": args.repeat,
            "timing": "inc/off: start of the reducer to its counts written (processes included); pyspark: "
                      "textFile..collect, without the SparkContext's start (startup_s)",
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "corpora": [{k: v for k, v in c.items() if k != "params"} | {"params": c["params"]} for c in corpora],
            "summary": summary, "rows": rows}


def summarize(rows: list[dict], corpora: list[dict]) -> list[dict]:
    """Per corpus and system: the median over repetitions, and speed-up over PySpark."""
    out = []
    for c in corpora:
        med = {}
        for system in SYSTEMS:
            rs = [r for r in rows if r["corpus"] == c["name"] and r["system"] == system]
            if not rs:
                continue
            s = float(np.median([r["seconds"] for r in rs]))
            d = {"corpus": c["name"], "system": system, "seconds": s, "words_per_s": c["words"] / s,
                 "exact": all(r["exact"] for r in rs), "runs": len(rs)}
            if "absorbed_tuples_pct" in rs[0]:
                d["absorbed_tuples_pct"] = float(np.median([r["absorbed_tuples_pct"] for r in rs]))
                d["absorbed_occurrences_pct"] = float(np.median([r["absorbed_occurrences_pct"] for r in rs]))
                d["reducer_cpu_s"] = float(np.median([r["reducer_cpu_s"] for r in rs]))
                d["bytes_to_reducer"] = int(np.median([r["bytes_to_reducer"] for r in rs]))
            med[system] = d
        sp = med.get("pyspark", {}).get("seconds")
        for d in med.values():
            d["speedup_vs_pyspark"] = sp / d["seconds"] if sp else None
            out.append(d)
    return out


def table(result: dict) -> str:
    lines = [f"{'corpus':>6} {'system':>8} {'seconds':>8} {'Mwords/s':>9} {'absorbed % tuples/occ':>22} "
             f"{'reducer: MB in, CPU s':>22} {'x PySpark':>9} exact"]
    for d in result["summary"]:
        ab = (f"{d['absorbed_tuples_pct']:.1f} / {d['absorbed_occurrences_pct']:.1f}"
              if "absorbed_tuples_pct" in d else "-")
        red = (f"{d['bytes_to_reducer'] / 1e6:.1f}, {d['reducer_cpu_s']:.2f}" if "reducer_cpu_s" in d else "-")
        vs = f"{d['speedup_vs_pyspark']:.2f}" if d["speedup_vs_pyspark"] else "-"
        lines.append(f"{d['corpus']:>6} {d['system']:>8} {d['seconds']:>8.2f} {d['words_per_s'] / 1e6:>9.2f} "
                     f"{ab:>22} {red:>22} {vs:>9} {'yes' if d['exact'] else 'NO'}")
    for c in result["corpora"]:
        lines.append(f"{c['name']}: {c['bytes'] / 1e6:.1f} MB, {c['words']} words, {c['distinct']} distinct; {c['what']}")
    for r in result["rows"]:
        if r.get("hot_keys") and r["rep"] == 0:
            lines.append(f"hot keys, {r['corpus']} ({r['system']}): absorbed share of the occurrences by key rank")
            for h in r["hot_keys"]:
                lines.append(f"  ranks {h['ranks']:>14}: {h['share_of_occurrences'] * 100:6.2f}% of the words, "
                             f"{h['absorbed_share'] * 100:6.2f}% absorbed; {h['keys_fully_absorbed']} of "
                             f"{h['keys']} keys fully, {h['keys_not_absorbed']} not at all")
    lines.append("x PySpark: PySpark's seconds / this system's (above 1: faster than PySpark)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default="zipf,real", help="comma-separated: zipf, real (default %(default)s)")
    p.add_argument("--systems", default="inc,off,pyspark", help="comma-separated: inc (only the keys that "
                   "hold an aggregator through the switch), inc-all (every tuple through the switch), off "
                   "(switch aggregation off), pyspark (default %(default)s)")
    p.add_argument("--zipf-mb", type=float, default=105.0, help="Zipf corpus size in MB (default %(default)s)")
    p.add_argument("--vocab", type=int, default=200_000, help="Zipf vocabulary (default %(default)s)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default %(default)s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--real-mb", type=float, default=50.0, help="real corpus size in MB, the text "
                   "repeated up to it (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs per system and corpus; the median is "
                   "reported (default %(default)s)")
    p.add_argument("--spark-master", default="local[2]")
    p.add_argument("--mtu", type=int, default=3400)
    p.add_argument("--cols", type=int, default=512, help="switch columns the job asks for (default %(default)s: "
                   "the whole array of incd's default build; the job has the switch to itself)")
    p.add_argument("--cache", default="/tmp/inc_kv_bench", help="corpora cache and scratch (default %(default)s)")
    p.add_argument("--lab-name", default="inckv", help="name of the lab this run creates")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before giving up")
    p.add_argument("--out", default=str(ROOT / "results" / "kv_bench.json"), help="JSON output file")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = p.parse_args()
    from netns_lab.benchkit import run_and_save

    return run_and_save("kv_bench", run, args, table,
                        lambda rows: all(r["exact"] for r in rows), as_json=args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_reduce":
        sys.exit(reducer_wrapper(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_spark":
        sys.exit(spark_child(sys.argv[2:]))
    sys.exit(main())
