/* Packet address rewrites of the switch (after xdp-tutorial's rewrite_helpers.h). */
#ifndef INC_REWRITE_HELPERS_H
#define INC_REWRITE_HELPERS_H

#include "parsing.h"
#include "inc_state.h"
#include "csum_helpers.h"

/* The INC part becomes its header alone, csum sealed (after every other
 * header change); the caller trims the frame and fixes the IP checksum. */
static __always_inline void header_only(struct iphdr *ip, struct udphdr *udp, struct inc_hdr *h)
{
	h->numel = 0;
	inc_csum_set(h, 0);
	ip->tot_len = htons(sizeof(*ip) + sizeof(*udp) + sizeof(*h));
	udp->len = htons(sizeof(*udp) + sizeof(*h));
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

#endif /* INC_REWRITE_HELPERS_H */
