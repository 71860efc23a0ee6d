/* The lane loops of the aggregation: a packet's int32 lanes added (or maxed)
 * into an aggregator slot, copied in or out, and a slot's round started and
 * completed. Used by the switch (modulo and hash modes) and measured as is by
 * bench_agg.bpf.c. Map-free: callers pass the slot they looked up. */
#ifndef INC_LANE_LOOPS_H
#define INC_LANE_LOOPS_H

#include "parsing.h"
#include "inc_state.h"

/* Runs BODY for every lane k < n, with q pointing at its packet word: eight
 * lanes per packet bounds check (the verifier needs each access checked, and
 * checking every lane doubled the cost of a full packet: scripts/xdp_cost.py),
 * then lane by lane for the rest. */
#define FOR_EACH_LANE(p, end, n, BODY)                                   \
	do {                                                                 \
		__u32 i_ = 0;                                                    \
		for (__u32 c_ = 0; c_ < INC_MAX_ELEMS / 8; c_++) {              \
			if (i_ + 8 > (n))                                            \
				break;                                                   \
			__s32 *q8_ = (p) + i_;                                       \
			barrier_var(q8_);                                            \
			if ((void *)(q8_ + 8) > (end))                               \
				break;                                                   \
			_Pragma("unroll") for (int j_ = 0; j_ < 8; j_++) {           \
				__u32 k = i_ + j_;                                       \
				__s32 *q = q8_ + j_;                                     \
				BODY;                                                    \
			}                                                            \
			i_ += 8;                                                     \
		}                                                                \
		for (int t_ = 0; t_ < 8; t_++) {                                 \
			if (i_ >= (n) || i_ >= INC_MAX_ELEMS)                        \
				break;                                                   \
			__s32 *q = (p) + i_;                                         \
			barrier_var(q);                                              \
			if ((void *)(q + 1) > (end))                                 \
				break;                                                   \
			__u32 k = i_;                                                \
			BODY;                                                        \
			i_++;                                                        \
		}                                                                \
	} while (0)

/* Runs BODY for every lane k < n (n <= LIMIT) of an array in map memory
 * (jumbo frames): a bounds check per eight lanes, then lane by lane for the
 * rest. A check per lane would leave the
 * verifier one pending branch per lane: more than it follows for 16 000. */
#define FOR_LANES(n, LIMIT, BODY)                                         \
	do {                                                              \
		__u32 i_ = 0;                                             \
		for (; i_ + 8 <= (LIMIT); i_ += 8) {                      \
			if (i_ + 8 > (n))                                 \
				break;                                    \
			_Pragma("unroll") for (int t_ = 0; t_ < 8; t_++) { \
				__u32 k = i_ + t_;                        \
				BODY;                                     \
			}                                                 \
		}                                                         \
		for (int t_ = 0; t_ < 8; t_++) {                          \
			__u32 k = i_ + t_;                                \
			if (k >= (n) || k >= (LIMIT))                     \
				break;                                    \
			BODY;                                             \
		}                                                         \
	} while (0)

/* v, or 0 if it is above MAX (a constant), compared in the very register the
 * helper gets: the compiler may otherwise test a copy or a shifted value,
 * which leaves the verifier without the bound (a length for
 * bpf_xdp_load_bytes/store_bytes). */
#define BOUND_LEN(v, MAX) asm volatile("if %0 <= %1 goto +1; %0 = 0;" : "+r"(v) : "i"(MAX))

/* Lane k's weight in the csum (csum_helpers.h). */
#define LANE_W(k) ((__u32)(2 * (k) + INC_LANE_W0))

/* The weighted sum of lanes r_0..r_{n-1} costs two adds per lane, no multiply:
 * with a = sum of r_k and b = sum of the running sums a_k,
 * sum of k r_k = n a - b, so sum of (2k + 17) r_k = (2n + 17) a - 2b. */
#define LANE_ACC(a, b, r) do { (a) += (__u32)(r); (b) += (a); } while (0)

static __always_inline __u32 lanes_weighted(__u32 a, __u32 b, __u32 n)
{
	return (2 * n + INC_LANE_W0) * a - 2 * b;
}

static __always_inline void lanes_claim(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	FOR_EACH_LANE(p, end, n, s->lanes[k] = *q);
}

/* Adds the packet into the slot and leaves the running sum in the packet, so
 * the last contributor's packet already carries the result. */
static __always_inline int lanes_sum(struct inc_slot *s, __s32 *p, void *end, __u32 n, __u32 *tot)
{
	__s32 ovf = 0;
	__u32 wa = 0, wb = 0;
	FOR_EACH_LANE(p, end, n, {
		__s32 a = s->lanes[k];
		__s32 b = *q;
		__s32 r = (__s32)((__u32)a + (__u32)b);
		ovf |= (a ^ r) & (b ^ r);
		s->lanes[k] = r;
		*q = r;
		LANE_ACC(wa, wb, r);
	});
	*tot = lanes_weighted(wa, wb, n);
	return ovf < 0;
}

static __always_inline __u32 lanes_max(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	__u32 wa = 0, wb = 0;
	FOR_EACH_LANE(p, end, n, {
		__s32 x = s->lanes[k];
		__s32 y = *q;
		__s32 r = x > y ? x : y;
		s->lanes[k] = r;
		*q = r;
		LANE_ACC(wa, wb, r);
	});
	return lanes_weighted(wa, wb, n);
}

/* Returns the weighted sum of the lanes written (for the packet's new csum). */
static __always_inline __u32 lanes_copy_out(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	__u32 wa = 0, wb = 0;
	FOR_EACH_LANE(p, end, n, {
		__s32 r = s->lanes[k];
		*q = r;
		LANE_ACC(wa, wb, r);
	});
	return lanes_weighted(wa, wb, n);
}

/* A round's bookkeeping, taken by its first contribution (lanes apart). */
static __always_inline void slot_start(struct inc_slot *s, __u32 job_id, __u16 gen, __u32 psn, __u64 bit,
				       __u8 op, __u32 n, __u64 now)
{
	s->job = job_id;
	s->gen = gen;
	s->psn = psn;
	s->bitmap = bit;
	s->count = 1;
	s->op = op;
	s->numel = n;
	s->overflow = 0;
	s->claimed_ns = now;
}

/* Starts a round in s with its first contribution. Returns 1 if that
 * completes it (a one-worker job). Called with s->lock held. */
static __always_inline int slot_claim(struct inc_slot *s, __u32 job_id, __u16 gen, __u32 psn,
				      __u64 bit, __u8 op, __u32 n, __u64 now, __s32 *payload,
				      void *end, __u8 world)
{
	slot_start(s, job_id, gen, psn, bit, op, n, now);
	lanes_claim(s, payload, end, n);
	s->state = world <= 1 ? INC_SLOT_COMPLETE : INC_SLOT_PARTIAL;
	return world <= 1;
}

/* Adds a contribution that is not in s yet; the running result is left in
 * the packet. Returns 1 if that completes the round. Called with s->lock held. */
static __always_inline int slot_add(struct inc_slot *s, __u8 op, __u64 bit, __s32 *payload,
				    void *end, __u32 n, __u8 world, __u32 *tot)
{
	if (op == INC_OP_MAX)
		*tot = lanes_max(s, payload, end, n);
	else if (lanes_sum(s, payload, end, n, tot))
		s->overflow = 1;
	s->bitmap |= bit;
	s->count++;
	if (s->count < world)
		return 0;
	s->state = INC_SLOT_COMPLETE;
	return 1;
}

#endif /* INC_LANE_LOOPS_H */
