"""Judge throughput and rate-limit resilience: OpenAIJudge at its default settings.

A loopback OpenAI-compatible server (its own process, 127.0.0.1, fixed latency per request)
answers every judgment. All legs run in one invocation, so only ratios and counts matter:
  concurrent    n judgments at the default settings (concurrency included)
  sequential    the same at concurrency 1, timed on --sequential-subset judgments and scaled to n
                (each request waits the same fixed latency)
  cached        the concurrent leg again with the same cache: the server must see no request
  rate_limited  n judgments against a server that admits --rate requests/s (token bucket holding
                --burst) and answers 429 beyond it, once with retry-after-ms (the time until the next
                token) and once with no header at all
Targets: speed-up >= 20x at the defaults, 0 NaN under the rate limit, cached rerun <= 1 s.

    python benchmarks/judge.py [--n 500] [--latency 0.1] [--rate 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safeproj import io
from safeproj.eval.judges import DEFAULT_CONCURRENCY, OpenAIJudge

MODEL = "bench-judge"
KEY_ENV = "SAFEPROJ_BENCH_JUDGE_KEY"


def serve(port_queue, latency: float, rate: float | None, burst: float, retry_after_ms: bool) -> None:
    """Answer chat completions with a valid judgment after `latency` s; beyond `rate`/s answer 429."""
    lock = threading.Lock()
    state = {"requests": 0, "limited": 0, "tokens": burst, "refilled": time.monotonic()}

    def take_token() -> float | None:
        with lock:
            state["requests"] += 1
            if rate is None:
                return None
            now = time.monotonic()
            state["tokens"] = min(burst, state["tokens"] + (now - state["refilled"]) * rate)
            state["refilled"] = now
            if state["tokens"] >= 1:
                state["tokens"] -= 1
                return None
            state["limited"] += 1
            return (1 - state["tokens"]) / rate

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args):
            pass

        def _send(self, payload: dict, status: int = 200, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # /stats: requests seen, 429s sent, this process's CPU seconds
            self._send({"requests": state["requests"], "limited": state["limited"], "cpu_s": time.process_time()})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            wait = take_token()
            if wait is not None:
                headers = {"retry-after-ms": f"{1000 * wait:.0f}"} if retry_after_ms else {}
                self._send({"error": {"message": "rate limited", "type": "requests"}}, 429, headers)
                return
            time.sleep(latency)
            message = {"role": "assistant", "content": "#thereason: benchmark\n#thescore: 1"}
            self._send(
                {
                    "id": "bench",
                    "object": "chat.completion",
                    "created": 0,
                    "model": MODEL,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                }
            )

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # the default backlog of 5 resets bursts of new connections
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever(poll_interval=0.05)


class LoopbackServer:
    """The server above in its own process, so its CPU does not compete with the client's GIL."""

    def __init__(self, latency: float, rate: float | None = None, burst: float = 1.0, retry_after_ms: bool = True):
        ports = multiprocessing.Queue()
        self.process = multiprocessing.Process(
            target=serve, args=(ports, latency, rate, burst, retry_after_ms), daemon=True
        )
        self.process.start()
        self.base = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base.replace("/v1", "/stats")) as r:
            return json.load(r)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join()


def timed_judge(base: str, pairs, cache: str | None, **settings) -> tuple[float, list, OpenAIJudge]:
    judge = OpenAIJudge(base, MODEL, api_key_env=KEY_ENV, cache_path=cache, progress=False, **settings)
    start = time.perf_counter()
    judged = judge.judge(pairs)
    return time.perf_counter() - start, judged, judge


def throughput(args) -> dict:
    pairs = [(f"benchmark instruction {i}", f"benchmark response {i}") for i in range(args.n)]
    seq_pairs = [(f"sequential instruction {i}", "response") for i in range(args.sequential_subset)]
    with LoopbackServer(args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        timed_judge(server.base, [("warm-up", "x")], None)  # SDK import and first connection
        cache = str(Path(tmp) / "judge.sqlite")
        server_before = server.stats()
        client_cpu = time.process_time()
        concurrent_s, judged, _ = timed_judge(server.base, pairs, cache)
        client_cpu = time.process_time() - client_cpu
        server_cpu = server.stats()["cpu_s"] - server_before["cpu_s"]
        if not all(j.score == 1.0 for j in judged):
            raise RuntimeError("benchmark judgments came back incomplete")
        sequential_s, _, _ = timed_judge(server.base, seq_pairs, None, concurrency=1)
        before = server.stats()["requests"]
        cached_s, _, _ = timed_judge(server.base, pairs, cache)
        cached_requests = server.stats()["requests"] - before
    sequential_est = sequential_s * args.n / args.sequential_subset
    return {
        "concurrency": DEFAULT_CONCURRENCY,
        "concurrent_s": round(concurrent_s, 3),
        "sequential_subset": args.sequential_subset,
        "sequential_subset_s": round(sequential_s, 3),
        "sequential_est_s": round(sequential_est, 3),
        "speedup": round(sequential_est / concurrent_s, 2),
        "ideal_speedup": DEFAULT_CONCURRENCY,
        "concurrent_client_cpu_ms_per_request": round(1000 * client_cpu / args.n, 2),
        "concurrent_server_cpu_ms_per_request": round(1000 * server_cpu / args.n, 2),
        "cached_rerun_s": round(cached_s, 4),
        "cached_rerun_server_requests": cached_requests,
    }


def rate_limited(args, retry_after_ms: bool) -> dict:
    pairs = [(f"limited instruction {i}", f"response {i}") for i in range(args.n)]
    with LoopbackServer(args.latency, args.rate, args.burst, retry_after_ms) as server:
        wall_s, judged, judge = timed_judge(server.base, pairs, None)
        stats = server.stats()
    nan = sum(math.isnan(j.score) for j in judged)
    return {
        "retry_after": "retry-after-ms" if retry_after_ms else "none",
        "wall_s": round(wall_s, 2),
        "floor_s": round(args.n / args.rate, 2),  # no client can finish faster than n / rate
        "nan": nan,
        "server_requests": stats["requests"],
        "rate_limited_replies": stats["limited"],
        "limit_cuts": judge.last_pacing.cuts,
        "final_limit": round(judge.last_pacing.limit, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.1, help="server seconds per request")
    parser.add_argument("--sequential-subset", type=int, default=50)
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s the rate-limited server admits")
    parser.add_argument("--burst", type=float, default=5.0, help="requests the rate-limited server admits at once")
    parser.add_argument("--out", default="benchmarks/results/judge.json")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "benchmark-placeholder")

    result = {"n": args.n, "latency_s": args.latency, "rate_per_s": args.rate, "burst": args.burst}
    result.update(throughput(args))
    result["rate_limited"] = [rate_limited(args, True), rate_limited(args, False)]
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    result["targets"] = {"speedup_min": 20, "rate_limited_nan_max": 0, "cached_rerun_max_s": 1.0}
    result["pass"] = (
        result["speedup"] >= 20
        and result["cached_rerun_s"] <= 1.0
        and result["cached_rerun_server_requests"] == 0
        and all(leg["nan"] == 0 for leg in result["rate_limited"])
    )
    result["note"] = (
        f"default settings throughout; sequential leg timed on {args.sequential_subset} judgments at "
        "concurrency 1 and scaled to n"
    )
    io.write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
