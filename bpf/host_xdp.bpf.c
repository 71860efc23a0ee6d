/* The host side of the XDP data path: a worker's contributions leave and its
 * results arrive without the socket stack.
 *
 * host_tx runs under BPF_PROG_TEST_RUN in live-frames mode, once per packet
 * to send: it writes every header field (live-frame pages keep what the last
 * run wrote), copies the packet's lanes from tx_vec (an mmapable array the
 * agent filled with the quantized vector) and returns XDP_TX, so the frame
 * leaves by the host's veth towards the switch.
 *
 * host_rx is attached to the host's veth. A result for this agent's port and
 * job, psn in the current reduction and csum intact, has its lanes copied into
 * rx_vec and its state into rx_state, then is dropped. Every other frame is
 * passed on to the kernel. The result that makes the count reach
 * rx_ctl.wake_at is passed on too: the agent sleeps in poll() on its UDP
 * socket, and that datagram is its doorbell.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "inc_proto.h"
#include "parsing.h"

#ifndef HOST_MAX_PKTS
#define HOST_MAX_PKTS 8192
#endif
#define HOST_MAX_LIST HOST_MAX_PKTS

/* A packet's lanes, padded to 1024 so that a length masked to 12 bits is a
 * size the verifier can see stays inside the row. */
#define HOST_ROW_LANES 1024
struct host_row {
	__s32 lanes[HOST_ROW_LANES];
};

/* Written by the agent before each BPF_PROG_TEST_RUN of host_tx. */
struct host_tx_ctl {
	__u64 runs;        /* runs so far in this call (the program counts) */
	__u32 first;       /* list_len == 0: run i sends packet first + i */
	__u32 list_len;    /* > 0: run i sends packet tx_list[i] */
	__u32 psn0;        /* psn of packet 0 of the reduction */
	__u32 npk;
	__u32 hash_off;    /* hash mode: the job's region of the pool */
	__u32 hash_size;   /* 0: modulo mode (slot 0) */
	__u32 saddr;       /* network order */
	__u32 daddr;
	__u16 sport;       /* network order */
	__u16 dport;
	__u16 job;
	__u16 gen;
	__u16 rank;
	__u16 elems;       /* lanes of a full packet */
	__u16 last_numel;  /* lanes of packet npk - 1 */
	__u8 op;
	__u8 flags;        /* INC_F_RETRANS on resends */
	__u8 src_mac[ETH_ALEN];
	__u8 dst_mac[ETH_ALEN];
	__u32 pad;
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
};

/* rx_state[i]: 0 = nothing yet; else 1 | overflow << 1 | gen << 16. */
#define HOST_RX_GOT 1
#define HOST_RX_OVERFLOW 2

/* All mmapable (an mmapped array's entries are 8-byte aligned, hence the
 * __u64 values): the agent writes the control words and reads the counters as
 * plain memory, without a system call per change. */
BPF_F_TABLE("array", int, struct host_tx_ctl, tx_ctl, 1, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, __u64, tx_list, HOST_MAX_LIST, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct host_row, tx_vec, HOST_MAX_PKTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, __u64, tx_lsum, HOST_MAX_PKTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct host_rx_ctl, rx_ctl, 1, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct host_row, rx_vec, HOST_MAX_PKTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, __u64, rx_state, HOST_MAX_PKTS, BPF_F_MMAPABLE);

#define FRAME_HDRS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

static __always_inline __u32 hdr_word_sum(struct inc_hdr *h)
{
	__u32 *w = (__u32 *)h;
	__u32 s = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*h) / 4); i++)
		s += w[i];
	return s;
}

int host_tx(struct xdp_md *ctx)
{
	int zero = 0;
	struct host_tx_ctl *c = tx_ctl.lookup(&zero);
	if (!c)
		return XDP_ABORTED;
	__u32 run = (__u32)__sync_fetch_and_add(&c->runs, 1);
	__u32 i = c->first + run;
	if (c->list_len) {
		if (run >= c->list_len)
			return XDP_DROP;
		__u64 *li = tx_list.lookup(&run);
		if (!li)
			return XDP_DROP;
		i = (__u32)*li;
	}
	if (i >= c->npk || i >= HOST_MAX_PKTS)
		return XDP_DROP;
	int key = i;
	struct host_row *row = tx_vec.lookup(&key);
	__u64 *lsum = tx_lsum.lookup(&key);
	if (!row || !lsum)
		return XDP_DROP;
	__u32 numel = i + 1 == c->npk ? c->last_numel : c->elems;
	if (numel == 0 || numel > c->elems || c->elems > INC_MAX_ELEMS)
		return XDP_DROP;
	int shrink = (int)(c->elems - numel) * 4;
	if (shrink && bpf_xdp_adjust_tail(ctx, -shrink))
		return XDP_DROP;

	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct inc_hdr *h = (void *)(udp + 1);
	if ((void *)(h + 1) > end)
		return XDP_DROP;
	__u32 payload = sizeof(*h) + numel * 4;

	__builtin_memcpy(eth->h_dest, c->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, c->src_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(sizeof(*ip) + sizeof(*udp) + payload);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	ip->saddr = c->saddr;
	ip->daddr = c->daddr;
	ip->check = ipv4_csum(ip);
	udp->source = c->sport;
	udp->dest = c->dport;
	udp->len = bpf_htons(sizeof(*udp) + payload);
	udp->check = 0;

	__u32 psn = c->psn0 + i;
	h->version = INC_VERSION;
	h->type = INC_T_DATA;
	h->flags = c->flags;
	h->op = c->op;
	h->job = c->job;
	h->gen = c->gen;
	h->psn = psn;
	h->slot = c->hash_size ? inc_hash_slot(c->job, psn, c->hash_off, c->hash_size) : 0;
	h->rank = c->rank;
	h->numel = numel;
	h->csum = 0;
	h->bitmap = 0;
	h->csum = -(hdr_word_sum(h) + (__u32)*lsum);

	__u32 len = (((numel - 1) & (HOST_ROW_LANES - 1)) + 1) * 4; /* = numel * 4 */
	if (bpf_xdp_store_bytes(ctx, FRAME_HDRS + sizeof(*h), row->lanes, len))
		return XDP_DROP;
	return XDP_TX;
}

int host_rx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct cursor cur = {.pos = data, .end = end};
	struct ethhdr *eth = parse_eth(&cur);
	if (!eth || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = parse_ipv4(&cur);
	if (!ip || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = parse_udp(&cur);
	if (!udp)
		return XDP_PASS;
	int zero = 0;
	struct host_rx_ctl *c = rx_ctl.lookup(&zero);
	if (!c || udp->dest != c->dport)
		return XDP_PASS;
	struct inc_hdr *h = cur.pos;
	if ((void *)(h + 1) > end)
		return XDP_PASS;
	if (h->version != INC_VERSION || h->type != INC_T_RESULT || h->job != c->job)
		return XDP_PASS;
	__u32 i = h->psn - c->psn0;
	__u32 numel = h->numel;
	if (i >= c->npk || i >= HOST_MAX_PKTS) {
		__sync_fetch_and_add(&c->stray, 1);
		return XDP_DROP;
	}
	if (numel == 0 || numel > INC_MAX_ELEMS || numel != (i + 1 == c->npk ? c->last_numel : c->elems))
		return XDP_PASS;

	/* The csum covers header and lanes: a frame changed on the way is lost. */
	__u32 *w = (__u32 *)(h + 1);
	if ((void *)(w + numel) > end)
		return XDP_PASS;
	__u32 s = hdr_word_sum(h);
	for (__u32 k = 0; k < INC_MAX_ELEMS; k++) {
		if (k >= numel)
			break;
		__u32 *q = w + k;
		barrier_var(q);
		if ((void *)(q + 1) > end)
			break;
		s += *q;
	}
	if (s != 0) {
		__sync_fetch_and_add(&c->corrupt, 1);
		return XDP_DROP;
	}

	int key = i;
	struct host_row *row = rx_vec.lookup(&key);
	__u64 *st = rx_state.lookup(&key);
	if (!row || !st)
		return XDP_DROP;
	__u32 len = (((numel - 1) & (HOST_ROW_LANES - 1)) + 1) * 4; /* = numel * 4 */
	if (bpf_xdp_load_bytes(ctx, FRAME_HDRS + sizeof(*h), row->lanes, len))
		return XDP_DROP;
	__u32 v = HOST_RX_GOT | ((__u32)h->gen << 16);
	if (h->flags & INC_F_OVERFLOW)
		v |= HOST_RX_OVERFLOW;
	*st = v;
	__u64 n = __sync_fetch_and_add(&c->landed, 1) + 1;
	return n == c->wake_at ? XDP_PASS : XDP_DROP;
}
