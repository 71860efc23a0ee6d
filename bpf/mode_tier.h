/* Two tiers (docs/design.md, "Two tiers"): a leaf sums its rack's ranks of a
 * modulo job (mode_modulo.h with world = job->local), sends the partial up to
 * the spine as one contribution of rank job_up.rank, and keeps the slot
 * INC_SLOT_UP. The spine is an ordinary modulo switch whose ranks are the
 * leaves. Its result comes down (xdp_inc_down): the leaf stores it, the slot
 * becomes complete, and the result is broadcast to the rack. A rank that
 * resends while the slot is UP sends the partial up again (lost on the way up
 * or its result lost on the way down: the spine answers a partial it already
 * holds from its complete slot); while it is complete, the leaf answers it.
 * Included by mode_modulo.h. */
#ifndef INC_MODE_TIER_H
#define INC_MODE_TIER_H

#include "inc_entry.h"
#include "lane_loops.h"
#include "rewrite_helpers.h"

/* A leaf, xdp_inc_ingress: a result for a job it is a leaf of is taken only
 * from the job's spine, behind the uplink, and goes on to xdp_inc_down. */
static __always_inline int tier_enter_down(struct xdp_md *ctx, struct inc_pkt *pk, __u32 job_id,
					   struct inc_job *job)
{
	struct inc_stats *st = stats_of(job_id);
	if (st)
		st->pkts_in++;
	if (pk->h->gen != job->gen)
		return drop(job_id, INC_DROP_BAD_GEN);
	struct inc_member *up = job_up.lookup(&job_id);
	if (!up || up->ifindex == 0 || up->ifindex != ctx->ingress_ifindex || up->addr != pk->ip->saddr ||
	    pk->udp->source != bpf_htons(INC_PORT))
		return drop(job_id, INC_DROP_BAD_SOURCE);
	mode_progs.call(ctx, INC_PROG_DOWN);
	return drop(job_id, INC_DROP_NO_JOB);
}

/* The packet, holding the rack's partial (tot: its lanes' weighted sum), to the spine. */
static __always_inline int tier_up(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp, struct inc_hdr *h,
				   __u32 job_id, __u32 tot, int overflow, int first, struct inc_stats *st)
{
	struct inc_member *up = job_up.lookup(&job_id);
	if (!up || up->ifindex == 0)
		return drop(job_id, INC_DROP_NO_JOB);
	h->type = INC_T_DATA;
	h->rank = up->rank;
	h->flags = (h->flags & INC_F_SELECT) | (overflow ? INC_F_OVERFLOW : 0) | (first ? 0 : INC_F_RETRANS);
	inc_csum_set(h, tot);
	readdress(eth, ip, udp, up);
	if (st) {
		if (first) {
			st->consumed++;
			st->up_sent++;
		} else {
			st->up_resent++;
		}
	}
	return bpf_redirect(up->ifindex, 0);
}

/* A leaf: the spine's result for a psn its rack completed. Stored, then to the rack. */
static __always_inline int tier_down(struct xdp_md *ctx, struct inc_pkt *pk, __u32 job_id, struct inc_job *job,
				     struct inc_stats *st)
{
	struct inc_hdr *h = pk->h;
	__u32 n = h->numel, psn = h->psn;
	__u32 tot = lanes_sum_of_verified(hdr_words(h)); /* before the header changes */
	__u32 idx = job->offset + psn % job->slots;
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_NO_JOB);
	int reason = -1;
	bpf_spin_lock(&s->lock);
	if (s->job != job_id || s->gen != job->gen || s->psn != psn)
		reason = INC_DROP_STALE;
	else if (s->numel != n)
		reason = INC_DROP_BAD_LEN;
	else if (s->state != INC_SLOT_UP)
		reason = INC_DROP_DUP; /* already complete: a second answer to partials sent up again */
	else {
		lanes_claim(s, pk->payload, pk->end, n);
		s->overflow = !!(h->flags & INC_F_OVERFLOW);
		s->state = INC_SLOT_COMPLETE;
	}
	bpf_spin_unlock(&s->lock);
	if (reason >= 0)
		return drop(job_id, reason);
	if (st) {
		st->down_received++;
		st->slots_completed++;
		if (h->flags & INC_F_OVERFLOW)
			st->overflows++;
	}
	h->flags &= INC_F_SELECT | INC_F_OVERFLOW;
	inc_csum_set(h, tot);
	pk->udp->check = 0;
	return tx_ports.redirect_map(0, BPF_F_BROADCAST);
}

#endif /* INC_MODE_TIER_H */
