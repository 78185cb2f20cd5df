#!/usr/bin/env python3
"""Key-level load for the hot-key and key-attack drills (tests/src/keydrill.rs).

One process, THREADS client connections (raw sockets, RESP2), each sending batches of
PIPELINE commands and reading their replies, for SECONDS:

  hot      GET of one key (--key): the pod that hammers a hot key.
  normal   GET of a key among --keys existing ones (prefix --prefix), and 1 in 10 a SET:
           ordinary traffic, whose latency the drill watches.
  missing  GET of random keys that do not exist (prefix --prefix): cache penetration.

--interval pauses each thread between batches (seconds). Prints one JSON object:
  ok, errors (by kind: the error's first words, e.g. "ERR throttled", "NOPERM"), closed
  (connections the proxy closed), hits/misses (GET replies with and without a value),
  p50_ms/p99_ms/max_ms (per batch round trip), start/end (CLOCK_MONOTONIC seconds, shared with
  the drill), first_error (kind -> monotonic time of its first occurrence), and
  per_second: [{"t": second, "ok": n, "errors": n}] from start.
"""

import argparse
import json
import os
import random
import socket
import threading
import time


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, host, port, timeout):
        self.s = socket.create_connection((host, port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self):
        d = self.s.recv(65536)
        if not d:
            raise ConnectionError("closed by peer")
        self.buf += d

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill()

    def reply(self):
        """One reply: ('ok', value) / ('nil', None) / ('err', text)."""
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"-":
            return ("err", rest.decode(errors="replace"))
        if t in (b"+", b":"):
            return ("ok", rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return ("nil", None)
            while len(self.buf) < n + 2:
                self._fill()
            v, self.buf = self.buf[:n], self.buf[n + 2:]
            return ("ok", v)
        if t == b"_":
            return ("nil", None)
        if t == b"*":
            n = int(rest)
            if n < 0:
                return ("nil", None)
            for _ in range(n):
                self.reply()
            return ("ok", None)
        raise ValueError("unexpected reply %r" % line[:40])


def err_kind(text):
    words = text.split()
    if words[:2] == ["ERR", "throttled:"]:
        return "throttled"
    if words and words[0] == "NOPERM":
        return "NOPERM"
    return " ".join(words[:2]) if words else "?"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["hot", "normal", "missing"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pipeline", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--key", default="hot:key")
    p.add_argument("--prefix", default="k:")
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args()

    lock = threading.Lock()
    stats = {"ok": 0, "hits": 0, "misses": 0, "closed": 0, "errors": {}, "first_error": {}}
    lat = []
    per_second = {}
    start = time.monotonic()
    end = start + a.seconds

    def batch_cmds(rng):
        """[(command bytes, is a GET)]"""
        if a.mode == "hot":
            return [(enc("GET", a.key), True)] * a.pipeline
        if a.mode == "missing":
            return [(enc("GET", "%smiss:%d:%d" % (a.prefix, os.getpid(), rng.getrandbits(48))),
                     True) for _ in range(a.pipeline)]
        out = []
        for _ in range(a.pipeline):
            k = "%s%d" % (a.prefix, rng.randrange(a.keys))
            if rng.random() < 0.1:
                out.append((enc("SET", k, "v" * 32), False))
            else:
                out.append((enc("GET", k), True))
        return out

    def worker(seed):
        rng = random.Random(seed)
        local_lat = []
        c = None
        while time.monotonic() < end:
            try:
                if c is None:
                    c = Conn(a.host, a.port, a.timeout)
                cmds = batch_cmds(rng)
                t0 = time.monotonic()
                c.s.sendall(b"".join(b for b, _ in cmds))
                res = [(c.reply(), get) for _, get in cmds]
                t1 = time.monotonic()
            except (OSError, ConnectionError, ValueError):
                with lock:
                    stats["closed"] += 1
                if c is not None:
                    c.s.close()
                c = None
                time.sleep(0.01)
                continue
            local_lat.append((t1 - t0) * 1000.0)
            sec = int(t1 - start)
            with lock:
                row = per_second.setdefault(sec, {"ok": 0, "errors": 0})
                for (kind, v), get in res:
                    if kind == "err":
                        k = err_kind(v)
                        stats["errors"][k] = stats["errors"].get(k, 0) + 1
                        stats["first_error"].setdefault(k, t1)
                        row["errors"] += 1
                    else:
                        stats["ok"] += 1
                        row["ok"] += 1
                        if get and kind == "nil":
                            stats["misses"] += 1
                        elif get:
                            stats["hits"] += 1
            if a.interval > 0:
                time.sleep(a.interval)
        if c is not None:
            c.s.close()
        with lock:
            lat.extend(local_lat)

    threads = [threading.Thread(target=worker, args=(i * 7919 + os.getpid(),))
               for i in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()

    def pct(q):
        if not lat:
            return None
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)

    stats.update({
        "mode": a.mode,
        "batches": len(lat),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1], 3) if lat else None,
        "start": start,
        "end": time.monotonic(),
        "per_second": [dict(t=s, **per_second[s]) for s in sorted(per_second)],
    })
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
