#!/usr/bin/env python3
"""Client load for the operations drills (restart, upgrade): what applications see while the
agent is replaced under them.

  pool      THREADS threads share one redis-py ConnectionPool (the way applications pool):
            SET then GET of a per-thread key, in a loop. --retries N sets redis-py's retry
            count (redis-py 6+ retries 3 times by default; 0 shows every error a connection
            loss would cause).
  short     THREADS threads each open a new TCP connection per command (PHP style): connect,
            PING, read +PONG, close. Counts refused connects apart from other errors.

--interval pauses each thread between iterations (seconds); --stop-file ends the run early
when the file appears (the drill decides when the load stops). Prints one JSON object:
  ok, errors {kind: n} (kind: the exception class, or "refused"), error_samples (first 5
  messages), first_error / last_error (CLOCK_MONOTONIC seconds), start / end, connects (short
  mode: connects attempted).
"""

import argparse
import json
import os
import socket
import threading
import time


def now():
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = {}
        self.samples = []
        self.first_error = None
        self.last_error = None
        self.connects = 0

    def good(self, n=1):
        with self.lock:
            self.ok += n

    def bad(self, kind, msg):
        t = now()
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if len(self.samples) < 5:
                self.samples.append("%.3f %s: %s" % (t, kind, msg))
            if self.first_error is None:
                self.first_error = t
            self.last_error = t


def stopped(a, deadline):
    return now() >= deadline or (a.stop_file and os.path.exists(a.stop_file))


def pool_worker(a, st, pool, idx, deadline):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kw = {}
    if a.retries is not None:
        kw["retry"] = Retry(NoBackoff(), a.retries)
    r = redis.Redis(connection_pool=pool, **kw)
    key = "dm:ops:%d:%d" % (os.getpid(), idx)
    i = 0
    while not stopped(a, deadline):
        i += 1
        try:
            r.set(key, str(i))
            v = r.get(key)
            if v != str(i).encode():
                st.bad("wrong-value", repr(v))
            else:
                st.good(2)
        except Exception as e:  # noqa: BLE001 - every failure is what the drill counts
            st.bad(type(e).__name__, str(e)[:200])
        if a.interval:
            time.sleep(a.interval)


def short_worker(a, st, idx, deadline):
    while not stopped(a, deadline):
        with st.lock:
            st.connects += 1
        s = None
        try:
            s = socket.create_connection((a.host, a.port), timeout=a.timeout)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                d = s.recv(64)
                if not d:
                    raise ConnectionError("closed before the reply")
                buf += d
            if buf != b"+PONG\r\n":
                st.bad("reply", repr(buf[:80]))
            else:
                st.good()
        except ConnectionRefusedError as e:
            st.bad("refused", str(e))
        except Exception as e:  # noqa: BLE001
            st.bad(type(e).__name__, str(e)[:200])
        finally:
            if s is not None:
                s.close()
        if a.interval:
            time.sleep(a.interval)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["pool", "short"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.002)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--retries", type=int, default=None)
    p.add_argument("--stop-file", default=None)
    a = p.parse_args()

    st = Stats()
    start = now()
    deadline = start + a.seconds
    threads = []
    pool = None
    if a.mode == "pool":
        import redis

        pool = redis.ConnectionPool(host=a.host, port=a.port, socket_timeout=a.timeout,
                                    max_connections=a.threads)
    for i in range(a.threads):
        if a.mode == "pool":
            t = threading.Thread(target=pool_worker, args=(a, st, pool, i, deadline))
        else:
            t = threading.Thread(target=short_worker, args=(a, st, i, deadline))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    print(json.dumps({
        "mode": a.mode,
        "ok": st.ok,
        "errors": st.errors,
        "error_samples": st.samples,
        "first_error": st.first_error,
        "last_error": st.last_error,
        "connects": st.connects,
        "start": start,
        "end": now(),
    }))


if __name__ == "__main__":
    main()
