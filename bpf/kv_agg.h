/* Key-value mode: where a tuple goes and how it is claimed or added there.
 * Used by the switch (mode_kv.h) and measured as is by bench_kv.bpf.c.
 * Map-free: callers look the aggregator up. */
#ifndef INC_KV_AGG_H
#define INC_KV_AGG_H

#include "inc_state.h"

static __always_inline __u64 kv_tuple_key(struct inc_kv_tuple *t)
{
	return ((__u64)t->key_hi << 32) | t->key_lo;
}

/* Index in kv_pool of tuple `row`'s aggregator: column col0 + inc_kv_col(key) % cpp
 * of the epoch whose copy starts at base (see inc_state.h). */
static __always_inline __u32 kv_agg_index(__u32 base, __u32 col0, __u32 cpp, __u64 key, __u32 row)
{
	return base + (col0 + inc_kv_col(key) % cpp) * INC_KV_ROWS + row;
}

#define KV_AGG_OTHER 0   /* held by another key: the tuple stays in the packet */
#define KV_AGG_ADDED 1   /* same key: its value added */
#define KV_AGG_CLAIMED 2 /* was empty: taken for the key, its value added */

/* A 64-bit compare-and-swap claims an empty aggregator, a 64-bit atomic add
 * adds: no lock (cheaper than a spin lock per aggregator: scripts/kv_cost.py). */
static __always_inline int kv_claim_add(struct inc_kv_agg *a, __u64 key, struct inc_kv_tuple *t)
{
	__u64 old = a->key;
	if (old == 0)
		old = __sync_val_compare_and_swap(&a->key, 0, key);
	if (old != 0 && old != key)
		return KV_AGG_OTHER;
	__sync_fetch_and_add(&a->value, (__s64)t->value);
	return old == 0 ? KV_AGG_CLAIMED : KV_AGG_ADDED;
}

#endif /* INC_KV_AGG_H */
