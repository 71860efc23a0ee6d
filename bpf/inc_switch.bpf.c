/* INC switch dataplane: allreduce in XDP, in two addressing modes.
 *
 * xdp_inc_ingress runs on every switch port. Contributions are added into an
 * aggregator slot under the slot's spin lock (DESIGN §4: cheaper than per-lane
 * atomics).
 *
 * Modulo mode (NetReduce): slot = offset + psn % slots. The last contributor's
 * packet leaves with the sum and is broadcast through tx_ports; xdp_inc_egress,
 * the devmap egress program, keeps the copies for ports where the job has a
 * member and rewrites their Ethernet/IP/UDP headers for that member.
 *
 * Hash mode (ATP): the host computes the slot. A slot is tagged (job, gen,
 * psn); packets that find it held by another tag go to the job's parameter
 * server (PS) untouched; a complete slot sends its sum to the PS and stays
 * held until the PS's result crosses the switch (the ACK), which frees it and
 * is broadcast to the workers. Resends never add into a slot: they evict a
 * partial aggregate of their own psn towards the PS, or pass through, and the
 * PS, which gets a bitmap of contributors with every aggregate, counts each
 * rank once.
 *
 * Built by incd with bcc: -I bpf, optional -DINC_POOL_SLOTS=N.
 */
#include <uapi/linux/bpf.h>
#include "parsing.h"
#include "inc_proto.h"

#ifndef INC_POOL_SLOTS
#define INC_POOL_SLOTS INC_POOL_SLOTS_DEFAULT
#endif
#ifndef INC_KV_COLS
#define INC_KV_COLS INC_KV_COLS_DEFAULT
#endif

/* incd builds with -DINC_PIN_DIR="/sys/fs/bpf/<instance>": every map, the tail
 * call table included, is then pinned there, or reused if already pinned. The
 * pins keep the switch aggregating while incd is down (a prog array loses its
 * entries when its last user reference goes), and let a restarted incd adopt
 * the running jobs' state. */
#ifdef INC_PIN_DIR
#define INC_TABLE(type, key, leaf, name, n) \
	BPF_TABLE_PINNED(type, key, leaf, name, n, INC_PIN_DIR "/" #name)
#define INC_PINNED(type, name) type ":" INC_PIN_DIR "/" #name
#else
#define INC_TABLE(type, key, leaf, name, n) BPF_TABLE(type, key, leaf, name, n)
#define INC_PINNED(type, name) type
#endif

INC_TABLE("array", int, struct inc_job, jobs, INC_MAX_JOBS);
INC_TABLE("array", int, struct inc_slot, pool, INC_POOL_SLOTS);
INC_TABLE("hash", struct inc_member_key, struct inc_member, members, INC_MAX_JOBS * 4);
INC_TABLE("array", int, struct inc_member, job_ps, INC_MAX_JOBS); /* hash mode: the job's PS (ifindex 0 = none) */
INC_TABLE("array", int, struct inc_source, sources, INC_MAX_JOBS * INC_MAX_WORKERS);
INC_TABLE("percpu_array", int, struct inc_stats, stats, INC_MAX_JOBS);
/* Key-value mode: two copies (epochs) of a rows x columns aggregator array, and
 * per (job, flow) the psns already absorbed. */
INC_TABLE("array", int, struct inc_kv_agg, kv_pool, 2 * INC_KV_COLS * INC_KV_ROWS);
INC_TABLE("hash", struct inc_kv_flow_key, struct inc_kv_flow, kv_flows, INC_KV_MAX_FLOWS);
BPF_XDP_REDIRECT_MAP(INC_PINNED("devmap", tx_ports), struct bpf_devmap_val, tx_ports, INC_MAX_PORTS);

/* Keeps clang from folding the pointer into pkt_end arithmetic, which the
 * verifier rejects. */
#define barrier_var(v) asm volatile("" : "+r"(v))

enum verdict_kind {
	V_CONSUMED,
	V_MCAST,
	V_RETX,
	V_DROP,
	V_PS_PASS,      /* hash: the worker's own packet to the PS */
	V_PS_AGG,       /* hash: a complete aggregate to the PS */
	V_PS_PARTIAL,   /* hash: a partial aggregate evicted by a resend, to the PS */
};

static __always_inline struct inc_stats *stats_of(__u32 job)
{
	return stats.lookup(&job);
}

static __always_inline int drop(__u32 job, int reason)
{
	struct inc_stats *st = stats_of(job);
	if (st && reason >= 0 && reason < INC_DROP__COUNT)
		st->drops[reason]++;
	return XDP_DROP;
}

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

/* Integrity (inc_hdr.csum): the 32-bit words of header and lanes sum to 0 mod
 * 2^32. A plain sum catches every single-bit error and costs one add per lane,
 * and it is fused into the loops that write lanes, so a packet the switch
 * rewrites gets its new csum without another pass. Real links have a CRC;
 * veth and software impairments do not, and XDP never sees the UDP checksum
 * verified (senders leave it to offload), so the switch checks this itself. */
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

static __always_inline void lanes_claim(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	FOR_EACH_LANE(p, end, n, s->lanes[k] = *q);
}

/* Adds the packet into the slot and leaves the running sum in the packet, so
 * the last contributor's packet already carries the result. */
static __always_inline int lanes_sum(struct inc_slot *s, __s32 *p, void *end, __u32 n, __u32 *tot)
{
	__s32 ovf = 0;
	__u32 t = 0;
	FOR_EACH_LANE(p, end, n, {
		__s32 a = s->lanes[k];
		__s32 b = *q;
		__s32 r = (__s32)((__u32)a + (__u32)b);
		ovf |= (a ^ r) & (b ^ r);
		s->lanes[k] = r;
		*q = r;
		t += (__u32)r;
	});
	*tot = t;
	return ovf < 0;
}

static __always_inline __u32 lanes_max(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	__u32 t = 0;
	FOR_EACH_LANE(p, end, n, {
		__s32 a = s->lanes[k];
		__s32 b = *q;
		__s32 r = a > b ? a : b;
		s->lanes[k] = r;
		*q = r;
		t += (__u32)r;
	});
	return t;
}

/* Returns the sum of the lanes written (for the packet's new csum). */
static __always_inline __u32 lanes_copy_out(struct inc_slot *s, __s32 *p, void *end, __u32 n)
{
	__u32 t = 0;
	FOR_EACH_LANE(p, end, n, {
		__s32 r = s->lanes[k];
		*q = r;
		t += (__u32)r;
	});
	return t;
}

/* Starts a round in s with its first contribution. Returns 1 if that
 * completes it (a one-worker job). Called with s->lock held. */
static __always_inline int slot_claim(struct inc_slot *s, __u32 job_id, __u16 gen, __u32 psn,
				      __u64 bit, __u8 op, __u32 n, __u64 now, __s32 *payload,
				      void *end, __u8 world)
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

/* Readdress a packet to a host (member or PS) behind a switch port. */
static __always_inline void readdress(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp,
				      struct inc_member *m)
{
	__builtin_memcpy(eth->h_dest, m->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, m->port_mac, ETH_ALEN);
	ip->saddr = m->switch_addr;
	ip->daddr = m->addr;
	ip->check = ipv4_csum(ip);
	udp->source = htons(INC_PORT);
	udp->dest = m->port;
	udp->check = 0;
}

/* Back the way it came: swapped addresses keep the IP checksum valid. */
static __always_inline void swap_addresses(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp)
{
	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
	__be32 a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	__be16 p = udp->source;
	udp->source = udp->dest;
	udp->dest = p;
}

static __always_inline int hash_data(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				     struct udphdr *udp, struct inc_hdr *h, __s32 *payload,
				     void *end, __u32 job_id, struct inc_job *job,
				     struct inc_stats *st)
{
	__u32 n = h->numel, psn = h->psn, rank = h->rank;
	__u32 idx = h->slot;
	if (idx < job->offset || idx - job->offset >= job->slots)
		return drop(job_id, INC_DROP_BAD_SLOT);
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_BAD_SLOT);

	/* Whether the slot's current owner still exists must be known before the
	 * lock (no helper calls under it); the owner is re-checked inside. */
	__u32 owner = s->job;
	__u16 owner_gen = 0;
	struct inc_job *oj = jobs.lookup(&owner);
	if (oj && oj->mode != 0)
		owner_gen = oj->gen;
	__u64 now = bpf_ktime_get_ns();
	__u64 bit = 1ULL << rank;
	__u8 world = job->world;
	__u16 gen = job->gen;
	int resend = h->flags & INC_F_RETRANS;
	int verdict = V_DROP, reason = INC_DROP_DUP, collision = 0, reclaimed = 0, overflow = 0;
	__u64 agg_bitmap = bit;
	__u32 tot = lanes_sum_of_verified(hdr_words(h)); /* what the lanes add up to when it leaves */

	bpf_spin_lock(&s->lock);
	int mine = s->state != INC_SLOT_EMPTY && s->job == job_id && s->gen == gen && s->psn == psn;
	if (mine) {
		if (resend) {
			/* Its sender has no result yet: hand what the slot holds to the
			 * PS. A partial is evicted, so it can never be added to twice. */
			tot = lanes_copy_out(s, payload, end, n);
			agg_bitmap = s->bitmap;
			overflow = s->overflow;
			if (s->state == INC_SLOT_COMPLETE) {
				verdict = V_PS_AGG;
			} else {
				s->state = INC_SLOT_EMPTY;
				verdict = V_PS_PARTIAL;
			}
		} else if (s->bitmap & bit) {
			reason = INC_DROP_DUP;
		} else if (s->numel != n || s->op != h->op) {
			reason = INC_DROP_BAD_LEN;
		} else if (slot_add(s, h->op, bit, payload, end, n, world, &tot)) {
			agg_bitmap = s->bitmap;
			overflow = s->overflow;
			verdict = V_PS_AGG;
		} else {
			verdict = V_CONSUMED;
		}
	} else {
		int dead_owner = s->job == owner && s->gen != owner_gen;
		int stale = now - s->claimed_ns > INC_SLOT_STALE_NS;
		if (!resend && (s->state == INC_SLOT_EMPTY || dead_owner || stale)) {
			reclaimed = s->state != INC_SLOT_EMPTY;
			verdict = slot_claim(s, job_id, gen, psn, bit, h->op, n, now, payload, end, world)
					  ? V_PS_AGG : V_CONSUMED;
		} else {
			collision = s->state != INC_SLOT_EMPTY;
			verdict = V_PS_PASS;
		}
	}
	bpf_spin_unlock(&s->lock);

	if (st && reclaimed)
		st->reclaims++;
	if (verdict == V_DROP)
		return drop(job_id, reason);
	if (verdict == V_CONSUMED) {
		if (st)
			st->consumed++;
		return XDP_DROP;
	}
	struct inc_member *ps = job_ps.lookup(&job_id);
	if (!ps || ps->ifindex == 0)
		return drop(job_id, INC_DROP_BAD_SOURCE);
	if (st) {
		if (verdict == V_PS_AGG && !resend) {
			st->consumed++;
			st->slots_completed++;
			st->to_ps++;
		} else {
			st->fallbacks++;
		}
		if (collision)
			st->collisions++;
		if (overflow && verdict == V_PS_AGG && !resend)
			st->overflows++;
	}
	if (verdict == V_PS_PASS) {
		h->flags = (h->flags & INC_F_RETRANS) | (collision ? INC_F_COLLISION : 0);
	} else {
		h->flags = INC_F_AGGREGATE | (h->flags & INC_F_RETRANS) | (overflow ? INC_F_OVERFLOW : 0);
	}
	h->bitmap = agg_bitmap;
	inc_csum_set(h, tot);
	readdress(eth, ip, udp, ps);
	return bpf_redirect(ps->ifindex, 0);
}

/* Packets from a hash job's PS: its result for a psn (free the slot if it
 * still holds that psn - the ACK - then broadcast; the egress program delivers
 * to the workers), or an EVICT: a psn the PS got single packets for, whose
 * other contributions may sit in a slot that can now never complete; the
 * partial goes back to the PS with its bitmap and the slot is freed. */
static __always_inline int hash_from_ps(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
					struct udphdr *udp, struct inc_hdr *h, __s32 *payload,
					void *end, __u32 job_id, struct inc_job *job,
					struct inc_stats *st)
{
	struct inc_member *ps = job_ps.lookup(&job_id);
	if (!ps || ps->ifindex == 0 || ps->ifindex != ctx->ingress_ifindex || ps->addr != ip->saddr)
		return drop(job_id, INC_DROP_BAD_SOURCE);
	__u32 idx = h->slot;
	if (idx < job->offset || idx - job->offset >= job->slots)
		return drop(job_id, INC_DROP_BAD_SLOT);
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_BAD_SLOT);
	int evict = h->type == INC_T_EVICT, hit = 0;
	__u32 n = h->numel;
	__u64 bitmap = 0;
	__u32 tot = 0;
	bpf_spin_lock(&s->lock);
	if (s->state != INC_SLOT_EMPTY && s->job == job_id && s->gen == job->gen && s->psn == h->psn) {
		if (!evict) {
			s->state = INC_SLOT_EMPTY;
			hit = 1;
		} else if (s->state == INC_SLOT_PARTIAL && s->numel == n) {
			tot = lanes_copy_out(s, payload, end, n);
			bitmap = s->bitmap;
			s->state = INC_SLOT_EMPTY;
			hit = 1;
		}
	}
	bpf_spin_unlock(&s->lock);
	udp->check = 0;
	if (!evict) {
		if (st && hit)
			st->releases++;
		return tx_ports.redirect_map(0, BPF_F_BROADCAST);
	}
	if (!hit)
		return XDP_DROP; /* nothing (left) to evict: the partial completed or was evicted */
	if (st)
		st->evictions++;
	h->type = INC_T_DATA;
	h->flags = INC_F_AGGREGATE;
	h->bitmap = bitmap;
	inc_csum_set(h, tot);
	readdress(eth, ip, udp, ps);
	return bpf_redirect(ps->ifindex, 0);
}

/* An INC packet whose headers and lanes the verifier has seen checked. */
struct inc_pkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	struct inc_hdr *h;
	__s32 *payload;
	void *end;
};

#define PARSE_OK 0
#define PARSE_PASS (-1)
#define PARSE_DROP(reason) (1 + (reason)) /* reason 0 must not read as OK */

/* PARSE_OK for a well-formed INC packet, PARSE_PASS for anything that is not
 * INC traffic, else PARSE_DROP(reason). */
static __always_inline int parse_inc(struct xdp_md *ctx, struct inc_pkt *pk)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth = parse_eth(&c);
	if (!eth || eth->h_proto != htons(ETH_P_IP))
		return PARSE_PASS;
	struct iphdr *ip = parse_ipv4(&c);
	if (!ip || ip->protocol != IPPROTO_UDP)
		return PARSE_PASS;
	if (ip->ihl != 5)
		return PARSE_PASS; /* could be INC behind IP options: the kernel may have it */
	struct udphdr *udp = parse_udp(&c);
	if (!udp)
		return PARSE_PASS;
	__u16 dport = ntohs(udp->dest);
	if (dport < INC_PORT_MIN || dport > INC_PORT_MAX)
		return PARSE_PASS;
	/* From here on the packet is ours: it is aggregated, answered or dropped. */
	if (ip->frag_off & htons(0x3fff))
		return PARSE_DROP(INC_DROP_BAD_HDR);
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return PARSE_DROP(INC_DROP_BAD_HDR);
	if (h->version != INC_VERSION || h->op > INC_OP_MAX ||
	    h->type < INC_T_DATA || h->type > INC_T_KV)
		return PARSE_DROP(INC_DROP_BAD_HDR);
	pk->h = h; /* set early: length errors are charged to the job */
	__u32 n = h->numel;
	__s32 *payload = (__s32 *)(h + 1);
	if (n == 0 || n > INC_MAX_ELEMS)
		return PARSE_DROP(INC_DROP_BAD_LEN);
	void *pend = (void *)payload + n * 4;
	barrier_var(pend);
	if (pend > c.end)
		return PARSE_DROP(INC_DROP_BAD_LEN);
	pk->eth = eth;
	pk->ip = ip;
	pk->udp = udp;
	pk->h = h;
	pk->payload = payload;
	pk->end = c.end;
	return PARSE_OK;
}

/* One program per mode, entered by tail call: each is verified on its own,
 * which keeps the verifier's work (800-lane loops on every path) in bounds. */
INC_TABLE("prog", u32, u32, mode_progs, INC_MODE_PROGS);

int xdp_inc_ingress(struct xdp_md *ctx)
{
	struct inc_pkt pk = {};
	int rc = parse_inc(ctx, &pk);
	if (rc == PARSE_PASS)
		return XDP_PASS;
	if (rc == PARSE_DROP(INC_DROP_BAD_LEN) && pk.h) {
		__u32 j = pk.h->job;
		struct inc_job *jj = jobs.lookup(&j);
		return drop(jj && jj->mode ? j : 0, INC_DROP_BAD_LEN);
	}
	if (rc != PARSE_OK)
		return drop(0, rc - 1);
	struct inc_hdr *h = pk.h;
	__u32 job_id = h->job;
	if (!inc_csum_ok(h, pk.payload, pk.end, h->numel)) {
		/* nothing in it can be trusted, the job id included */
		struct inc_job *jj = jobs.lookup(&job_id);
		return drop(jj && jj->mode ? job_id : 0, INC_DROP_BAD_CSUM);
	}
	if (job_id == 0 || job_id >= INC_MAX_JOBS)
		return drop(0, INC_DROP_NO_JOB);
	struct inc_job *job = jobs.lookup(&job_id);
	if (!job || job->mode == 0 || job->slots == 0)
		return drop(0, INC_DROP_NO_JOB);
	int kv = job->mode == INC_MODE_KV;
	if ((h->type == INC_T_KV) != kv)
		return drop(0, INC_DROP_BAD_HDR); /* key-value packets for key-value jobs only */
	if (!kv && h->type != INC_T_DATA && job->mode != INC_MODE_HASH)
		return drop(0, INC_DROP_BAD_HDR); /* only a hash job's PS sends results in */
	int data = h->type == INC_T_DATA || kv; /* from a rank (a mapper's flow id in KV) */
	struct inc_stats *st = stats_of(job_id);
	if (st)
		st->pkts_in++;
	if (h->gen != job->gen)
		return drop(job_id, INC_DROP_BAD_GEN);
	if (data && (h->rank >= job->world || h->rank >= INC_MAX_WORKERS))
		return drop(job_id, INC_DROP_BAD_RANK);
	if (data) {
		/* Only the rank's registered host, behind its registered port. */
		__u32 sidx = job_id * INC_MAX_WORKERS + h->rank;
		struct inc_source *src = sources.lookup(&sidx);
		if (!src || src->addr == 0 || src->addr != pk.ip->saddr ||
		    src->port != pk.udp->source || src->ifindex != ctx->ingress_ifindex)
			return drop(job_id, INC_DROP_BAD_SOURCE);
	}
	/* Each program holds a few 800-lane loops at most, so each passes the
	 * verifier on its own. */
	__u32 prog = job->mode;
	if (job->mode == INC_MODE_HASH && h->type != INC_T_DATA)
		prog = INC_PROG_HASH_FROM_PS;
	mode_progs.call(ctx, prog);
	return drop(job_id, INC_DROP_NO_JOB); /* no program for this mode */
}

/* Re-derives what the dispatcher checked: tail calls keep no stack. */
static __always_inline int enter_mode(struct xdp_md *ctx, struct inc_pkt *pk, __u32 *job_id,
				      struct inc_job **job, struct inc_stats **st)
{
	if (parse_inc(ctx, pk) != PARSE_OK)
		return -1;
	*job_id = pk->h->job;
	*job = jobs.lookup(job_id);
	if (!*job || pk->h->rank >= INC_MAX_WORKERS)
		return -1;
	*st = stats_of(*job_id);
	return 0;
}

int xdp_inc_hash(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || pk.h->type != INC_T_DATA)
		return XDP_DROP;
	return hash_data(ctx, pk.eth, pk.ip, pk.udp, pk.h, pk.payload, pk.end, job_id, job, st);
}

int xdp_inc_hash_from_ps(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || pk.h->type == INC_T_DATA)
		return XDP_DROP;
	return hash_from_ps(ctx, pk.eth, pk.ip, pk.udp, pk.h, pk.payload, pk.end, job_id, job, st);
}

int xdp_inc_modulo(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st))
		return XDP_DROP;
	struct ethhdr *eth = pk.eth;
	struct iphdr *ip = pk.ip;
	struct udphdr *udp = pk.udp;
	struct inc_hdr *h = pk.h;
	__s32 *payload = pk.payload;
	struct cursor c = { .pos = payload, .end = pk.end };
	__u32 n = h->numel;
	__u32 rank = h->rank;
	__u32 psn = h->psn;
	__u32 idx = job->offset + psn % job->slots;
	struct inc_slot *s = pool.lookup(&idx);
	if (!s)
		return drop(job_id, INC_DROP_NO_JOB);

	__u64 bit = 1ULL << rank;
	__u8 world = job->world;
	__u16 gen = job->gen;
	__u64 now = bpf_ktime_get_ns();
	int verdict = V_DROP, reason = INC_DROP_STALE, overflow = 0;
	__u32 tot = lanes_sum_of_verified(hdr_words(h)); /* what the lanes add up to when it leaves */

	bpf_spin_lock(&s->lock);
	int owned = s->job == job_id && s->gen == gen && s->state != INC_SLOT_EMPTY;
	int newer = (__s32)(psn - s->psn) > 0;
	if (!owned || (newer && s->state == INC_SLOT_COMPLETE)) {
		/* First contributor of this round: the previous round (psn - slots)
		 * completed, and every worker got its result before anyone could
		 * send this psn, because windows are half the region. */
		verdict = slot_claim(s, job_id, gen, psn, bit, h->op, n, now, payload, c.end, world)
				  ? V_MCAST : V_CONSUMED;
	} else if (s->psn == psn) {
		if (s->numel != n || s->op != h->op) {
			reason = INC_DROP_BAD_LEN;
		} else if (s->bitmap & bit) {
			if (s->state == INC_SLOT_COMPLETE) {
				/* Its result was lost: answer from the stored sum. */
				tot = lanes_copy_out(s, payload, c.end, n);
				overflow = s->overflow;
				verdict = V_RETX;
			} else {
				reason = INC_DROP_DUP;
			}
		} else if (slot_add(s, h->op, bit, payload, c.end, n, world, &tot)) {
			overflow = s->overflow;
			verdict = V_MCAST;
		} else {
			verdict = V_CONSUMED;
		}
	} else {
		reason = newer ? INC_DROP_AHEAD : INC_DROP_STALE;
	}
	bpf_spin_unlock(&s->lock);

	if (verdict == V_DROP)
		return drop(job_id, reason);
	if (verdict == V_CONSUMED) {
		if (st)
			st->consumed++;
		return XDP_DROP;
	}

	h->type = INC_T_RESULT;
	h->flags = overflow ? INC_F_OVERFLOW : 0;
	inc_csum_set(h, tot);
	udp->check = 0; /* payload rewritten; 0 = no checksum is valid for IPv4 UDP */
	if (verdict == V_RETX) {
		/* Unicast back the way it came; swapping addresses keeps the IP checksum. */
		swap_addresses(eth, ip, udp);
		if (st)
			st->retrans_answered++;
		/* Not XDP_TX: on veth, XDP_TX only wakes the peer's NAPI when the peer
		 * runs XDP itself, so with GRO alone the answer would sit in the peer's
		 * ring until some later redirect flushed it - at the end of a job,
		 * never. A redirect back out of the ingress port flushes properly. */
		return bpf_redirect(ctx->ingress_ifindex, 0);
	}
	if (st) {
		st->consumed++;
		st->slots_completed++;
		if (overflow)
			st->overflows++;
	}
	/* No BPF_F_EXCLUDE_INGRESS: the last contributor needs the result too. */
	return tx_ports.redirect_map(0, BPF_F_BROADCAST);
}

int xdp_inc_egress(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth = parse_eth(&c);
	if (!eth)
		return XDP_DROP;
	struct iphdr *ip = parse_ipv4(&c);
	if (!ip)
		return XDP_DROP;
	struct udphdr *udp = parse_udp(&c);
	if (!udp)
		return XDP_DROP;
	struct inc_hdr *h = c.pos;
	if ((void *)(h + 1) > c.end)
		return XDP_DROP;

	struct inc_member_key key = { .job = h->job, .ifindex = ctx->egress_ifindex };
	struct inc_member *m = members.lookup(&key);
	if (!m)
		return XDP_DROP; /* the job has nobody behind this port */

	readdress(eth, ip, udp, m);
	h->csum += (__u32)h->rank - (__u32)m->rank; /* keeps the words' sum at 0 */
	h->rank = m->rank;

	struct inc_stats *st = stats_of(h->job);
	if (st)
		st->results_mcast++;
	return XDP_PASS;
}

/* --- Key-value mode (word count) ------------------------------------------
 *
 * See inc_proto.h for the wire format. Per packet: the flow's seen entry for
 * the psn is taken under the flow's lock (new psn -> PENDING; one already
 * absorbed -> re-ACK, or replay of the same leftovers to the reducer; one still
 * PENDING on another CPU -> drop as dup; one older than the ring -> drop, its
 * sender had its ACK long ago because a mapper's window is at most
 * INC_KV_WINDOW). Then each tuple is claimed/added with 64-bit atomics on its
 * aggregator, no lock: a drain of the other epoch never runs concurrently
 * (incd waits a grace period after flipping the epoch). */

/* Per packet working state of the tuple loop. Kept in a per-CPU map rather
 * than in registers: the verifier does not track values in map memory, so the
 * loop's paths (absorbed or not) meet again at the loop head and are pruned;
 * with exact counters in registers they never do (266 tuples: too complex). */
struct kv_scratch {
	__u32 absorbed;
	__u32 claimed;
	__u32 left;
	__u32 lsum;
	__u64 mask[INC_KV_MASK_WORDS];
};
BPF_TABLE("percpu_array", int, struct kv_scratch, kv_scratch, 1);

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
	h->numel = 0;
	h->slot = absorbed;
	h->bitmap = 0;
	inc_csum_set(h, 0);
	swap_addresses(eth, ip, udp);
	ip->tot_len = htons(sizeof(*ip) + sizeof(*udp) + sizeof(*h));
	ip->check = ipv4_csum(ip);
	udp->len = htons(sizeof(*udp) + sizeof(*h));
	udp->check = 0;
	int keep = sizeof(*eth) + sizeof(*ip) + sizeof(*udp) + sizeof(*h);
	int cut = (int)((long)ctx->data_end - (long)ctx->data) - keep;
	if (cut > 0 && bpf_xdp_adjust_tail(ctx, -cut))
		return XDP_DROP;
	/* Not XDP_TX: see the retransmission answer of modulo mode. */
	return bpf_redirect(ctx->ingress_ifindex, 0);
}

int xdp_inc_kv(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || pk.h->type != INC_T_KV)
		return XDP_DROP;
	struct inc_hdr *h = pk.h;
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
		return kv_ack(ctx, pk.eth, pk.ip, pk.udp, h, absorbed);
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
	struct inc_kv_tuple *tp = (struct inc_kv_tuple *)pk.payload;
	for (__u32 i = 0; i < INC_KV_MAX_TUPLES; i++) {
		if (i >= nt)
			break;
		struct inc_kv_tuple *t = tp + i;
		barrier_var(t);
		if ((void *)(t + 1) > pk.end)
			break;
		__u64 key = ((__u64)t->key_hi << 32) | t->key_lo;
		__u64 bit = 1ULL << (i & 63);
		int took;
		if (replay) {
			took = (sc->mask[i >> 6] & bit) != 0;
		} else if (key == 0) {
			took = 1; /* no tuple: nothing to add, nothing to pass on */
			sc->mask[i >> 6] |= bit;
			sc->absorbed++;
		} else {
			__u32 idx = base + (col0 + inc_kv_col(key) % cpp) * INC_KV_ROWS + i;
			struct inc_kv_agg *a = kv_pool.lookup(&idx);
			took = 0;
			if (a) {
				__u64 old = a->key;
				if (old == 0)
					old = __sync_val_compare_and_swap(&a->key, 0, key);
				if (old == 0 || old == key) {
					__sync_fetch_and_add(&a->value, (__s64)t->value);
					if (old == 0)
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
				if ((void *)(d + 1) <= pk.end) {
					d->key_lo = lo;
					d->key_hi = hi;
					d->value = (__s32)v;
				}
			}
			sc->left = k + 1;
			sc->lsum += lo + hi + v;
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
		return kv_ack(ctx, pk.eth, pk.ip, pk.udp, h, absorbed);
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
	pk.ip->tot_len = htons(sizeof(struct iphdr) + sizeof(struct udphdr) + inc_len);
	pk.udp->len = htons(sizeof(struct udphdr) + inc_len);
	readdress(pk.eth, pk.ip, pk.udp, red); /* recomputes the IP checksum */
	int keep = sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + inc_len;
	int cut = (int)((long)ctx->data_end - (long)ctx->data) - keep;
	if (cut > 0 && bpf_xdp_adjust_tail(ctx, -cut))
		return XDP_DROP;
	return bpf_redirect(red->ifindex, 0);
}
