/* What every INC packet goes through before its mode's code: parsing and
 * bounds checks (parse_inc), drops charged to a job (drop), and the re-entry
 * of the tail-called mode programs (enter_mode). The ingress checks that
 * admit a packet to its mode (csum, job, generation, rank, source) are
 * xdp_inc_ingress in inc_switch.bpf.c; the mode programs trust them. Included
 * by inc_switch.bpf.c after inc_maps.h. */
#ifndef INC_ENTRY_H
#define INC_ENTRY_H

#include "parsing.h"
#include "csum_helpers.h"

/* Where a jumbo frame's lanes start: Ethernet, IPv4 without options, UDP, INC. */
#define JUMBO_LANES_AT (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + \
			sizeof(struct inc_hdr))

enum verdict_kind {
	V_CONSUMED,
	V_MCAST,
	V_RETX,
	V_DROP,
	V_PS_PASS,      /* hash: the worker's own packet to the PS */
	V_PS_AGG,       /* hash: a complete aggregate to the PS */
	V_PS_PARTIAL,   /* hash: a partial aggregate evicted by a resend, to the PS */
	V_DONE,         /* broadcast: the header-only completion, to everyone */
	V_DONE_BACK,    /* broadcast: the completion, back to the sender only */
	V_UP,           /* a leaf: its rack's partial, to the spine */
	V_UP_AGAIN,     /* a leaf: the partial again, for a rank that resent */
};

static __always_inline struct inc_stats *stats_of(__u32 job)
{
	return stats.lookup(&job);
}

static __always_inline int drop(__u32 job, int reason)
{
	struct inc_stats *st = stats_of(job);
	if (st && reason >= 0 && reason < INC_DROP__COUNT)
		st->drops[reason]++;
	return XDP_DROP;
}

/* An INC packet whose headers and lanes the verifier has seen checked. */
struct inc_pkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	struct inc_hdr *h;
	__s32 *payload;
	void *end;
};

#define PARSE_OK 0
#define PARSE_PASS (-1)
#define PARSE_JUMBO (-2) /* a well-formed jumbo frame: its lanes are not in the linear part */
#define PARSE_DROP(reason) (1 + (reason)) /* reason 0 must not read as OK */

/* PARSE_OK for a well-formed INC packet, PARSE_JUMBO for a well-formed jumbo
 * frame (header checked, lanes not: pk->payload and pk->end are unset),
 * PARSE_PASS for anything that is not INC traffic, else PARSE_DROP(reason). */
static __always_inline int parse_inc(struct xdp_md *ctx, struct inc_pkt *pk)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth = parse_eth(&c);
	if (!eth || eth->h_proto != htons(ETH_P_IP))
		return PARSE_PASS;
	struct iphdr *ip = parse_ipv4(&c);
	if (!ip || ip->protocol != IPPROTO_UDP)
		return PARSE_PASS;
	if (ip->ihl != 5)
		return PARSE_PASS; /* could be INC behind IP options: the kernel may have it */
	struct udphdr *udp = parse_udp(&c);
	if (!udp)
		return PARSE_PASS;
	__u16 dport = ntohs(udp->dest);
	if (dport < INC_PORT_MIN || dport > INC_PORT_MAX)
		return PARSE_PASS;
	/* From here on the packet is ours: it is aggregated, answered or dropped. */
	if (ip->frag_off & htons(0x3fff))
		return PARSE_DROP(INC_DROP_BAD_HDR);
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return PARSE_DROP(INC_DROP_BAD_HDR);
	if (h->version != INC_VERSION || h->op > INC_OP_MAX ||
	    h->type < INC_T_DATA || h->type > INC_T_JRESULT || h->type == INC_T_KV_ACK)
		return PARSE_DROP(INC_DROP_BAD_HDR);
	pk->h = h; /* set early: length errors are charged to the job */
	__u32 n = h->numel;
	if (h->type >= INC_T_JUMBO) {
		/* The whole frame (all its buffers) must hold the lanes. */
		if (n == 0 || n > INC_JUMBO_ELEMS || h->op != INC_OP_SUM || h->flags & ~(INC_F_RETRANS | INC_F_OVERFLOW) ||
		    bpf_xdp_get_buff_len(ctx) < JUMBO_LANES_AT + n * 4)
			return PARSE_DROP(INC_DROP_BAD_LEN);
		pk->eth = eth;
		pk->ip = ip;
		pk->udp = udp;
		return PARSE_JUMBO;
	}
	__s32 *payload = (__s32 *)(h + 1);
	/* Only a broadcast's ACK carries no lanes. */
	int bare = h->type == INC_T_DATA &&
		   (h->flags & (INC_F_BCAST | INC_F_NO_LANES)) == (INC_F_BCAST | INC_F_NO_LANES);
	if ((n == 0 && !bare) || (n != 0 && bare) || n > INC_MAX_ELEMS)
		return PARSE_DROP(INC_DROP_BAD_LEN);
	void *pend = (void *)payload + n * 4;
	barrier_var(pend);
	if (pend > c.end)
		return PARSE_DROP(INC_DROP_BAD_LEN);
	pk->eth = eth;
	pk->ip = ip;
	pk->udp = udp;
	pk->h = h;
	pk->payload = payload;
	pk->end = c.end;
	return PARSE_OK;
}

/* Re-derives what the dispatcher checked: tail calls keep no stack. want is
 * PARSE_OK, or PARSE_JUMBO for the jumbo program. */
static __always_inline int enter_mode_as(struct xdp_md *ctx, struct inc_pkt *pk, __u32 *job_id,
					 struct inc_job **job, struct inc_stats **st, int want)
{
	if (parse_inc(ctx, pk) != want)
		return -1;
	*job_id = pk->h->job;
	*job = jobs.lookup(job_id);
	if (!*job || pk->h->rank >= INC_MAX_WORKERS)
		return -1;
	*st = stats_of(*job_id);
	return 0;
}

static __always_inline int enter_mode(struct xdp_md *ctx, struct inc_pkt *pk, __u32 *job_id,
				      struct inc_job **job, struct inc_stats **st)
{
	return enter_mode_as(ctx, pk, job_id, job, st, PARSE_OK);
}

#endif /* INC_ENTRY_H */
