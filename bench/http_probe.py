"""An HTTP client for bench.service_path, run inside a pod's network namespace (``ip netns exec``): a new
connection per request, as busybox httpd (both servers) closes each one.

    python -m bench.http_probe <host> <requests> <parallel>   # prints JSON: latencies (s), requests/s
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import sys
import time


def once(host: str) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, 80, timeout=10)
    try:
        conn.request("GET", "/")
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{host} answered {reply.status}")
    finally:
        conn.close()
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    host, requests, parallel = argv[0], int(argv[1]), int(argv[2])
    latencies = [once(host) for _ in range(requests)]  # one at a time: latency
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:  # many at once: throughput
        list(pool.map(lambda _: once(host), range(requests)))
    print(json.dumps({"latencies": latencies, "rps": requests / (time.perf_counter() - started)}))


if __name__ == "__main__":
    main(sys.argv[1:])
