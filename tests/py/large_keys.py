#!/usr/bin/env python3
"""Large keys through the proxy (tests/tests/largekeys.rs): big values with redis-py, big
structures written in batches and read back as raw bytes, so a reply can be compared byte for
byte with what redis-server answers directly (the same script, run on the node against the
backend).

Every mode prints one JSON object on its last line and exits non-zero on a failed check.

  large_keys.py values  --host H --port P --sizes N,N,.. --pipeline N,N,.. --over N
      redis-py SET then GET of a value of each size (a pseudo-random pattern holding every
      byte value; compared by SHA-256 and length), then one pipeline SETting and GETting
      values of the --pipeline sizes, then a raw SET whose body is --over bytes (just over the
      proxy's max_bulk_len): reports the line the proxy answered, and checks on a new
      connection that nothing was stored and the proxy still answers.
  hset    --host H --port P --key K --n N --batch B
      HSET K with N fields in commands of B fields each (raw RESP, one command in flight);
      fields f:%07d, values the 4 little-endian bytes of the field number (every byte value).
  fetch   --host H --port P --cmd JSON [--cmd JSON ..]
      sends each command (a JSON list of strings), reads its whole reply as raw bytes (up to
      an ECHO of a random token sent after it) and reports length, SHA-256 and the first bytes.
  gets    --host H --port P --key K --clients N --rounds R
      N connections at once, each GETting K R times as raw bytes; every reply must be equal.
  scan    --host H --port P --cmd JSON --count C
      iterates a SCAN-family command (the JSON list without cursor and COUNT, e.g.
      ["HSCAN","h"]) to its end; reports calls, elements and the SHA-256 of all replies.
"""

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import time


def connect(a, timeout=30.0):
    s = socket.create_connection((a.host, a.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def cmd(*args):
    out = [b"*%d\r\n" % len(args)]
    for x in args:
        if isinstance(x, str):
            x = x.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(x), x))
    return b"".join(out)


def pattern(size, seed):
    """`size` bytes: every byte value first, then a seeded pseudo-random tail."""
    head = bytes(range(256))[:size]
    return head + random.Random(seed).randbytes(max(0, size - len(head)))


def digest(b):
    return hashlib.sha256(b).hexdigest()


class ConnectionClosed(Exception):
    pass


class Raw:
    """One raw connection; `call` returns a reply's exact bytes without parsing RESP: the
    command is followed by ECHO of a random token, and the reply ends where that echo starts."""

    def __init__(self, a):
        self.s = connect(a)
        self.buf = bytearray()

    def call(self, args):
        token = os.urandom(16).hex().encode()
        tail = b"$%d\r\n%s\r\n" % (len(token), token)
        self.s.sendall(cmd(*args) + cmd("ECHO", token))
        buf = self.buf
        chunk = bytearray(1 << 20)
        view = memoryview(chunk)
        while not buf.endswith(tail):
            try:
                n = self.s.recv_into(view)
            except ConnectionResetError:
                n = 0
            if n == 0:
                raise ConnectionClosed("connection closed after %d bytes of the reply to %r: %r"
                                       % (len(buf), args[:2], bytes(buf[:80])))
            buf += view[:n]
        reply = bytes(buf[: len(buf) - len(tail)])
        self.buf = bytearray()
        return reply


def mode_values(a):
    import redis

    r = redis.Redis(host=a.host, port=a.port, socket_timeout=60)
    out = {"single": [], "pipeline": None, "over": None}
    for size in [int(x) for x in a.sizes.split(",") if x]:
        val = pattern(size, size)
        key = "lk:v:%d" % size
        t = time.time()
        assert r.set(key, val) is True, "SET %s" % key
        t_set = time.time() - t
        t = time.time()
        got = r.get(key)
        t_get = time.time() - t
        assert got is not None, "GET %s: nil" % key
        assert len(got) == size and digest(got) == digest(val), (
            "GET %s: %d bytes, sha256 %s; sent %d bytes, sha256 %s"
            % (key, len(got), digest(got), size, digest(val)))
        assert len(set(got[:256])) == 256
        out["single"].append({"size": size, "sha256": digest(val),
                              "set_ms": round(t_set * 1000), "get_ms": round(t_get * 1000)})
        del got, val

    sizes = [int(x) for x in a.pipeline.split(",") if x]
    if sizes:
        vals = [pattern(n, 1000 + i) for i, n in enumerate(sizes)]
        p = r.pipeline(transaction=False)
        for i, v in enumerate(vals):
            p.set("lk:p:%d" % i, v)
        for i in range(len(vals)):
            p.get("lk:p:%d" % i)
        p.ping()
        t = time.time()
        res = p.execute()
        took = time.time() - t
        n = len(vals)
        assert res[:n] == [True] * n, "pipeline SETs: %r" % res[:n]
        for i, (v, got) in enumerate(zip(vals, res[n:2 * n])):
            assert got is not None and len(got) == len(v) and digest(got) == digest(v), (
                "pipeline GET lk:p:%d: %s bytes" % (i, None if got is None else len(got)))
        assert res[-1] is True, "PING after the pipeline: %r" % res[-1]
        out["pipeline"] = {"sizes": sizes, "ms": round(took * 1000)}
        del res, vals

    if a.over:
        key = "lk:over"
        s = connect(a)
        s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key.encode(), a.over))
        body = os.urandom(64 * 1024)
        sent = 0
        try:
            while sent < a.over:
                n = min(len(body), a.over - sent)
                s.sendall(body[:n])
                sent += n
            s.sendall(b"\r\n")
        except (ConnectionResetError, BrokenPipeError):
            pass
        s.settimeout(10)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        assert line.startswith("-ERR"), "over max_bulk_len: answered %r" % data[:200]
        r2 = redis.Redis(host=a.host, port=a.port, socket_timeout=10)
        assert r2.ping() is True
        stored = r2.exists(key)
        assert stored == 0, "the refused value was stored"
        # The earlier values are intact.
        for size in [int(x) for x in a.sizes.split(",") if x][:1]:
            got = r2.get("lk:v:%d" % size)
            assert got == pattern(size, size), "lk:v:%d changed" % size
        out["over"] = {"size": a.over, "sent": sent, "line": line,
                       "closed": True, "stored": stored}
    print(json.dumps(out))


def mode_hset(a):
    s = Raw(a)
    fields = 0
    t = time.time()
    for start in range(0, a.n, a.batch):
        end = min(a.n, start + a.batch)
        parts = [b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 + 2 * (end - start), len(a.key),
                                                          a.key.encode())]
        parts.extend(b"$9\r\nf:%07d\r\n$4\r\n%s\r\n" % (i, i.to_bytes(4, "little"))
                     for i in range(start, end))
        s.s.sendall(b"".join(parts))
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.s.recv(64)
            if not chunk:
                raise RuntimeError("closed during HSET batch %d" % start)
            reply += chunk
        assert reply == b":%d\r\n" % (end - start), "HSET batch at %d: %r" % (start, reply)
        fields += end - start
    print(json.dumps({"fields": fields, "ms": round((time.time() - t) * 1000)}))


def mode_fetch(a):
    s = Raw(a)
    out = []
    for c in a.cmd:
        args = json.loads(c)
        t = time.time()
        reply = s.call(args)
        out.append({"cmd": args, "len": len(reply), "sha256": digest(reply),
                    "head": reply[:48].decode("latin-1"),
                    "ms": round((time.time() - t) * 1000)})
    print(json.dumps(out))


def mode_gets(a):
    """--clients connections at once, each GETting --key --rounds times as raw bytes. Every
    complete reply must be the same; a connection the proxy closes (its memory budget) ends
    that client, and is counted."""
    import threading

    results, closed, errors = [], [], []

    def one():
        try:
            s = Raw(a)
            for _ in range(a.rounds):
                reply = s.call(["GET", a.key])
                results.append((len(reply), digest(reply)))
        except ConnectionClosed as e:
            closed.append(str(e))
        except Exception as e:  # reported below
            errors.append(repr(e))

    t = time.time()
    threads = [threading.Thread(target=one) for _ in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(set(results)) <= 1, "different replies: %r" % set(results)
    print(json.dumps({"replies": len(results), "closed": len(closed),
                      "first_closed": closed[0] if closed else None,
                      "len": results[0][0] if results else None,
                      "sha256": results[0][1] if results else None,
                      "ms": round((time.time() - t) * 1000)}))


def mode_scan(a):
    s = Raw(a)
    base = json.loads(a.cmd[0])
    h = hashlib.sha256()
    cursor, calls, elements = b"0", 0, 0
    t = time.time()
    while True:
        reply = s.call(base[:1] + base[1:] + [cursor, "COUNT", str(a.count)])
        h.update(reply)
        calls += 1
        # *2\r\n$<n>\r\n<cursor>\r\n*<m>\r\n...
        parts = reply.split(b"\r\n", 4)
        assert parts[0] == b"*2" and parts[1].startswith(b"$") and parts[3].startswith(b"*"), (
            "scan reply head %r" % reply[:64])
        cursor = parts[2]
        elements += int(parts[3][1:])
        if cursor == b"0":
            break
    print(json.dumps({"calls": calls, "elements": elements, "sha256": h.hexdigest(),
                      "ms": round((time.time() - t) * 1000)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sizes", default="")
    p.add_argument("--pipeline", default="")
    p.add_argument("--over", type=int, default=0)
    p.add_argument("--key", default="h")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cmd", action="append", default=[])
    a = p.parse_args()
    fn = globals().get("mode_" + a.mode)
    if fn is None:
        sys.exit("unknown mode %s" % a.mode)
    fn(a)


if __name__ == "__main__":
    main()
