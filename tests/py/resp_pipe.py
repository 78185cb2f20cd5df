#!/usr/bin/env python3
"""One raw TCP connection as a pipe: what arrives on stdin is written to the socket, what the
socket sends is written to stdout, and the process ends when the peer closes the connection (or
stdin closes). Lets a test hold a connection from inside a pod (a process in the pod's netns and
cgroup, so its connect is captured) and speak RESP over it byte for byte.

Usage: resp_pipe.py HOST PORT
"""

import os
import socket
import sys
import threading


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port), timeout=5)
    s.settimeout(None)

    def upstream():
        fd = sys.stdin.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            s.sendall(data)

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.fileno()
    while True:
        try:
            data = s.recv(65536)
        except OSError:
            break
        if not data:
            break
        os.write(out, data)
    # The peer closed: the test sees EOF on our stdout.
    os._exit(0)


if __name__ == "__main__":
    main()
