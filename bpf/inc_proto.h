/* Wire format of INC: what hosts and the switch exchange, the one source of truth.
 *
 * Kernel (bcc) and user space both read this file. Python derives the #define
 * and enum constants by parsing it (bpf/wire.py) and tests compare the Python
 * codec's struct layout and every constant with what a C compiler makes of it
 * (tests/unit/test_layout.py). Keep it free of kernel-only includes. The
 * switch's own state (map value structs) is in inc_state.h.
 *
 * Byte order: the Ethernet/IP/UDP headers are network order as usual; the INC
 * header and payload are LITTLE-endian. Every host and the XDP switch here are
 * x86_64, so this saves a byte swap per lane in the aggregation loop.
 */
#ifndef INC_PROTO_H
#define INC_PROTO_H

#ifndef __KERNEL__
#include <linux/types.h>
#endif

#define INC_VERSION 2 /* 2: the position-weighted csum */

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
#define INC_JUMBO_SUBS 20      /* slots (psns) one jumbo frame covers */
#define INC_JUMBO_ELEMS (INC_JUMBO_SUBS * INC_MAX_ELEMS) /* 64 KB of lanes: a frame of 64074 B */
#define INC_MAX_WORKERS 64     /* width of the slot bitmap */
#define INC_MAX_JOBS 1024      /* job ids 1..INC_MAX_JOBS-1; 0 collects unattributable drops */

/* inc_hdr.type */
#define INC_T_DATA 1           /* worker -> switch: a contribution */
#define INC_T_RESULT 2         /* switch -> worker: the aggregate for a psn */
#define INC_T_EVICT 3          /* hash mode, PS -> switch: hand me the partial of this psn */
#define INC_T_KV 4             /* key-value mode, mapper -> switch (-> reducer): tuples */
#define INC_T_KV_ACK 5         /* key-value mode, switch -> mapper: every tuple of psn absorbed */
#define INC_T_JUMBO 6          /* modulo data in one jumbo frame: psns psn .. psn + INC_JUMBO_SUBS - 1,
				* INC_MAX_ELEMS lanes each (docs/design.md, "Jumbo frames") */
#define INC_T_JRESULT 7        /* a jumbo result on its chain: switch -> rank r -> switch -> rank r + 1 */

/* inc_hdr.flags */
#define INC_F_RETRANS 0x01     /* sender had sent this psn before; on a jumbo result: the answer to a
				* resend, for its sender only (the end of its chain) */
#define INC_F_OVERFLOW 0x02    /* result: a lane overflowed int32 while summing */
#define INC_F_COLLISION 0x04   /* hash mode, to the PS: the slot was held by another (job, psn) */
#define INC_F_AGGREGATE 0x08   /* hash mode, to the PS: a switch aggregate of the ranks in bitmap */
#define INC_F_KV_PARTIAL 0x10  /* key-value, to the reducer: some tuples were absorbed (cut out) */
#define INC_F_NO_LANES 0x20    /* modulo result: the psn is complete, its lanes went to the ranks in bitmap */
#define INC_F_SELECT 0x40      /* modulo data (kept in its result): only the ranks in bitmap get the lanes */
#define INC_F_BCAST 0x80       /* modulo broadcast (mode_bcast.h): data from the root, sent on to the others at
				* once; from the others header-only ACKs (NO_LANES); the completion (NO_LANES) */

/* inc_hdr.op */
#define INC_OP_SUM 0
#define INC_OP_MAX 1           /* used for the shared-exponent round of fp32 */

/* Hash mode: the slot a host writes into inc_hdr.slot for (job, psn). Only
 * hosts and the PS compute it (the switch checks the range); Python's copy in
 * bpf/wire.py is checked against this one by tests/unit/test_layout.py. */
#define INC_HASH_MUL_PSN 0x9E3779B1u
#define INC_HASH_MUL_JOB 0x85EBCA77u
#define INC_HASH_RUN 64
/* The csum (csum_helpers.h): word j of a packet weighs 2j + 1; the csum field
 * is word 5 (weight 11), so it is solved for with 11's inverse mod 2^32. */
#define INC_CSUM_WORD 5
#define INC_CSUM_INV11 0xBA2E8BA3u
#define INC_LANE_W0 17 /* lane k is word 8 + k: weight 2k + 17 */
static inline __u32 inc_hash_slot(__u32 job, __u32 psn, __u32 offset, __u32 size)
{
	__u32 run = psn / INC_HASH_RUN;
	__u32 h = run * INC_HASH_MUL_PSN + job * INC_HASH_MUL_JOB;
	h ^= h >> 15;
	return offset + (h % size + psn % INC_HASH_RUN) % size;
}

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
	__u32 csum;    /* integrity: the 32-bit words w_j of this header and of lanes[0..numel),
			* weighted by 2j + 1, sum to 0 mod 2^32 (see csum_helpers.h) */
	__u64 bitmap;  /* towards the PS: ranks whose data the lanes hold (set by the switch);
			* modulo data and results with INC_F_SELECT: ranks that get the lanes */
} __attribute__((packed));

/* Drop reasons: index into inc_stats.drops (inc_state.h), reported by incd. */
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
#define INC_KV_MAX_TUPLES 266  /* 798 words <= INC_MAX_ELEMS: 3266 B on the wire */
#define INC_KV_WINDOW 128      /* seen psns kept per flow: a mapper's window may not exceed it */

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

#endif /* INC_PROTO_H */
