/* Bounds-checked header parsing for XDP (after xdp-tutorial's parsing_helpers.h).
 * Each helper checks the packet range it returns, so callers touch only what the
 * verifier has seen checked. */
#ifndef INC_PARSING_H
#define INC_PARSING_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>

/* Keeps clang from folding the pointer into pkt_end arithmetic, which the
 * verifier rejects. */
#ifndef barrier_var
#define barrier_var(v) asm volatile("" : "+r"(v))
#endif

struct cursor {
	void *pos;
	void *end;
};

static __always_inline struct ethhdr *parse_eth(struct cursor *c)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > c->end)
		return 0;
	c->pos = eth + 1;
	return eth;
}

/* IPv4 without options only: INC senders never set options, and a fixed
 * header keeps the rewrite and checksum code simple. */
static __always_inline struct iphdr *parse_ipv4(struct cursor *c)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > c->end)
		return 0;
	c->pos = ip + 1;
	return ip;
}

static __always_inline struct udphdr *parse_udp(struct cursor *c)
{
	struct udphdr *udp = c->pos;
	if ((void *)(udp + 1) > c->end)
		return 0;
	c->pos = udp + 1;
	return udp;
}

/* The UDP header of an IPv4 (no options) UDP frame, cursor past it; 0 for
 * anything else. The host programs' first step (host_rx, ps_fast). */
static __always_inline struct udphdr *parse_ipv4_udp(struct cursor *c, struct ethhdr **eth,
						     struct iphdr **ip)
{
	*eth = parse_eth(c);
	if (!*eth || (*eth)->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	*ip = parse_ipv4(c);
	if (!*ip || (*ip)->ihl != 5 || (*ip)->protocol != IPPROTO_UDP)
		return 0;
	return parse_udp(c);
}

static __always_inline __u16 ipv4_csum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *w = (__u16 *)ip;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

#endif
