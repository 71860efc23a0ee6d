/* Every map of the switch, declared once (bcc's BPF_* macros). Included by
 * inc_switch.bpf.c only, before the mode headers that use the maps; the names
 * are how incd (incd/dataplane.py) finds and pins them. */
#ifndef INC_MAPS_H
#define INC_MAPS_H

#include "inc_state.h"

/* incd builds with -DINC_PIN_DIR="/sys/fs/bpf/<instance>": every map, the tail
 * call table included, is then pinned there, or reused if already pinned. The
 * pins keep the switch aggregating while incd is down (a prog array loses its
 * entries when its last user reference goes), and let a restarted incd adopt
 * the running jobs' state. */
#ifdef INC_PIN_DIR
#define INC_TABLE(type, key, leaf, name, n) \
	BPF_TABLE_PINNED(type, key, leaf, name, n, INC_PIN_DIR "/" #name)
#define INC_PINNED(type, name) type ":" INC_PIN_DIR "/" #name
#else
#define INC_TABLE(type, key, leaf, name, n) BPF_TABLE(type, key, leaf, name, n)
#define INC_PINNED(type, name) type
#endif

INC_TABLE("array", int, struct inc_job, jobs, INC_MAX_JOBS);
INC_TABLE("array", int, struct inc_slot, pool, INC_POOL_SLOTS);
INC_TABLE("hash", struct inc_member_key, struct inc_member, members, INC_MAX_JOBS * 4);
INC_TABLE("array", int, struct inc_member, job_ps, INC_MAX_JOBS); /* hash mode: the job's PS (ifindex 0 = none) */
INC_TABLE("array", int, struct inc_member, job_up, INC_MAX_JOBS); /* a leaf: the job's spine (rank: this leaf's) */
INC_TABLE("array", int, struct inc_source, sources, INC_MAX_JOBS * INC_MAX_WORKERS);
INC_TABLE("percpu_array", int, struct inc_stats, stats, INC_MAX_JOBS);
/* Key-value mode: two copies (epochs) of a rows x columns aggregator array, and
 * per (job, flow) the psns already absorbed. */
INC_TABLE("array", int, struct inc_kv_agg, kv_pool, 2 * INC_KV_COLS * INC_KV_ROWS);
INC_TABLE("hash", struct inc_kv_flow_key, struct inc_kv_flow, kv_flows, INC_KV_MAX_FLOWS);
BPF_XDP_REDIRECT_MAP(INC_PINNED("devmap", tx_ports), struct bpf_devmap_val, tx_ports, INC_MAX_PORTS);

/* One program per mode, entered by tail call: each is verified on its own,
 * which keeps the verifier's work (800-lane loops on every path) in bounds. */
INC_TABLE("prog", u32, u32, mode_progs, INC_MODE_PROGS);

/* Per-CPU scratch of the key-value tuple loop (struct kv_scratch); per packet,
 * so never pinned. */
BPF_TABLE("percpu_array", int, struct kv_scratch, kv_scratch, 1);

/* A jumbo frame's lanes, per CPU (struct inc_jumbo_buf). It lives across the
 * frame's tail calls, and a restarted incd replaces mode_progs' entries while
 * frames are in flight, so old and new programs must share it: pinned too. */
INC_TABLE("array", int, struct inc_jumbo_buf, jumbo_buf, INC_JUMBO_CPUS);

#endif /* INC_MAPS_H */
