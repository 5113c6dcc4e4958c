#!/usr/bin/env python3
# bench/loop_echo_check.py
#
# Functional checks of bench/loop_echo_server (the echo comparison's floor),
# for each loop (--io uring, --io uring --recv single, --io epoll):
#   half-close  a peer that sends N bytes and then shutdown(SHUT_WR), reading
#               all the while, gets all N bytes back before EOF, as from the
#               Go, thread and weft servers (which write all they read);
#   no leak     peers that send but never read empty the buffer ring while
#               idle peers are swept (--idle 1); once every client closed, the
#               server holds no connection descriptor. (A swept connection
#               whose receive then ended with -ENOBUFS used to stay open.)
#
#   bazel build --config=bench //bench:loop_echo_server
#   bench/loop_echo_check.py "$(bazel info --config=bench bazel-bin)/bench/loop_echo_server" [port]
#
# Listens on 127.0.0.1 only; takes ~15 s. Exit status 1 if a check failed.
import os
import socket
import subprocess
import sys
import threading
import time


def half_close(port, n):
    s = socket.create_connection(("127.0.0.1", port))
    got = [0]

    def reader():
        time.sleep(0.3)  # let the server's echoes back up behind full sockets
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            got[0] += len(b)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(b"x" * n)
    s.shutdown(socket.SHUT_WR)
    t.join(10)
    s.close()
    return got[0]


def leaked_fds(port, pid):
    def nfds():
        return len(os.listdir(f"/proc/{pid}/fd"))

    base = nfds()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for h in hogs:
        h.setblocking(False)
    chunk = b"y" * 65536
    end = time.time() + 1.5
    while time.time() < end:
        for h in hogs:
            try:
                h.send(chunk)
            except (BlockingIOError, ConnectionError):
                pass
    time.sleep(2.5)  # the once-a-second sweep drops everyone (--idle 1)
    for s in idle + hogs:
        s.close()
    time.sleep(1.5)
    return nfds() - base


def main():
    binary = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 19870
    failed = False
    for args in (["--io", "uring"], ["--io", "uring", "--recv", "single"], ["--io", "epoll"]):
        port += 1
        p = subprocess.Popen([binary, "--port", str(port), "--idle", "1"] + args)
        try:
            time.sleep(0.3)
            for n in (1_000_000, 3_000_000, 5_000_000, 6_000_000):
                got = half_close(port, n)
                ok = got == n
                failed |= not ok
                print(f"{' '.join(args)}: half-close {n}: echoed {got}", "ok" if ok else "LOST")
            extra = leaked_fds(port, p.pid)
            failed |= extra != 0
            print(f"{' '.join(args)}: descriptors left open: {extra}", "ok" if extra == 0 else "LEAK")
        finally:
            p.kill()
            p.wait()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
