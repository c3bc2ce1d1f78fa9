// SPDX-License-Identifier: GPL-2.0
/*
 * The DynaBase proxy's kernel splice (built and loaded by proxy/kernel.py).
 *
 * Once a client connection has authenticated, the proxy puts the client's socket and
 * its PgBouncer socket into `socks`. This stream verdict program then runs for every
 * packet either socket receives and forwards it to the other socket inside the kernel,
 * so no byte of the connection passes through the proxy process. On the way it reads
 * only the 5-byte Postgres message headers and counts what metering and the proxy's
 * timeouts need: queries (Query, Execute), sync points (Query, Sync, FunctionCall, each
 * answered by one ReadyForQuery), ReadyForQuery with its transaction status, bytes, and
 * the time from each sync point to its ReadyForQuery.
 *
 * A stream that is not the Postgres protocol is forwarded as it is and no longer read:
 * PgBouncer refuses it and closes, and the proxy closes the other side.
 *
 * The proxy takes a connection back by setting its mode to MODE_USER: from the next
 * packet on, each direction goes to the socket's own receive queue, where the proxy
 * reads it. Counters and parse state are committed under the connection's spin lock,
 * together with the mode check, so after the proxy has set the mode and read the
 * connection once under the same lock, they are final.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_CONNS 16384
#define RING 16 /* packets with sync points still unanswered that are remembered */
#define MAX_MESSAGE (1u << 30)

enum { MODE_KERNEL = 0, MODE_USER = 1 };
enum { FROM_CLIENT = 0, FROM_SERVER = 1 };

struct link { /* per socket, keyed by its cookie; written by the proxy */
	__u64 peer;   /* the cookie of the connection's other socket */
	__u32 slot;   /* the connection's index in conns and modes */
	__u32 side;   /* FROM_CLIENT: the client's socket, FROM_SERVER: PgBouncer's */
};

struct parse { /* where one direction's byte stream stands */
	__u32 rem;          /* body bytes of the current message still to come */
	__u8 hdr[5];        /* the start of a header cut by the end of a packet */
	__u8 hdr_len;
	__u8 status_next;   /* the next byte is a ReadyForQuery's status */
	__u8 user;          /* this direction goes to user space now */
	__u8 lost;          /* not the Postgres protocol: forwarded as it is, no longer read */
	__u8 pad[3];
};

struct batch {
	__u64 syncs;  /* sync points sent up to and including this packet's */
	__u64 at;     /* when the packet arrived (CLOCK_MONOTONIC, ns) */
};

/* The packet being scanned: scratch of one direction's program (which runs for one
 * packet at a time), kept in the map so the verifier need not follow its values. */
struct work {
	__u32 off;
	__u32 len;
	__u32 queries;
	__u32 syncs;
	__u32 readies;
	__u32 status;  /* 0: no status byte in this packet */
	__u32 bad;     /* not the Postgres protocol */
	__u32 side;
	struct parse p;
	__u64 total;     /* ReadyForQuery so far, this packet's included */
	__u64 answered;  /* as conn.answered, after this packet */
	__u64 query_ns;  /* this packet's ReadyForQuery: time since their sync points */
	__u64 now;
};

struct conn {
	struct bpf_spin_lock lock;
	__u32 pad;
	struct parse dir[2];
	__u64 bytes[2];   /* forwarded, per direction */
	__u64 queries;
	__u64 syncs;
	__u64 readies;
	__u64 query_ns;   /* summed over answered sync points: sent -> ReadyForQuery */
	__u64 client_at;  /* last packet from the client */
	__u64 ready_at;   /* last ReadyForQuery */
	__u64 batches;    /* packets with sync points so far (ring position) */
	__u64 answered;   /* the oldest batch with an unanswered sync point */
	__u32 status;     /* transaction status byte of the last ReadyForQuery */
	__u32 pad2;
	struct batch ring[RING];
	struct work work[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2 * MAX_CONNS);
	__type(key, __u64);
	__type(value, __u64);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * MAX_CONNS);
	__type(key, __u64);
	__type(value, struct link);
} links SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CONNS);
	__type(key, __u32);
	__type(value, struct conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CONNS);
	__type(key, __u32);
	__type(value, __u32);
} modes SEC(".maps");

struct loop_ctx {
	struct __sk_buff *skb;
	struct work *w;
	struct conn *c;
};

/* One step through the packet: the rest of a message body, a header byte that ends a
 * packet, or a whole header. Returns 1 to stop. */
static long step(__u32 index, struct loop_ctx *x)
{
	struct work *s = x->w;
	__u8 b[5];
	__u32 h, length, take;

	if (s->off >= s->len)
		return 1;
	if (s->p.rem) {
		if (s->p.status_next) {
			if (bpf_skb_load_bytes(x->skb, s->off, b, 1))
				goto bad;
			s->status = b[0];
			s->p.status_next = 0;
		}
		take = s->len - s->off;
		if (take > s->p.rem)
			take = s->p.rem;
		s->off += take;
		s->p.rem -= take;
		return 0;
	}
	if (s->p.hdr_len || s->len - s->off < 5) {
		h = s->p.hdr_len;
		if (h >= 5 || bpf_skb_load_bytes(x->skb, s->off, b, 1))
			goto bad;
		s->p.hdr[h] = b[0];
		s->off += 1;
		if (h < 4) {
			s->p.hdr_len = h + 1;
			return 0;
		}
		s->p.hdr_len = 0;
		__builtin_memcpy(b, s->p.hdr, 5);
	} else {
		if (bpf_skb_load_bytes(x->skb, s->off, b, 5))
			goto bad;
		s->off += 5;
	}
	length = ((__u32)b[1] << 24) | ((__u32)b[2] << 16) | ((__u32)b[3] << 8) | b[4];
	if (length < 4 || length > MAX_MESSAGE)
		goto bad;
	s->p.rem = length - 4;
	if (s->side == FROM_CLIENT) {
		if (b[0] == 'Q') {
			s->queries++;
			s->syncs++;
		} else if (b[0] == 'E') {
			s->queries++;
		} else if (b[0] == 'S' || b[0] == 'F') {
			s->syncs++;
		}
	} else if (b[0] == 'Z') {
		s->readies++;
		s->p.status_next = s->p.rem > 0;
	}
	return 0;
bad:
	s->bad = 1;
	return 1;
}

/* One ReadyForQuery of this packet answers the oldest unanswered sync point. A packet
 * holds one sync point or more, so it is in the packet of the previous one or the next.
 * Only this (PgBouncer's) socket's program writes readies and answered; the client's
 * may overwrite a ring entry meanwhile only when more than RING packets are unanswered,
 * which makes that query's time approximate, never the counts. */
static long answer(__u32 index, struct loop_ctx *x)
{
	struct work *w = x->w;
	struct conn *c = x->c;
	__u64 batches = c->batches;

	w->total++;
	if (w->answered < batches && c->ring[w->answered & (RING - 1)].syncs < w->total)
		w->answered++;
	if (w->answered < batches)
		w->query_ns += w->now - c->ring[w->answered & (RING - 1)].at;
	return 0;
}

SEC("sk_skb/stream_verdict")
int splice(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct link *l = bpf_map_lookup_elem(&links, &cookie);
	struct loop_ctx x = {};
	struct conn *c;
	struct work *w;
	__u32 *mode, slot, side;
	__u64 now;

	if (!l)
		return SK_PASS;
	slot = l->slot;
	side = l->side & 1;
	c = bpf_map_lookup_elem(&conns, &slot);
	mode = bpf_map_lookup_elem(&modes, &slot);
	if (!c || !mode || c->dir[side].user)
		return SK_PASS;
	if (c->dir[side].lost)
		goto forward;
	/* Only this socket's program, one packet at a time, uses work[side] and writes dir[side]. */
	w = &c->work[side];
	w->off = 0;
	w->len = skb->len;
	w->queries = w->syncs = w->readies = w->status = w->bad = 0;
	w->side = side;
	w->p = c->dir[side];
	x.skb = skb;
	x.w = w;
	x.c = c;
	bpf_loop(skb->len / 2 + 8, step, &x, 0);
	now = bpf_ktime_get_ns();
	if (side == FROM_SERVER && w->readies && !w->bad) {
		w->total = c->readies;
		w->answered = c->answered;
		if (c->batches - w->answered > RING)
			w->answered = c->batches - RING; /* older packets were overwritten */
		w->query_ns = 0;
		w->now = now;
		bpf_loop(w->readies, answer, &x, 0);
	}

	bpf_spin_lock(&c->lock);
	if (*mode != MODE_KERNEL) {
		c->dir[side].user = 1;
		bpf_spin_unlock(&c->lock);
		return SK_PASS;
	}
	if (w->bad) {
		c->dir[side].lost = 1;
		bpf_spin_unlock(&c->lock);
		goto forward;
	}
	c->dir[side] = w->p;
	c->bytes[side] += w->len;
	if (side == FROM_CLIENT) {
		c->client_at = now;
		c->queries += w->queries;
		if (w->syncs) {
			c->syncs += w->syncs;
			c->ring[c->batches & (RING - 1)].syncs = c->syncs;
			c->ring[c->batches & (RING - 1)].at = now;
			c->batches++;
		}
	} else {
		if (w->status)
			c->status = w->status;
		if (w->readies) {
			c->ready_at = now;
			c->readies = w->total;
			c->answered = w->answered;
			c->query_ns += w->query_ns;
		}
	}
	bpf_spin_unlock(&c->lock);
forward:
	return bpf_sk_redirect_hash(skb, &socks, &l->peer, 0);
}

char LICENSE[] SEC("license") = "GPL";
