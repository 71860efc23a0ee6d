/* Hash mode (ATP): the host computes the slot. A slot is tagged (job, gen,
 * psn); packets that find it held by another tag go to the job's parameter
 * server (PS) untouched; a complete slot sends its sum to the PS and stays
 * held until the PS's result crosses the switch (the ACK), which frees it and
 * is broadcast to the workers. Resends never add into a slot: they evict a
 * partial aggregate of their own psn towards the PS, or pass through, and the
 * PS, which gets a bitmap of contributors with every aggregate, counts each
 * rank once. Included by inc_switch.bpf.c after inc_maps.h. */
#ifndef INC_MODE_HASH_H
#define INC_MODE_HASH_H

#include "inc_entry.h"
#include "lane_loops.h"
#include "rewrite_helpers.h"

/* The aggregator the host named in h->slot, if it lies in the job's region. */
static __always_inline struct inc_slot *hash_slot(struct inc_hdr *h, struct inc_job *job)
{
	__u32 idx = h->slot;
	if (idx < job->offset || idx - job->offset >= job->slots)
		return 0;
	return pool.lookup(&idx);
}

static __always_inline int hash_data(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				     struct udphdr *udp, struct inc_hdr *h, __s32 *payload,
				     void *end, __u32 job_id, struct inc_job *job,
				     struct inc_stats *st)
{
	__u32 n = h->numel, psn = h->psn, rank = h->rank;
	struct inc_slot *s = hash_slot(h, job);
	if (!s)
		return drop(job_id, INC_DROP_BAD_SLOT);

	/* Whether the slot's current owner still exists must be known before the
	 * lock (no helper calls under it); the owner is re-checked inside. */
	__u32 owner = s->job;
	__u16 owner_gen = 0;
	struct inc_job *oj = jobs.lookup(&owner);
	if (oj && oj->mode != 0)
		owner_gen = oj->gen;
	__u64 now = bpf_ktime_get_ns();
	__u64 bit = 1ULL << rank;
	__u8 world = job->world;
	__u16 gen = job->gen;
	int resend = h->flags & INC_F_RETRANS;
	int verdict = V_DROP, reason = INC_DROP_DUP, collision = 0, reclaimed = 0, overflow = 0;
	__u64 agg_bitmap = bit;
	__u64 select = (h->flags & INC_F_SELECT) ? h->bitmap : 0; /* kept for the result (hash_from_ps) */
	__u32 tot = lanes_sum_of_verified(hdr_words(h)); /* what the lanes add up to when it leaves */

	bpf_spin_lock(&s->lock);
	int mine = s->state != INC_SLOT_EMPTY && s->job == job_id && s->gen == gen && s->psn == psn;
	if (mine) {
		if (resend) {
			/* Its sender has no result yet: hand what the slot holds to the
			 * PS. A partial is evicted, so it can never be added to twice. */
			tot = lanes_copy_out(s, payload, end, n);
			agg_bitmap = s->bitmap;
			overflow = s->overflow;
			if (s->state == INC_SLOT_COMPLETE) {
				verdict = V_PS_AGG;
			} else {
				s->state = INC_SLOT_EMPTY;
				verdict = V_PS_PARTIAL;
			}
		} else if (s->bitmap & bit) {
			reason = INC_DROP_DUP;
		} else if (s->numel != n || s->op != h->op) {
			reason = INC_DROP_BAD_LEN;
		} else if (slot_add(s, h->op, bit, payload, end, n, world, &tot)) {
			agg_bitmap = s->bitmap;
			overflow = s->overflow;
			verdict = V_PS_AGG;
		} else {
			verdict = V_CONSUMED;
		}
	} else {
		int dead_owner = s->job == owner && s->gen != owner_gen;
		int stale = now - s->claimed_ns > INC_SLOT_STALE_NS;
		if (!resend && (s->state == INC_SLOT_EMPTY || dead_owner || stale)) {
			reclaimed = s->state != INC_SLOT_EMPTY;
			verdict = slot_claim(s, job_id, gen, psn, bit, h->op, n, now, payload, end, world)
					  ? V_PS_AGG : V_CONSUMED;
			s->select = select;
		} else {
			collision = s->state != INC_SLOT_EMPTY;
			verdict = V_PS_PASS;
		}
	}
	bpf_spin_unlock(&s->lock);

	if (st && reclaimed)
		st->reclaims++;
	if (verdict == V_DROP)
		return drop(job_id, reason);
	if (verdict == V_CONSUMED) {
		if (st)
			st->consumed++;
		return XDP_DROP;
	}
	struct inc_member *ps = job_ps.lookup(&job_id);
	if (!ps || ps->ifindex == 0)
		return drop(job_id, INC_DROP_BAD_SOURCE);
	if (st) {
		if (verdict == V_PS_AGG && !resend) {
			st->consumed++;
			st->slots_completed++;
			st->to_ps++;
		} else {
			st->fallbacks++;
		}
		if (collision)
			st->collisions++;
		if (overflow && verdict == V_PS_AGG && !resend)
			st->overflows++;
	}
	if (verdict == V_PS_PASS) {
		h->flags = (h->flags & INC_F_RETRANS) | (collision ? INC_F_COLLISION : 0);
	} else {
		h->flags = INC_F_AGGREGATE | (h->flags & INC_F_RETRANS) | (overflow ? INC_F_OVERFLOW : 0);
	}
	h->bitmap = agg_bitmap;
	inc_csum_set(h, tot);
	readdress(eth, ip, udp, ps);
	return bpf_redirect(ps->ifindex, 0);
}

/* Packets from a hash job's PS: its result for a psn (free the slot if it
 * still holds that psn - the ACK - then broadcast; the egress program delivers
 * to the workers), or an EVICT: a psn the PS got single packets for, whose
 * other contributions may sit in a slot that can now never complete; the
 * partial goes back to the PS with its bitmap and the slot is freed. */
static __always_inline int hash_from_ps(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
					struct udphdr *udp, struct inc_hdr *h, __s32 *payload,
					void *end, __u32 job_id, struct inc_job *job,
					struct inc_stats *st)
{
	struct inc_member *ps = job_ps.lookup(&job_id);
	if (!ps || ps->ifindex == 0 || ps->ifindex != ctx->ingress_ifindex || ps->addr != ip->saddr)
		return drop(job_id, INC_DROP_BAD_SOURCE);
	struct inc_slot *s = hash_slot(h, job);
	if (!s)
		return drop(job_id, INC_DROP_BAD_SLOT);
	int evict = h->type == INC_T_EVICT, hit = 0;
	__u32 n = h->numel;
	__u64 bitmap = 0, select = 0;
	__u32 tot = 0, result_lanes = lanes_sum_of_verified(hdr_words(h));
	bpf_spin_lock(&s->lock);
	if (s->state != INC_SLOT_EMPTY && s->job == job_id && s->gen == job->gen && s->psn == h->psn) {
		if (!evict) {
			s->state = INC_SLOT_EMPTY;
			select = s->select;
			hit = 1;
		} else if (s->state == INC_SLOT_PARTIAL && s->numel == n) {
			tot = lanes_copy_out(s, payload, end, n);
			bitmap = s->bitmap;
			s->state = INC_SLOT_EMPTY;
			hit = 1;
		}
	}
	bpf_spin_unlock(&s->lock);
	udp->check = 0;
	if (!evict) {
		if (st && hit)
			st->releases++;
		if (select) {
			/* The workers asked for the lanes at some ranks only (a reduce,
			 * a reduce_scatter): the egress program gives the others a bare
			 * completion, as in modulo mode. */
			h->flags |= INC_F_SELECT;
			h->bitmap = select;
			inc_csum_set(h, result_lanes);
		}
		return tx_ports.redirect_map(0, BPF_F_BROADCAST);
	}
	if (!hit)
		return XDP_DROP; /* nothing (left) to evict: the partial completed or was evicted */
	if (st)
		st->evictions++;
	h->type = INC_T_DATA;
	h->flags = INC_F_AGGREGATE;
	h->bitmap = bitmap;
	inc_csum_set(h, tot);
	readdress(eth, ip, udp, ps);
	return bpf_redirect(ps->ifindex, 0);
}

#endif /* INC_MODE_HASH_H */
