/* Microbenchmark only (scripts/xdp_cost.py): three ways to add a packet's
 * lanes into one aggregator, each as a tiny XDP program, so their cost per
 * packet can be compared with BPF_PROG_TEST_RUN. The switch uses the spin
 * lock; README "Performance" records why. */
#include <uapi/linux/bpf.h>
#include "parsing.h"
#include "inc_proto.h"

#define barrier_var(v) asm volatile("" : "+r"(v))

struct agg_locked {
	struct bpf_spin_lock lock;
	__s32 lanes[INC_MAX_ELEMS];
};
struct agg_plain {
	__s32 lanes[INC_MAX_ELEMS];
};
BPF_ARRAY(locked, struct agg_locked, 1);
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

/* The same with one bounds check per 8 lanes (lane counts here are multiples of 8). */
int agg_spinlock_chunked(struct xdp_md *ctx)
{
	void *end;
	__u32 n, k = 0;
	__s32 *p = lanes_of(ctx, &end, &n);
	struct agg_locked *a = locked.lookup(&k);
	if (!p || !a)
		return XDP_ABORTED;
	bpf_spin_lock(&a->lock);
	for (__u32 c = 0; c < INC_MAX_ELEMS / 8; c++) {
		__u32 i = c * 8;
		if (i + 8 > n)
			break;
		__s32 *q = p + i;
		barrier_var(q);
		if ((void *)(q + 8) > end)
			break;
#pragma unroll
		for (int j = 0; j < 8; j++)
			a->lanes[i + j] += q[j];
	}
	bpf_spin_unlock(&a->lock);
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
