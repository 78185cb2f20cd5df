#!/usr/bin/env python3
"""Failover load for the DataMesh failover drill (tests/src/drill.rs runs it; used by
`cargo xtask drill failover` and tests/tests/failover.rs).

Usage: failover_load.py --label L --kind plain|sentinel|cluster ADDRESSES --prefix P [options]

One process per target, so the "direct" and "datamesh" loads of a drill run side by side, each
with its own interpreter lock:
  --kind plain --addr H:P                         redis.Redis (a server or the proxy listener)
  --kind sentinel --sentinels H:P,... --master-name N   Sentinel(...).master_for(N)
  --kind cluster --nodes H:P,...                  redis.cluster.RedisCluster

Clients, each a thread with its own client object (so its own connection) and every command
sent once (socket timeout --timeout, NO client-side retries: `retry=Retry(NoBackoff(), 0)`;
a command that fails is not resent, the client just goes on with its next command and
reconnects as redis-py does):
  set-N    acknowledged SETs of unique keys (all read back at the end)
  incr-N   INCR of its own counter key (counts sent, acked, errors, unknown outcomes)
  pipe-0   pipelines of --pipeline mixed SET/GET (transaction=False)
  pub-0    PUBLISH of a sequence number
  sub-0    SUBSCRIBE; counts messages, gaps, duplicates, re-subscriptions

Protocol on stdio: once every client has had a success (the subscriber: its subscription is
confirmed) this prints {"event": "ready"}. It then reads ONE JSON line from stdin,
{"stop": true, "fault": T, "recheck_ms": N}, where T is the fault's CLOCK_MONOTONIC time in
seconds (time.monotonic() reads that clock on Linux, as Rust's libc::clock_gettime does), stops
the clients, lets the subscriber drain, reads everything back and prints {"result": {...}},
every "relative to the fault" figure computed against T.

What it measures (per process):
  errors by kind     the error's class (classify()): unknown-outcome ("may have been
                     executed" in the proxy's text), hold-expired ("no usable backend node
                     after holding"), command-timeout (the proxy's command_timeout_ms, for a
                     command that cannot have run twice), LOADING, READONLY, ConnectionError,
                     TimeoutError, MASTERDOWN, CLUSTERDOWN, proxy-error (another "datamesh
                     proxy" error), other:<exception class>
  dropped            established data connections the PEER closed: when redis-py discards a
                     connection (after an error, or silently when the pool finds it readable
                     before use) the socket is peeked: EOF or reset counts, a socket that is
                     still open (a client-side timeout) does not
  unknown per conn   unknown-outcome events per connection (a pipeline counts once)
  missing            acknowledged SETs absent (or with another value) at the end; "old" ones
                     were acknowledged more than 200 ms before the fault
  executed twice     an INCR counter whose final value exceeds the INCRs its client sent
  incr resends       INCRs written to a socket more than once per INCR issued: proves redis-py
                     did not retry (must be 0; incr_writes >= incr_acked proves it counts)
  max stall          the longest single command (a pipeline is one command)
  first ok           fault -> the first success of a command on a key (not PUBLISH) sent after
                     the fault
"""

import argparse
import collections
import json
import select
import socket
import sys
import threading
import time

try:
    import redis
    import redis.connection
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import (
        AskError,
        BusyLoadingError,
        ClusterDownError,
        ConnectionError as RConnectionError,
        MasterDownError,
        MovedError,
        ReadOnlyError,
        RedisError,
        TimeoutError as RTimeoutError,
        TryAgainError,
    )
    from redis.retry import Retry
    from redis.sentinel import Sentinel
except ImportError as e:  # pragma: no cover
    sys.exit("redis-py is not installed (run `cargo xtask setup`): %s" % e)

# Writes acknowledged this long before the fault must survive it (async replication may lose
# the last ones).
OLD_ACK_S = 0.2
# Error texts kept per kind, for the report.
SAMPLES_PER_KIND = 3

now = time.monotonic


# ---------------------------------------------------------------------------------------------
# Instrumentation: redis-py's connection class, patched to count per thread.


class _ThreadCounters(threading.local):
    def __init__(self):
        self.active = False  # a load thread: count its connects, drops and INCR writes
        self.connects = 0
        self.drops = 0
        self.incr_sends = 0


TL = _ThreadCounters()
# Connections to these (host, port) are the Sentinel client's own, not data connections.
SENTINEL_ADDRS = set()


def _data_conn(conn):
    addr = (str(getattr(conn, "host", "")), int(getattr(conn, "port", 0) or 0))
    return addr not in SENTINEL_ADDRS


def _peer_closed(sock):
    """True when the peer closed or reset this socket (EOF or reset pending)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True


_orig_connect = redis.connection.Connection._connect
_orig_disconnect = redis.connection.AbstractConnection.disconnect
_orig_send = redis.connection.AbstractConnection.send_packed_command


def _counting_connect(self):
    sock = _orig_connect(self)
    if TL.active and _data_conn(self):
        TL.connects += 1
    return sock


def _counting_disconnect(self, *args, **kwargs):
    sock = getattr(self, "_sock", None)
    if sock is not None and TL.active and _data_conn(self) and _peer_closed(sock):
        TL.drops += 1
    return _orig_disconnect(self, *args, **kwargs)


def _counting_send(self, command, *args, **kwargs):
    if TL.active:
        if isinstance(command, (bytes, bytearray)):
            first = command
        else:
            first = command[0] if command else b""
        if bytes(first[:16]).startswith(b"*2\r\n$4\r\nINCR\r\n"):
            TL.incr_sends += 1
    return _orig_send(self, command, *args, **kwargs)


redis.connection.Connection._connect = _counting_connect
redis.connection.AbstractConnection.disconnect = _counting_disconnect
redis.connection.AbstractConnection.send_packed_command = _counting_send

# redis-py's ClusterPipeline resends, one by one, the commands of a pipeline whose node
# connection failed ("RETRY MAGIC" in redis/cluster.py), whatever `retry` says; keep only the
# redirects it must follow, so the direct cluster client sends every command once too.
redis.cluster.ClusterPipeline.ERRORS_ALLOW_RETRY = (MovedError, AskError, TryAgainError)


def classify(e):
    text = str(e)
    if "may have been executed" in text:
        return "unknown-outcome"
    if "no usable backend node after holding" in text:
        return "hold-expired"
    if "command_timeout_ms" in text:
        return "command-timeout"
    if isinstance(e, BusyLoadingError) or text.startswith("LOADING"):
        return "LOADING"
    # A Sentinel client turns READONLY into "The previous master is now a slave".
    demoted = "previous master is now" in text
    if isinstance(e, ReadOnlyError) or text.startswith("READONLY") or demoted:
        return "READONLY"
    # redis-py strips these codes from the text into the exception class.
    coded = (
        (MasterDownError, "MASTERDOWN"),
        (ClusterDownError, "CLUSTERDOWN"),
        (TryAgainError, "TRYAGAIN"),
    )
    for cls, code in coded:
        if isinstance(e, cls) or text.startswith(code):
            return code
    if "datamesh proxy" in text:
        return "proxy-error"
    if isinstance(e, RTimeoutError):
        return "TimeoutError"
    if type(e) is RConnectionError:
        return "ConnectionError"
    return "other:" + type(e).__name__


# ---------------------------------------------------------------------------------------------
# Clients


def hostport(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


class Target:
    """Makes a fresh client of the configured kind (each thread has its own).

    Retries are off everywhere redis-py has them: `retry=Retry(NoBackoff(), 0)` for the plain
    and Sentinel clients and for RedisCluster's command retries (its node clients have none),
    and ClusterPipeline's resend is patched out above. RedisCluster still refreshes its slot
    map after a connection error: that is how it follows a failover, not a resend."""

    def __init__(self, a):
        self.a = a
        self.kw = dict(
            socket_timeout=a.timeout,
            socket_connect_timeout=a.timeout,
            retry=Retry(NoBackoff(), 0),
        )
        if a.kind == "sentinel":
            self.sentinels = [hostport(s) for s in a.sentinels.split(",")]
            for h, p in self.sentinels:
                SENTINEL_ADDRS.add((h, p))

    def client(self):
        a = self.a
        if a.kind == "plain":
            host, port = hostport(a.addr)
            c = redis.Redis(host=host, port=port, **self.kw)
        elif a.kind == "sentinel":
            s = Sentinel(
                self.sentinels,
                sentinel_kwargs=dict(socket_timeout=1.0, socket_connect_timeout=1.0),
            )
            c = s.master_for(a.master_name, **self.kw)
        else:
            nodes = [ClusterNode(*hostport(n)) for n in a.nodes.split(",")]
            kw = dict(self.kw)
            retry = kw.pop("retry")
            c = RedisCluster(startup_nodes=nodes, retry=retry, **kw)
            for node in c.get_nodes():
                r = node.redis_connection.get_retry() if node.redis_connection else None
                assert r is None or r.get_retries() == 0, "cluster node client retries %r" % r
        if a.kind != "cluster":
            assert c.get_retry().get_retries() == 0, "client retries are not disabled"
        return c

    def verify_client(self):
        """The client of the final reads: --verify H:P when given, else a client like the load's."""
        if self.a.verify:
            host, port = hostport(self.a.verify)
            return redis.Redis(host=host, port=port, socket_timeout=10, socket_connect_timeout=5)
        return self.client()


class Client(threading.Thread):
    """One load client: a thread with its own client object and its own statistics."""

    def __init__(self, name, target, stop, prefix, pace):
        super().__init__(name=name, daemon=True)
        self.target = target
        self.stop = stop
        self.prefix = prefix
        self.pace = pace
        self.ready = threading.Event()
        # (t0, t1, ok): one per command (a pipeline is one)
        self.events = []
        self.errors = collections.Counter()
        self.samples = collections.defaultdict(list)
        # unknown-outcome events per connection number
        self.unknown_by_conn = collections.Counter()
        self.unknown = 0
        self.connects = 0
        self.drops = 0
        self.fatal = None

    def error(self, e, n=1):
        kind = classify(e)
        self.errors[kind] += n
        if len(self.samples[kind]) < SAMPLES_PER_KIND:
            self.samples[kind].append("%s: %s" % (type(e).__name__, e))
        return kind

    def run(self):
        TL.active = True
        try:
            self.loop()
        except Exception as e:  # a bug in this script: report it instead of dying silently
            self.fatal = "%s: %s" % (type(e).__name__, e)
        finally:
            self.connects = TL.connects
            self.drops = TL.drops
            TL.active = False
            self.ready.set()

    def conn_no(self):
        return TL.connects

    def timed(self, fn):
        """Runs one command; records it; returns (ok, value or error kind)."""
        t0 = now()
        try:
            v = fn()
            ok = True
        except RedisError as e:
            v = self.error(e)
            ok = False
            if v == "unknown-outcome":
                self.unknown += 1
                self.unknown_by_conn[self.conn_no()] += 1
        t1 = now()
        self.events.append((t0, t1, ok))
        if ok:
            self.ready.set()
        return ok, v

    def summary(self):
        return {
            "name": self.name,
            "ops": len(self.events),
            "ok": sum(1 for e in self.events if e[2]),
            "errors": dict(self.errors),
            "drops": self.drops,
            "connects": self.connects,
            "unknown": self.unknown,
            "max_unknown_per_conn": max(self.unknown_by_conn.values(), default=0),
            "fatal": self.fatal,
        }


class SetClient(Client):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.acked = []  # (key, value, t_ack)

    def loop(self):
        r = self.target.client()
        i = 0
        while not self.stop.is_set():
            key = "%ss%s:%d" % (self.prefix, self.name, i)
            val = "v%d" % i
            i += 1
            ok, _ = self.timed(lambda: r.set(key, val))
            if ok:
                self.acked.append((key, val, self.events[-1][1]))
            time.sleep(self.pace)


class IncrClient(Client):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.key = "%sc:%s" % (self.prefix, self.name)
        self.sent = 0  # INCRs issued (each at most once)
        self.acked = 0
        self.failed = 0
        self.writes = 0  # INCRs written to a socket
        self.resends = 0  # extra writes of one INCR to a socket: a client-side retry

    def loop(self):
        r = self.target.client()
        while not self.stop.is_set():
            self.sent += 1
            writes = TL.incr_sends
            # INCR itself (redis-py's incr() sends INCRBY key 1).
            ok, _ = self.timed(lambda: r.execute_command("INCR", self.key))
            self.writes += TL.incr_sends - writes
            self.resends += max(0, TL.incr_sends - writes - 1)
            if ok:
                self.acked += 1
            else:
                self.failed += 1
            time.sleep(self.pace)


class PipeClient(Client):
    def __init__(self, *a, size=10, **kw):
        super().__init__(*a, **kw)
        self.size = size
        self.acked = []  # (key, value, t_ack)

    def loop(self):
        r = self.target.client()
        k = 0
        while not self.stop.is_set():
            p = r.pipeline(transaction=False)
            sets = []
            for j in range(self.size):
                if j % 2 == 0:
                    key = "%sp:%d" % (self.prefix, k)
                    val = "p%d" % k
                    k += 1
                    p.set(key, val)
                    sets.append((j, key, val))
                else:
                    p.get("%sp:%d" % (self.prefix, k - 1))
            t0 = now()
            unknown_here = 0
            try:
                res = p.execute(raise_on_error=False)
                ok = True
                for v in res:
                    if isinstance(v, Exception):
                        ok = False
                        if self.error(v) == "unknown-outcome":
                            unknown_here += 1
            except RedisError as e:
                res = None
                ok = False
                if self.error(e, self.size) == "unknown-outcome":
                    unknown_here += self.size
            t1 = now()
            if unknown_here:
                self.unknown += unknown_here
                self.unknown_by_conn[self.conn_no()] += 1
            self.events.append((t0, t1, ok))
            if res is not None:
                for j, key, val in sets:
                    if not isinstance(res[j], Exception):
                        self.acked.append((key, val, t1))
            if ok:
                self.ready.set()
            time.sleep(self.pace)


class PubClient(Client):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.acked = {}  # seq -> t_ack
        self.unheard = set()  # seqs PUBLISH said no subscriber received

    def loop(self):
        r = self.target.client()
        seq = 0
        while not self.stop.is_set():
            s = seq
            seq += 1
            ok, receivers = self.timed(lambda: r.publish(self.prefix + "chan", str(s)))
            if ok:
                self.acked[s] = self.events[-1][1]
                if receivers == 0:
                    self.unheard.add(s)
            time.sleep(max(self.pace, 0.005))


class SubClient(Client):
    """Subscribes; on an error drops its client and subscribes again with a fresh one."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.received = {}  # seq -> t_recv
        self.dups = 0
        self.resubscribes = -1  # the first subscription is not a re-subscription
        self.subscribed_at = None

    def loop(self):
        ps = None
        while not self.stop.is_set():
            try:
                if ps is None:
                    self.resubscribes += 1
                    ps = self.target.client().pubsub()
                    ps.subscribe(self.prefix + "chan")
                msg = ps.get_message(timeout=0.2)
            except RedisError as e:
                self.error(e)
                try:
                    ps.close()
                except Exception:
                    pass
                ps = None
                time.sleep(0.05)
                continue
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                if self.subscribed_at is None:
                    self.subscribed_at = now()
                self.ready.set()
            elif msg["type"] == "message":
                s = int(msg["data"])
                if s in self.received:
                    self.dups += 1
                else:
                    self.received[s] = now()
        if ps is not None:
            try:
                ps.close()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# The end: reads back, figures relative to the fault


def chunks(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def read_back(target, keys):
    """GETs `keys` (pipelines of 500); returns (values by key, keys that could not be read).

    These reads check the result, they are not load: a failed chunk is tried again."""
    values = {}
    unread = []
    r = target.verify_client()
    for part in chunks(keys, 500):
        for attempt in range(5):
            try:
                p = r.pipeline(transaction=False)
                for k in part:
                    p.get(k)
                for k, v in zip(part, p.execute()):
                    values[k] = v
                break
            except RedisError:
                time.sleep(0.2)
                r = target.verify_client()
        else:
            unread.extend(part)
    return values, unread


def get_int(target, key):
    for attempt in range(5):
        try:
            v = target.verify_client().get(key)
            return int(v) if v is not None else 0
        except RedisError:
            time.sleep(0.2)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--kind", choices=["plain", "sentinel", "cluster"], required=True)
    ap.add_argument("--addr")
    ap.add_argument("--sentinels")
    ap.add_argument("--master-name", default="mymaster")
    ap.add_argument("--nodes")
    ap.add_argument("--verify", help="host:port the final reads use instead of the load's target")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--set-clients", type=int, default=4)
    ap.add_argument("--incr-clients", type=int, default=2)
    ap.add_argument("--pipeline", type=int, default=10)
    ap.add_argument("--pace-ms", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    a = ap.parse_args()
    addresses = {"plain": a.addr, "sentinel": a.sentinels, "cluster": a.nodes}[a.kind]
    assert addresses, "--kind %s needs its addresses" % a.kind

    target = Target(a)
    stop = threading.Event()
    sub_stop = threading.Event()
    pace = a.pace_ms / 1000.0
    mk = lambda cls, name, **kw: cls(name, target, stop, a.prefix, pace, **kw)
    sets = [mk(SetClient, "set-%d" % i) for i in range(a.set_clients)]
    incrs = [mk(IncrClient, "incr-%d" % i) for i in range(a.incr_clients)]
    pipe = mk(PipeClient, "pipe-0", size=a.pipeline)
    pub = mk(PubClient, "pub-0")
    sub = SubClient("sub-0", target, sub_stop, a.prefix, pace)
    load = sets + incrs + [pipe, pub]
    everyone = load + [sub]
    # The subscriber first, so the publisher's messages find it.
    sub.start()
    sub.ready.wait(a.ready_timeout)
    for c in load:
        c.start()
    deadline = now() + a.ready_timeout
    for c in everyone:
        c.ready.wait(max(0.0, deadline - now()))
    late = [c.name for c in everyone if not c.ready.is_set() or c.fatal]
    if late:
        print(
            json.dumps(
                {
                    "event": "not-ready",
                    "clients": late,
                    "errors": {c.name: c.samples for c in everyone},
                    "fatal": {c.name: c.fatal for c in everyone if c.fatal},
                }
            ),
            flush=True,
        )
        sys.exit(1)
    print(json.dumps({"event": "ready"}), flush=True)

    line = sys.stdin.readline()
    if not line:
        sys.exit("stdin closed before the stop line")
    cmd = json.loads(line)
    fault = float(cmd["fault"])
    recheck = float(cmd.get("recheck_ms") or 0) / 1000.0

    stop.set()
    for c in load:
        c.join(2 * a.timeout + 5)
    # Let the subscriber catch the publisher's last acknowledged message.
    last_pub = max(pub.acked, default=None)
    drain_until = now() + 2.0
    while last_pub is not None and last_pub not in sub.received and now() < drain_until:
        time.sleep(0.02)
    sub_stop.set()
    sub.join(a.timeout + 5)
    stuck = [c.name for c in everyone if c.is_alive()]

    # Acknowledged writes still there?
    acked = [w for c in sets + [pipe] for w in c.acked]
    values, unread = read_back(target, [k for k, _, _ in acked])
    unread = set(unread)
    missing = []
    wrong = 0
    for key, val, t_ack in acked:
        if key in unread:
            continue
        v = values.get(key)
        if v != val.encode():
            missing.append((key, t_ack - fault))
            wrong += v is not None
    missing.sort(key=lambda m: m[1])

    counters = [
        {
            "key": c.key,
            "sent": c.sent,
            "acked": c.acked,
            "failed": c.failed,
            "unknown": c.unknown,
            "final": get_int(target, c.key),
        }
        for c in incrs
    ]
    if recheck:
        time.sleep(recheck)
    for cnt in counters:
        cnt["final_later"] = get_int(target, cnt["key"]) if recheck else cnt["final"]

    # Timing relative to the fault (the subscriber sends no commands with a latency). The first
    # success counts only commands on keys: PUBLISH is keyless (any cluster node takes it, and a
    # server that is still loading its data already accepts it).
    timed = [e for c in load for e in c.events]
    keyed = [e for c in sets + incrs + [pipe] for e in c.events]
    stall = max(timed, key=lambda e: e[1] - e[0], default=None)
    after = [e[1] - fault for e in keyed if e[2] and e[0] >= fault]
    errs_after = [e[1] - fault for e in timed if not e[2] and e[1] >= fault]

    subscribed_at = sub.subscribed_at or float("inf")
    expected = [s for s, t in pub.acked.items() if t >= subscribed_at]
    lost = sorted(s for s in expected if s not in sub.received)
    # Runs of consecutive lost messages: [first acked, last acked (ms after the fault), count].
    gaps = []
    for i, seq in enumerate(lost):
        t = round((pub.acked[seq] - fault) * 1000, 1)
        if i == 0 or lost[i - 1] != seq - 1:
            gaps.append([t, t, 0])
        gaps[-1][1] = t
        gaps[-1][2] += 1

    errors = collections.Counter()
    samples = {}
    for c in everyone:
        errors.update(c.errors)
        for k, v in c.samples.items():
            samples.setdefault(k, [])
            samples[k].extend(v[: SAMPLES_PER_KIND - len(samples[k])])
    result = {
        "label": a.label,
        "ops": len(timed),
        "ops_ok": sum(1 for e in timed if e[2]),
        "errors": dict(errors),
        "error_samples": samples,
        "dropped": sum(c.drops for c in everyone),
        "connects": sum(c.connects for c in everyone),
        "unknown": sum(c.unknown for c in everyone),
        "max_unknown_per_conn": max(max(c.unknown_by_conn.values(), default=0) for c in everyone),
        "acked_writes": len(acked),
        "missing": len(missing),
        "missing_old": sum(1 for _, t in missing if t < -OLD_ACK_S),
        "missing_samples": [{"key": k, "acked_ms": round(t * 1000, 1)} for k, t in missing[:5]],
        "wrong_values": wrong,
        "unread": len(unread),
        "exec_twice": sum(1 for c in counters if c["final"] is not None and c["final"] > c["sent"]),
        "counters": counters,
        "incr_resends": sum(c.resends for c in incrs),
        # Every acknowledged INCR was written once at least: proves the resend counter counts.
        "incr_writes": sum(c.writes for c in incrs),
        "incr_acked": sum(c.acked for c in incrs),
        "max_stall_ms": round((stall[1] - stall[0]) * 1000, 1) if stall else None,
        "max_stall_at_ms": round((stall[0] - fault) * 1000, 1) if stall else None,
        "first_ok_ms": round(min(after) * 1000, 1) if after else None,
        "last_error_ms": round(max(errs_after) * 1000, 1) if errs_after else None,
        "pub_acked": len(expected),
        "sub_received": len(sub.received),
        "sub_lost": len(lost),
        # Of those, PUBLISH answered 0 receivers: published where the subscriber was not (yet).
        "sub_lost_unheard": sum(1 for s in lost if s in pub.unheard),
        "sub_gaps": len(gaps),
        "sub_gap_spans": gaps[:5],
        "sub_dups": sub.dups,
        "sub_resubscribes": max(sub.resubscribes, 0),
        "sub_got_last": last_pub is None or last_pub in sub.received,
        "stuck": stuck,
        # Clients that died of an exception that is not a Redis error: a bug of this script.
        "fatal": {c.name: c.fatal for c in everyone if c.fatal},
        "clients": [c.summary() for c in everyone],
    }
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main()
