/* INC switch dataplane: allreduce in XDP (modulo and hash addressing) and
 * key-value aggregation, the program entry points.
 *
 * xdp_inc_ingress runs on every switch port: it admits INC packets (inc_entry.h)
 * and tail-calls its job's mode program, xdp_inc_modulo (mode_modulo.h),
 * xdp_inc_hash and xdp_inc_hash_from_ps (mode_hash.h), xdp_inc_kv
 * (mode_kv.h), xdp_inc_jumbo (mode_jumbo.h) or, on a leaf, xdp_inc_down (mode_tier.h). xdp_inc_egress, the devmap egress program, delivers broadcast
 * results to each port's members. The wire format is inc_proto.h, the maps'
 * value structs inc_state.h, the maps inc_maps.h.
 *
 * Built by incd with bcc as one translation unit: -I bpf, optional
 * -DINC_POOL_SLOTS=N, -DINC_KV_COLS=N, -DINC_PIN_DIR="...".
 */
#include <uapi/linux/bpf.h>
#include "parsing.h"
#include "inc_proto.h"
#include "inc_state.h"
#include "inc_maps.h"
#include "csum_helpers.h"
#include "lane_loops.h"
#include "rewrite_helpers.h"
#include "kv_agg.h"
#include "inc_entry.h"
#include "mode_modulo.h"
#include "mode_hash.h"
#include "mode_kv.h"
#include "mode_bcast.h"
#include "mode_jumbo.h"

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
	int jumbo = rc == PARSE_JUMBO;
	if (rc != PARSE_OK && !jumbo)
		return drop(0, rc - 1);
	struct inc_hdr *h = pk.h;
	__u32 job_id = h->job;
	/* A jumbo frame's lanes are checked as its program loads them. */
	if (!jumbo && !inc_csum_ok(h, pk.payload, pk.end, h->numel)) {
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
	if (job->tier == INC_TIER_LEAF && h->type == INC_T_RESULT && !jumbo)
		return tier_enter_down(ctx, &pk, job_id, job);
	if (jumbo && (job->mode != INC_MODE_MODULO || job->tier != INC_TIER_ONE))
		return drop(0, INC_DROP_BAD_HDR); /* jumbo frames are single-switch modulo jobs' */
	if (!kv && !jumbo && h->type != INC_T_DATA && job->mode != INC_MODE_HASH)
		return drop(0, INC_DROP_BAD_HDR); /* only a hash job's PS (or a leaf's spine) sends results in */
	/* From a rank (a mapper's flow id in KV); a jumbo result on its chain too. */
	int data = h->type == INC_T_DATA || kv || jumbo;
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
	if (job->tier != INC_TIER_ONE && job->mode == INC_MODE_MODULO)
		prog = job->tier == INC_TIER_LEAF ? INC_PROG_LEAF : INC_PROG_SPINE;
	if (jumbo)
		prog = INC_PROG_JUMBO;
	else if (h->flags & INC_F_BCAST) {
		if (job->mode != INC_MODE_MODULO || !data || job->tier != INC_TIER_ONE)
			return drop(job_id, INC_DROP_BAD_HDR); /* broadcasts are single-switch modulo jobs' */
		prog = INC_PROG_BCAST;
	}
	mode_progs.call(ctx, prog);
	return drop(job_id, INC_DROP_NO_JOB); /* no program for this mode */
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
	return modulo_data(ctx, pk.eth, pk.ip, pk.udp, pk.h, pk.payload, pk.end, job_id, job, st, INC_TIER_ONE);
}

int xdp_inc_leaf(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || job->tier != INC_TIER_LEAF)
		return XDP_DROP;
	return modulo_data(ctx, pk.eth, pk.ip, pk.udp, pk.h, pk.payload, pk.end, job_id, job, st, INC_TIER_LEAF);
}

int xdp_inc_spine(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || job->tier != INC_TIER_SPINE)
		return XDP_DROP;
	return modulo_data(ctx, pk.eth, pk.ip, pk.udp, pk.h, pk.payload, pk.end, job_id, job, st, INC_TIER_SPINE);
}

int xdp_inc_down(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || pk.h->type != INC_T_RESULT || job->tier != INC_TIER_LEAF)
		return XDP_DROP;
	return tier_down(ctx, &pk, job_id, job, st);
}

int xdp_inc_bcast(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || pk.h->type != INC_T_DATA || job->mode != INC_MODE_MODULO)
		return XDP_DROP;
	return modulo_bcast(ctx, pk.eth, pk.ip, pk.udp, pk.h, pk.end, job_id, job, st);
}

int xdp_inc_jumbo(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode_as(ctx, &pk, &job_id, &job, &st, PARSE_JUMBO) || job->mode != INC_MODE_MODULO)
		return XDP_DROP;
	if (pk.h->type == INC_T_JRESULT)
		return jumbo_chain(pk.eth, pk.ip, pk.udp, pk.h, job_id, job, st);
	return jumbo_begin(ctx, pk.h, job_id, st);
}

int xdp_inc_jumbo_add(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_jumbo_data(ctx, &pk, &job_id, &job, &st))
		return XDP_DROP;
	return jumbo_step(ctx, pk.h, job_id, job, st);
}

int xdp_inc_jumbo_out(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_jumbo_data(ctx, &pk, &job_id, &job, &st))
		return XDP_DROP;
	return jumbo_out(ctx, &pk, job_id, job, st);
}

int xdp_inc_kv(struct xdp_md *ctx)
{
	struct inc_pkt pk;
	__u32 job_id;
	struct inc_job *job;
	struct inc_stats *st;
	if (enter_mode(ctx, &pk, &job_id, &job, &st) || pk.h->type != INC_T_KV)
		return XDP_DROP;
	return kv_data(ctx, &pk, job_id, job, st);
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

	if ((h->flags & (INC_F_BCAST | INC_F_NO_LANES)) == INC_F_BCAST && h->rank == m->rank)
		return XDP_DROP; /* the root's own broadcast data: it waits for the completion */
	struct inc_stats *st = stats_of(h->job);
	if (st)
		st->results_mcast++;
	__u32 jid = h->job;
	struct inc_job *job = jobs.lookup(&jid);
	int spine = job && job->tier == INC_TIER_SPINE; /* its members are leaves: the bitmap names ranks below them */
	if (!spine && (h->flags & INC_F_SELECT) && h->type == INC_T_RESULT && !((h->bitmap >> (m->rank & 63)) & 1)) {
		/* Not one of the ranks the senders named (reduce to a root, a rank's
		 * shard): it learns that the psn is complete, without the lanes. */
		int cut = (int)((void *)c.end - (void *)(h + 1));
		h->rank = m->rank;
		h->flags |= INC_F_NO_LANES;
		header_only(ip, udp, h);
		readdress(eth, ip, udp, m);
		if (cut > 0 && bpf_xdp_adjust_tail(ctx, -(cut & 0x3fff)))
			return XDP_DROP;
		return XDP_PASS;
	}
	readdress(eth, ip, udp, m);
	h->csum = csum_after_rank(h->csum, h->rank, m->rank);
	h->rank = m->rank;
	return XDP_PASS;
}
