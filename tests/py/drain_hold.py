#!/usr/bin/env python3
"""Connections a drain must not close at once (tests/tests/drain.rs).

Opens, through redis-py connections: an idle one (PING answered), one inside MULTI (a SET
queued), one in BLPOP (timeout 30 s), a RESP2 subscriber and a RESP3 client with a
subscription. Waits until all are quiet (longer than the proxy's 250 ms quiet wait), sends
SIGNAL to PID (the agent's worker), then watches every socket until it is closed by the peer.

Prints one JSON object: closed_ms (name -> ms from the signal to its close, null if not closed
within --wait seconds), unsolicited (name -> bytes received before the close: a drain closes
without a last line).
"""

import argparse
import json
import os
import select
import signal
import time

import redis


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--signal", default="SIGUSR1")
    ap.add_argument("--wait", type=float, default=8.0)
    args = ap.parse_args()

    def conn(protocol=2):
        c = redis.Connection(host=args.host, port=args.port, socket_timeout=10, protocol=protocol)
        c.connect()
        return c

    conns = {}
    idle = conn()
    idle.send_command("PING")
    assert idle.read_response() in (b"PONG", "PONG", True)
    conns["idle"] = idle

    multi = conn()
    multi.send_command("MULTI")
    assert multi.read_response() in (b"OK", "OK", True)
    multi.send_command("SET", "dm-drain-multi", "v")
    assert multi.read_response() in (b"QUEUED", "QUEUED")
    conns["multi"] = multi

    blpop = conn()
    blpop.send_command("BLPOP", "dm-drain-nothing", 30)
    conns["blpop"] = blpop

    sub2 = conn()
    sub2.send_command("SUBSCRIBE", "dm-drain-ch")
    r = sub2.read_response()
    assert r[0] in (b"subscribe", "subscribe"), r
    conns["subscribe_resp2"] = sub2

    sub3 = conn(protocol=3)
    sub3.send_command("SUBSCRIBE", "dm-drain-ch3")
    r = sub3.read_response(push_request=True)
    assert r[0] in (b"subscribe", "subscribe"), r
    conns["subscribe_resp3"] = sub3

    # Everyone quiet for longer than the proxy's quiet wait; the BLPOP is there by now.
    time.sleep(0.6)
    socks = {c._sock.fileno(): (name, c._sock) for name, c in conns.items()}
    closed = {name: None for name in conns}
    unsolicited = {name: 0 for name in conns}
    t0 = time.monotonic()
    os.kill(args.pid, getattr(signal, args.signal))
    open_fds = set(socks)
    while open_fds and time.monotonic() - t0 < args.wait:
        ready, _, _ = select.select(list(open_fds), [], [], 0.05)
        for fd in ready:
            name, s = socks[fd]
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data:
                unsolicited[name] += len(data)
                continue
            closed[name] = round((time.monotonic() - t0) * 1000, 1)
            open_fds.discard(fd)
    print(json.dumps({"closed_ms": closed, "unsolicited": unsolicited}))


if __name__ == "__main__":
    main()
