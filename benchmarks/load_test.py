"""Load test for `harmon serve`: concurrent clients on loopback for a bounded time.

Either point it at a running server on this machine (``--url http://127.0.0.1:8000``) or let
it start one (``--model DIR``, or neither for the shipped default model, with the model's own
settings unless ``--size`` / ``--num-iter`` / ``--num-steps`` / ``--image-size`` are given). Each client loops over a mix of
image generations, chat completions and streamed chat completions until ``--duration``
seconds have passed. It reports completed requests, errors split into rejected (429, the
queue was full: expected under overload) and failed (anything else: must be zero), latency
percentiles of completed requests, and checks the server still answers afterwards.

    .venv/bin/python benchmarks/load_test.py --clients 8 --duration 30

``--compare-batching`` measures the server's batching instead: image generations only, for each client count
of ``--clients`` (e.g. ``1,4,16``), against a server started with ``--max-batch`` (batching on) and one started
with ``--max-batch 1`` (off); it prints images/s and latency p50/p95 of each and the ratio on/off:

    .venv/bin/python benchmarks/load_test.py --compare-batching --clients 1,4,16 --duration 60

Exit status 0 only when no accepted request failed and the server answered afterwards.
Only loopback addresses are allowed: this never sends load anywhere else.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from harmon.server.worker import MAX_BATCH

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")  # prompts of the shapes world (any text works)
SHAPES = ("circle", "square", "triangle")


@dataclass
class Tally:
    """What the clients saw, merged under a lock."""

    completed: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.completed[kind] = self.completed.get(kind, 0) + 1
            self.latencies.append(seconds)

    def reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def fail(self, why: str) -> None:
        with self.lock:
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append(why)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def sample_image_data_url() -> str:
    """A small PNG as a data: URL (made without PIL so the script needs only the standard library)."""
    import struct
    import zlib

    width = height = 32
    rows = b"".join(b"\x00" + b"".join(bytes((x * 8 % 256, y * 8 % 256, 128)) for x in range(width))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


class Client:
    """One simulated user with its own keep-alive connection."""

    def __init__(self, host: str, port: int, api_key: str | None, args: argparse.Namespace, tally: Tally, seed: int):
        self.host, self.port, self.args, self.tally = host, port, args, tally
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.random = random.Random(seed)
        self.conn: http.client.HTTPConnection | None = None
        self.image_url = sample_image_data_url()

    def request(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.args.timeout)
        try:
            self.conn.request("POST", path, json.dumps(body), self.headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except Exception:
            self.conn.close()
            self.conn = None
            raise

    def one(self) -> None:
        kind = "image" if self.args.images_only else self.random.choice(["image", "chat", "chat_stream"])
        if kind == "image":
            prompt = f"a {self.random.choice(COLORS)} {self.random.choice(SHAPES)}"
            path, body = "/v1/images/generations", {"prompt": prompt, "seed": self.random.randrange(2**31)}
        else:
            path = "/v1/chat/completions"
            body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"},
                                                              {"type": "image_url",
                                                               "image_url": {"url": self.image_url}}]}],
                    "max_tokens": self.args.max_tokens, "stream": kind == "chat_stream"}
        start = time.perf_counter()
        try:
            status, raw = self.request(path, body)
        except Exception as err:
            self.tally.fail(f"{kind}: {type(err).__name__}: {err}")
            return
        elapsed = time.perf_counter() - start
        if status == 429:
            self.tally.reject()
            time.sleep(0.2)  # back off a little, as a client honouring Retry-After would
            return
        why = check_answer(kind, status, raw)
        if why:
            self.tally.fail(why)
        else:
            self.tally.ok(kind, elapsed)

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.one()
        if self.conn is not None:
            self.conn.close()


def check_answer(kind: str, status: int, raw: bytes) -> str | None:
    """Why a response is not a correct answer, or None."""
    if status != 200:
        return f"{kind}: HTTP {status}: {raw[:200]!r}"
    try:
        if kind == "image":
            png = base64.b64decode(json.loads(raw)["data"][0]["b64_json"])
            return None if png.startswith(b"\x89PNG") else f"{kind}: not a PNG"
        if kind == "chat":
            json.loads(raw)["choices"][0]["message"]["content"]
            return None
        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any('"error"' in e for e in events):
            return f"{kind}: bad event stream: {raw[-200:]!r}"
        return None
    except Exception as err:
        return f"{kind}: bad body ({type(err).__name__}: {err}): {raw[:200]!r}"


def get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_healthy(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if get(host, port, "/health", timeout=2)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start_server(args: argparse.Namespace, max_batch: int | None = None) -> tuple[subprocess.Popen, int]:
    """`harmon serve` on a free loopback port (the default model when ``--model`` is absent), with ``max_batch``
    (default: ``--max-batch``, else the server's own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue_size = max([args.queue_size] + args.clients) if args.compare_batching else args.queue_size
    command = [sys.executable, "-m", "harmon.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--queue-size", str(queue_size), "--device", args.device, "--log-level", "warning"]
    max_batch = args.max_batch if max_batch is None else max_batch
    if max_batch is not None:
        command += ["--max-batch", str(max_batch)]
    for option in ("model", "size", "num_iter", "num_steps", "image_size"):
        if getattr(args, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    if not wait_healthy("127.0.0.1", port, 180, process):
        process.kill()
        raise SystemExit("load_test: the server did not start")
    return process, port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (loopback addresses only for --url)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="start `harmon serve --model MODEL` for the test (default: start it with "
                       "the shipped model)")
    p.add_argument("--clients", type=client_counts, default=[8],
                   help="concurrent clients; a comma list (1,4,16) runs the load once per count")
    p.add_argument("--images-only", action="store_true", help="send only image generations")
    p.add_argument("--compare-batching", action="store_true",
                   help="image generations only, each client count against a server started with --max-batch "
                        "(batching on) and one with --max-batch 1 (off): images/s, latency p50/p95, the ratio")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as failed")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of chat requests")
    p.add_argument("--api-key", default=os.environ.get("HARMON_API_KEY"), help="API key of the server")
    g = p.add_argument_group("a server started here (without --url); None: the model's own settings")
    g.add_argument("--queue-size", type=int, default=4, help="(with --compare-batching at least the most clients)")
    g.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    g.add_argument("--size", type=int, default=None)
    g.add_argument("--num-iter", type=int, default=None)
    g.add_argument("--num-steps", type=int, default=None)
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"only loopback servers may be load-tested, not {urlparse(args.url).hostname}")
    if args.compare_batching and args.url:
        p.error("--compare-batching starts its own servers: leave out --url")
    if args.max_batch is not None and not 1 <= args.max_batch <= MAX_BATCH:
        p.error(f"--max-batch must be in 1..{MAX_BATCH} (1: no batching), got {args.max_batch}")
    args.images_only = args.images_only or args.compare_batching
    return args


def client_counts(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16] (each at least 1)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give client counts as 8 or 1,4,16, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be at least 1, got {text!r}")
    return counts


def load(host: str, port: int, args: argparse.Namespace, clients: int) -> tuple[Tally, float, bool]:
    """``clients`` clients for ``args.duration`` seconds: what they saw, the wall time (until the last answer),
    and whether the server still answers a generation afterwards."""
    tally = Tally()
    deadline = time.monotonic() + args.duration
    started = time.perf_counter()
    threads = [threading.Thread(target=Client(host, port, args.api_key, args, tally, k).run, args=(deadline,))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    healthy = wait_healthy(host, port, 10)
    after = Client(host, port, args.api_key, args, Tally(), 0)
    status, raw = after.request("/v1/images/generations", {"prompt": "after the load", "seed": 0})
    return tally, wall, healthy and check_answer("image", status, raw) is None


def report_of(tally: Tally, wall: float, answers_after: bool, clients: int) -> dict:
    """One load's numbers: completed requests (by kind), errors, requests and images per second, latency
    percentiles of the completed requests, whether the server answered afterwards."""
    ms = [1000 * s for s in tally.latencies]
    return {"clients": clients, "duration_s": round(wall, 2), "completed": sum(tally.completed.values()),
            "completed_by_kind": tally.completed, "rejected_429": tally.rejected, "failed": tally.failed,
            "throughput_rps": round(sum(tally.completed.values()) / wall, 2),
            "images_per_s": round(tally.completed.get("image", 0) / wall, 3),
            "latency_ms": {f"p{q}": None if percentile(ms, q) is None else round(percentile(ms, q), 1)
                           for q in (50, 90, 95, 99)},
            "answers_after": answers_after, "failures": tally.failures}


def print_report(report: dict) -> None:
    lat = report["latency_ms"]
    print(f"{report['completed']} completed {report['completed_by_kind']} in {report['duration_s']} s "
          f"({report['throughput_rps']} req/s, {report['images_per_s']} images/s) by {report['clients']} clients")
    print(f"errors: {report['rejected_429']} rejected (429, queue full), {report['failed']} failed")
    print(f"latency of completed: p50 {lat['p50']} ms, p90 {lat['p90']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms")
    print(f"server answers afterwards: {'yes' if report['answers_after'] else 'NO'}")
    for why in report["failures"]:
        print(f"  failure: {why}")


def serve_and_load(args: argparse.Namespace, max_batch: int | None = None) -> list[dict]:
    """One report per client count of ``args.clients``, against ``--url`` or a server started here (with
    ``max_batch``); one image is drawn first so that no load pays for what a first request sets up."""
    process = None
    if args.url:
        url = urlparse(args.url)
        host, port = url.hostname, url.port or 80
    else:
        process, port = start_server(args, max_batch)
        host = "127.0.0.1"
    try:
        Client(host, port, args.api_key, args, Tally(), 0).request("/v1/images/generations",
                                                                    {"prompt": "warm up", "seed": 0})
        return [report_of(*load(host, port, args, clients), clients) for clients in args.clients]
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)


def comparison(on: list[dict], off: list[dict]) -> list[dict]:
    """Per client count: images/s and latency p50/p95 with batching on and off, and the ratio of images/s."""
    rows = []
    for a, b in zip(on, off):
        ratio = round(a["images_per_s"] / b["images_per_s"], 2) if b["images_per_s"] else None
        rows.append({"clients": a["clients"], "images_per_s": {"on": a["images_per_s"], "off": b["images_per_s"]},
                     "p50_ms": {"on": a["latency_ms"]["p50"], "off": b["latency_ms"]["p50"]},
                     "p95_ms": {"on": a["latency_ms"]["p95"], "off": b["latency_ms"]["p95"]}, "ratio": ratio})
    return rows


def ok(report: dict) -> bool:
    return report["failed"] == 0 and report["answers_after"] and report["completed"] > 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.compare_batching:
        reports = serve_and_load(args)
        if args.json:
            print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        else:
            for report in reports:
                print_report(report)
        return 0 if all(ok(r) for r in reports) else 1
    on, off = serve_and_load(args), serve_and_load(args, max_batch=1)
    rows = comparison(on, off)
    if args.json:
        print(json.dumps({"comparison": rows, "on": on, "off": off}, indent=2))
    else:
        print(f"batching on (--max-batch {args.max_batch or 'default'}) vs off (--max-batch 1), image generations, "
              f"{args.duration:g} s per run")
        print(f"{'clients':>7} | {'images/s on':>11} {'off':>7} {'ratio':>6} | {'p50 ms on':>9} {'off':>8} | "
              f"{'p95 ms on':>9} {'off':>8}")
        for r in rows:
            print(f"{r['clients']:>7} | {r['images_per_s']['on']:>11} {r['images_per_s']['off']:>7} "
                  f"{r['ratio'] if r['ratio'] is not None else '-':>6} | {r['p50_ms']['on']!s:>9} "
                  f"{r['p50_ms']['off']!s:>8} | {r['p95_ms']['on']!s:>9} {r['p95_ms']['off']!s:>8}")
        for report in on + off:
            for why in report["failures"]:
                print(f"  failure: {why}")
    return 0 if all(ok(r) for r in on + off) else 1


if __name__ == "__main__":
    sys.exit(main())
