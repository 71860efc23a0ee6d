/* The switch's own state: job table, members, aggregators, counters, and the
 * key-value aggregator and seen state; the value structs of the maps in
 * inc_maps.h.
 *
 * Written by incd (job table, members, sources) and by the dataplane
 * (aggregators, counters). incd reads these structs through bcc, which builds
 * its types from them; Python parses the constants here as it does those of
 * inc_proto.h (bpf/wire.py). Keep it free of kernel-only includes: the unit
 * tests compile it with gcc.
 */
#ifndef INC_STATE_H
#define INC_STATE_H

#include "inc_proto.h"

#ifndef __KERNEL__
#include <linux/bpf.h>   /* struct bpf_spin_lock */
#endif

#define INC_MAX_PORTS 64

/* Map sizes chosen when incd builds the switch (-DINC_POOL_SLOTS=N,
 * -DINC_KV_COLS=N); a build without them gets the defaults. */
#define INC_POOL_SLOTS_DEFAULT 4096
#define INC_KV_COLS_DEFAULT 512 /* columns of the aggregator array */
#ifndef INC_POOL_SLOTS
#define INC_POOL_SLOTS INC_POOL_SLOTS_DEFAULT
#endif
#ifndef INC_KV_COLS
#define INC_KV_COLS INC_KV_COLS_DEFAULT
#endif

/* inc_job.mode */
#define INC_MODE_MODULO 1      /* NetReduce: idx = offset + psn % slots, switch only */
#define INC_MODE_HASH 2        /* ATP: idx from the host, PS fallback, ACK release */
/* Index of the program for a hash job's PS packets (results, EVICTs) in the
 * dataplane's program array; modes index their own data programs. */
#define INC_PROG_HASH_FROM_PS 3
#define INC_PROG_BCAST 5       /* modulo jobs' broadcasts (INC_F_BCAST) */
#define INC_MODE_KV 4          /* key-value aggregation (word count): see inc_proto.h */
#define INC_PROG_JUMBO 6       /* modulo jobs' jumbo frames (INC_T_JUMBO, INC_T_JRESULT) */
#define INC_PROG_JUMBO_ADD 7   /* a jumbo frame into one of its slots, then the next */
#define INC_PROG_JUMBO_OUT 8   /* a jumbo frame's result written and sent */
#define INC_PROG_DOWN 9        /* a leaf: the spine's result for its rack's partial (mode_tier.h) */
#define INC_PROG_LEAF 10       /* modulo data on a leaf of the job (mode_modulo.h, mode_tier.h) */
#define INC_PROG_SPINE 11      /* modulo data (the leaves' partials) on the job's spine */
#define INC_MODE_PROGS 16       /* size of the program array */

/* Hash mode: a slot claimed longer ago than this by a (job, psn) that never
 * finished may be taken over; its contributors resend to the PS. */
#define INC_SLOT_STALE_NS 200000000ULL

/* inc_slot.state */
#define INC_SLOT_EMPTY 0
#define INC_SLOT_PARTIAL 1
#define INC_SLOT_COMPLETE 2
#define INC_SLOT_UP 3          /* a leaf: its rack's partial went up to the spine; the result has not come back */

/* inc_job.tier: where this switch sits on the job's path (docs/design.md, "Two tiers") */
#define INC_TIER_ONE 0         /* the job's only switch */
#define INC_TIER_LEAF 1        /* sums its rack's ranks, sends the partial up (job_up), replicates the result */
#define INC_TIER_SPINE 2       /* its "ranks" are the leaves */

/* Job table, indexed by job id. Written by incd only. */
struct inc_job {
	__u32 offset;  /* first aggregator slot of the job's region (key-value: first column) */
	__u32 slots;   /* region size; modulo mode uses 2 * window (key-value: columns) */
	__u16 gen;
	__u8 mode;     /* 0 = no such job */
	__u8 world;
	__u8 epoch;    /* key-value: which copy of the aggregator array is active (0/1) */
	__u8 tier;     /* INC_TIER_*; modulo jobs only */
	__u16 parts;   /* key-value: subspaces the columns are cut into; flow f uses part f % parts */
	__u8 local;    /* a leaf: the job's ranks behind it (a slot is complete here with these) */
	__u8 pad;
	__u16 pad2;
};

/* Where and how to deliver a job's results on one switch port (devmap egress). */
struct inc_member_key {
	__u16 job;
	__u16 pad;
	__u32 ifindex;
};

/* Where a job's rank may send from: sources[job * INC_MAX_WORKERS + rank].
 * Data packets from any other port or address are dropped (bad_source). */
struct inc_source {
	__u32 addr;    /* host IPv4, network order; 0 = no such member */
	__u32 ifindex; /* switch port it is behind */
	__u16 port;    /* its UDP port, network order (another process on the host is a stranger) */
	__u16 pad;
};

/* Also the value of job_ps (hash mode: where a job's PS is). */
struct inc_member {
	__u8 mac[6];       /* host (or next hop) MAC */
	__u8 port_mac[6];  /* switch port MAC */
	__u32 addr;        /* host IPv4, network order */
	__u32 switch_addr; /* switch port IPv4, network order */
	__u16 port;        /* host UDP port, network order */
	__u16 rank;
	__u32 ifindex;     /* switch port the host is behind */
};

/* One aggregator. The pool is an array of these; a job owns [offset, offset+slots). */
struct inc_slot {
	struct bpf_spin_lock lock;
	__u32 psn;        /* round currently held */
	__u64 bitmap;     /* ranks whose contribution is in lanes */
	__u16 job;        /* owner tag: a slot tagged with another job/gen is free */
	__u16 gen;
	__u8 state;       /* INC_SLOT_* */
	__u8 count;       /* contributions so far */
	__u8 op;
	__u8 overflow;
	__u16 numel;
	__u16 jdone;      /* jumbo, first slot of a frame: ranks done adding into all its slots */
	__u64 claimed_ns; /* hash mode: when this (job, psn) took the slot */
	__u64 select;     /* hash mode: the ranks its result's lanes go to (INC_F_SELECT); 0: all.
			   * Jumbo, first slot of a frame: the frame's numel */
	__s32 lanes[INC_MAX_ELEMS];
};

/* Per-job counters, in a per-CPU array indexed by job id (0 = unattributable). */
struct inc_stats {
	__u64 pkts_in;          /* INC data packets parsed for this job */
	__u64 consumed;         /* contributions added and absorbed */
	__u64 slots_completed;
	__u64 results_mcast;    /* result copies sent out by the egress program */
	__u64 retrans_answered; /* stored result unicast back to a retransmitter */
	__u64 overflows;        /* slots whose int32 sum overflowed */
	__u64 collisions;       /* hash: slot held by another (job, psn); packet sent to the PS */
	__u64 fallbacks;        /* hash: packets sent to the PS other than complete aggregates */
	__u64 to_ps;            /* hash: complete aggregates sent to the PS */
	__u64 releases;         /* hash: slots freed by the PS's result (the ACK) */
	__u64 reclaims;         /* hash: stale slots taken over */
	__u64 evictions;        /* hash: partials handed to the PS on its EVICT */
	__u64 kv_absorbed;      /* key-value: tuples added into an aggregator (claims included) */
	__u64 kv_claimed;       /* key-value: tuples that took an empty aggregator */
	__u64 kv_leftover;      /* key-value: tuples left in the packet for the reducer */
	__u64 kv_acks;          /* key-value: packets fully absorbed and acknowledged by the switch */
	__u64 kv_to_reducer;    /* key-value: packets sent on to the reducer with their leftovers */
	__u64 kv_resent;        /* key-value: retransmissions of a psn already absorbed (re-acked or
				 * replayed to the reducer, never added again) */
	__u64 chained;          /* jumbo: results passed on to the next rank of their chain */
	__u64 up_sent;          /* a leaf: its rack's partials sent up to the spine */
	__u64 up_resent;        /* a leaf: partials sent up again for a rank that resent */
	__u64 down_received;    /* a leaf: results from the spine, replicated to the rack */
	__u64 drops[INC_DROP__COUNT];
};

/* --- Key-value mode: aggregators and seen state ------------------------------ */
#define INC_KV_ROWS INC_KV_MAX_TUPLES
#define INC_KV_MASK_WORDS 5    /* ceil(INC_KV_MAX_TUPLES / 64) */
#define INC_KV_MAX_FLOWS 256   /* (job, flow) pairs with seen state, all KV jobs together (6 KiB each) */

/* One aggregator: kv_pool[epoch * INC_KV_COLS * INC_KV_ROWS + col * INC_KV_ROWS + row]
 * (column-major, so a job's columns are one contiguous range per epoch).
 * Claimed with a 64-bit compare-and-swap on key, added with a 64-bit atomic
 * add: no lock (kv_agg.h; scripts/kv_cost.py measures both ways). */
struct inc_kv_agg {
	__u64 key;     /* 0 = empty */
	__s64 value;   /* sum over the epoch: 64-bit, int32 tuples cannot overflow it */
};

/* inc_kv_seen.state */
#define INC_KV_EMPTY 0
#define INC_KV_PENDING 1       /* being absorbed on some CPU right now */
#define INC_KV_ALL 2           /* every tuple absorbed: acknowledged by the switch */
#define INC_KV_PARTIAL 3       /* mask = tuples absorbed; the rest went to the reducer */

/* What the switch did with psn (one entry of a flow's ring, psn % INC_KV_WINDOW). */
struct inc_kv_seen {
	__u32 psn;
	__u8 state;
	__u8 pad;
	__u16 absorbed;
	__u64 mask[INC_KV_MASK_WORDS]; /* bit i: tuple i was absorbed */
};

struct inc_kv_flow_key {
	__u16 job;
	__u16 flow;    /* the mapper's rank */
};

/* Seen state of one flow; written by incd when the job is programmed. */
struct inc_kv_flow {
	struct bpf_spin_lock lock;
	__u32 pad;
	struct inc_kv_seen ring[INC_KV_WINDOW];
};

/* Per packet working state of the key-value tuple loop (mode_kv.h). Kept in a
 * per-CPU map rather than in registers: the verifier does not track values in
 * map memory, so the loop's paths (absorbed or not) meet again at the loop
 * head and are pruned; with exact counters in registers they never do (266
 * tuples: too complex). */
struct kv_scratch {
	__u32 absorbed;
	__u32 claimed;
	__u32 left;
	__u32 lsum;
	__u64 mask[INC_KV_MASK_WORDS];
};

/* Jumbo frames: a frame's lanes, loaded once per packet, and where its
 * programs are (one entry per CPU, indexed by the CPU id: a per-CPU map value
 * is limited to 32 KB; a frame's tail calls all run on one CPU). */
#ifndef INC_JUMBO_CPUS
#define INC_JUMBO_CPUS 64
#endif
struct inc_jumbo_buf {
	__u32 j;       /* the frame's next slot */
	__s32 fate;    /* what its first slot decided (enum jumbo_first) */
	__s32 lanes[INC_JUMBO_ELEMS];
};

#endif /* INC_STATE_H */
