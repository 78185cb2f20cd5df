#!/usr/bin/env python3
"""Password guessing against a Redis endpoint, as a hostile tenant would: N connections in
threads, each sending wrong `AUTH <user> <guess>` one after the other (waiting for each reply),
reconnecting when the server closes the connection, for a fixed time. Prints one JSON object:
guesses answered, connections closed by the server, guesses/s, the slowest reply.

Raw sockets (no client library), so nothing retries or pipelines behind our back.
"""

import argparse
import json
import socket
import threading
import time


def auth(user, guess):
    parts = [b"AUTH", user.encode(), guess.encode()]
    out = b"*%d\r\n" % len(parts)
    for p in parts:
        out += b"$%d\r\n%s\r\n" % (len(p), p)
    return out


def hammer(host, port, user, deadline, stats, lock):
    guesses = closes = 0
    slowest = 0.0
    n = 0
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection((host, port), timeout=5)
        except OSError:
            time.sleep(0.01)
            continue
        f = s.makefile("rb")
        try:
            while time.monotonic() < deadline:
                n += 1
                t0 = time.monotonic()
                s.sendall(auth(user, "guess-%d" % n))
                line = f.readline()
                if not line:
                    closes += 1
                    break
                slowest = max(slowest, time.monotonic() - t0)
                assert line.startswith(b"-WRONGPASS"), line
                guesses += 1
        except (ConnectionResetError, BrokenPipeError):
            closes += 1
        except socket.timeout:
            pass
        finally:
            s.close()
    with lock:
        stats["guesses"] += guesses
        stats["closes"] += closes
        stats["slowest_reply_s"] = max(stats["slowest_reply_s"], slowest)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="app")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    stats = {"guesses": 0, "closes": 0, "slowest_reply_s": 0.0}
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + a.seconds
    threads = [
        threading.Thread(target=hammer, args=(a.host, a.port, a.user, deadline, stats, lock))
        for _ in range(a.connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    stats["seconds"] = round(elapsed, 3)
    stats["guesses_per_s"] = round(stats["guesses"] / elapsed, 1)
    stats["slowest_reply_s"] = round(stats["slowest_reply_s"], 3)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
