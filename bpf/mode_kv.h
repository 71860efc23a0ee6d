/* Key-value mode (word count): tuples claimed or added into their aggregators.
 *
 * See inc_proto.h for the wire format. Per packet: the flow's seen entry for
 * the psn is taken under the flow's lock (new psn -> PENDING; one already
 * absorbed -> re-ACK, or replay of the same leftovers to the reducer; one still
 * PENDING on another CPU -> drop as dup; one older than the ring -> drop, its
 * sender had its ACK long ago because a mapper's window is at most
 * INC_KV_WINDOW). Then each tuple is claimed/added with 64-bit atomics on its
 * aggregator, no lock: a drain of the other epoch never runs concurrently
 * (incd waits a grace period after flipping the epoch). Included by
 * inc_switch.bpf.c after inc_maps.h. */
#ifndef INC_MODE_KV_H
#define INC_MODE_KV_H

#include "inc_entry.h"
#include "kv_agg.h"
#include "rewrite_helpers.h"

#define KV_NEW 0
#define KV_REACK 1
#define KV_REPLAY 2
#define KV_DUP 3
#define KV_OLD 4

/* The packet becomes a header-only INC_T_KV_ACK back to its sender. */
static __always_inline int kv_ack(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				  struct udphdr *udp, struct inc_hdr *h, __u32 absorbed)
{
	h->type = INC_T_KV_ACK;
	h->flags &= INC_F_RETRANS;
	h->slot = absorbed;
	h->bitmap = 0;
	header_only(ip, udp, h);
	swap_addresses(eth, ip, udp);
	ip->check = ipv4_csum(ip);
	udp->check = 0;
	int keep = sizeof(*eth) + sizeof(*ip) + sizeof(*udp) + sizeof(*h);
	int cut = (int)((long)ctx->data_end - (long)ctx->data) - keep;
	if (cut > 0 && bpf_xdp_adjust_tail(ctx, -cut))
		return XDP_DROP;
	/* Not XDP_TX: see the retransmission answer of modulo mode. */
	return bpf_redirect(ctx->ingress_ifindex, 0);
}

/* A KV packet of a key-value job, admitted and re-entered (enter_mode). */
static __always_inline int kv_data(struct xdp_md *ctx, struct inc_pkt *pk, __u32 job_id,
				   struct inc_job *job, struct inc_stats *st)
{
	struct inc_hdr *h = pk->h;
	__u32 n = h->numel;
	__u32 nt = n / INC_KV_TUPLE_WORDS;
	if (n != nt * INC_KV_TUPLE_WORDS || nt > INC_KV_MAX_TUPLES)
		return drop(job_id, INC_DROP_BAD_LEN);
	__u32 off = job->offset, cols = job->slots, parts = job->parts;
	if (parts == 0 || parts > cols || off >= INC_KV_COLS || cols > INC_KV_COLS - off)
		return drop(job_id, INC_DROP_NO_JOB); /* not a key-value job incd programmed */
	struct inc_member *red = job_ps.lookup(&job_id);
	if (!red || red->ifindex == 0)
		return drop(job_id, INC_DROP_BAD_SOURCE); /* no reducer yet: absorb nothing */
	struct inc_kv_flow_key fk = { .job = job_id, .flow = h->rank };
	struct inc_kv_flow *fl = kv_flows.lookup(&fk);
	if (!fl)
		return drop(job_id, INC_DROP_BAD_SOURCE);

	int zero = 0;
	struct kv_scratch *sc = kv_scratch.lookup(&zero);
	if (!sc)
		return XDP_DROP;
	__builtin_memset(sc, 0, sizeof(*sc));
	__u32 psn = h->psn;
	struct inc_kv_seen *e = &fl->ring[psn & (INC_KV_WINDOW - 1)];
	__u64 mask[INC_KV_MASK_WORDS] = {};
	__u32 absorbed = 0;
	int action;
	bpf_spin_lock(&fl->lock);
	if (e->state != INC_KV_EMPTY && e->psn == psn) {
		absorbed = e->absorbed;
		if (e->state == INC_KV_PENDING) {
			action = KV_DUP;
		} else if (e->state == INC_KV_ALL) {
			action = KV_REACK;
		} else {
			action = KV_REPLAY;
#pragma unroll
			for (int w = 0; w < INC_KV_MASK_WORDS; w++)
				mask[w] = e->mask[w];
		}
	} else if (e->state != INC_KV_EMPTY && (__s32)(psn - e->psn) < 0) {
		action = KV_OLD;
	} else {
		e->psn = psn;
		e->state = INC_KV_PENDING;
		action = KV_NEW;
	}
	bpf_spin_unlock(&fl->lock);

	if (action == KV_DUP)
		return drop(job_id, INC_DROP_DUP);
	if (action == KV_OLD)
		return drop(job_id, INC_DROP_KV_OLD);
	if (action == KV_REACK) {
		if (st) {
			st->kv_resent++;
			st->kv_acks++;
		}
		return kv_ack(ctx, pk->eth, pk->ip, pk->udp, h, absorbed);
	}

	int replay = action == KV_REPLAY;
	__u32 cpp = cols / parts;
	__u32 col0 = off + (h->rank % parts) * cpp;
	__u32 base = (job->epoch & 1) * (INC_KV_COLS * INC_KV_ROWS);
	if (replay) {
		sc->absorbed = absorbed;
#pragma unroll
		for (int w = 0; w < INC_KV_MASK_WORDS; w++)
			sc->mask[w] = mask[w];
	}
	struct inc_kv_tuple *tp = (struct inc_kv_tuple *)pk->payload;
	for (__u32 i = 0; i < INC_KV_MAX_TUPLES; i++) {
		if (i >= nt)
			break;
		struct inc_kv_tuple *t = tp + i;
		barrier_var(t);
		if ((void *)(t + 1) > pk->end)
			break;
		__u64 key = kv_tuple_key(t);
		__u64 bit = 1ULL << (i & 63);
		int took;
		if (replay) {
			took = (sc->mask[i >> 6] & bit) != 0;
		} else if (key == 0) {
			took = 1; /* no tuple: nothing to add, nothing to pass on */
			sc->mask[i >> 6] |= bit;
			sc->absorbed++;
		} else {
			__u32 idx = kv_agg_index(base, col0, cpp, key, i);
			struct inc_kv_agg *a = kv_pool.lookup(&idx);
			took = 0;
			if (a) {
				int r = kv_claim_add(a, key, t);
				if (r != KV_AGG_OTHER) {
					if (r == KV_AGG_CLAIMED)
						sc->claimed++;
					took = 1;
					sc->mask[i >> 6] |= bit;
					sc->absorbed++;
				}
			}
		}
		if (!took) {
			/* Compaction: leftover number k moves to tuple k (k <= i). */
			__u32 lo = t->key_lo, hi = t->key_hi, v = (__u32)t->value;
			__u32 k = sc->left;
			if (k < INC_KV_MAX_TUPLES) {
				struct inc_kv_tuple *d = tp + k;
				barrier_var(d);
				if ((void *)(d + 1) <= pk->end) {
					d->key_lo = lo;
					d->key_hi = hi;
					d->value = (__s32)v;
				}
			}
			sc->left = k + 1;
			/* tuple k is lanes 3k..3k+2 */
			sc->lsum += LANE_W(3 * k) * lo + LANE_W(3 * k + 1) * hi + LANE_W(3 * k + 2) * v;
		}
	}
	absorbed = sc->absorbed;
	__u32 claimed = sc->claimed, left = sc->left, lsum = sc->lsum;

	if (!replay) {
		/* Our PENDING entry: nobody else writes it; the final state is
		 * published under the lock, after the mask. */
#pragma unroll
		for (int w = 0; w < INC_KV_MASK_WORDS; w++)
			e->mask[w] = sc->mask[w];
		bpf_spin_lock(&fl->lock);
		if (e->psn == psn) {
			e->absorbed = absorbed;
			e->state = left ? INC_KV_PARTIAL : INC_KV_ALL;
		}
		bpf_spin_unlock(&fl->lock);
	}
	if (st) {
		if (replay) {
			st->kv_resent++;
		} else {
			st->kv_absorbed += absorbed;
			st->kv_claimed += claimed;
			st->kv_leftover += left;
		}
	}
	if (!left) {
		if (st)
			st->kv_acks++;
		return kv_ack(ctx, pk->eth, pk->ip, pk->udp, h, absorbed);
	}
	if (st)
		st->kv_to_reducer++;
	if (left > INC_KV_MAX_TUPLES)
		return XDP_DROP; /* cannot happen: left <= nt */
	h->flags = (h->flags & INC_F_RETRANS) | (absorbed ? INC_F_KV_PARTIAL : 0);
	h->slot = absorbed;
	h->numel = left * INC_KV_TUPLE_WORDS;
	h->bitmap = 0;
	inc_csum_set(h, lsum);
	/* The leftovers only: cut the absorbed tuples (now at the end) off. */
	__u32 inc_len = sizeof(*h) + left * sizeof(struct inc_kv_tuple);
	pk->ip->tot_len = htons(sizeof(struct iphdr) + sizeof(struct udphdr) + inc_len);
	pk->udp->len = htons(sizeof(struct udphdr) + inc_len);
	readdress(pk->eth, pk->ip, pk->udp, red); /* recomputes the IP checksum */
	int keep = sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + inc_len;
	int cut = (int)((long)ctx->data_end - (long)ctx->data) - keep;
	if (cut > 0 && bpf_xdp_adjust_tail(ctx, -cut))
		return XDP_DROP;
	return bpf_redirect(red->ifindex, 0);
}

#endif /* INC_MODE_KV_H */
