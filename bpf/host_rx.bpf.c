/* The receiving half of a worker's XDP data path: results land without the
 * socket stack.
 *
 * host_rx is attached to the host's veth. A result for this agent's port and
 * job, psn in the current reduction and csum intact, has its lanes copied into
 * rx_vec (an mmapable array the agent reads in place) and its state into
 * rx_state, then is dropped. Every other frame goes on to the kernel. The
 * result that makes the count reach rx_ctl.wake_at goes on too: the agent
 * sleeps in poll() on its UDP socket, and that datagram is its doorbell.
 *
 * Jumbo results (INC_T_JRESULT) land in rx_jumbo and go back to the switch
 * for the next rank (host_rx_jumbo); their doorbell is the ring buffer bell.
 *
 * Contributions still leave by the socket (UDP GSO, or 64 KB datagrams for
 * jumbo frames); why not by a live-frames sender is in docs/performance.md.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "inc_proto.h"
#include "parsing.h"
#include "csum_helpers.h"
#include "rewrite_helpers.h"

#ifndef HOST_MAX_PKTS
#define HOST_MAX_PKTS 8192
#endif

/* A packet's lanes, padded to 1024 so that a length masked to 12 bits is a
 * size the verifier can see stays inside the row. */
#define HOST_ROW_LANES 1024
struct host_row {
	__s32 lanes[HOST_ROW_LANES];
};

/* Jumbo results (INC_T_JRESULT): one row per frame, unpadded, so that the
 * rows are one contiguous vector. 1 row when the agent does not use them. */
#ifndef HOST_JUMBO_PKTS
#define HOST_JUMBO_PKTS 1
#endif
struct host_jrow {
	__s32 lanes[INC_JUMBO_ELEMS];
};

struct host_rx_ctl {
	__u32 psn0;
	__u32 npk;
	__u16 dport;       /* this agent's UDP port, network order */
	__u16 job;
	__u16 elems;
	__u16 last_numel;
	__u64 wake_at;     /* pass the result that makes landed reach this */
	__u64 landed;      /* results written into rx_vec in this reduction */
	__u64 corrupt;     /* csum mismatch: dropped as if lost */
	__u64 stray;       /* INC results for this port outside the reduction */
	__u32 jumbo;       /* this reduction's results are jumbo frames */
	__u32 chain_end;   /* the last rank: a jumbo result ends here, else it goes back to the switch */
};

/* rx_state[i]: 0 = nothing yet; else 1 | overflow << 1 | bare << 2 | gen << 16
 * (bare: a result without lanes came, which a broadcast's lanes that land
 * later keep). */
#define HOST_RX_GOT 1
#define HOST_RX_OVERFLOW 2
#define HOST_RX_BARE 4

/* All mmapable (an mmapped array's entries are 8-byte aligned, hence the
 * __u64 values): the agent writes the control words and reads the counters as
 * plain memory, without a system call per change. */
BPF_F_TABLE("array", int, struct host_rx_ctl, rx_ctl, 1, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct host_row, rx_vec, HOST_MAX_PKTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, __u64, rx_state, HOST_MAX_PKTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct host_jrow, rx_jumbo, HOST_JUMBO_PKTS, BPF_F_MMAPABLE);
/* The jumbo path's doorbell: a jumbo result must go on to the next rank, so
 * it cannot also wake the agent's socket; a record here wakes its poll(). */
BPF_RINGBUF_OUTPUT(bell, 1);

#define FRAME_HDRS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

/* A jumbo result (bpf/mode_jumbo.h): its lanes land in rx_jumbo, then the
 * frame goes back to the switch, which passes it to the next rank; unless
 * this rank ends the chain or the frame answers this rank's resend. A frame
 * outside the reduction still goes on: the ranks after this one may need it. */
static __always_inline int host_rx_jumbo(struct xdp_md *ctx, struct host_rx_ctl *c, struct ethhdr *eth,
					 struct iphdr *ip, struct udphdr *udp, struct inc_hdr *h)
{
	int last = c->chain_end || (h->flags & INC_F_RETRANS);
	__u32 d = h->psn - c->psn0;
	__u32 i = d / INC_JUMBO_SUBS;
	__u32 numel = h->numel;
	if (!c->jumbo || d % INC_JUMBO_SUBS || i >= c->npk || i >= HOST_JUMBO_PKTS ||
	    numel != (i + 1 == c->npk ? c->last_numel : c->elems) || numel == 0 || numel > INC_JUMBO_ELEMS) {
		__sync_fetch_and_add(&c->stray, 1);
		goto on;
	}
	int key = i;
	struct host_jrow *row = rx_jumbo.lookup(&key);
	__u64 *st = rx_state.lookup(&key);
	if (!row || !st)
		return XDP_DROP;
	__u32 top = numel - 1; /* numel is 1..INC_JUMBO_ELEMS here */
	BOUND_LEN(top, INC_JUMBO_ELEMS - 1);
	if (bpf_xdp_load_bytes(ctx, FRAME_HDRS + sizeof(*h), row->lanes, (top + 1) * 4))
		return XDP_DROP;
	__u32 wa = 0, wb = 0;
	FOR_LANES(numel, INC_JUMBO_ELEMS, LANE_ACC(wa, wb, row->lanes[k]));
	if (hdr_words(h) + lanes_weighted(wa, wb, numel) != 0) {
		/* changed on the way: lost here, and for the ranks after this one */
		__sync_fetch_and_add(&c->corrupt, 1);
		return XDP_DROP;
	}
	__u64 v = HOST_RX_GOT | ((__u32)h->gen << 16);
	if (h->flags & INC_F_OVERFLOW)
		v |= HOST_RX_OVERFLOW;
	*st = v;
	__u64 n = __sync_fetch_and_add(&c->landed, 1) + 1;
	if (n == c->wake_at) {
		__u32 rec = i;
		bell.ringbuf_output(&rec, sizeof(rec), BPF_RB_FORCE_WAKEUP);
	}
on:
	if (last)
		return XDP_DROP;
	swap_addresses(eth, ip, udp); /* from this rank's port: the switch checks it */
	return XDP_TX;
}

int host_rx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct cursor cur = {.pos = data, .end = end};
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp = parse_ipv4_udp(&cur, &eth, &ip);
	if (!udp)
		return XDP_PASS;
	int zero = 0;
	struct host_rx_ctl *c = rx_ctl.lookup(&zero);
	if (!c || udp->dest != c->dport)
		return XDP_PASS;
	struct inc_hdr *h = cur.pos;
	if ((void *)(h + 1) > end)
		return XDP_PASS;
	if (h->version != INC_VERSION || h->job != c->job)
		return XDP_PASS;
	if (h->type == INC_T_JRESULT)
		return host_rx_jumbo(ctx, c, eth, ip, udp, h);
	if (h->type != INC_T_RESULT)
		return XDP_PASS;
	__u32 i = h->psn - c->psn0;
	__u32 numel = h->numel;
	if (i >= c->npk || i >= HOST_MAX_PKTS) {
		/* A broadcast's data can come before this rank opened the
		 * broadcast (the root does not wait for it): up to the socket,
		 * where the agent keeps it (hostagent/bcast.py). */
		if ((h->flags & (INC_F_BCAST | INC_F_NO_LANES)) == INC_F_BCAST)
			return XDP_PASS;
		__sync_fetch_and_add(&c->stray, 1);
		return XDP_DROP;
	}
	/* A result without lanes (INC_F_NO_LANES) says the psn is complete and its
	 * lanes went to other ranks: counted, nothing to copy. */
	int bare = (h->flags & INC_F_NO_LANES) && numel == 0;
	if (!bare && (numel == 0 || numel > INC_MAX_ELEMS ||
		      numel != (i + 1 == c->npk ? c->last_numel : c->elems)))
		return XDP_PASS;

	/* The csum covers header and lanes: a frame changed on the way is lost. */
	if (!inc_csum_ok(h, (__s32 *)(h + 1), end, numel)) {
		__sync_fetch_and_add(&c->corrupt, 1);
		return XDP_DROP;
	}

	int key = i;
	struct host_row *row = rx_vec.lookup(&key);
	__u64 *st = rx_state.lookup(&key);
	if (!row || !st)
		return XDP_DROP;
	__u32 len = (((numel - 1) & (HOST_ROW_LANES - 1)) + 1) * 4; /* = numel * 4 */
	if (!bare && bpf_xdp_load_bytes(ctx, FRAME_HDRS + sizeof(*h), row->lanes, len))
		return XDP_DROP;
	__u32 v = HOST_RX_GOT | ((__u32)h->gen << 16);
	if (h->flags & INC_F_OVERFLOW)
		v |= HOST_RX_OVERFLOW;
	*st = v | (bare ? HOST_RX_BARE : (*st & HOST_RX_BARE));
	__u64 n = __sync_fetch_and_add(&c->landed, 1) + 1;
	return n == c->wake_at ? XDP_PASS : XDP_DROP;
}
