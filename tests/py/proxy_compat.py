#!/usr/bin/env python3
"""redis-py scenarios for the DataMesh RESP proxy tests (tests/tests/proxy.rs).

Usage: proxy_compat.py SCENARIO --host H --port P [options]

Each scenario talks to the proxy like an application would (redis-py sync, asyncio, cluster
client), checks every answer with assert, and prints ONE JSON line with what it measured. Any
failed check exits non-zero with a traceback (the Rust test shows it). Scenarios that must
look behind the proxy get the real server(s) with --direct / --nodes (the test process is
never captured, and neither is this script when it runs on the node).
"""

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time

try:
    import redis
    import redis.asyncio
    from redis.cluster import RedisCluster
except ImportError as e:  # pragma: no cover
    sys.exit("redis-py is not installed (run `cargo xtask setup`): %s" % e)

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def client(a, **kw):
    kw.setdefault("socket_timeout", 20)
    kw.setdefault("socket_connect_timeout", 5)
    if a.password is not None:
        kw.setdefault("password", a.password)
    if a.user is not None:
        kw.setdefault("username", a.user)
    return redis.Redis(host=a.host, port=a.port, **kw)


def direct(a, **kw):
    assert a.direct, "this scenario needs --direct host:port"
    host, port = a.direct.rsplit(":", 1)
    kw.setdefault("socket_timeout", 20)
    if a.direct_password:
        kw.setdefault("password", a.direct_password)
    return redis.Redis(host=host, port=int(port), **kw)


def expect_error(fn, *needles):
    """Runs fn, which must raise a redis error whose text contains every needle."""
    try:
        fn()
    except redis.exceptions.RedisError as e:
        # redis-py strips some error codes (NOAUTH, WRONGPASS) into the exception class.
        text = "%s: %s" % (type(e).__name__, e)
        for n in needles:
            assert n.lower() in text.lower(), "error %r lacks %r" % (text, n)
        return text
    raise AssertionError("expected an error containing %r, got a reply" % (needles,))


def pct(values, p):
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


@scenario
def basic(a):
    r = client(a)
    k = a.prefix
    assert r.ping() is True
    assert r.echo("hello") == b"hello"
    assert r.set(k + "s", "v") is True
    assert r.get(k + "s") == b"v"
    assert r.get(k + "missing") is None
    binary = b"\x00\x01\r\n\xffbinary\r\n"
    r.set(k + "bin", binary)
    assert r.get(k + "bin") == binary
    big = bytes(range(256)) * 4096  # 1 MiB
    r.set(k + "big", big)
    assert r.get(k + "big") == big
    assert r.incr(k + "n") == 1 and r.incrby(k + "n", 41) == 42
    r.expire(k + "n", 100)
    assert 0 < r.ttl(k + "n") <= 100
    r.hset(k + "h", mapping={"f1": "a", "f2": "b"})
    assert r.hgetall(k + "h") == {b"f1": b"a", b"f2": b"b"}
    r.rpush(k + "l", "x", "y", "z")
    assert r.lrange(k + "l", 0, -1) == [b"x", b"y", b"z"]
    r.sadd(k + "set", "m1", "m2")
    assert r.smembers(k + "set") == {b"m1", b"m2"}
    r.zadd(k + "z", {"one": 1, "two": 2})
    assert r.zrange(k + "z", 0, -1, withscores=True) == [(b"one", 1.0), (b"two", 2.0)]
    assert r.mset({k + "m1": "1", k + "m2": "2"}) is True
    assert r.mget([k + "m1", k + "m2", k + "missing"]) == [b"1", b"2", None]
    assert r.exists(k + "m1", k + "m2", k + "missing") == 2
    assert r.delete(k + "m1", k + "m2", k + "missing") == 2
    expect_error(lambda: r.lpush(k + "s", "x"), "WRONGTYPE")
    expect_error(lambda: r.execute_command("NOSUCHCOMMAND", "x"), "unknown command")
    assert r.client_setname("compat-basic") is True
    assert r.client_getname() in ("compat-basic", b"compat-basic")
    cid = r.client_id()
    assert isinstance(cid, int) and cid > 0
    info = r.info("server")
    assert "redis_version" in info, info
    print(json.dumps({"ok": True, "client_id": cid, "redis_version": info["redis_version"]}))


@scenario
def pipeline(a):
    r = client(a)
    k = a.prefix
    n = a.count
    p = r.pipeline(transaction=False)
    for i in range(n):
        p.set("%sp:%d" % (k, i), "v%d" % i)
    for i in range(n):
        p.get("%sp:%d" % (k, i))
    t0 = time.monotonic()
    res = p.execute()
    dt = time.monotonic() - t0
    assert len(res) == 2 * n, len(res)
    assert all(x is True for x in res[:n]), res[:n][:10]
    for i in range(n):
        assert res[n + i] == ("v%d" % i).encode(), (i, res[n + i])
    print(json.dumps({"ok": True, "commands": 2 * n, "seconds": round(dt, 3)}))


@scenario
def transaction(a):
    r = client(a)
    other = client(a)
    k = a.prefix
    p = r.pipeline(transaction=True)
    p.set(k + "t", 1).incr(k + "t").get(k + "t")
    assert p.execute() == [True, 2, b"2"]

    # An error inside EXEC is per command; the others still run.
    r.set(k + "str", "text")
    p = r.pipeline(transaction=True)
    p.set(k + "t2", "a").incr(k + "str").get(k + "t2")
    res = p.execute(raise_on_error=False)
    assert res[0] is True and isinstance(res[1], redis.exceptions.ResponseError) and res[2] == b"a", res

    # WATCH without a conflict commits.
    r.set(k + "w", "start")
    with r.pipeline() as p:
        p.watch(k + "w")
        assert p.get(k + "w") == b"start"
        p.multi()
        p.set(k + "w", "mine")
        assert p.execute() == [True]
    assert r.get(k + "w") == b"mine"

    # WATCH with a conflict from another client aborts: WatchError, the other write stays.
    with r.pipeline() as p:
        p.watch(k + "w")
        p.get(k + "w")
        other.set(k + "w", "theirs")
        p.multi()
        p.set(k + "w", "mine-again")
        try:
            p.execute()
            raise AssertionError("EXEC after a conflicting write did not abort")
        except redis.exceptions.WatchError:
            pass
    assert r.get(k + "w") == b"theirs"

    # DISCARD and UNWATCH on one connection.
    c = client(a, single_connection_client=True)
    assert c.execute_command("WATCH", k + "w")
    assert c.execute_command("UNWATCH")
    assert c.execute_command("MULTI")
    c.execute_command("SET", k + "discarded", "x")  # QUEUED (redis-py's SET callback maps it)
    assert c.execute_command("DISCARD")
    assert c.get(k + "discarded") is None
    # EXEC without MULTI is the server's error.
    expect_error(lambda: c.execute_command("EXEC"), "EXEC without MULTI")
    print(json.dumps({"ok": True}))


def next_message(p, want_type, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = p.get_message(timeout=max(0.01, deadline - time.monotonic()))
        if m is None:
            continue
        if m["type"] == want_type:
            return m
        raise AssertionError("expected a %s message, got %r" % (want_type, m))
    raise AssertionError("no %s message within %.1fs" % (want_type, timeout))


@scenario
def pubsub(a):
    pub = client(a)
    sub_client = client(a, protocol=a.protocol)
    k = a.prefix
    p = sub_client.pubsub()
    p.subscribe(k + "ch")
    m = next_message(p, "subscribe")
    assert m["channel"] == (k + "ch").encode(), m
    p.psubscribe(k + "news.*")
    m = next_message(p, "psubscribe")
    assert m["channel"] == (k + "news.*").encode(), m

    n = pub.publish(k + "ch", "hello")
    assert n == 1, "PUBLISH reached %r subscribers, expected 1" % n
    m = next_message(p, "message")
    assert m["channel"] == (k + "ch").encode() and m["data"] == b"hello", m

    n = pub.publish(k + "news.tech", "extra")
    assert n == 1, n
    m = next_message(p, "pmessage")
    assert m["pattern"] == (k + "news.*").encode() and m["data"] == b"extra", m

    # PING while subscribed is answered in pub/sub form.
    p.ping()
    m = next_message(p, "pong")

    p.unsubscribe(k + "ch")
    next_message(p, "unsubscribe")
    assert pub.publish(k + "ch", "gone") == 0, "a message reached an unsubscribed channel"
    p.punsubscribe(k + "news.*")
    next_message(p, "punsubscribe")
    assert pub.publish(k + "news.tech", "gone") == 0
    p.close()
    # The publishing client's shared connection is unaffected.
    assert pub.set(k + "after", "1") and pub.get(k + "after") == b"1"
    print(json.dumps({"ok": True, "protocol": a.protocol}))


@scenario
def blocking(a):
    k = a.prefix
    blockers = a.count
    d = direct(a)
    results = {}
    errors = []

    def block(i):
        try:
            c = client(a, socket_timeout=60)
            t0 = time.monotonic()
            res = c.blpop(["%sq:%d" % (k, i)], timeout=30)
            results[i] = (res, time.monotonic())
            del t0
        except Exception as e:  # reported below
            errors.append("blocker %d: %r" % (i, e))

    threads = [threading.Thread(target=block, args=(i,), daemon=True) for i in range(blockers)]
    for t in threads:
        t.start()
    # Every blocker waits on its own backend connection: the backend shows them all in BLPOP.
    deadline = time.monotonic() + 15
    while True:
        blocked = [c for c in d.client_list() if c.get("cmd") == "blpop"]
        if len(blocked) >= blockers:
            break
        assert not errors, errors
        assert time.monotonic() < deadline, "only %d of %d BLPOPs reached the backend: %r" % (
            len(blocked), blockers, d.client_list())
        time.sleep(0.02)

    # Meanwhile other clients work on the shared pool at normal latency.
    lat = []
    lat_lock = threading.Lock()

    def work(w):
        try:
            c = client(a)
            mine = []
            for i in range(200):
                key = "%sw:%d:%d" % (k, w, i)
                t0 = time.monotonic()
                c.set(key, i)
                assert c.get(key) == str(i).encode()
                mine.append(time.monotonic() - t0)
            with lat_lock:
                lat.extend(mine)
        except Exception as e:
            errors.append("worker %d: %r" % (w, e))

    workers = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(10)]
    t0 = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    work_s = time.monotonic() - t0
    assert not errors, errors
    assert len(lat) == 2000, "workers finished %d of 2000 round trips" % len(lat)
    assert not results, "a BLPOP returned before anything was pushed: %r" % results

    pusher = client(a)
    pushed_at = time.monotonic()
    for i in range(blockers):
        assert pusher.lpush("%sq:%d" % (k, i), "item-%d" % i) >= 1
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert len(results) == blockers, "only %d of %d BLPOPs woke up" % (len(results), blockers)
    wake = []
    for i, (res, at) in results.items():
        assert res == (("%sq:%d" % (k, i)).encode(), ("item-%d" % i).encode()), (i, res)
        wake.append(at - pushed_at)
    out = {
        "ok": True,
        "blockers": blockers,
        "work_seconds": round(work_s, 3),
        "p50_ms": round(pct(lat, 0.5) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
        "max_ms": round(max(lat) * 1000, 2),
        "max_wake_ms": round(max(wake) * 1000, 2),
    }
    print(json.dumps(out))


@scenario
def select(a):
    k = a.prefix
    r0 = client(a, db=0)
    r1 = client(a, db=1)
    r0.set(k + "db", "zero")
    r1.set(k + "db", "one")
    assert r0.get(k + "db") == b"zero"
    assert r1.get(k + "db") == b"one"
    # What the backend holds, per database.
    assert direct(a, db=0).get(k + "db") == b"zero"
    assert direct(a, db=1).get(k + "db") == b"one"
    assert direct(a, db=2).get(k + "db") is None
    # SELECT back and forth on one connection, also pipelined.
    c = client(a, single_connection_client=True)
    assert c.execute_command("SELECT", 1)
    assert c.get(k + "db") == b"one"
    assert c.execute_command("SELECT", 0)
    assert c.get(k + "db") == b"zero"
    p = c.pipeline(transaction=False)
    p.execute_command("SELECT", 1).get(k + "db").execute_command("SELECT", 0).get(k + "db")
    res = p.execute()
    assert res[1] == b"one" and res[3] == b"zero", res
    expect_error(lambda: c.execute_command("SELECT", 99999), "out of range")
    assert c.get(k + "db") == b"zero"
    print(json.dumps({"ok": True}))


@scenario
def auth(a):
    k = a.prefix
    anon = redis.Redis(host=a.host, port=a.port, socket_timeout=10)
    expect_error(lambda: anon.get(k + "x"), "Authentication")
    ok = redis.Redis(host=a.host, port=a.port, password=a.password, socket_timeout=10)
    assert ok.set(k + "x", "1") and ok.get(k + "x") == b"1"
    alice = redis.Redis(host=a.host, port=a.port, username=a.user, password=a.user_password,
                        socket_timeout=10)
    assert alice.get(k + "x") == b"1"
    wrong = redis.Redis(host=a.host, port=a.port, password="not-the-password", socket_timeout=10)
    msg = expect_error(lambda: wrong.get(k + "x"))
    assert "AuthenticationError" in msg and "invalid" in msg.lower(), msg
    wrong_user = redis.Redis(host=a.host, port=a.port, username=a.user, password=a.password + "x",
                             socket_timeout=10)
    expect_error(lambda: wrong_user.get(k + "x"))
    # HELLO 3 with AUTH in one step.
    r3 = redis.Redis(host=a.host, port=a.port, username=a.user, password=a.user_password,
                     protocol=3, socket_timeout=10)
    assert r3.get(k + "x") == b"1"
    # (AUTH on an open connection, byte for byte, is checked with a raw socket in Rust.)
    print(json.dumps({"ok": True, "wrong_password_error": msg}))


@scenario
def resp3(a):
    k = a.prefix
    r = client(a, protocol=3)
    hello = r.execute_command("HELLO", 3)
    hello = {(x.decode() if isinstance(x, bytes) else x): y for x, y in hello.items()}
    assert hello.get("proto") == 3, hello
    assert hello.get("server") in (b"redis", "redis"), hello
    assert r.set(k + "s", "v") and r.get(k + "s") == b"v"
    r.hset(k + "h", mapping={"a": "1", "b": "2"})
    assert r.hgetall(k + "h") == {b"a": b"1", b"b": b"2"}
    r.zadd(k + "z", {"m": 1.5})
    assert r.zscore(k + "z", "m") == 1.5
    assert r.smembers(k + "missing-set") == set()
    assert r.get(k + "missing") is None
    assert isinstance(r.client_id(), int)
    # The same commands work on RESP2 next to it.
    r2 = client(a, protocol=2)
    assert r2.hgetall(k + "h") == {b"a": b"1", b"b": b"2"}
    print(json.dumps({"ok": True, "hello": {x: str(y) for x, y in hello.items()}}))


@scenario
def asyncio_gather(a):
    k = a.prefix
    n = a.count

    async def main():
        kw = {"socket_timeout": 30}
        if a.password is not None:
            kw["password"] = a.password
        # One connection per concurrent command: n client connections at once.
        r = redis.asyncio.Redis(host=a.host, port=a.port, max_connections=n, **kw)
        t0 = time.monotonic()
        res = await asyncio.gather(*(r.set("%sa:%d" % (k, i), "v%d" % i) for i in range(n)))
        assert all(x is True for x in res), res
        vals = await asyncio.gather(*(r.get("%sa:%d" % (k, i)) for i in range(n)))
        for i, v in enumerate(vals):
            assert v == ("v%d" % i).encode(), (i, v)
        counts = await asyncio.gather(*(r.incr(k + "counter") for _ in range(n)))
        assert sorted(counts) == list(range(1, n + 1)), counts
        async with r.pipeline(transaction=False) as p:
            for i in range(n):
                p.get("%sa:%d" % (k, i))
            pres = await p.execute()
        assert pres == [("v%d" % i).encode() for i in range(n)]
        dt = time.monotonic() - t0
        conns = len(r.connection_pool._available_connections) + len(r.connection_pool._in_use_connections)
        await r.aclose()
        return dt, conns

    dt, conns = asyncio.run(main())
    print(json.dumps({"ok": True, "commands": 4 * n, "seconds": round(dt, 3), "connections": conns}))


@scenario
def cluster_client(a):
    k = a.prefix
    rc = RedisCluster(host=a.host, port=a.port, socket_timeout=20)
    nodes = rc.get_nodes()
    keys = ["%sc:%d" % (k, i) for i in range(a.count)]
    for i, key in enumerate(keys):
        assert rc.set(key, "v%d" % i) is True
    for i, key in enumerate(keys):
        assert rc.get(key) == ("v%d" % i).encode()
    mapping = {key + ":m": "m%d" % i for i, key in enumerate(keys)}
    res = rc.mset_nonatomic(mapping)  # one result per slot batch (redis-py >= 5: a list)
    assert res is True or (isinstance(res, list) and res and all(x is True for x in res)), res
    assert rc.mget_nonatomic(list(mapping)) == [v.encode() for v in mapping.values()]
    p = rc.pipeline()
    for key in keys:
        p.incr(key + ":n")
    assert p.execute() == [1] * len(keys)
    info = rc.cluster_info()
    assert info.get("cluster_state") == "ok", info
    # Behind the proxy the keys really are spread over the backend cluster's masters.
    spread = {}
    if a.nodes:
        direct_nodes = []
        for addr in a.nodes.split(","):
            host, port = addr.rsplit(":", 1)
            direct_nodes.append((addr, redis.Redis(host=host, port=int(port), socket_timeout=10)))
        def holds(n, key):
            try:
                return n.execute_command("EXISTS", key) == 1
            except redis.exceptions.MovedError:  # not this node's slot
                return False

        for key in keys:
            holders = [addr for addr, n in direct_nodes if holds(n, key)]
            assert len(holders) == 1, (key, holders)
            spread[holders[0]] = spread.get(holders[0], 0) + 1
        assert len(spread) == len(direct_nodes), "keys did not reach every master: %r" % spread
    print(json.dumps({"ok": True, "client_nodes": [n.name for n in nodes], "spread": spread}))


@scenario
def hammer(a):
    """A pipeline of --count GETs as fast as possible; counts throttle errors and time."""
    r = client(a)
    r.set(a.prefix + "h", "x")
    t0 = time.monotonic()
    p = r.pipeline(transaction=False)
    for _ in range(a.count):
        p.get(a.prefix + "h")
    res = p.execute(raise_on_error=False)
    dt = time.monotonic() - t0
    ok = sum(1 for x in res if x == b"x")
    throttled = [str(x) for x in res if isinstance(x, Exception) and "throttled" in str(x)]
    other = [str(x) for x in res if isinstance(x, Exception) and "throttled" not in str(x)]
    # And sequential commands: each one is delayed or refused, never lost.
    seq_lat = []
    seq_throttled = 0
    for _ in range(a.count // 10):
        t1 = time.monotonic()
        try:
            assert r.get(a.prefix + "h") == b"x"
        except redis.exceptions.ResponseError as e:
            assert "throttled" in str(e), e
            seq_throttled += 1
        seq_lat.append(time.monotonic() - t1)
    print(json.dumps({
        "ok": ok, "throttled": len(throttled), "other_errors": other[:5], "n_other": len(other),
        "seconds": round(dt, 3), "first_throttle_error": throttled[0] if throttled else None,
        "seq_throttled": seq_throttled, "seq_p50_ms": round(pct(seq_lat, 0.5) * 1000, 2),
        "seq_max_ms": round(max(seq_lat) * 1000, 2) if seq_lat else 0,
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--password")
    ap.add_argument("--user")
    ap.add_argument("--user-password")
    ap.add_argument("--direct", help="host:port of the backend, for checks behind the proxy")
    ap.add_argument("--direct-password")
    ap.add_argument("--nodes", help="comma-separated cluster node addresses behind the proxy")
    ap.add_argument("--prefix", default="compat:")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--protocol", type=int, default=2)
    a = ap.parse_args()
    SCENARIOS[a.scenario](a)


if __name__ == "__main__":
    main()
