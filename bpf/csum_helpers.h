/* Integrity (inc_hdr.csum): the packet's 32-bit words w_j (header, then
 * lanes), each weighted by 2j + 1, sum to 0 mod 2^32. Odd weights keep every
 * single-bit error visible (an odd multiple of 2^b is never 0 mod 2^32), and
 * position weights catch what a plain sum cannot: two words swapped, or one
 * word up and another down by the same amount (a psn + 1 with a lane - 1).
 * It costs two adds per lane (lane_loops.h), fused into the loops that write lanes
 * (lane_loops.h return the weighted sum of what they wrote), so a packet the
 * switch rewrites gets its new csum without another pass. What it does not
 * catch is in docs/design.md. Real links have a CRC; veth and software
 * impairments do not, and XDP never sees the UDP checksum verified (senders
 * leave it to offload), so the switch checks this itself. */
#ifndef INC_CSUM_HELPERS_H
#define INC_CSUM_HELPERS_H

#include "lane_loops.h"

/* The header's part of the weighted sum. */
static __always_inline __u32 hdr_words(struct inc_hdr *h)
{
	__u32 *w = (__u32 *)h;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*h) / 4); i++)
		sum += (__u32)(2 * i + 1) * w[i];
	return sum;
}

static __always_inline int inc_csum_ok(struct inc_hdr *h, __s32 *p, void *end, __u32 n)
{
	__u32 wa = 0, wb = 0;
	FOR_EACH_LANE(p, end, n, LANE_ACC(wa, wb, *q));
	return hdr_words(h) + lanes_weighted(wa, wb, n) == 0;
}

/* After rewriting the header: lanes_sum is the lanes' weighted sum now. */
static __always_inline void inc_csum_set(struct inc_hdr *h, __u32 lanes_sum)
{
	h->csum = 0;
	h->csum = -(hdr_words(h) + lanes_sum) * INC_CSUM_INV11;
}

/* The lanes' weighted sum of a packet whose csum checked out, before its
 * header changed. */
static __always_inline __u32 lanes_sum_of_verified(__u32 hdr_sum_on_arrival)
{
	return -hdr_sum_on_arrival;
}

/* The csum after header word 4's low half (the rank) went from `from` to `to`. */
static __always_inline __u32 csum_after_rank(__u32 csum, __u16 from, __u16 to)
{
	return csum + ((__u32)from - (__u32)to) * 9 * INC_CSUM_INV11;
}

#endif /* INC_CSUM_HELPERS_H */
