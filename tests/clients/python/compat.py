#!/usr/bin/env python3
"""redis-py client program of the compatibility test (tests/clients/README.md has the contract).

Each feature runs in a forked child with its own connections and a 10 s deadline, and prints
exactly one `RESULT <feature> <status> <detail>` line: `works` when redis-py got what Redis
gives (checked against hard-coded values), `refused` when the server answered an error,
`differs` for a documented difference, `na` when redis-py has no such feature, `FAILED`
otherwise. Anything else printed is log.
"""

import os
import sys
import threading
import time
import traceback

import redis
import redis.backoff
import redis.retry
from redis.cluster import RedisCluster

HOST = os.environ["DM_HOST"]
PORT = int(os.environ["DM_PORT"])
USER = os.environ["DM_USER"]
PASSWORD = os.environ["DM_PASSWORD"]
TOPOLOGY = os.environ.get("DM_TOPOLOGY", "standalone")
MODE = os.environ.get("DM_MODE", "proxy")
PREFIX = os.environ["DM_PREFIX"]
FEATURE_SECS = 10


class Status(Exception):
    """Ends a feature with a status other than `works` (`differs`, `na`, `refused`)."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def key(name):
    # One hash slot per run in cluster topology, so MULTI, scripts and BLPOP pairs stay legal.
    if TOPOLOGY == "cluster":
        return "{%s}%s" % (PREFIX, name)
    return PREFIX + name


def conn(**kw):
    kw.setdefault("socket_timeout", 8)
    kw.setdefault("socket_connect_timeout", 5)
    kw.setdefault("username", USER)
    kw.setdefault("password", PASSWORD)
    return redis.Redis(host=HOST, port=PORT, **kw)


def no_retry():
    # A wrong password is not worth retrying (redis-py 8 retries connects by default).
    return redis.retry.Retry(redis.backoff.NoBackoff(), 0)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def f_auth():
    r = conn()
    check(r.ping() is True, "PING did not answer PONG")
    bad = conn(password=PASSWORD + "-wrong", retry=no_retry())
    try:
        bad.ping()
    except redis.exceptions.AuthenticationError as e:
        check("invalid" in str(e).lower() or "wrongpass" in str(e).lower(), "error %r" % e)
        return "username/password options; wrong password: AuthenticationError"
    raise AssertionError("a wrong password was accepted")


def f_select():
    k = key("select")
    r2 = conn(db=2)
    check(r2.set(k, "in-db-2") is True, "SET in db 2")
    check(r2.get(k) == b"in-db-2", "GET in db 2")
    check(conn(db=0).get(k) is None, "the db-2 key is visible in db 0")
    r2.delete(k)
    return "db=2 connection option"


def f_pipeline():
    p = conn().pipeline(transaction=False)
    for i in range(100):
        p.set(key("p%d" % i), "v%d" % i)
    for i in range(100):
        p.get(key("p%d" % i))
    got = p.execute()
    want = [True] * 100 + [("v%d" % i).encode() for i in range(100)]
    check(got == want, "pipeline replies %r" % got[:5])
    return "100 SET + 100 GET in one pipeline"


def f_transaction():
    r, other = conn(), conn()
    k = key("tx")
    r.delete(k)
    p = r.pipeline(transaction=True)
    p.set(k, 1)
    p.incr(k)
    check(p.execute() == [True, 2], "MULTI/SET/INCR/EXEC")
    with r.pipeline() as p:
        p.watch(k)
        other.set(k, "changed")
        p.multi()
        p.set(k, "mine")
        try:
            p.execute()
            raise AssertionError("EXEC after a WATCHed key changed was not aborted")
        except redis.exceptions.WatchError:
            pass
    check(r.get(k) == b"changed", "the aborted transaction wrote")
    return "MULTI/EXEC; WATCH abort raises WatchError"


def f_pubsub():
    a, b = conn(), conn()
    ch = key("ch")
    ps = a.pubsub()
    ps.subscribe(ch)
    ps.psubscribe(key("c*"))
    seen = set()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        m = ps.get_message(timeout=1)
        if m and m["type"] in ("subscribe", "psubscribe"):
            seen.add(m["type"])
    check(seen == {"subscribe", "psubscribe"}, "subscription confirmations %r" % seen)
    n = b.publish(ch, "hello")
    # Redis Cluster counts only the receivers on the node that ran PUBLISH (the message
    # still reaches every node's subscribers).
    if TOPOLOGY != "cluster":
        check(n == 2, "PUBLISH reached %r receivers, want 2" % n)
    got = {}
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        m = ps.get_message(timeout=1)
        if m and m["type"] in ("message", "pmessage"):
            got[m["type"]] = (m["channel"], m["data"])
    want = {"message": (ch.encode(), b"hello"), "pmessage": (ch.encode(), b"hello")}
    check(got == want, "received %r" % got)
    ps.unsubscribe()
    ps.punsubscribe()
    left = set()
    deadline = time.monotonic() + 5
    while len(left) < 2 and time.monotonic() < deadline:
        m = ps.get_message(timeout=1)
        if m and m["type"] in ("unsubscribe", "punsubscribe"):
            left.add(m["type"])
    check(left == {"unsubscribe", "punsubscribe"}, "unsubscribe confirmations %r" % left)
    # Back to normal commands on the same connection (PubSub.close() would drop it): keys on
    # different slots, so a connection left pinned to one cluster node shows.
    c = ps.connection
    for i in range(10):
        c.send_command("SET", "%sps%d" % (PREFIX, i), "v%d" % i)
        check(c.read_response() in (b"OK", "OK"), "SET after unsubscribing")
        c.send_command("GET", "%sps%d" % (PREFIX, i))
        check(c.read_response() == ("v%d" % i).encode(), "GET after unsubscribing")
    ps.close()
    return "SUBSCRIBE + PSUBSCRIBE on one PubSub, message and pmessage, unsubscribe, then SET/GET on that connection (PUBLISH counted %d)" % n


def f_blocking():
    a, b = conn(), conn()
    k = key("bl")
    a.delete(k)
    t = threading.Timer(0.2, lambda: b.rpush(k, "v"))
    t.start()
    got = a.blpop([k], 5)
    t.join()
    check(got == (k.encode(), b"v") or got == [k.encode(), b"v"], "BLPOP got %r" % (got,))
    t0 = time.monotonic()
    check(a.blpop([key("bl-empty")], 0.5) is None, "BLPOP on an empty key")
    check(time.monotonic() - t0 >= 0.4, "BLPOP 0.5 returned early")
    return "BLPOP 5 woken by RPUSH; BLPOP 0.5 -> None"


def f_scripts():
    r = conn()
    k = key("s")
    got = r.eval("return {KEYS[1], ARGV[1]}", 1, k, "arg")
    check(got == [k.encode(), b"arg"], "EVAL %r" % got)
    sha = r.script_load("return 'loaded'")
    check(r.evalsha(sha, 0) == b"loaded", "EVALSHA")
    try:
        r.evalsha("0" * 40, 0)
        raise AssertionError("EVALSHA of an unknown sha succeeded")
    except redis.exceptions.NoScriptError:
        pass
    return "EVAL, SCRIPT LOAD + EVALSHA, NOSCRIPT"


def f_large_value():
    r = conn(socket_timeout=9)
    k = key("big")
    value = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    check(r.set(k, value) is True, "SET 8 MiB")
    check(r.get(k) == value, "GET 8 MiB is not byte-exact")
    r.delete(k)
    lk = key("list")
    r.delete(lk)
    items = [str(i).encode() for i in range(100000)]
    check(r.rpush(lk, *items) == 100000, "RPUSH 100000")
    check(r.lrange(lk, 0, -1) == items, "LRANGE 0 -1")
    r.delete(lk)
    return "8 MiB value, 100000-element list"


def f_resp3():
    r = conn(protocol=3)
    hello = r.execute_command("HELLO", 3)
    proto = hello.get(b"proto", hello.get("proto"))
    check(proto == 3, "HELLO 3 answered %r" % hello)
    k = key("h")
    r.delete(k)
    r.hset(k, mapping={"a": "1", "b": "2"})
    check(r.hgetall(k) == {b"a": b"1", b"b": b"2"}, "HGETALL map")
    check(r.get(key("missing")) is None, "null")
    return "protocol=3"


def f_reconnect():
    a, b = conn(), conn()
    aid = a.client_id()
    killed = b.execute_command("CLIENT", "KILL", "ID", aid)
    check(killed == 1, "CLIENT KILL ID answered %r" % killed)
    check(a.ping() is True, "PING after the kill")
    check(a.client_id() != aid, "the connection was not replaced")
    return "the pool reconnects transparently (default Retry)"


def f_client_list():
    r = conn()
    cid = r.client_id()
    lines = r.client_list()
    check(any(c.get("id") == str(cid) for c in lines), "CLIENT LIST lacks id=%s" % cid)
    info = r.client_info()
    for f in ("id", "addr", "user", "db", "resp"):
        check(f in info, "CLIENT INFO lacks %s: %r" % (f, info))
    check(str(info["id"]) == str(cid), "CLIENT INFO id %r, CLIENT ID %r" % (info["id"], cid))
    check(info["user"] == USER, "CLIENT INFO user %r" % info["user"])
    check(r.client_setname("dm-py-list") is True, "CLIENT SETNAME")
    check(r.client_getname() in ("dm-py-list", b"dm-py-list"), "CLIENT GETNAME")
    return "CLIENT ID/LIST/INFO/SETNAME/GETNAME"


def raw_connection():
    c = redis.Connection(host=HOST, port=PORT, username=USER, password=PASSWORD,
                         socket_timeout=8, socket_connect_timeout=5)
    c.connect()
    return c


def closed(c):
    try:
        c.send_command("PING")
        c.read_response()
        return False
    except (redis.exceptions.ConnectionError, OSError):
        return True


def f_client_kill():
    b = conn()
    # New form first: it needs no CLIENT LIST.
    c = raw_connection()
    c.send_command("CLIENT", "ID")
    cid = c.read_response()
    n = b.execute_command("CLIENT", "KILL", "ID", cid)
    check(n == 1, "CLIENT KILL ID answered %r" % n)
    check(closed(c), "the connection killed by ID is still open")
    # Old form: find A by its name.
    a = raw_connection()
    name = "dm-py-victim-%d" % os.getpid()
    a.send_command("CLIENT", "SETNAME", name)
    check(a.read_response() in (b"OK", "OK"), "SETNAME")
    found = [x for x in b.client_list() if x.get("name") == name]
    check(len(found) == 1, "CLIENT LIST shows %d connections named %s" % (len(found), name))
    check(b.client_kill(found[0]["addr"]) is True, "CLIENT KILL addr")
    check(closed(a), "the connection killed by address is still open")
    return "CLIENT KILL ID id -> 1, CLIENT KILL addr -> OK (found by name in CLIENT LIST)"


def f_acl():
    r = conn()
    who = r.acl_whoami()
    check(who in (USER, USER.encode()), "ACL WHOAMI %r" % who)
    users = [u.decode() if isinstance(u, bytes) else u for u in r.acl_users()]
    check(USER in users, "ACL USERS %r" % users)
    cats = [c.decode() if isinstance(c, bytes) else c for c in r.acl_cat()]
    check("read" in cats, "ACL CAT %r" % cats)
    wrong = "dm-wrong-%d" % os.getpid()
    try:
        conn(username=wrong, password="nope", retry=no_retry()).ping()
        raise AssertionError("AUTH as an unknown user succeeded")
    except redis.exceptions.AuthenticationError:
        pass
    log = r.acl_log(10)
    mine = [e for e in log if e.get("username") == wrong]
    check(mine and mine[0].get("reason") == "auth", "ACL LOG %r" % log[:3])
    return "WHOAMI, USERS, CAT, LOG after a failed AUTH"


def f_cluster_client():
    try:
        rc = RedisCluster(host=HOST, port=PORT, username=USER, password=PASSWORD,
                          socket_timeout=8, socket_connect_timeout=5)
    except redis.exceptions.RedisClusterException as e:
        raise Status("refused", "RedisCluster: %s" % e)
    for i in range(10):
        check(rc.set("%scc%d" % (PREFIX, i), "v%d" % i) is True, "SET")
    for i in range(10):
        check(rc.get("%scc%d" % (PREFIX, i)) == ("v%d" % i).encode(), "GET")
    nodes = [n.name for n in rc.get_nodes()]
    if len(nodes) == 1:
        raise Status("differs", "one-node cluster: %s" % nodes[0])
    return "%d nodes" % len(nodes)


FEATURES = [
    ("auth", f_auth),
    ("select", f_select),
    ("pipeline", f_pipeline),
    ("transaction", f_transaction),
    ("pubsub", f_pubsub),
    ("blocking", f_blocking),
    ("scripts", f_scripts),
    ("large_value", f_large_value),
    ("resp3", f_resp3),
    ("reconnect", f_reconnect),
    ("client_list", f_client_list),
    ("client_kill", f_client_kill),
    ("acl", f_acl),
    ("cluster_client", f_cluster_client),
]


def one_line(s):
    return " ".join(str(s).split())[:300]


def run_feature(name, fn):
    """In the forked child: run, classify, print the RESULT line."""
    try:
        detail = fn()
        status = "works"
    except Status as s:
        status, detail = s.status, s.detail
    except redis.exceptions.ResponseError as e:
        status, detail = "refused", "%s: %s" % (type(e).__name__, e)
    except Exception as e:  # noqa: BLE001 - every other outcome is a failure to report
        traceback.print_exc()
        status, detail = "FAILED", "%s: %s" % (type(e).__name__, e)
    sys.stdout.write("RESULT %s %s %s\n" % (name, status, one_line(detail)))
    sys.stdout.flush()


def main():
    print("redis-py %s, %s:%d topology=%s mode=%s" % (redis.__version__, HOST, PORT, TOPOLOGY, MODE))
    sys.stdout.flush()
    wanted = os.environ.get("DM_FEATURES", "").split()
    for name, fn in FEATURES:
        if wanted and name not in wanted:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                run_feature(name, fn)
            finally:
                os._exit(0)
        deadline = time.monotonic() + FEATURE_SECS
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if status != 0:
                    print("RESULT %s FAILED the feature's process ended with status %d" % (name, status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                print("RESULT %s FAILED timed out after %d s" % (name, FEATURE_SECS))
                break
            time.sleep(0.01)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
