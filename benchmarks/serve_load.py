"""A bounded load test of ``selfalign serve`` on loopback: N concurrent clients for D seconds of mixed queries.

Either starts the server itself (``--index INDEX_DIR``: ``selfalign serve`` in a child process on a free loopback
port, stopped at the end) or targets one already running (``--url http://127.0.0.1:8000``; loopback only).
The mix per request: 80% text search (``k`` 5, 10 or 24), 15% explain of a hit, 5% thumbnail.
Reports requests/s, p50/p90/p99 latency and errors, as markdown and JSON (``--json FILE``).

    nice -n 10 python benchmarks/serve_load.py --index indexes/scenes-test --clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from selfalign.serve.cli import is_loopback

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "star", "triangle", "ring", "cross", "hexagon", "diamond"]
RELATIONS = ["to the left of", "to the right of", "above", "below", "next to"]
MAX_CLIENTS, MAX_DURATION = 64, 600


def make_query(rng: random.Random) -> str:
    """A random scenes-style description (one or two objects, sometimes a count or a relation)."""
    first = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
    roll = rng.random()
    if roll < 0.3:
        return first
    if roll < 0.5:
        return f"two {rng.choice(COLOURS)} {rng.choice(SHAPES)}s"
    return f"{first} {rng.choice(RELATIONS)} a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: str, token: str, threads: int) -> tuple[subprocess.Popen, str]:
    """``selfalign serve`` in a child process on a free loopback port; waits for ``/health``."""
    port = _free_port()
    cmd = [sys.executable, "-m", "selfalign.cli", "serve", index, "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--quiet", "--threads", str(threads)]
    env = {**os.environ, "SELFALIGN_TOKEN": token} if token else dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early:\n{proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer /health within 120 s")


def client_loop(url: str, token: str, deadline: float, seed: int, max_requests: int, out: list, counter: list,
                lock: threading.Lock) -> None:
    """One client: sequential requests on a keep-alive connection until the deadline (or the global cap)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ids: list[int] = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= max_requests:
                    return
                counter[0] += 1
            roll = rng.random()
            if roll < 0.80 or not ids:
                kind, path, params = "search", "/api/search", {"q": make_query(rng), "k": rng.choice((5, 10, 24))}
            elif roll < 0.95:
                kind, path, params = "explain", "/api/explain", {"q": make_query(rng), "id": rng.choice(ids)}
            else:
                kind, path, params = "thumbnail", f"/api/thumbnails/{rng.choice(ids)}", {}
            start = time.perf_counter()
            try:
                response = http.get(path, params=params)
                ok = response.status_code == 200
                if ok and kind == "search":
                    ids = [r["id"] for r in response.json()["results"]] or ids
            except httpx.HTTPError:
                ok = False
            out.append((kind, time.perf_counter() - start, ok))


def summarise(samples: list, seconds: float) -> dict:
    def stats(rows: list) -> dict:
        lat = np.array([r[1] for r in rows]) * 1000 if rows else np.zeros(1)
        return {"requests": len(rows), "errors": sum(not r[2] for r in rows),
                "rps": round(len(rows) / seconds, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
                "p90_ms": round(float(np.percentile(lat, 90)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
                "max_ms": round(float(lat.max()), 1)}

    kinds = sorted({r[0] for r in samples})
    return {"all": stats(samples), **{k: stats([r for r in samples if r[0] == k]) for k in kinds}}


def markdown(report: dict) -> str:
    lines = [f"clients {report['clients']}, {report['seconds']:.1f} s, server threads {report['server_threads']}",
             "", "| requests | count | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in report["results"].items():
        lines.append(f"| {name} | {s['requests']} | {s['errors']} | {s['rps']} | {s['p50_ms']} | {s['p90_ms']} | "
                     f"{s['p99_ms']} | {s['max_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="a gallery: start 'selfalign serve' on it for the test")
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=os.environ.get("SELFALIGN_TOKEN", ""))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many in total")
    parser.add_argument("--server-threads", type=int, default=0, help="--threads for the started server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --duration 0..{MAX_DURATION} s")

    proc = None
    if args.index:
        proc, url = start_server(args.index, args.token, args.server_threads)
    else:
        url = args.url.rstrip("/")
        if not is_loopback(urlsplit(url).hostname or ""):
            parser.error("--url must be a loopback address (127.0.0.0/8, ::1 or localhost)")
    try:
        samples: list = []
        lock, counter = threading.Lock(), [0]
        start = time.monotonic()
        deadline = start + args.duration
        threads = [threading.Thread(target=client_loop, args=(url, args.token, deadline, args.seed + i,
                                                              args.max_requests, samples, counter, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - start
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    report = {"url": url, "clients": args.clients, "seconds": round(seconds, 2),
              "server_threads": args.server_threads or "torch default", "results": summarise(samples, seconds),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    print(markdown(report))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["results"]["all"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
