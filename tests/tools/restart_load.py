#!/usr/bin/env python3
"""Pooled redis-py load for the DataMesh restart drill (tests/src/restartdrill.rs runs it, inside a
captured pod; used by `cargo xtask drill restart` and tests/tests/restartdrill.rs).

Usage: restart_load.py --label L --addr H:P --clients N --retries 0|1 [--pace-ms 2] [--timeout 2]

Each client is a thread with its own redis.Redis (so its own connection pool, one connection
reused for every command) doing SET then GET of its own key, forever:
  --retries 0   no client-side retry (`retry=Retry(NoBackoff(), 0)`): a command whose connection
                died fails, the client counts the error and goes on (redis-py reconnects)
  --retries 1   one retry on a connection error or timeout (`Retry(NoBackoff(), 1)`), as a
                pooled application client usually has: an established connection lost with a
                killed worker costs a reconnect, not an error

Protocol on stdio: once every client has had a success it prints {"event": "ready"}. It then
reads ONE JSON line from stdin, {"phases": [[name, t0, t1], ...]} with CLOCK_MONOTONIC seconds
(time.monotonic() reads that clock on Linux), stops the clients and prints {"result": {...}}:
the commands and the errors by kind that STARTED in each phase's [t0, t1).
"""

import argparse
import collections
import json
import sys
import threading
import time

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RTimeoutError
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover
    sys.exit("redis-py is not installed (run `cargo xtask setup`): %s" % e)

now = time.monotonic


def classify(e):
    if isinstance(e, RConnectionError):
        return "ConnectionError"
    if isinstance(e, RTimeoutError):
        return "TimeoutError"
    if isinstance(e, RedisError):
        return "redis:" + type(e).__name__
    return "other:" + type(e).__name__


class Client(threading.Thread):
    def __init__(self, name, a, stop):
        super().__init__(name=name, daemon=True)
        host, port = a.addr.rsplit(":", 1)
        self.r = redis.Redis(
            host=host,
            port=int(port),
            socket_timeout=a.timeout,
            socket_connect_timeout=a.timeout,
            retry=Retry(NoBackoff(), a.retries),
        )
        assert self.r.get_retry().get_retries() == a.retries
        self.key = "restart:%s:%s" % (a.label, name)
        self.pace = a.pace_ms / 1000.0
        self.stop = stop
        self.ready = threading.Event()
        # (start, end, error kind or None, error text)
        self.events = []
        self.fatal = None

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            t0 = now()
            try:
                if n % 2:
                    self.r.set(self.key, str(n))
                else:
                    self.r.get(self.key)
                self.events.append((t0, now(), None, None))
                self.ready.set()
            except RedisError as e:
                self.events.append((t0, now(), classify(e), str(e)[:200]))
            except Exception as e:  # a bug of this script, not a Redis error
                self.fatal = "%s: %s" % (type(e).__name__, e)
                return
            if self.pace:
                time.sleep(self.pace)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--retries", type=int, choices=[0, 1], default=0)
    ap.add_argument("--pace-ms", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    a = ap.parse_args()

    stop = threading.Event()
    clients = [Client("c%d" % i, a, stop) for i in range(a.clients)]
    for c in clients:
        c.start()
    deadline = now() + a.ready_timeout
    for c in clients:
        c.ready.wait(max(0.0, deadline - now()))
    late = [c.name for c in clients if not c.ready.is_set()]
    if late:
        samples = [e[3] for c in clients for e in c.events if e[2]][:5]
        print(json.dumps({"event": "not-ready", "clients": late, "samples": samples}), flush=True)
        sys.exit(1)
    print(json.dumps({"event": "ready"}), flush=True)

    line = sys.stdin.readline()
    if not line:
        sys.exit("stdin closed before the stop line")
    phases = json.loads(line)["phases"]
    stop.set()
    for c in clients:
        c.join(2 * a.timeout + 5)

    events = [e for c in clients for e in c.events]
    out = {}
    for name, t0, t1 in phases:
        inside = [e for e in events if t0 <= e[0] < t1]
        errors = collections.Counter(e[2] for e in inside if e[2])
        samples = {}
        for e in inside:
            if e[2] and len(samples.setdefault(e[2], [])) < 2:
                samples[e[2]].append(e[3])
        out[name] = {
            "ops": len(inside),
            "ok": sum(1 for e in inside if not e[2]),
            "errors": dict(errors),
            "samples": samples,
            "max_stall_ms": round(max((e[1] - e[0] for e in inside), default=0.0) * 1000, 1),
        }
    result = {
        "label": a.label,
        "retries": a.retries,
        "ops": len(events),
        "ok": sum(1 for e in events if not e[2]),
        "phases": out,
        "fatal": {c.name: c.fatal for c in clients if c.fatal},
        "stuck": [c.name for c in clients if c.is_alive()],
    }
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main()
