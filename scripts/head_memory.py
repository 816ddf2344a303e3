#!/usr/bin/env python3
"""Memory sluice holds per client connection that is still sending its
request head: starts the release binary, opens N connections that each
send a partial head of a given size and then stall, and prints the RSS
growth per connection. Bounded: N connections, one pass per size, then
everything is closed and sluice is stopped.

    cargo build --release --bin sluice
    python3 scripts/head_memory.py [N]   # default 2000
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
BIN = os.path.join(os.path.dirname(__file__), "..", "target", "release", "sluice")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    port, backend = free_port(), free_port()
    cfg = f"""
worker_threads = 1
[admin]
enabled = false
[[listener]]
bind = "127.0.0.1:{port}"
pool = "app"
header_read_timeout = "120s"
[[pool]]
name = "app"
[[pool.backend]]
name = "b1"
address = "127.0.0.1:{backend}"
"""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cfg)
        path = f.name
    print(f"{N} connections per row, a fresh sluice each; RSS growth / connection")
    try:
        for size in [0, 1000, 8000, 16000, 30000, 40000]:
            measure(path, port, size)
    finally:
        os.unlink(path)


def measure(path, port, size):
    proc = subprocess.Popen([BIN, "run", "--config", path], stderr=subprocess.DEVNULL)
    socks = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"x" * size
        # Warm-up: the runtime's and allocator's first growth is not per
        # connection.
        warm = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        for s in warm:
            s.sendall(head)
        time.sleep(0.5)
        for s in warm:
            s.close()
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        for _ in range(N):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head)
            socks.append(s)
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        alive = proc.poll() is None
        print(
            f"partial head of {len(head):>6} bytes: "
            f"{(after - before) / N:7.2f} KiB/conn (RSS {before} -> {after} KiB, sluice up: {alive})"
        )
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
