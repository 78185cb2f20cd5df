#!/usr/bin/env python3
"""Pooled redis-py load for the drain tests (tests/tests/drain.rs).

THREADS threads share one redis.ConnectionPool (as an application does) and loop SET/GET of
their own keys for SECONDS, checking every value. The pool's connections are checked before
reuse (redis-py reconnects when the proxy closed one cleanly). Retries are OFF (Retry with 0
retries), so every failed command counts: the drain must close connections only where a
pooled client sees the close before it reuses the connection.

Prints {"started": <monotonic s>} once the threads run, then at the end one JSON object: ok, errors (count), error_samples (first 20 "Type: message"),
created (connections the pool made: 1 per thread at least, more after each clean close),
per_second: [{"t": s, "ok": n, "errors": n}], start/end (CLOCK_MONOTONIC seconds).
"""

import argparse
import json
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--prefix", default="dm-drain")
    args = ap.parse_args()

    created = [0]
    created_lock = threading.Lock()

    class CountingConnection(redis.Connection):
        def _connect(self):
            sock = super()._connect()
            with created_lock:
                created[0] += 1
            return sock

    pool = redis.ConnectionPool(
        connection_class=CountingConnection,
        host=args.host,
        port=args.port,
        socket_timeout=10,
        socket_connect_timeout=10,
        retry=Retry(NoBackoff(), 0),
    )
    r = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))

    lock = threading.Lock()
    ok = [0]
    errors = []
    seconds = int(args.seconds) + 2
    per_second = [{"t": i, "ok": 0, "errors": 0} for i in range(seconds)]
    start = time.monotonic()
    stop_at = start + args.seconds

    def run(tid):
        n = 0
        key = f"{args.prefix}:{tid}"
        while time.monotonic() < stop_at:
            n += 1
            value = f"{tid}-{n}"
            try:
                r.set(key, value)
                got = r.get(key)
                if got != value.encode():
                    raise AssertionError(f"GET {key} = {got!r}, expected {value!r}")
                good = True
                err = None
            except Exception as e:  # every failure counts, whatever its type
                good = False
                err = f"{type(e).__name__}: {e} (t={time.monotonic() - start:.3f}s)"
            sec = min(int(time.monotonic() - start), seconds - 1)
            with lock:
                if good:
                    ok[0] += 1
                    per_second[sec]["ok"] += 1
                else:
                    errors.append(err)
                    per_second[sec]["errors"] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    # The test waits for this line (importing redis takes most of a second).
    print(json.dumps({"started": start}), flush=True)
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "ok": ok[0],
                "errors": len(errors),
                "error_samples": errors[:20],
                "created": created[0],
                "per_second": per_second,
                "start": start,
                "end": time.monotonic(),
            }
        )
    )


if __name__ == "__main__":
    main()
