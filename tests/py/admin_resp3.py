#!/usr/bin/env python3
"""CLIENT and ACL answers as redis-py parses them with RESP3 (protocol=3): logs in, makes one
failed AUTH on a second connection, then prints one JSON object with what CLIENT ID, CLIENT
INFO, CLIENT LIST, ACL WHOAMI, ACL USERS, ACL CAT and ACL LOG gave (types and values), so the
test can compare the proxy with a direct redis-server.

Usage: admin_resp3.py --host H --port P --user U --password PW --bad-user B
"""

import argparse
import json
import socket

import redis


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--bad-user", required=True)
    a = ap.parse_args()
    r = redis.Redis(host=a.host, port=a.port, username=a.user, password=a.password,
                    protocol=3, socket_timeout=10)
    # The failed AUTH on a raw socket: redis-py retries a failed AUTH on its own.
    with socket.create_connection((a.host, a.port), timeout=10) as s:
        user = a.bad_user.encode()
        s.sendall(b"*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$8\r\nwrong-pw\r\n" % (len(user), user))
        failed = s.makefile("rb").readline().decode().strip()
    assert failed.startswith("-WRONGPASS"), failed
    out = {"failed_auth": failed}
    out["id"] = r.client_id()
    info = r.client_info()
    out["info"] = {k: str(v) for k, v in info.items()}
    out["list_ids"] = [int(c["id"]) for c in r.client_list()]
    out["whoami"] = r.acl_whoami()
    if isinstance(out["whoami"], bytes):
        out["whoami"] = out["whoami"].decode()
    users = r.acl_users()
    out["users"] = [u.decode() if isinstance(u, bytes) else u for u in users]
    cats = r.acl_cat()
    out["cat"] = [c.decode() if isinstance(c, bytes) else c for c in cats]
    read = r.acl_cat("read")
    out["cat_read"] = sorted(c.decode() if isinstance(c, bytes) else c for c in read)
    log = r.acl_log(count=5)
    out["log_type"] = type(log).__name__
    entries = []
    for e in log:
        entries.append({
            "type": type(e).__name__,
            "keys": list(e.keys()),
            "fields": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in e.items()},
            "age_type": type(e.get("age-seconds")).__name__,
        })
    out["log"] = entries
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
