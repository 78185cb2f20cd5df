#!/usr/bin/env python3
"""Client load of one pod for the gray-release drill (tests/src/graydrill.rs), redis-py.

For SECONDS, two threads against HOST:PORT (the endpoint's service address, as a pod dials it):

  short  a new connection every INTERVAL seconds: CLIENT INFO, SET, GET (checked), INCR, close.
         Each connection is recorded as [t, via, ok, errors]: t the CLOCK_MONOTONIC time just
         before its connect (shared with the drill), via 1 when the proxy answered (its CLIENT
         INFO line says fd=-1: the proxy's own client registry) and 0 when Redis did (a real
         fd), 2 when the connection failed before CLIENT INFO answered.
  long   one connection for the whole run, SET/GET/INCR every INTERVAL seconds: whatever the
         drill reloads, it keeps its path and sees no error.

With --ready-file and --go-file: writes the first once imported, then waits (up to 60 s) for
the second to exist before it starts, so the drill starts every pod's load at once.

No client retries: every exception and every wrong value is an error, counted by kind (the
exception's class and the first words of its message). Prints one JSON object:
  pod, start, end, ok (commands answered right), errors {kind: n}, conns [[t, via, ok, err]],
  long {t, via, ok, errors} (t: before its connect).
"""

import argparse
import json
import os
import threading
import time

import redis


def kind(e):
    words = str(e).split()[:3]
    return " ".join([type(e).__name__] + words)


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = {}

    def error(self, k):
        with self.lock:
            self.errors[k] = self.errors.get(k, 0) + 1

    def add_ok(self, n):
        with self.lock:
            self.ok += n


def client(host, port):
    # single_connection_client: the connection is opened here and used for every command.
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=3,
        socket_connect_timeout=3,
        single_connection_client=True,
    )


def via_of(r):
    info = r.execute_command("CLIENT", "INFO")
    if isinstance(info, dict):  # a redis-py version that parses the line
        return 1 if str(info.get("fd")) == "-1" else 0
    if isinstance(info, bytes):
        info = info.decode(errors="replace")
    return 1 if " fd=-1 " in f" {info} " else 0


def work(r, pod, i, tally):
    """SET, GET (checked) and INCR on r; returns (ok, errors)."""
    key = f"gray:{pod}:{i % 64}"
    val = f"{pod}-{i}".encode()
    ok = err = 0
    if r.set(key, val):
        ok += 1
    else:
        err += 1
        tally.error("wrong SET reply")
    got = r.get(key)
    if got == val:
        ok += 1
    else:
        err += 1
        tally.error("wrong GET value")
    r.incr(f"gray:{pod}:count")
    ok += 1
    return ok, err


def short_loop(a, deadline, tally, conns):
    i = 0
    while time.monotonic() < deadline:
        i += 1
        t = time.monotonic()
        via, ok, err = 2, 0, 0
        r = None
        try:
            r = client(a.host, a.port)
            via = via_of(r)
            ok += 1
            o, e = work(r, a.pod, i, tally)
            ok += o
            err += e
        except Exception as e:  # every failure is a client error
            err += 1
            tally.error(kind(e))
        finally:
            if r is not None:
                try:
                    r.close()
                except Exception:
                    pass
        tally.add_ok(ok)
        conns.append([round(t, 6), via, ok, err])
        pause = a.interval - (time.monotonic() - t)
        if pause > 0:
            time.sleep(pause)


def long_loop(a, deadline, tally, out):
    ok = err = 0
    out["t"] = round(time.monotonic(), 6)
    try:
        r = client(a.host, a.port)
        out["via"] = via_of(r)
        ok += 1
    except Exception as e:
        tally.error(kind(e))
        out.update(via=2, ok=0, errors=1)
        return
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            o, e = work(r, a.pod + "-long", i, tally)
            ok += o
            err += e
        except Exception as e:
            err += 1
            tally.error(kind(e))
            try:
                r.close()
                r = client(a.host, a.port)
            except Exception:
                pass
        time.sleep(a.interval)
    tally.add_ok(ok)
    out.update(ok=ok, errors=err)
    try:
        r.close()
    except Exception:
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--pod", required=True)
    p.add_argument("--ready-file", default="")
    p.add_argument("--go-file", default="")
    a = p.parse_args()

    tally = Tally()
    conns = []
    long_out = {}
    if a.ready_file:
        # Every pod's load starts at once: python's start-up on a busy machine takes from
        # a fraction of a second to seconds, and the drill times its reloads from the start.
        with open(a.ready_file, "w") as f:
            f.write("ready\n")
        give_up = time.monotonic() + 60
        while a.go_file and not os.path.exists(a.go_file) and time.monotonic() < give_up:
            time.sleep(0.002)
    start = time.monotonic()
    deadline = start + a.seconds
    threads = [
        threading.Thread(target=short_loop, args=(a, deadline, tally, conns)),
        threading.Thread(target=long_loop, args=(a, deadline, tally, long_out)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "pod": a.pod,
                "start": start,
                "end": time.monotonic(),
                "ok": tally.ok,
                "errors": tally.errors,
                "conns": conns,
                "long": long_out,
            }
        )
    )


if __name__ == "__main__":
    main()
