/* The parameter server's XDP fast path (hash mode).
 *
 * Nearly everything a hash job's PS receives is a complete aggregate: the
 * switch summed all ranks and the PS only has to turn it into the result,
 * keep a copy for workers that lose it, and send it back through the switch
 * (the ACK that frees the slot). ps_fast does that on the PS's veth without
 * the socket stack: it rewrites the frame into the result, stores it in
 * ps_rows/ps_done (the result cache the PS's user space shares through
 * mmap), and sends it back with XDP_TX. Everything else (partials,
 * collisions, resends of a cached psn, anything malformed or corrupt) goes on
 * to the PS's socket, where user space handles every case as before.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "inc_proto.h"
#include "parsing.h"
#include "csum_helpers.h"
#include "rewrite_helpers.h"

#ifndef PS_RING
#define PS_RING 4096
#endif
/* A cached result packet (header and lanes), padded to a page so that a
 * length masked to 12 bits stays inside the row for the verifier. */
#define PS_ROW_BYTES 4096

struct ps_row {
	__u8 bytes[PS_ROW_BYTES];
};

/* ps_done[psn % PS_RING]: which psn the row holds (-1: none) and its length. */
struct ps_done {
	__s64 tag;
	__s64 len;
};

struct ps_ctl {
	__u16 dport;      /* the PS's UDP port, network order; 0 = fast path off */
	__u16 job;
	__u16 gen;
	__u16 pad;
	__u64 all_bits;   /* the bitmap of a complete aggregate */
	__u64 fast;       /* results sent from here */
};

BPF_F_TABLE("array", int, struct ps_ctl, ps_ctl, 1, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct ps_row, ps_rows, PS_RING, BPF_F_MMAPABLE);
BPF_F_TABLE("array", int, struct ps_done, ps_done, PS_RING, BPF_F_MMAPABLE);

#define FRAME_HDRS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

int ps_fast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct cursor cur = {.pos = data, .end = end};
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp = parse_ipv4_udp(&cur, &eth, &ip);
	if (!udp)
		return XDP_PASS;
	int zero = 0;
	struct ps_ctl *c = ps_ctl.lookup(&zero);
	if (!c || c->dport == 0 || udp->dest != c->dport)
		return XDP_PASS;
	struct inc_hdr *h = cur.pos;
	if ((void *)(h + 1) > end)
		return XDP_PASS;
	__u32 numel = h->numel;
	if (h->version != INC_VERSION || h->type != INC_T_DATA || h->job != c->job ||
	    h->gen != c->gen || !(h->flags & INC_F_AGGREGATE) || h->bitmap != c->all_bits ||
	    numel == 0 || numel > INC_MAX_ELEMS || (h->op != INC_OP_SUM && h->op != INC_OP_MAX))
		return XDP_PASS;
	int key = h->psn & (PS_RING - 1);
	struct ps_done *d = ps_done.lookup(&key);
	struct ps_row *row = ps_rows.lookup(&key);
	if (!d || !row || d->tag == (__s64)h->psn)
		return XDP_PASS; /* cached already: this is a resend, user space answers it */
	if (!inc_csum_ok(h, (__s32 *)(h + 1), end, numel))
		return XDP_PASS; /* user space counts it and drops it */

	__u32 tot = lanes_sum_of_verified(hdr_words(h));
	h->type = INC_T_RESULT;
	h->flags &= INC_F_OVERFLOW;
	h->rank = 0;
	inc_csum_set(h, tot);
	udp->check = 0;
	__u32 len = ((sizeof(*h) + numel * 4 - 1) & (PS_ROW_BYTES - 1)) + 1;
	if (bpf_xdp_load_bytes(ctx, FRAME_HDRS, row->bytes, len))
		return XDP_PASS;
	d->len = len;
	d->tag = h->psn; /* last: a tag that matches promises a whole row */
	swap_addresses(eth, ip, udp);
	__sync_fetch_and_add(&c->fast, 1);
	return XDP_TX;
}
