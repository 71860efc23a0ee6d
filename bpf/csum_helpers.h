/* Integrity (inc_hdr.csum): the 32-bit words of header and lanes sum to 0 mod
 * 2^32. A plain sum catches every single-bit error and costs one add per lane,
 * and it is fused into the loops that write lanes (lane_loops.h return the sum
 * of what they wrote), so a packet the switch rewrites gets its new csum
 * without another pass. Real links have a CRC; veth and software impairments
 * do not, and XDP never sees the UDP checksum verified (senders leave it to
 * offload), so the switch checks this itself. */
#ifndef INC_CSUM_HELPERS_H
#define INC_CSUM_HELPERS_H

#include "lane_loops.h"

static __always_inline __u32 hdr_words(struct inc_hdr *h)
{
	__u32 *w = (__u32 *)h;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*h) / 4); i++)
		sum += w[i];
	return sum;
}

static __always_inline int inc_csum_ok(struct inc_hdr *h, __s32 *p, void *end, __u32 n)
{
	__u32 sum = hdr_words(h);
	FOR_EACH_LANE(p, end, n, sum += (__u32)*q);
	return sum == 0;
}

/* After rewriting the header: lanes_sum is what the packet's lanes add up to now. */
static __always_inline void inc_csum_set(struct inc_hdr *h, __u32 lanes_sum)
{
	h->csum = 0;
	h->csum = -(hdr_words(h) + lanes_sum);
}

/* The lanes of a packet whose csum checked out, before its header changed. */
static __always_inline __u32 lanes_sum_of_verified(__u32 hdr_sum_on_arrival)
{
	return -hdr_sum_on_arrival;
}

#endif /* INC_CSUM_HELPERS_H */
