/* INC switch dataplane: modulo-addressed allreduce (NetReduce) in XDP.
 *
 * xdp_inc_ingress runs on every switch port. Contributions are added into the
 * job's aggregator slot under the slot's spin lock (DESIGN §4: cheaper than
 * per-lane atomics). The last contributor's packet leaves with the sum and is
 * broadcast through tx_ports; xdp_inc_egress, the devmap egress program, keeps
 * the copies for ports where the job has a member and rewrites their
 * Ethernet/IP/UDP headers for that member, dropping the rest.
 *
 * Built by incd with bcc: -I bpf, optional -DINC_POOL_SLOTS=N.
 */
#include <uapi/linux/bpf.h>
#include "parsing.h"
#include "inc_proto.h"

#ifndef INC_POOL_SLOTS
#define INC_POOL_SLOTS INC_POOL_SLOTS_DEFAULT
#endif

BPF_ARRAY(jobs, struct inc_job, INC_MAX_JOBS);
BPF_ARRAY(pool, struct inc_slot, INC_POOL_SLOTS);
BPF_HASH(members, struct inc_member_key, struct inc_member, INC_MAX_JOBS * 4);
BPF_PERCPU_ARRAY(stats, struct inc_stats, INC_MAX_JOBS);
BPF_XDP_REDIRECT_MAP("devmap", struct bpf_devmap_val, tx_ports, INC_MAX_PORTS);

/* Keeps clang from folding the pointer into pkt_end arithmetic, which the
 * verifier rejects. */
#define barrier_var(v) asm volatile("" : "+r"(v))

enum verdict_kind {
	V_CONSUMED,
	V_MCAST,
	V_RETX,
	V_DROP,
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

static __always_inline void lanes_claim(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	for (__u32 i = 0; i < INC_MAX_ELEMS; i++) {
		if (i >= n)
			break;
		__s32 *q = p + i;
		barrier_var(q);
		if ((void *)(q + 1) > end)
			break;
		s->lanes[i] = *q;
	}
}

/* Adds the packet into the slot and leaves the running sum in the packet, so
 * the last contributor's packet already carries the result. */
static __always_inline int lanes_sum(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	__s32 ovf = 0;
	for (__u32 i = 0; i < INC_MAX_ELEMS; i++) {
		if (i >= n)
			break;
		__s32 *q = p + i;
		barrier_var(q);
		if ((void *)(q + 1) > end)
			break;
		__s32 a = s->lanes[i], b = *q;
		__s32 r = (__s32)((__u32)a + (__u32)b);
		ovf |= (a ^ r) & (b ^ r);
		s->lanes[i] = r;
		*q = r;
	}
	return ovf < 0;
}

static __always_inline void lanes_max(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	for (__u32 i = 0; i < INC_MAX_ELEMS; i++) {
		if (i >= n)
			break;
		__s32 *q = p + i;
		barrier_var(q);
		if ((void *)(q + 1) > end)
			break;
		__s32 a = s->lanes[i], b = *q;
		__s32 r = a > b ? a : b;
		s->lanes[i] = r;
		*q = r;
	}
}

static __always_inline void lanes_copy_out(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	for (__u32 i = 0; i < INC_MAX_ELEMS; i++) {
		if (i >= n)
			break;
		__s32 *q = p + i;
		barrier_var(q);
		if ((void *)(q + 1) > end)
			break;
		*q = s->lanes[i];
	}
}

int xdp_inc_ingress(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth = parse_eth(&c);
	if (!eth || eth->h_proto != htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = parse_ipv4(&c);
	if (!ip || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	if (ip->ihl != 5) {
		/* Could still be INC traffic behind options: let the kernel have it. */
		return XDP_PASS;
	}
	struct udphdr *udp = parse_udp(&c);
	if (!udp)
		return XDP_PASS;
	__u16 dport = ntohs(udp->dest);
	if (dport < INC_PORT_MIN || dport > INC_PORT_MAX)
		return XDP_PASS;

	/* From here on the packet is ours: it is aggregated, answered or dropped. */
	if (ip->frag_off & htons(0x3fff))
		return drop(0, INC_DROP_BAD_HDR);
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return drop(0, INC_DROP_BAD_HDR);
	if (h->version != INC_VERSION || h->type != INC_T_DATA || h->op > INC_OP_MAX)
		return drop(0, INC_DROP_BAD_HDR);

	__u32 job_id = h->job;
	if (job_id == 0 || job_id >= INC_MAX_JOBS)
		return drop(0, INC_DROP_NO_JOB);
	struct inc_job *job = jobs.lookup(&job_id);
	if (!job || job->mode != INC_MODE_MODULO || job->slots == 0)
		return drop(0, INC_DROP_NO_JOB);
	struct inc_stats *st = stats_of(job_id);
	if (st)
		st->pkts_in++;
	if (h->gen != job->gen)
		return drop(job_id, INC_DROP_BAD_GEN);
	__u32 rank = h->rank;
	if (rank >= job->world || rank >= INC_MAX_WORKERS)
		return drop(job_id, INC_DROP_BAD_RANK);

	__u32 n = h->numel;
	__s32 *payload = (__s32 *)(h + 1);
	if (n == 0 || n > INC_MAX_ELEMS)
		return drop(job_id, INC_DROP_BAD_LEN);
	void *pend = (void *)payload + n * 4;
	barrier_var(pend);
	if (pend > c.end)
		return drop(job_id, INC_DROP_BAD_LEN);

	__u32 psn = h->psn;
	__u32 idx = job->offset + psn % job->slots;
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_NO_JOB);

	__u64 bit = 1ULL << rank;
	__u8 world = job->world;
	__u16 gen = job->gen;
	int verdict = V_DROP, reason = INC_DROP_STALE, overflow = 0;

	bpf_spin_lock(&s->lock);
	int owned = s->job == job_id && s->gen == gen && s->state != INC_SLOT_EMPTY;
	int newer = (__s32)(psn - s->psn) > 0;
	if (!owned || (newer && s->state == INC_SLOT_COMPLETE)) {
		/* First contributor of this round: the previous round (psn - slots)
		 * completed, and every worker got its result before anyone could
		 * send this psn, because windows are half the region. */
		s->job = job_id;
		s->gen = gen;
		s->psn = psn;
		s->bitmap = bit;
		s->count = 1;
		s->op = h->op;
		s->numel = n;
		s->overflow = 0;
		lanes_claim(s, payload, c.end, n);
		if (world <= 1) {
			s->state = INC_SLOT_COMPLETE;
			verdict = V_MCAST;
		} else {
			s->state = INC_SLOT_PARTIAL;
			verdict = V_CONSUMED;
		}
	} else if (s->psn == psn) {
		if (s->numel != n || s->op != h->op) {
			reason = INC_DROP_BAD_LEN;
		} else if (s->bitmap & bit) {
			if (s->state == INC_SLOT_COMPLETE) {
				/* Its result was lost: answer from the stored sum. */
				lanes_copy_out(s, payload, c.end, n);
				overflow = s->overflow;
				verdict = V_RETX;
			} else {
				reason = INC_DROP_DUP;
			}
		} else {
			if (h->op == INC_OP_MAX)
				lanes_max(s, payload, c.end, n);
			else if (lanes_sum(s, payload, c.end, n))
				s->overflow = 1;
			s->bitmap |= bit;
			s->count++;
			if (s->count >= world) {
				s->state = INC_SLOT_COMPLETE;
				overflow = s->overflow;
				verdict = V_MCAST;
			} else {
				verdict = V_CONSUMED;
			}
		}
	} else {
		reason = newer ? INC_DROP_AHEAD : INC_DROP_STALE;
	}
	bpf_spin_unlock(&s->lock);

	if (verdict == V_DROP)
		return drop(job_id, reason);
	if (verdict == V_CONSUMED) {
		if (st)
			st->consumed++;
		return XDP_DROP;
	}

	h->type = INC_T_RESULT;
	h->flags = overflow ? INC_F_OVERFLOW : 0;
	udp->check = 0; /* payload rewritten; 0 = no checksum is valid for IPv4 UDP */
	if (verdict == V_RETX) {
		/* Unicast back the way it came; swapping addresses keeps the IP checksum. */
		__u8 tmp[ETH_ALEN];
		__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
		__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
		__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
		__be32 a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
		__be16 p = udp->source;
		udp->source = udp->dest;
		udp->dest = p;
		if (st)
			st->retrans_answered++;
		/* Not XDP_TX: on veth, XDP_TX only wakes the peer's NAPI when the peer
		 * runs XDP itself, so with GRO alone the answer would sit in the peer's
		 * ring until some later redirect flushed it - at the end of a job,
		 * never. A redirect back out of the ingress port flushes properly. */
		return bpf_redirect(ctx->ingress_ifindex, 0);
	}
	if (st) {
		st->consumed++;
		st->slots_completed++;
		if (overflow)
			st->overflows++;
	}
	/* No BPF_F_EXCLUDE_INGRESS: the last contributor needs the result too. */
	return tx_ports.redirect_map(0, BPF_F_BROADCAST);
}

int xdp_inc_egress(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth = parse_eth(&c);
	if (!eth)
		return XDP_DROP;
	struct iphdr *ip = parse_ipv4(&c);
	if (!ip)
		return XDP_DROP;
	struct udphdr *udp = parse_udp(&c);
	if (!udp)
		return XDP_DROP;
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return XDP_DROP;

	struct inc_member_key key = { .job = h->job, .ifindex = ctx->egress_ifindex };
	struct inc_member *m = members.lookup(&key);
	if (!m)
		return XDP_DROP; /* the job has nobody behind this port */

	__builtin_memcpy(eth->h_dest, m->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, m->port_mac, ETH_ALEN);
	ip->saddr = m->switch_addr;
	ip->daddr = m->addr;
	ip->check = ipv4_csum(ip);
	udp->source = htons(INC_PORT);
	udp->dest = m->port;
	udp->check = 0;
	h->rank = m->rank;

	struct inc_stats *st = stats_of(h->job);
	if (st)
		st->results_mcast++;
	return XDP_PASS;
}
