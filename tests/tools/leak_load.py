#!/usr/bin/env python3
"""Client load for the resource-leak drill (tests/src/leakdrill.rs runs it in a pod; used by
`cargo xtask drill resource-leak` and tests/tests/leakdrill.rs).

Usage: leak_load.py --host H --port P [--clients N] [--pace-ms MS]

Runs until stdin is closed, then prints one JSON line {"result": {...}} and exits. Before
that, once every client has had a success, it prints {"event": "ready"}.

Two kinds of client, each a thread:
  pooled-N   a redis.Redis (its own pool, so long-lived connections) sending SET then GET
             of its own key, paced. NO retries inside redis-py (`retry=Retry(NoBackoff(), 0)`):
             on a ConnectionError / TimeoutError the script itself retries the command ONCE on
             a new connection, like an application with one reconnect-and-retry:
             `retried` counts those, `errors` (by exception class) counts commands that failed
             even after it (what the application would see).
  connect    a connect loop: TCP connect, PING, +PONG, close, paced. `refused` counts
             ECONNREFUSED, `connect_errors` every other failure by errno name or class.
"""

import argparse
import errno
import json
import socket
import sys
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--pace-ms", type=float, default=2.0)
    a = ap.parse_args()

    stop = threading.Event()
    lock = threading.Lock()
    st = {
        "ops": 0,
        "retried": 0,
        "errors": {},
        "connects": 0,
        "refused": 0,
        "connect_errors": {},
    }
    first_ok = [threading.Event() for _ in range(a.clients + 1)]
    pace = a.pace_ms / 1000.0

    def count(key, sub=None):
        with lock:
            if sub is None:
                st[key] += 1
            else:
                st[key][sub] = st[key].get(sub, 0) + 1

    def pooled(i):
        r = redis.Redis(
            host=a.host,
            port=a.port,
            socket_timeout=5,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )
        key = "leakdrill:%d" % i
        n = 0
        while not stop.is_set():
            n += 1
            val = str(n)
            for cmd in (lambda: r.set(key, val), lambda: r.get(key)):
                try:
                    try:
                        cmd()
                    except (redis.ConnectionError, redis.TimeoutError):
                        count("retried")
                        cmd()
                    count("ops")
                    first_ok[i].set()
                except Exception as e:  # noqa: BLE001 - every failure is counted by class
                    count("errors", type(e).__name__)
            time.sleep(pace)

    def connect_loop():
        while not stop.is_set():
            s = None
            try:
                s = socket.create_connection((a.host, a.port), timeout=5)
                s.sendall(b"PING\r\n")
                buf = b""
                while not buf.endswith(b"\r\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        raise ConnectionError("closed before the reply")
                    buf += chunk
                if not buf.startswith(b"+PONG"):
                    raise ValueError(buf[:60].decode(errors="replace"))
                count("connects")
                first_ok[a.clients].set()
            except ConnectionRefusedError:
                count("refused")
            except OSError as e:
                name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
                count("connect_errors", name)
            except Exception as e:  # noqa: BLE001
                count("connect_errors", type(e).__name__)
            finally:
                if s is not None:
                    s.close()
            time.sleep(pace)

    threads = [threading.Thread(target=pooled, args=(i,), daemon=True) for i in range(a.clients)]
    threads.append(threading.Thread(target=connect_loop, daemon=True))
    for t in threads:
        t.start()
    for e in first_ok:
        e.wait(30)
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(10)
    with lock:
        print(json.dumps({"result": st}), flush=True)


if __name__ == "__main__":
    main()
