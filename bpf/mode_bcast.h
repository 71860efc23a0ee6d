/* Broadcast in a modulo job (INC_F_BCAST): the root sends its data once and
 * the switch replicates it; the other ranks send only header-only ACKs.
 *
 * A root data packet claims the psn's slot (without its lanes: nobody asks
 * the switch for them, the root resends) and goes at once to every member but
 * the root (the egress program drops the root's copy). Each other rank ACKs
 * a psn when its data has landed (INC_F_NO_LANES, no lanes). The last ACK
 * completes the slot and leaves as a header-only completion to everyone: the
 * root's window moves on completions only, so when it sends psn p + 2W every
 * rank has ACKed p, and the slot can start a new round (docs/design.md,
 * "Broadcast"). Losses are repaired by the root: a resend of a psn whose slot
 * is still waiting goes to everyone again (ranks that had it ACK again), one
 * whose slot is complete is answered with the completion; an ACK for a
 * complete psn is answered with the completion too.
 * Included by inc_switch.bpf.c after inc_maps.h. */
#ifndef INC_MODE_BCAST_H
#define INC_MODE_BCAST_H

#include "inc_entry.h"
#include "rewrite_helpers.h"

static __always_inline int modulo_bcast(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
					struct udphdr *udp, struct inc_hdr *h, void *end, __u32 job_id,
					struct inc_job *job, struct inc_stats *st)
{
	__u32 n = h->numel, psn = h->psn;
	__u32 idx = job->offset + psn % job->slots;
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_NO_JOB);
	int ack = (h->flags & INC_F_NO_LANES) != 0;
	__u64 bit = 1ULL << h->rank;
	__u8 world = job->world;
	__u16 gen = job->gen;
	__u64 now = bpf_ktime_get_ns();
	int verdict = V_DROP, reason = INC_DROP_STALE;
	__u32 tot = lanes_sum_of_verified(hdr_words(h));

	bpf_spin_lock(&s->lock);
	int owned = s->job == job_id && s->gen == gen && s->state != INC_SLOT_EMPTY;
	int newer = (__s32)(psn - s->psn) > 0;
	if (!ack && (!owned || (newer && s->state == INC_SLOT_COMPLETE))) {
		s->job = job_id;
		s->gen = gen;
		s->psn = psn;
		s->bitmap = bit; /* the root's */
		s->count = 1;
		s->op = INC_OP_SUM;
		s->numel = n;
		s->overflow = 0;
		s->claimed_ns = now;
		s->state = world <= 1 ? INC_SLOT_COMPLETE : INC_SLOT_PARTIAL;
		verdict = world <= 1 ? V_DONE : V_MCAST;
	} else if (owned && s->psn == psn) {
		if (!ack) {
			if (!(s->bitmap & bit) || s->numel != n)
				reason = INC_DROP_DUP; /* data for this psn from another rank than its root */
			else
				verdict = s->state == INC_SLOT_COMPLETE ? V_DONE_BACK : V_MCAST;
		} else if (s->bitmap & bit) {
			if (s->state == INC_SLOT_COMPLETE)
				verdict = V_DONE_BACK;
			else
				reason = INC_DROP_DUP;
		} else {
			s->bitmap |= bit;
			s->count++;
			verdict = V_CONSUMED;
			if (s->count >= world) {
				s->state = INC_SLOT_COMPLETE;
				verdict = V_DONE;
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
	udp->check = 0;
	if (verdict == V_MCAST) {
		h->flags = INC_F_BCAST;
		inc_csum_set(h, tot);
		return tx_ports.redirect_map(0, BPF_F_BROADCAST);
	}
	/* The completion: the header alone. */
	int cut = (int)(end - (void *)(h + 1));
	h->flags = INC_F_BCAST | INC_F_NO_LANES;
	header_only(ip, udp, h);
	if (verdict == V_DONE_BACK) {
		swap_addresses(eth, ip, udp);
		ip->check = ipv4_csum(ip);
		if (st)
			st->retrans_answered++;
	} else if (st) {
		st->consumed += ack;
		st->slots_completed++;
	}
	if (cut > 0 && bpf_xdp_adjust_tail(ctx, -(cut & 0x3fff)))
		return XDP_DROP;
	if (verdict == V_DONE_BACK)
		return bpf_redirect(ctx->ingress_ifindex, 0);
	return tx_ports.redirect_map(0, BPF_F_BROADCAST);
}

#endif /* INC_MODE_BCAST_H */
