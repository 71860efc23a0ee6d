/* Jumbo frames in a modulo job (INC_T_JUMBO): one frame of up to 64 KB
 * carries the lanes of INC_JUMBO_SUBS consecutive psns, psn .. psn + 19, and
 * is added into their slots (offset + (psn + j) % slots) as 20 ordinary
 * contributions would be. Per frame, not per 3.2 KB, go the UDP stack, the
 * veth hops and this program's dispatch (docs/design.md, "Jumbo frames").
 *
 * The lanes are in the frame's fragments, so they are loaded once into a
 * per-CPU buffer and checked there (csum) before anything is added
 * (xdp_inc_jumbo). The first slot decides for the frame: duplicate, stale,
 * ahead, or the answer to a resend of a complete frame. Each slot is then
 * claimed or added under its own lock, as in mode_modulo.h, one tail call per
 * slot (xdp_inc_jumbo_add: 20 slots' loops in one program are more than the
 * verifier takes). A rank that has added into all its slots counts itself in
 * the first slot's jdone; the one that makes jdone reach the world writes the
 * sums into its own frame: the result (xdp_inc_jumbo_out).
 *
 * Devmap broadcast refuses multi-buffer frames, so the result is not cloned:
 * it goes to rank 0, whose host copies the lanes and sends the frame back
 * (INC_T_JRESULT), and the switch passes it on to rank 1, and so on
 * (jumbo_chain). A rank whose result is lost resends its contribution and is
 * answered from the slots, for itself only (INC_F_RETRANS). Included by
 * inc_switch.bpf.c after inc_maps.h. */
#ifndef INC_MODE_JUMBO_H
#define INC_MODE_JUMBO_H

#include "inc_entry.h"
#include "lane_loops.h"
#include "rewrite_helpers.h"

enum jumbo_first {
	J_CLAIM,  /* the first slot was started or added to: go on with the others */
	J_DUP,
	J_RETX,
	J_STALE,
	J_AHEAD,
	J_BAD_LEN,
};

/* The frame's lanes [base, base + len) added into slot s (claim: copied). Under s->lock. */
static __always_inline int jumbo_add(struct inc_slot *s, struct inc_jumbo_buf *b, __u32 base, __u32 len,
				     int claim)
{
	__s32 ovf = 0;
	if (base > INC_JUMBO_ELEMS - INC_MAX_ELEMS)
		return 0;
	FOR_LANES(len, INC_MAX_ELEMS, {
		__s32 a = claim ? 0 : s->lanes[k];
		__s32 x = b->lanes[base + k];
		__s32 r = (__s32)((__u32)a + (__u32)x);
		ovf |= (a ^ r) & (x ^ r);
		s->lanes[k] = r;
	});
	return ovf < 0;
}

/* Slot s (one of the frame's; j its place) takes this rank's lanes: it
 * starts the slot's round or adds to it. Returns the frame's fate when j is 0;
 * later slots can only be claimed or added (J_CLAIM) or, if their state
 * contradicts the first slot's, J_STALE. Under s->lock. */
static __always_inline int jumbo_slot(struct inc_slot *s, __u32 j, __u32 job_id, __u16 gen, __u32 psn, __u64 bit,
				      __u32 n, __u32 len, __u8 world, __u64 now, struct inc_jumbo_buf *b)
{
	__u32 sp = psn + j;
	int owned = s->job == job_id && s->gen == gen && s->state != INC_SLOT_EMPTY;
	int newer = (__s32)(sp - s->psn) > 0;
	if (!owned || (newer && s->state == INC_SLOT_COMPLETE)) {
		slot_start(s, job_id, gen, sp, bit, INC_OP_SUM, len, now);
		s->overflow = jumbo_add(s, b, j * INC_MAX_ELEMS, len, 1);
		s->jdone = 0;
		s->select = n;
		s->state = world <= 1 ? INC_SLOT_COMPLETE : INC_SLOT_PARTIAL;
		return J_CLAIM;
	}
	if (s->psn != sp)
		return newer ? J_AHEAD : J_STALE;
	if (s->numel != len || s->op != INC_OP_SUM || (j == 0 && s->select != n))
		return J_BAD_LEN;
	if (s->bitmap & bit) {
		if (j == 0 && s->state == INC_SLOT_COMPLETE && s->jdone >= world)
			return J_RETX;
		return J_DUP;
	}
	if (jumbo_add(s, b, j * INC_MAX_ELEMS, len, 0))
		s->overflow = 1;
	s->bitmap |= bit;
	s->count++;
	if (s->count >= world)
		s->state = INC_SLOT_COMPLETE;
	return J_CLAIM;
}

/* The frame's lanes become the stored sums of its slots (gathered into b,
 * then one store), *tot their weighted sum (for the csum), *overflow whether
 * any slot overflowed. Returns -1 if a slot is missing or the store fails. */
static __always_inline int jumbo_write_result(struct xdp_md *ctx, struct inc_job *job, struct inc_jumbo_buf *b,
					      __u32 psn, __u32 n, __u32 *tot, int *overflow)
{
	__u32 wa = 0, wb = 0;
	for (__u32 j = 0; j < INC_JUMBO_SUBS; j++) {
		if (j * INC_MAX_ELEMS >= n)
			break;
		__u32 left = n - j * INC_MAX_ELEMS;
		__u32 len = left < INC_MAX_ELEMS ? left : INC_MAX_ELEMS;
		__u32 idx = job->offset + (psn + j) % job->slots;
		struct inc_slot *s = pool.lookup(&idx);
		if (!s)
			return -1;
		*overflow |= s->overflow;
		__s32 *out = &b->lanes[j * INC_MAX_ELEMS];
		FOR_LANES(len, INC_MAX_ELEMS, {
			__s32 r = s->lanes[k];
			out[k] = r;
			LANE_ACC(wa, wb, r);
		});
	}
	__u32 top = n - 1; /* n is 1..INC_JUMBO_ELEMS (parse_inc) */
	BOUND_LEN(top, INC_JUMBO_ELEMS - 1);
	if (bpf_xdp_store_bytes(ctx, JUMBO_LANES_AT, b->lanes, (top + 1) * 4))
		return -1;
	*tot = lanes_weighted(wa, wb, n);
	return 0;
}

/* Rank dst's port and address for its job, or NULL. */
static __always_inline struct inc_member *jumbo_member(__u32 job_id, __u32 dst)
{
	if (dst >= INC_MAX_WORKERS)
		return NULL;
	__u32 sidx = job_id * INC_MAX_WORKERS + dst;
	struct inc_source *src = sources.lookup(&sidx);
	if (!src || src->addr == 0)
		return NULL;
	struct inc_member_key key = { .job = job_id, .ifindex = src->ifindex };
	struct inc_member *m = members.lookup(&key);
	if (!m || m->rank != dst)
		return NULL; /* two ranks behind one port: the chain cannot tell them apart */
	return m;
}

/* The frame, readdressed to rank dst, out of dst's port. */
static __always_inline int jumbo_send_to(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp, struct inc_hdr *h,
					 __u32 job_id, __u32 dst)
{
	struct inc_member *m = jumbo_member(job_id, dst);
	if (!m)
		return drop(job_id, INC_DROP_BAD_RANK);
	readdress(eth, ip, udp, m);
	h->csum = csum_after_rank(h->csum, h->rank, dst);
	h->rank = dst;
	return bpf_redirect(m->ifindex, 0);
}

/* enter_mode for the programs that take a contribution on (add, out). */
static __always_inline int enter_jumbo_data(struct xdp_md *ctx, struct inc_pkt *pk, __u32 *job_id,
					    struct inc_job **job, struct inc_stats **st)
{
	return enter_mode_as(ctx, pk, job_id, job, st, PARSE_JUMBO) || (*job)->mode != INC_MODE_MODULO ||
	       pk->h->type != INC_T_JUMBO;
}

static __always_inline struct inc_jumbo_buf *jumbo_buf_here(void)
{
	__u32 cpu = bpf_get_smp_processor_id();
	return jumbo_buf.lookup(&cpu);
}

/* A contribution (INC_T_JUMBO), admitted by xdp_inc_ingress: its lanes
 * loaded and checked, then into its slots (jumbo_step). */
static __always_inline int jumbo_begin(struct xdp_md *ctx, struct inc_hdr *h, __u32 job_id, struct inc_stats *st)
{
	__u32 n = h->numel;
	struct inc_jumbo_buf *b = jumbo_buf_here();
	if (!b || n == 0 || n > INC_JUMBO_ELEMS)
		return drop(job_id, INC_DROP_BAD_LEN);
	__u32 top = n - 1;
	BOUND_LEN(top, INC_JUMBO_ELEMS - 1);
	if (bpf_xdp_load_bytes(ctx, JUMBO_LANES_AT, b->lanes, (top + 1) * 4))
		return drop(job_id, INC_DROP_BAD_LEN);
	/* Nothing is added before the whole frame checked out. */
	__u32 wa = 0, wb = 0;
	FOR_LANES(n, INC_JUMBO_ELEMS, LANE_ACC(wa, wb, b->lanes[k]));
	if (hdr_words(h) + lanes_weighted(wa, wb, n) != 0)
		return drop(job_id, INC_DROP_BAD_CSUM);
	b->j = 0;
	b->fate = J_CLAIM;
	mode_progs.call(ctx, INC_PROG_JUMBO_ADD);
	return drop(job_id, INC_DROP_NO_JOB);
}

/* Slot b->j of the frame takes its lanes (one tail call per slot keeps each
 * verification small); after the last, the rank counts itself done. */
static __always_inline int jumbo_step(struct xdp_md *ctx, struct inc_hdr *h, __u32 job_id, struct inc_job *job,
				      struct inc_stats *st)
{
	struct inc_jumbo_buf *b = jumbo_buf_here();
	if (!b)
		return drop(job_id, INC_DROP_NO_JOB);
	__u32 n = h->numel, psn = h->psn, j = b->j;
	if (j >= INC_JUMBO_SUBS || j * INC_MAX_ELEMS >= n)
		return drop(job_id, INC_DROP_BAD_LEN);
	__u32 left = n - j * INC_MAX_ELEMS;
	__u32 len = left < INC_MAX_ELEMS ? left : INC_MAX_ELEMS;
	__u32 idx = job->offset + (psn + j) % job->slots;
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_NO_JOB);
	__u64 bit = 1ULL << (h->rank & 63);
	__u8 world = job->world;
	__u16 gen = job->gen;
	__u64 now = bpf_ktime_get_ns();
	bpf_spin_lock(&s->lock);
	int fate = jumbo_slot(s, j, job_id, gen, psn, bit, n, len, world, now, b);
	bpf_spin_unlock(&s->lock);
	/* Slot 0 decides for the frame; a later slot only if the job's state is torn. */
	if (fate == J_DUP)
		return drop(job_id, INC_DROP_DUP);
	if (fate == J_STALE)
		return drop(job_id, INC_DROP_STALE);
	if (fate == J_AHEAD)
		return drop(job_id, INC_DROP_AHEAD);
	if (fate == J_BAD_LEN)
		return drop(job_id, INC_DROP_BAD_LEN);
	b->fate = fate;
	if (fate == J_CLAIM && (j + 1) * INC_MAX_ELEMS < n) {
		b->j = j + 1;
		mode_progs.call(ctx, INC_PROG_JUMBO_ADD);
		return drop(job_id, INC_DROP_NO_JOB);
	}
	if (fate == J_CLAIM) {
		__u32 idx0 = job->offset + psn % job->slots;
		struct inc_slot *s0 = pool.lookup(&idx0);
		if (!s0)
			return drop(job_id, INC_DROP_NO_JOB);
		int complete = 0;
		bpf_spin_lock(&s0->lock);
		if (s0->job == job_id && s0->gen == gen && s0->psn == psn)
			complete = ++s0->jdone == world;
		bpf_spin_unlock(&s0->lock);
		if (st)
			st->consumed++;
		if (!complete)
			return XDP_DROP;
	}
	mode_progs.call(ctx, INC_PROG_JUMBO_OUT);
	return drop(job_id, INC_DROP_NO_JOB);
}

/* The frame that completed its psns (or asked again for a complete one)
 * leaves with the result: to rank 0, the start of its chain, or back to the
 * rank that resent. */
static __always_inline int jumbo_out(struct xdp_md *ctx, struct inc_pkt *pk, __u32 job_id, struct inc_job *job,
				     struct inc_stats *st)
{
	struct inc_jumbo_buf *b = jumbo_buf_here();
	if (!b)
		return drop(job_id, INC_DROP_NO_JOB);
	int retx = b->fate == J_RETX;
	__u32 n = pk->h->numel;
	__u32 tot = 0;
	int overflow = 0;
	if (jumbo_write_result(ctx, job, b, pk->h->psn, n, &tot, &overflow))
		return drop(job_id, INC_DROP_BAD_LEN);
	if (parse_inc(ctx, pk) != PARSE_JUMBO)
		return XDP_DROP; /* it was checked on entry; only its lanes changed */
	struct inc_hdr *h = pk->h;
	h->type = INC_T_JRESULT;
	h->flags = (overflow ? INC_F_OVERFLOW : 0) | (retx ? INC_F_RETRANS : 0);
	inc_csum_set(h, tot);
	pk->udp->check = 0;
	if (retx) {
		if (st)
			st->retrans_answered++;
		swap_addresses(pk->eth, pk->ip, pk->udp);
		return bpf_redirect(ctx->ingress_ifindex, 0);
	}
	if (st) {
		st->slots_completed += (n + INC_MAX_ELEMS - 1) / INC_MAX_ELEMS;
		if (overflow)
			st->overflows++;
	}
	return jumbo_send_to(pk->eth, pk->ip, pk->udp, h, job_id, 0);
}

/* A result coming back from rank r on its chain: on to rank r + 1. */
static __always_inline int jumbo_chain(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp, struct inc_hdr *h,
				       __u32 job_id, struct inc_job *job, struct inc_stats *st)
{
	if (h->flags & INC_F_RETRANS)
		return drop(job_id, INC_DROP_BAD_HDR); /* an answer to one rank's resend ends with it */
	__u32 next = h->rank + 1;
	if (next >= job->world)
		return drop(job_id, INC_DROP_STALE); /* every rank has it */
	if (st)
		st->chained++;
	return jumbo_send_to(eth, ip, udp, h, job_id, next);
}

#endif /* INC_MODE_JUMBO_H */
