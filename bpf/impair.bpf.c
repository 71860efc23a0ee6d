// SPDX-License-Identifier: GPL-2.0
/*
 * Link impairments for the netns lab, attached with tc (clsact, direct action)
 * to the host end of every lab link.
 *
 * This kernel has no netem and no gact, so random loss and reordering are
 * built from what it has: a BPF classifier that drops with
 * bpf_get_prandom_u32(), and a mark (skb->priority) that steers a fraction of
 * egress packets into a slow HTB class, so later packets overtake them.
 *
 * Only IPv4 UDP is impaired: ARP, ICMP and TCP (control traffic, ssh,
 * daemon API) stay clean so the lab itself keeps working under heavy loss.
 *
 * Compiled by bcc at `inc-lab up` time; parameters come as -D flags:
 *   LOSS_PPM      drop probability per direction, parts per million
 *   REORDER_PPM   egress only: fraction sent through the slow class
 *   SLOW_CLASSID  HTB class for the slow path, TC_H_MAKE(major << 16, minor);
 *                 tc spells class ids in hex, so "1:20" is 0x10020
 *
 * Both programs return TC_ACT_UNSPEC for packets they keep: in direct-action
 * mode that means "continue with the next filter", which lets the ingress
 * side be followed by the u32 + mirred filter that feeds the IFB shaper.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#ifndef LOSS_PPM
#define LOSS_PPM 0
#endif
#ifndef REORDER_PPM
#define REORDER_PPM 0
#endif
#ifndef SLOW_CLASSID
#define SLOW_CLASSID 0x10020 /* tc class 1:20 */
#endif

#define PPM 1000000u

static __always_inline int is_ipv4_udp(struct __sk_buff *skb)
{
	__u8 proto;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	/* load_bytes works whether or not the header is in the linear part */
	if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, protocol),
			       &proto, sizeof(proto)) < 0)
		return 0;
	return proto == IPPROTO_UDP;
}

static __always_inline int chance_ppm(__u32 ppm)
{
	return ppm > 0 && (ppm >= PPM || bpf_get_prandom_u32() % PPM < ppm);
}

int impair_egress(struct __sk_buff *skb)
{
	if (!is_ipv4_udp(skb))
		return TC_ACT_UNSPEC;
	if (chance_ppm(LOSS_PPM))
		return TC_ACT_SHOT;
	if (chance_ppm(REORDER_PPM))
		skb->priority = SLOW_CLASSID;
	return TC_ACT_UNSPEC;
}

int impair_ingress(struct __sk_buff *skb)
{
	if (!is_ipv4_udp(skb))
		return TC_ACT_UNSPEC;
	if (chance_ppm(LOSS_PPM))
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}
