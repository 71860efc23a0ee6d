// SPDX-License-Identifier: GPL-2.0
/*
 * Link impairments for the netns lab, attached with tc (clsact, direct action)
 * to the host end of every lab link.
 *
 * This kernel has no netem and no gact, so the faults are built from what it
 * has: BPF classifiers, HTB, IFB and mirred.
 *
 *   loss      drop with bpf_get_prandom_u32()                    (IPv4 UDP)
 *   dup       bpf_clone_redirect() of the packet to its own device, the same
 *             direction; the copy comes through here again, marked, and is
 *             not duplicated or dropped a second time                 (IPv4 UDP)
 *   corrupt   flip one random bit of the UDP payload. The UDP checksum is
 *             left alone: host senders leave it to offload (veth never fills
 *             it in) and the switch zeroes it, so nothing below the INC
 *             header's own csum can notice; skb->csum is kept consistent
 *             (BPF_F_RECOMPUTE_CSUM) so the kernel does not report a
 *             hardware checksum failure                               (IPv4 UDP)
 *   reorder   a mark (skb->priority) steers egress packets into a slow HTB
 *             class, so later packets overtake them; with a delay line the
 *             chosen packets are held REORDER_EXTRA_NS longer instead  (IPv4 UDP)
 *   delay     the delay line, see below                              (all IPv4)
 *
 * The delay line. HTB holds a packet while its class has no tokens, and a
 * class loses tokens only when it sends. So each delayed packet P gets a class
 * of its own (the next of a ring of DELAY_CLASSES classes on the IFB device
 * DELAY_IFINDEX, all with a ceil of DELAY_BPS bytes/s and no burst), and ahead
 * of P goes a primer: a clone of P, made here with bpf_clone_redirect() and
 * cut by impair_primer (on the IFB's own egress hook) to d * DELAY_BPS bytes.
 * HTB sends the primer at once and charges the class d for it; P, right behind
 * it in the same class, leaves d later. P itself reaches the IFB through the
 * u32 + mirred filter that follows this program. The primer never leaves the
 * IFB: an egress one carries skb_iif 0 (mirred sets it, bpf_clone_redirect
 * does not), which the IFB drops; an ingress one is made PACKET_OTHERHOST,
 * which ip_rcv drops. The cost of P (len / DELAY_BPS) keeps its class busy a
 * little longer; the ring is long enough that a class is idle again when its
 * turn comes back. netns_lab/impair.py sets up the HTB side so that packets
 * due at the same time leave in ring order, i.e. in the order they came.
 *
 * Compiled by bcc at `inc-lab up` time; parameters come as -D flags:
 *   LOSS_PPM, DUP_PPM, CORRUPT_PPM   per direction, parts per million
 *   REORDER_PPM     egress only: fraction sent through the slow class
 *   SLOW_CLASSID    HTB class for the slow path, TC_H_MAKE(major << 16, minor)
 *   DELAY_NS, JITTER_NS   each IPv4 packet is held a time uniform in
 *                   [max(0, DELAY_NS - JITTER_NS), DELAY_NS + JITTER_NS]
 *   DELAY_IFINDEX, DELAY_MAJOR, DELAY_CLASSES, DELAY_BPS   the delay line
 *   PRIMER_MIN, PRIMER_MAX   primer lengths; delays below PRIMER_MIN bytes
 *                   pass without a primer (they skip the IFB)
 *
 * Return codes: TC_ACT_UNSPEC for packets that continue to the next filter
 * (the u32 + mirred to an IFB: the rate shaper on ingress, or the delay line);
 * with a delay line, TC_ACT_OK for the packets it does not hold, so they skip
 * the mirred.
 *
 * Counters: stats[(host * 2 + dir) * ST__COUNT + kind], host = third octet of
 * the host's own address (10.77.<host>.2: source on egress, destination on
 * ingress), dir 0 = egress (host->switch), 1 = ingress.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

#ifndef LOSS_PPM
#define LOSS_PPM 0
#endif
#ifndef REORDER_PPM
#define REORDER_PPM 0
#endif
#ifndef DUP_PPM
#define DUP_PPM 0
#endif
#ifndef CORRUPT_PPM
#define CORRUPT_PPM 0
#endif
#ifndef SLOW_CLASSID
#define SLOW_CLASSID 0x10020 /* tc class 1:20 */
#endif
#ifndef DELAY_NS
#define DELAY_NS 0ull
#endif
#ifndef JITTER_NS
#define JITTER_NS 0ull
#endif
#ifndef REORDER_EXTRA_NS
#define REORDER_EXTRA_NS 2000000ull
#endif
#ifndef DELAY_IFINDEX
#define DELAY_IFINDEX 0
#endif
#ifndef DELAY_MAJOR
#define DELAY_MAJOR 0x2
#endif
#ifndef DELAY_CLASSES
#define DELAY_CLASSES 1024
#endif
#ifndef DELAY_BPS
#define DELAY_BPS 1000000ull
#endif
#ifndef PRIMER_MIN
#define PRIMER_MIN 64
#endif
#ifndef PRIMER_MAX
#define PRIMER_MAX 8192
#endif

#define DELAY_ON (DELAY_IFINDEX != 0)
#define PPM 1000000u

/* skb->mark while a packet is in our hands (the lab sets no marks of its own) */
#define MARK_MASK 0xffff0000u
#define MARK_DUP 0x1d0b0000u         /* the copy made by dup */
#define MARK_PRIMER 0x1d0c0000u      /* egress primer, low 16 bits: its length */
#define MARK_PRIMER_IN 0x1d0d0000u   /* ingress primer */
#define MARK_HELD 0x1d0e0000u        /* egress packet on its way through the delay line */

enum {
	ST_PKTS,       /* IPv4 UDP packets seen (copies made by dup not included) */
	ST_LOST,
	ST_DUP,
	ST_CORRUPT,
	ST_REORDER,
	ST_DELAYED,    /* IPv4 packets held by the delay line (a primer sent) */
	ST_DELAY_US,   /* sum of their delays, microseconds */
	ST_UNDELAYED,  /* IPv4 packets whose drawn delay was too short to hold */
	ST_PRIMER_ERR, /* primers that could not be cut to length (held less) */
	ST__COUNT,
};
#define DIR_EGRESS 0
#define DIR_INGRESS 1

BPF_ARRAY(stats, __u64, 256 * 2 * ST__COUNT);
struct ring_pos {
	struct bpf_spin_lock lock;
	__u32 next;
};
BPF_ARRAY(ring, struct ring_pos, 1);

static __always_inline void count(__u32 host, __u32 dir, __u32 kind, __u64 n)
{
	__u32 idx = (host * 2 + dir) * ST__COUNT + kind;
	__u64 *v = stats.lookup(&idx);

	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline int chance_ppm(__u32 ppm)
{
	return ppm > 0 && (ppm >= PPM || bpf_get_prandom_u32() % PPM < ppm);
}

/* 0 if not IPv4, else 1 + IP protocol; *host: third octet of the host's address */
static __always_inline int ipv4_proto(struct __sk_buff *skb, int dir, __u32 *host)
{
	__u8 proto;
	__u8 addr[4];
	int off = dir == DIR_EGRESS ? __builtin_offsetof(struct iphdr, saddr)
				    : __builtin_offsetof(struct iphdr, daddr);

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	/* load_bytes works whether or not the header is in the linear part */
	if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, protocol),
			       &proto, sizeof(proto)) < 0)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + off, addr, sizeof(addr)) < 0)
		return 0;
	*host = addr[2];
	return 1 + proto;
}

/* Flips one random bit of the UDP payload; 1 if done. */
static __always_inline int corrupt(struct __sk_buff *skb, int dir)
{
	__u8 vihl, b;
	__u16 ulen;
	__u32 r = bpf_get_prandom_u32();

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
		return 0;
	__u32 l4 = ETH_HLEN + (vihl & 0xf) * 4;
	if (bpf_skb_load_bytes(skb, l4 + __builtin_offsetof(struct udphdr, len), &ulen, 2) < 0)
		return 0;
	__u32 plen = bpf_ntohs(ulen);
	if (plen <= sizeof(struct udphdr))
		return 0;
	plen -= sizeof(struct udphdr);
	__u32 off = l4 + sizeof(struct udphdr) + (r >> 3) % plen;
	if (off >= skb->len || off > 0xffff)
		return 0;
	if (bpf_skb_load_bytes(skb, off, &b, 1) < 0)
		return 0;
	b ^= 1 << (r & 7);
	/* Payload bytes only: no header checksum to fix. RECOMPUTE_CSUM keeps a
	 * CHECKSUM_COMPLETE skb->csum true to the new bytes; the UDP checksum
	 * field itself is not touched. */
	return bpf_skb_store_bytes(skb, off, &b, 1,
				   dir == DIR_INGRESS ? BPF_F_RECOMPUTE_CSUM : 0) == 0;
}

/* The delay line: send the primer to class k of the IFB, set P's class. 1 if held. */
static __always_inline int delay(struct __sk_buff *skb, int dir, __u32 host, __u64 extra_ns)
{
	__u64 d = DELAY_NS + extra_ns;

	if (JITTER_NS) {
		__u64 lo = DELAY_NS > JITTER_NS ? DELAY_NS - JITTER_NS : 0;
		__u64 span = DELAY_NS + JITTER_NS - lo;
		/* two draws: spans beyond 2^32 ns (4.3 s) stay uniform enough */
		__u64 r = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
		d = lo + r % (span + 1) + extra_ns;
	}
	__u64 len = d * DELAY_BPS / 1000000000ull;
	if (len < PRIMER_MIN) {
		count(host, dir, ST_UNDELAYED, 1);
		return 0;
	}
	if (len > PRIMER_MAX)
		len = PRIMER_MAX;
	/* The next class of the ring, for all CPUs and hosts in turn: HTB serves
	 * the classes that may send round robin in class id order, so packets due
	 * at the same moment leave in the order they came. */
	__u32 zero = 0;
	struct ring_pos *pos = ring.lookup(&zero);
	if (!pos)
		return 0;
	bpf_spin_lock(&pos->lock);
	__u32 k = pos->next;
	pos->next = k + 1 >= DELAY_CLASSES ? 0 : k + 1;
	bpf_spin_unlock(&pos->lock);
	__u32 mark = skb->mark, prio = skb->priority;

	skb->priority = (DELAY_MAJOR << 16) | (k + 1);
	skb->mark = (dir == DIR_EGRESS ? MARK_PRIMER : MARK_PRIMER_IN) | (__u32)len;
	if (bpf_clone_redirect(skb, DELAY_IFINDEX, 0) < 0) {
		skb->mark = mark;
		skb->priority = prio;
		return 0;
	}
	/* An egress packet comes back through here when the IFB hands it to eth0
	 * (on egress, IFB skips the filters' actions, not the filters). */
	skb->mark = dir == DIR_EGRESS ? MARK_HELD : mark;
	count(host, dir, ST_DELAYED, 1);
	count(host, dir, ST_DELAY_US, d / 1000);
	return 1;
}

static __always_inline int impair(struct __sk_buff *skb, int dir)
{
	if (skb->mark == MARK_HELD) {
		/* Out of the delay line: already impaired. The mirred filter next
		 * sees the IFB's skip flag and lets the packet go. */
		skb->mark = 0;
		return TC_ACT_UNSPEC;
	}
	__u32 host = 0;
	int proto = ipv4_proto(skb, dir, &host);
	int udp = proto == 1 + IPPROTO_UDP;
	__u64 extra = 0;

	if (udp) {
		if (skb->mark == MARK_DUP) {
			skb->mark = 0; /* the copy: already counted, not lost, not copied again */
		} else {
			count(host, dir, ST_PKTS, 1);
			if (chance_ppm(LOSS_PPM)) {
				count(host, dir, ST_LOST, 1);
				return TC_ACT_SHOT;
			}
			if (chance_ppm(DUP_PPM)) {
				__u32 mark = skb->mark;

				skb->mark = MARK_DUP;
				if (bpf_clone_redirect(skb, skb->ifindex,
						       dir == DIR_INGRESS ? BPF_F_INGRESS : 0) == 0)
					count(host, dir, ST_DUP, 1);
				skb->mark = mark;
			}
		}
		if (chance_ppm(CORRUPT_PPM) && corrupt(skb, dir))
			count(host, dir, ST_CORRUPT, 1);
		if (dir == DIR_EGRESS && chance_ppm(REORDER_PPM)) {
			count(host, dir, ST_REORDER, 1);
			if (DELAY_ON)
				extra = REORDER_EXTRA_NS;
			else
				skb->priority = SLOW_CLASSID;
		}
	}
	if (!DELAY_ON)
		return TC_ACT_UNSPEC;
	if (!proto)
		return TC_ACT_OK; /* ARP and the like: never held */
	return delay(skb, dir, host, extra) ? TC_ACT_UNSPEC : TC_ACT_OK;
}

int impair_egress(struct __sk_buff *skb)
{
	return impair(skb, DIR_EGRESS);
}

int impair_ingress(struct __sk_buff *skb)
{
	return impair(skb, DIR_INGRESS);
}

/* Egress hook of the delay line's IFB: cuts primers to length. Everything
 * else (the held packets, from mirred) passes unchanged into the HTB. */
int impair_primer(struct __sk_buff *skb)
{
	__u32 m = skb->mark;

	if ((m & MARK_MASK) != MARK_PRIMER && (m & MARK_MASK) != MARK_PRIMER_IN)
		return TC_ACT_UNSPEC;
	__u32 len = m & 0xffff;
	if (bpf_skb_change_tail(skb, len, 0) < 0) {
		/* held by the primer's own length instead: count it */
		__u32 host = 0, dir = (m & MARK_MASK) == MARK_PRIMER ? DIR_EGRESS : DIR_INGRESS;
		ipv4_proto(skb, dir, &host);
		count(host, dir, ST_PRIMER_ERR, 1);
	}
	if ((m & MARK_MASK) == MARK_PRIMER_IN)
		bpf_skb_change_type(skb, PACKET_OTHERHOST); /* ip_rcv drops it after the IFB */
	skb->mark = 0;
	return TC_ACT_UNSPEC;
}
