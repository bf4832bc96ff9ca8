#!/usr/bin/env python3
"""Host side of tests/guest/devices.sh (one role per invocation).

  console PTY           answer "RF-CONSOLE-HELLO <n>" with "ACK <n>"
  net-recv PORT OUT     receive one TCP stream, write "<bytes> <sha256>" to OUT
  vsock-echo PATH       listen on the Unix socket PATH (<uds>_<port>), echo one line as "echo:<line>"
  vsock-connect UDS PORT LOG   when LOG shows the guest listening, CONNECT to it and check the echo
"""
import hashlib
import os
import socket
import sys
import time


def console(pty):
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
    import termios
    import tty
    tty.setraw(fd, termios.TCSANOW)
    buf = b""
    deadline = time.time() + 600
    while time.time() < deadline:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.split(b"\n"):
            line = line.strip(b"\r")
            if line.startswith(b"RF-CONSOLE-HELLO "):
                os.write(fd, b"ACK " + line.split(b" ", 1)[1] + b"\n")
                time.sleep(1)
                return 0
    return 1


def net_recv(port, out):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("10.77.0.1", int(port)))
    srv.listen(1)
    conn, _ = srv.accept()
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    with open(out, "w") as f:
        f.write(f"{n} {h.hexdigest()}\n")
    return 0


def vsock_echo(path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    conn, _ = srv.accept()
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(256)
        if not data:
            break
        line += data
    conn.sendall(b"echo:" + line)
    conn.close()
    return 0


def vsock_connect(uds, port, log):
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with open(log, "rb") as f:
                if b"RF: vsock-listening" in f.read():
                    break
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(uds)
            s.sendall(f"CONNECT {port}\n".encode())
            f = s.makefile("rb")
            ok = f.readline()
            if not ok.startswith(b"OK "):
                raise OSError(f"answer {ok!r}")
            s.sendall(b"hello from host\n")
            reply = f.readline()
            print(f"vsock host-connect: {ok.strip().decode()} reply {reply.strip().decode()}")
            return 0 if reply == b"echo:hello from host\n" else 1
        except OSError as e:
            last = e
            time.sleep(0.3)
        finally:
            s.close()
    print(f"vsock host-connect failed: {last}")
    return 1


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    sys.exit({"console": console, "net-recv": net_recv, "vsock-echo": vsock_echo,
              "vsock-connect": vsock_connect}[role](*args))
