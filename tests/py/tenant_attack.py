#!/usr/bin/env python3
"""Hostile-tenant scenarios against the proxy, with raw sockets (the attacks are about bytes
and connection behaviour, which a client library would hide), and a redis-py bystander that
checks every reply it gets.

Every scenario prints one JSON object on its last line. Usage:

  tenant_attack.py SCENARIO --host H --port P [options]

Scenarios:
  upload      one SET with a body of --size bytes, streamed in 64 KiB chunks
  uploads     --clients N uploads of --size bytes at once (a body each, never finished if the
              proxy stops them); reports how each ended
  noread      --clients N connections each pipelining --gets GETs of --key and never reading;
              after --seconds, reports how many the proxy closed
  slowsub     one subscriber on --channel that never reads, for --seconds; reports closed
  publish     --count PUBLISHes of --size bytes to --channel (a well-behaved publisher)
  blpop-close --clients N connections each sending `BLPOP k 0` then a malformed frame, then
              closing; reports nothing but counts
  hold-blocked --clients N connections each blocked in BLPOP; reports how many block and how
              many were refused (the per-pod max_dedicated)
  fire-forget --clients N connections that each send one SET and close at once (no read)
  hold        --clients N idle connections held for --seconds; reports how many were refused
              (got an error line and were closed) and the first refusal
  slowloris   --clients N connections sending one byte of a command every --interval s;
              reports how many were closed within --seconds and the closing line
  idle        one connection that sends PING then nothing; reports when it was closed
  bystander   redis-py SET/GET of random values for --seconds; every reply is checked
"""

import argparse
import json
import os
import random
import select
import socket
import sys
import time


def connect(a, timeout=5.0):
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


def read_line(s, timeout):
    """The first line the server sent, or '' when it closed, or None on timeout."""
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return buf.decode(errors="replace") if buf else ""
            buf += chunk
    except socket.timeout:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return buf.decode(errors="replace") if buf else ""
    return buf.split(b"\r\n", 1)[0].decode(errors="replace")


def closed_by_peer(s, quiet=0.5):
    """True when the server closed (EOF or reset). Reads what is in flight (a closed
    connection's last replies may still be arriving) until EOF, a reset, or `quiet` seconds
    without data."""
    return all_closed([s], quiet)[0]


def all_closed(socks, quiet=0.5, deadline=15.0):
    """closed_by_peer for many sockets at once."""
    state = {s.fileno(): None for s in socks}
    last = {s.fileno(): time.time() for s in socks}
    by_fd = {s.fileno(): s for s in socks}
    end = time.time() + deadline
    for s in socks:
        s.setblocking(False)
    while time.time() < end:
        open_fds = [fd for fd, v in state.items() if v is None]
        if not open_fds:
            break
        r, _, _ = select.select(open_fds, [], [], 0.05)
        now = time.time()
        for fd in r:
            try:
                data = by_fd[fd].recv(1 << 20)
                if not data:
                    state[fd] = True
                else:
                    last[fd] = now
            except (ConnectionResetError, BrokenPipeError):
                state[fd] = True
            except BlockingIOError:
                pass
        for fd in open_fds:
            if state[fd] is None and now - last[fd] > quiet:
                state[fd] = False
    for s in socks:
        s.setblocking(True)
    return [bool(state[s.fileno()]) for s in socks]


def upload_one(a, size, chunk=64 * 1024):
    s = connect(a)
    s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\nup:%d\r\n$%d\r\n" % (len(b"up:%d" % size), size, size))
    sent, line = 0, None
    body = os.urandom(chunk)
    try:
        while sent < size:
            n = min(chunk, size - sent)
            s.sendall(body[:n])
            sent += n
        s.sendall(b"\r\n")
        line = read_line(s, 30)
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        line = read_line(s, 2)
    s.close()
    return {"sent": sent, "line": line}


def scenario_upload(a):
    r = upload_one(a, a.size)
    print(json.dumps(r))


def scenario_uploads(a):
    # Each client announces a body of --size and streams it slowly enough that they all hold
    # their part at once; the proxy should stop some (budget) before the agent's memory runs out.
    socks = []
    for _ in range(a.clients):
        s = connect(a)
        key = b"ups:%d" % len(socks)
        s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, a.size))
        socks.append({"s": s, "sent": 0, "dead": False, "line": None})
    chunk = os.urandom(256 * 1024)
    deadline = time.time() + a.seconds
    while time.time() < deadline and any(not c["dead"] and c["sent"] < a.size for c in socks):
        for c in socks:
            if c["dead"] or c["sent"] >= a.size:
                continue
            n = min(len(chunk), a.size - c["sent"])
            try:
                c["s"].settimeout(0.5)
                c["s"].sendall(chunk[:n])
                c["sent"] += n
                if c["sent"] >= a.size:
                    c["s"].sendall(b"\r\n")
            except socket.timeout:
                # The proxy is not reading it now (paused at the budget); try again later.
                pass
            except (ConnectionResetError, BrokenPipeError):
                c["dead"] = True
        time.sleep(a.interval)
    out = []
    for c in socks:
        line = read_line(c["s"], 5)
        out.append({"sent": c["sent"], "line": line})
        c["s"].close()
    print(json.dumps({
        "clients": out,
        "ok": sum(1 for c in out if c["line"] == "+OK"),
        "closed": sum(1 for c in out if c["line"] != "+OK"),
    }))


def scenario_noread(a):
    socks = []
    batch = cmd("GET", a.key) * a.gets
    for _ in range(a.clients):
        s = connect(a)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        try:
            s.send(batch)
        except BlockingIOError:
            pass
        s.setblocking(True)
        socks.append(s)
    # Whether the proxy closed them is read from its own metrics by the caller: a closed
    # connection's FIN waits behind megabytes this slow reader would have to drain first.
    time.sleep(a.seconds)
    for s in socks:
        s.close()
    print(json.dumps({"clients": a.clients}))


def scenario_slowsub(a):
    s = connect(a)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(cmd("SUBSCRIBE", a.channel))
    first = read_line(s, 5)
    time.sleep(a.seconds)
    s.close()
    print(json.dumps({"first": first}))


def scenario_publish(a):
    s = connect(a)
    payload = os.urandom(a.size // 2).hex().encode()
    receivers, errors = [], 0
    for _ in range(a.count):
        s.sendall(cmd("PUBLISH", a.channel, payload))
        line = read_line(s, 10)
        if line is None or not line.startswith(":"):
            errors += 1
        else:
            receivers.append(int(line[1:]))
    s.close()
    print(json.dumps({"published": a.count, "errors": errors, "last_receivers": receivers[-1:]}))


def scenario_blpop_close(a):
    for i in range(a.clients):
        s = connect(a)
        s.sendall(b"BLPOP dm:never:%d 0\r\n*1\r\nX\r\n" % i)
        s.close()
    print(json.dumps({"clients": a.clients}))


def scenario_hold(a):
    socks, refused, first = [], 0, None
    for _ in range(a.clients):
        try:
            s = connect(a)
        except OSError as e:
            refused += 1
            first = first or "connect: %s" % e
            continue
        socks.append(s)
    # A refused connection gets one error line and is closed at once.
    time.sleep(0.5)
    lines = {}
    for s in socks:
        line = closed_by_peer_line(s)
        if line is not None:
            lines[id(s)] = line
            refused += 1
            first = first or line
    # The ones that stayed are served.
    served = 0
    for s in socks:
        if id(s) not in lines:
            try:
                s.sendall(cmd("PING"))
                if read_line(s, 5) == "+PONG":
                    served += 1
            except OSError:
                pass
    time.sleep(a.seconds)
    for s in socks:
        s.close()
    print(json.dumps({"clients": a.clients, "refused": refused, "served": served, "first_refusal": first}))


def scenario_fire_forget(a):
    for i in range(a.clients):
        s = connect(a)
        s.sendall(cmd("SET", "ff:%d" % i, "1"))
        s.close()
    print(json.dumps({"clients": a.clients}))


def scenario_hold_blocked(a):
    socks = []
    for i in range(a.clients):
        s = connect(a)
        s.sendall(cmd("BLPOP", "dm:hb:%d" % i, "0"))
        socks.append(s)
    blocked = refused = 0
    first = None
    for s in socks:
        line = read_line(s, 1.0)
        if line is None:
            blocked += 1
        else:
            refused += 1
            first = first or line
    time.sleep(a.seconds)
    for s in socks:
        s.close()
    print(json.dumps({"clients": a.clients, "blocked": blocked, "refused": refused, "first_refusal": first}))


def closed_by_peer_line(s):
    """The line a refused connection got ('' if only closed), None if it is still open."""
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return ""
    finally:
        s.setblocking(True)
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def scenario_slowloris(a):
    socks = [connect(a) for _ in range(a.clients)]
    msg = cmd("SET", "slow", "x" * 64)
    start = time.time()
    pos = 0
    closed_at, lines = {}, {}
    while time.time() - start < a.seconds and len(closed_at) < len(socks):
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                if pos < len(msg):
                    s.send(msg[pos:pos + 1])
            except OSError:
                closed_at[i] = time.time() - start
                continue
            r, _, _ = select.select([s], [], [], 0)
            if r:
                line = read_line(s, 1)
                closed_at[i] = time.time() - start
                lines[i] = line
        pos += 1
        time.sleep(a.interval)
    for s in socks:
        s.close()
    print(json.dumps({
        "clients": a.clients,
        "closed": len(closed_at),
        "max_closed_after_s": max(closed_at.values()) if closed_at else None,
        "line": next(iter(lines.values()), None),
    }))


def scenario_idle(a):
    s = connect(a)
    s.sendall(cmd("PING"))
    first = read_line(s, 5)
    start = time.time()
    line = read_line(s, a.seconds)
    print(json.dumps({"first": first, "closed_after_s": None if line is None else round(time.time() - start, 2), "line": line}))


def scenario_bystander(a):
    import redis

    r = redis.Redis(host=a.host, port=a.port, socket_timeout=10)
    ok = wrong = errors = 0
    first_error = None
    worst = 0.0
    end = time.time() + a.seconds
    i = 0
    while time.time() < end:
        key = "bystander:%d" % (i % 64)
        val = os.urandom(random.randint(1, 2048))
        t = time.time()
        try:
            r.set(key, val)
            got = r.get(key)
            if got == val:
                ok += 1
            else:
                wrong += 1
        except Exception as e:  # every error is a failure of isolation here
            errors += 1
            first_error = first_error or repr(e)
            try:
                r = redis.Redis(host=a.host, port=a.port, socket_timeout=10)
            except Exception:
                pass
            time.sleep(0.05)
        worst = max(worst, time.time() - t)
        i += 1
        time.sleep(a.interval)
    print(json.dumps({"ok": ok, "wrong": wrong, "errors": errors, "first_error": first_error,
                      "worst_ms": round(worst * 1000, 1)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--gets", type=int, default=1000)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--key", default="big")
    p.add_argument("--channel", default="news")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--interval", type=float, default=0.0)
    a = p.parse_args()
    fn = globals().get("scenario_" + a.scenario.replace("-", "_"))
    if fn is None:
        sys.exit("unknown scenario %s" % a.scenario)
    fn(a)


if __name__ == "__main__":
    main()
