/* Microbenchmark only (scripts/kv_cost.py): two ways to claim-or-add a KV
 * packet's tuples into their aggregators (tuple i -> row i, column from the
 * key), each a tiny XDP program timed with BPF_PROG_TEST_RUN: 64-bit atomics
 * (the switch's own kv_claim_add of kv_agg.h, compare-and-swap on the key,
 * atomic add of the value) and a spin lock per aggregator around plain code. */
#include <uapi/linux/bpf.h>
#include "parsing.h"
#include "inc_proto.h"
#include "kv_agg.h"

#define BENCH_COLS 64

struct agg_locked {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 key;
	__s64 value;
};
BPF_ARRAY(kv_atomic, struct inc_kv_agg, BENCH_COLS * INC_KV_ROWS);
BPF_ARRAY(kv_locked, struct agg_locked, BENCH_COLS * INC_KV_ROWS);
BPF_PERCPU_ARRAY(hits, __u64, 1);

static __always_inline struct inc_kv_tuple *tuples_of(struct xdp_md *ctx, void **end, __u32 *n)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	if (!parse_eth(&c) || !parse_ipv4(&c) || !parse_udp(&c))
		return 0;
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return 0;
	*n = h->numel / INC_KV_TUPLE_WORDS;
	*end = c.end;
	return (struct inc_kv_tuple *)(h + 1);
}

/* Tuple i of the packet, or 0 past its end; its aggregator index in *idx. */
static __always_inline struct inc_kv_tuple *tuple_at(struct inc_kv_tuple *p, void *end, __u32 i,
						      __u64 *key, __u32 *idx)
{
	struct inc_kv_tuple *t = p + i;
	barrier_var(t);
	if ((void *)(t + 1) > end)
		return 0;
	*key = kv_tuple_key(t);
	*idx = kv_agg_index(0, 0, BENCH_COLS, *key, i);
	return t;
}

int kv_bench_atomic(struct xdp_md *ctx)
{
	void *end;
	__u32 n, z = 0;
	struct inc_kv_tuple *p = tuples_of(ctx, &end, &n);
	__u64 *hit = hits.lookup(&z);
	if (!p || !hit)
		return XDP_ABORTED;
	for (__u32 i = 0; i < INC_KV_MAX_TUPLES; i++) {
		__u64 key;
		__u32 idx;
		if (i >= n)
			break;
		struct inc_kv_tuple *t = tuple_at(p, end, i, &key, &idx);
		if (!t)
			break;
		struct inc_kv_agg *a = kv_atomic.lookup(&idx);
		if (a && kv_claim_add(a, key, t) != KV_AGG_OTHER)
			*hit += 1;
	}
	return XDP_DROP;
}

int kv_bench_locked(struct xdp_md *ctx)
{
	void *end;
	__u32 n, z = 0;
	struct inc_kv_tuple *p = tuples_of(ctx, &end, &n);
	__u64 *hit = hits.lookup(&z);
	if (!p || !hit)
		return XDP_ABORTED;
	for (__u32 i = 0; i < INC_KV_MAX_TUPLES; i++) {
		__u64 key;
		__u32 idx;
		if (i >= n)
			break;
		struct inc_kv_tuple *t = tuple_at(p, end, i, &key, &idx);
		if (!t)
			break;
		struct agg_locked *a = kv_locked.lookup(&idx);
		if (a) {
			__s32 v = t->value;
			int took = 0;
			bpf_spin_lock(&a->lock);
			if (a->key == 0)
				a->key = key;
			if (a->key == key) {
				a->value += v;
				took = 1;
			}
			bpf_spin_unlock(&a->lock);
			*hit += took;
		}
	}
	return XDP_DROP;
}

int noop(struct xdp_md *ctx)
{
	return XDP_DROP;
}
