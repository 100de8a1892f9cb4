#!/usr/bin/env python3
"""Peak and settled RSS of `conflux run` while HTTP bodies pile up in flight.

An output that cannot write yet (its folder is a file) keeps every accepted
event in the pipeline; N bodies of SIZE bytes are POSTed over C connections.
Then the blocker is removed, the output drains, and RSS is read again.
Usage: CONFLUX_BIN=target/release/conflux scripts/inflight_rss.py [N] [SIZE] [C] [extra input options]
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 153 * 1024
CONNS = int(sys.argv[3]) if len(sys.argv) > 3 else 64
EXTRA = sys.argv[4] if len(sys.argv) > 4 else ""
BIN = os.environ.get("CONFLUX_BIN", "target/release/conflux")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main():
    work = tempfile.mkdtemp()
    port = free_port()
    blocker = os.path.join(work, "blocked")
    with open(blocker, "w") as f:
        f.write("a file where the output's folder should be\n")
    pipeline = os.path.join(work, "p.yaml")
    with open(pipeline, "w") as f:
        f.write(f"""inputs:
  api: {{ type: http_server, address: "127.0.0.1:{port}", max_body: 1MiB, queue: 20000 {EXTRA} }}
outputs:
  out:
    type: file
    path: blocked/out.ndjson
    from: api
    retry: {{ initial_backoff: 100ms, max_backoff: 500ms }}
""")
    proc = subprocess.Popen([BIN, "run", pipeline], env={**os.environ, "CONFLUX_LOG": "error"})
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    pad = "x" * (SIZE - 40)
    statuses = {}
    lock = threading.Lock()
    counter = iter(range(N))

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = json.dumps({"i": i, "pad": pad})
            try:
                conn.request("POST", "/", body, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                status = "error"
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    started = time.time()
    threads = [threading.Thread(target=worker) for _ in range(CONNS)]
    for t in threads:
        t.start()
    peak_during = 0
    while any(t.is_alive() for t in threads):
        peak_during = max(peak_during, rss_kib(proc.pid)[0])
        time.sleep(0.05)
    took = time.time() - started
    rss_loaded, hwm = rss_kib(proc.pid)
    os.remove(blocker)
    accepted = statuses.get(202, 0)
    out = os.path.join(work, "blocked", "out.ndjson")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with open(out, "rb") as f:
                if sum(1 for _ in f) >= accepted:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    time.sleep(2)
    rss_after, hwm = rss_kib(proc.pid)
    proc.terminate()
    proc.wait(timeout=30)
    print(json.dumps({
        "bodies": N, "body_bytes": SIZE, "connections": CONNS, "seconds": round(took, 1),
        "answers": statuses, "peak_rss_mib": round(hwm / 1024, 1),
        "rss_under_load_mib": round(rss_loaded / 1024, 1), "rss_after_drain_mib": round(rss_after / 1024, 1),
    }))


if __name__ == "__main__":
    main()
