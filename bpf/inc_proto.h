/* Wire format and map layouts of the INC switch: the one source of truth.
 *
 * Kernel (bcc) and user space both read this file. Python derives the #define
 * and enum constants by parsing it (hostagent/proto.py) and a test compares the
 * Python codec's struct layout with offsetof() computed by a C compiler
 * (tests/test_layout.py). Keep it free of kernel-only includes.
 *
 * Byte order: the Ethernet/IP/UDP headers are network order as usual; the INC
 * header and payload are LITTLE-endian. Every host and the XDP switch here are
 * x86_64, so this saves a byte swap per lane in the aggregation loop.
 */
#ifndef INC_PROTO_H
#define INC_PROTO_H

#ifndef __KERNEL__
#include <linux/types.h>
#include <linux/bpf.h>   /* struct bpf_spin_lock */
#endif

#define INC_VERSION 1

/* UDP destination ports [INC_PORT_MIN, INC_PORT_MAX] mark INC traffic; any other
 * packet gets XDP_PASS so the switch's kernel forwards it. Agents send to
 * INC_PORT; results come from it. */
#define INC_PORT_MIN 38000
#define INC_PORT_MAX 38015
#define INC_PORT 38000
/* TCP port of incd's control API (not data plane; kept here so there is one list). */
#define INC_CTRL_PORT 38100

/* Lanes per packet. 800 * 4 B + 32 B header + 42 B Eth/IP/UDP = 3274 B, under
 * the ~3.5 KiB that XDP sees linearly on veth. */
#define INC_MAX_ELEMS 800
#define INC_MAX_WORKERS 64     /* width of the slot bitmap */
#define INC_MAX_JOBS 1024      /* job ids 1..INC_MAX_JOBS-1; 0 collects unattributable drops */
#define INC_MAX_PORTS 64
#define INC_POOL_SLOTS_DEFAULT 4096

/* inc_hdr.type */
#define INC_T_DATA 1           /* worker -> switch: a contribution */
#define INC_T_RESULT 2         /* switch -> worker: the aggregate for a psn */
#define INC_T_EVICT 3          /* hash mode, PS -> switch: hand me the partial of this psn */
#define INC_T_KV 4             /* key-value mode, mapper -> switch (-> reducer): tuples */
#define INC_T_KV_ACK 5         /* key-value mode, switch -> mapper: every tuple of psn absorbed */

/* inc_hdr.flags */
#define INC_F_RETRANS 0x01     /* sender had sent this psn before */
#define INC_F_OVERFLOW 0x02    /* result: a lane overflowed int32 while summing */
#define INC_F_COLLISION 0x04   /* hash mode, to the PS: the slot was held by another (job, psn) */
#define INC_F_AGGREGATE 0x08   /* hash mode, to the PS: a switch aggregate of the ranks in bitmap */
#define INC_F_KV_PARTIAL 0x10  /* key-value, to the reducer: some tuples were absorbed (cut out) */

/* inc_hdr.op */
#define INC_OP_SUM 0
#define INC_OP_MAX 1           /* used for the shared-exponent round of fp32 */

/* inc_job.mode */
#define INC_MODE_MODULO 1      /* NetReduce: idx = offset + psn % slots, switch only */
#define INC_MODE_HASH 2        /* ATP: idx from the host, PS fallback, ACK release */
/* Index of the program for a hash job's PS packets (results, EVICTs) in the
 * dataplane's program array; modes index their own data programs. */
#define INC_PROG_HASH_FROM_PS 3
#define INC_MODE_KV 4          /* key-value aggregation (word count): see "Key-value mode" below */
#define INC_MODE_PROGS 8       /* size of the program array */

/* Hash mode: the slot a host writes into inc_hdr.slot for (job, psn). Only
 * hosts and the PS compute it (the switch checks the range); Python's copy in
 * hostagent/proto.py is checked against this one by tests/test_layout.py. */
#define INC_HASH_MUL_PSN 0x9E3779B1u
#define INC_HASH_MUL_JOB 0x85EBCA77u
static inline __u32 inc_hash_slot(__u32 job, __u32 psn, __u32 offset, __u32 size)
{
	__u32 h = psn * INC_HASH_MUL_PSN + job * INC_HASH_MUL_JOB;
	h ^= h >> 15;
	return offset + h % size;
}

/* Hash mode: a slot claimed longer ago than this by a (job, psn) that never
 * finished may be taken over; its contributors resend to the PS. */
#define INC_SLOT_STALE_NS 200000000ULL

/* inc_slot.state */
#define INC_SLOT_EMPTY 0
#define INC_SLOT_PARTIAL 1
#define INC_SLOT_COMPLETE 2

struct inc_hdr {
	__u8 version;
	__u8 type;
	__u8 flags;
	__u8 op;
	__u16 job;
	__u16 gen;     /* registration generation: packets of an older run are dropped */
	__u32 psn;
	__u32 slot;    /* host-computed aggregator index (hash mode); 0 in modulo mode */
	__u16 rank;    /* data: sender's rank; result: the rank it is delivered to */
	__u16 numel;   /* int32 lanes that follow */
	__u32 csum;    /* integrity: the 32-bit words of this header and of lanes[0..numel)
			* sum to 0 mod 2^32 (see inc_csum_* in inc_switch.bpf.c) */
	__u64 bitmap;  /* ranks whose data the lanes hold (set by the switch towards the PS) */
} __attribute__((packed));

/* Job table, indexed by job id. Written by incd only. */
struct inc_job {
	__u32 offset;  /* first aggregator slot of the job's region (key-value: first column) */
	__u32 slots;   /* region size; modulo mode uses 2 * window (key-value: columns) */
	__u16 gen;
	__u8 mode;     /* 0 = no such job */
	__u8 world;
	__u8 epoch;    /* key-value: which copy of the aggregator array is active (0/1) */
	__u8 pad;
	__u16 parts;   /* key-value: subspaces the columns are cut into; flow f uses part f % parts */
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
	__u16 pad;
	__u64 claimed_ns; /* hash mode: when this (job, psn) took the slot */
	__s32 lanes[INC_MAX_ELEMS];
};

/* Drop reasons: index into inc_stats.drops. */
enum inc_drop {
	INC_DROP_BAD_HDR = 0,  /* truncated, wrong version/type, IP options, fragment */
	INC_DROP_BAD_LEN = 1,  /* numel 0, above INC_MAX_ELEMS, or beyond the packet */
	INC_DROP_NO_JOB = 2,   /* unknown job id */
	INC_DROP_BAD_GEN = 3,  /* packet of another registration generation */
	INC_DROP_BAD_RANK = 4, /* rank >= world */
	INC_DROP_DUP = 5,      /* contribution already counted, slot still partial */
	INC_DROP_STALE = 6,    /* psn older than the slot's round */
	INC_DROP_AHEAD = 7,    /* psn newer than the slot's round while it is partial */
	INC_DROP_BAD_SLOT = 8, /* hash mode: slot index outside the job's region */
	INC_DROP_BAD_SOURCE = 9, /* data not from the rank's registered host and port, result
				  * not from the job's PS, or no PS known */
	INC_DROP_BAD_CSUM = 10,  /* header or lanes changed on the way (csum mismatch) */
	INC_DROP_KV_OLD = 11,    /* key-value: psn older than the flow's seen window */
	INC_DROP__COUNT = 12,
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
	__u64 drops[INC_DROP__COUNT];
};

/* --- Key-value mode (word count) ---------------------------------------------
 *
 * A KV packet is an inc_hdr (type INC_T_KV, rank = the mapper's flow id, psn =
 * its sequence number in that flow, numel = 32-bit words that follow) and
 * numel / INC_KV_TUPLE_WORDS tuples. Tuple i goes to row i of the aggregator
 * array, at column offset + part * (slots / parts) + inc_kv_col(key) % (slots /
 * parts), part = rank % parts, in the active epoch's copy: an empty aggregator
 * is claimed, the same key adds, another key leaves the tuple in the packet.
 * All absorbed: the switch answers with an INC_T_KV_ACK (header only, slot =
 * tuples absorbed) and drops the packet. Otherwise the packet goes on to the
 * job's reducer (job_ps) with its leftover tuples only, in their order
 * (compacted: numel = 3 x leftovers, the packet shortened), slot = tuples
 * absorbed, INC_F_KV_PARTIAL if that is not 0; the reducer acknowledges it.
 * A resend of a psn already absorbed is never added again: re-ACKed, or its
 * same leftovers go to the reducer again (the flow's seen state keeps which
 * tuples were absorbed), flagged INC_F_RETRANS if the mapper flagged it.
 * Key 0 means "no tuple": mappers never send it (their hash maps 0 to 1). */
#define INC_KV_TUPLE_WORDS 3   /* __u64 key (little-endian) + __s32 value */
#define INC_KV_MAX_TUPLES 266  /* 798 words <= INC_MAX_ELEMS: 3278 B on the wire */
#define INC_KV_ROWS INC_KV_MAX_TUPLES
#define INC_KV_MASK_WORDS 5    /* ceil(INC_KV_MAX_TUPLES / 64) */
#define INC_KV_WINDOW 128      /* seen psns kept per flow: a mapper's window may not exceed it */
#define INC_KV_MAX_FLOWS 256   /* (job, flow) pairs with seen state, all KV jobs together (6 KiB each) */
#define INC_KV_COLS_DEFAULT 512 /* columns of the aggregator array (build with -DINC_KV_COLS=N) */

/* The wire tuple. Packed to 12 bytes; the switch reads it as three words. */
struct inc_kv_tuple {
	__u32 key_lo;
	__u32 key_hi;
	__s32 value;
};

/* Column of a key within its part (before % cols_per_part). */
static inline __u32 inc_kv_col(__u64 key)
{
	return (__u32)key ^ (__u32)(key >> 32);
}

/* One aggregator: kv_pool[epoch * INC_KV_COLS * INC_KV_ROWS + col * INC_KV_ROWS + row]
 * (column-major, so a job's columns are one contiguous range per epoch).
 * Claimed with a 64-bit compare-and-swap on key, added with a 64-bit atomic
 * add: no lock (scripts/kv_cost.py). */
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

#endif /* INC_PROTO_H */
