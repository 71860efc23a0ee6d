/* Modulo mode (NetReduce): slot = offset + psn % slots, the switch alone.
 * Contributions are added into the slot under its spin lock: cheaper than an
 * atomic add per lane (docs/design.md, "Why a spin lock"; scripts/xdp_cost.py
 * measures both).
 * The last contributor's packet leaves with the sum and is broadcast through
 * tx_ports; xdp_inc_egress, the devmap egress program, keeps the copies for
 * ports where the job has a member and rewrites their Ethernet/IP/UDP headers
 * for that member. Included by inc_switch.bpf.c after inc_maps.h. */
#ifndef INC_MODE_MODULO_H
#define INC_MODE_MODULO_H

#include "inc_entry.h"
#include "lane_loops.h"
#include "rewrite_helpers.h"
#include "mode_tier.h"

/* A data packet of a modulo job, admitted and re-entered (enter_mode).
 * tier (INC_TIER_*) is a constant of each program that calls this: the
 * verifier walks every code path after the lane loops once per loop exit, so
 * one program per tier keeps each within its limit. */
static __always_inline int modulo_data(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				       struct udphdr *udp, struct inc_hdr *h, __s32 *payload,
				       void *end, __u32 job_id, struct inc_job *job,
				       struct inc_stats *st, const int tier)
{
	struct cursor c = { .pos = payload, .end = end };
	__u32 n = h->numel;
	__u32 rank = h->rank;
	__u32 psn = h->psn;
	__u32 idx = job->offset + psn % job->slots;
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_NO_JOB);

	__u64 bit = 1ULL << rank;
	__u8 world = tier == INC_TIER_LEAF ? job->local : job->world; /* contributions that complete the slot here */
	__u16 gen = job->gen;
	__u64 now = bpf_ktime_get_ns();
	int verdict = V_DROP, reason = INC_DROP_STALE, overflow = 0;
	__u32 tot = lanes_sum_of_verified(hdr_words(h)); /* what the lanes add up to when it leaves */

	bpf_spin_lock(&s->lock);
	int owned = s->job == job_id && s->gen == gen && s->state != INC_SLOT_EMPTY;
	int newer = (__s32)(psn - s->psn) > 0;
	if (!owned || (newer && s->state == INC_SLOT_COMPLETE)) {
		/* First contributor of this round: the previous round (psn - slots)
		 * completed, and every worker got its result before anyone could
		 * send this psn, because windows are half the region. */
		verdict = slot_claim(s, job_id, gen, psn, bit, h->op, n, now, payload, c.end, world)
				  ? V_MCAST : V_CONSUMED;
	} else if (s->psn == psn) {
		if (s->numel != n || s->op != h->op) {
			reason = INC_DROP_BAD_LEN;
		} else if (s->bitmap & bit) {
			if (s->state == INC_SLOT_COMPLETE || (tier == INC_TIER_LEAF && s->state == INC_SLOT_UP)) {
				/* Its result was lost: answer from the stored sum. On a
				 * leaf still waiting for the spine, the rack's partial or
				 * the spine's result was lost: the partial goes up again. */
				tot = lanes_copy_out(s, payload, c.end, n);
				overflow = s->overflow;
				verdict = tier == INC_TIER_LEAF && s->state == INC_SLOT_UP ? V_UP_AGAIN : V_RETX;
			} else {
				reason = INC_DROP_DUP;
			}
		} else if (slot_add(s, h->op, bit, payload, c.end, n, world, &tot)) {
			overflow = s->overflow;
			verdict = V_MCAST;
		} else {
			verdict = V_CONSUMED;
		}
	} else {
		reason = newer ? INC_DROP_AHEAD : INC_DROP_STALE;
	}
	if (tier == INC_TIER_SPINE && (h->flags & INC_F_OVERFLOW) && verdict != V_DROP && verdict != V_RETX)
		s->overflow = 1; /* a leaf's partial that overflowed already */
	if (tier == INC_TIER_SPINE && verdict == V_MCAST)
		overflow = s->overflow;
	if (tier == INC_TIER_LEAF && verdict == V_MCAST) {
		s->state = INC_SLOT_UP; /* complete once the spine's result is back (mode_tier.h) */
		verdict = V_UP;
	}
	bpf_spin_unlock(&s->lock);

	if (verdict == V_DROP)
		return drop(job_id, reason);
	if (verdict == V_CONSUMED) {
		if (st)
			st->consumed++;
		return XDP_DROP;
	}
	if (tier == INC_TIER_LEAF && (verdict == V_UP || verdict == V_UP_AGAIN))
		return tier_up(eth, ip, udp, h, job_id, tot, overflow, verdict == V_UP, st);

	h->type = INC_T_RESULT;
	h->flags = (h->flags & INC_F_SELECT) | (overflow ? INC_F_OVERFLOW : 0);
	inc_csum_set(h, tot);
	udp->check = 0; /* payload rewritten; 0 = no checksum is valid for IPv4 UDP */
	if (verdict == V_RETX) {
		/* Unicast back the way it came; swapping addresses keeps the IP checksum. */
		swap_addresses(eth, ip, udp);
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

#endif /* INC_MODE_MODULO_H */
