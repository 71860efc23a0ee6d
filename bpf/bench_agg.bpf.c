/* Microbenchmark only (scripts/xdp_cost.py): three ways to add a packet's
 * lanes into one aggregator, each as a tiny XDP program, so their cost per
 * packet can be compared with BPF_PROG_TEST_RUN. The switch uses the spin
 * lock, with its own lane loop (lane_loops.h), timed here as
 * agg_spinlock_chunked; docs/performance.md records why. */
#include <uapi/linux/bpf.h>
#include "parsing.h"
#include "inc_proto.h"
#include "lane_loops.h"

struct agg_locked {
	struct bpf_spin_lock lock;
	__s32 lanes[INC_MAX_ELEMS];
};
struct agg_plain {
	__s32 lanes[INC_MAX_ELEMS];
};
BPF_ARRAY(locked, struct agg_locked, 1);
BPF_ARRAY(slot, struct inc_slot, 1);
BPF_ARRAY(shared, struct agg_plain, 1);
BPF_PERCPU_ARRAY(percpu, struct agg_plain, 1);

static __always_inline __s32 *lanes_of(struct xdp_md *ctx, void **end, __u32 *n)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	if (!parse_eth(&c) || !parse_ipv4(&c) || !parse_udp(&c))
		return 0;
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return 0;
	*n = h->numel;
	*end = c.end;
	return (__s32 *)(h + 1);
}

#define FOR_LANES(body)                                   \
	for (__u32 i = 0; i < INC_MAX_ELEMS; i++) {           \
		if (i >= n)                                       \
			break;                                        \
		__s32 *q = p + i;                                 \
		barrier_var(q);                                   \
		if ((void *)(q + 1) > end)                        \
			break;                                        \
		body;                                             \
	}

int agg_spinlock(struct xdp_md *ctx)
{
	void *end;
	__u32 n, k = 0;
	__s32 *p = lanes_of(ctx, &end, &n);
	struct agg_locked *a = locked.lookup(&k);
	if (!p || !a)
		return XDP_ABORTED;
	bpf_spin_lock(&a->lock);
	FOR_LANES(a->lanes[i] += *q)
	bpf_spin_unlock(&a->lock);
	return XDP_DROP;
}

/* The switch's add as is (lanes_sum: eight lanes per bounds check, overflow
 * check, the running sum left in the packet and summed for its csum) under
 * the slot's lock. */
int agg_spinlock_chunked(struct xdp_md *ctx)
{
	void *end;
	__u32 n, k = 0, tot;
	__s32 *p = lanes_of(ctx, &end, &n);
	struct inc_slot *s = slot.lookup(&k);
	if (!p || !s)
		return XDP_ABORTED;
	bpf_spin_lock(&s->lock);
	if (lanes_sum(s, p, end, n, &tot))
		s->overflow = 1;
	bpf_spin_unlock(&s->lock);
	return XDP_DROP;
}

int agg_atomic(struct xdp_md *ctx)
{
	void *end;
	__u32 n, k = 0;
	__s32 *p = lanes_of(ctx, &end, &n);
	struct agg_plain *a = shared.lookup(&k);
	if (!p || !a)
		return XDP_ABORTED;
	FOR_LANES(__sync_fetch_and_add(&a->lanes[i], *q)) /* result unused: no fetch */
	return XDP_DROP;
}

int agg_percpu(struct xdp_md *ctx)
{
	void *end;
	__u32 n, k = 0;
	__s32 *p = lanes_of(ctx, &end, &n);
	struct agg_plain *a = percpu.lookup(&k);
	if (!p || !a)
		return XDP_ABORTED;
	FOR_LANES(a->lanes[i] += *q)
	return XDP_DROP;
}

/* The fixed cost of one BPF_PROG_TEST_RUN round, to subtract from single runs. */
int noop(struct xdp_md *ctx)
{
	return XDP_DROP;
}
