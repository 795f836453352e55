"""Judge throughput: concurrent vs sequential OpenAIJudge, and a cached rerun.

A loopback OpenAI-compatible server (its own process, 127.0.0.1, fixed latency per request)
answers every judgment. Three legs, all in one run so only ratios matter:
  concurrent  n judgments at --concurrency
  sequential  the same protocol at concurrency 1, timed on --sequential-subset judgments and
              scaled linearly to n (each request waits the same fixed latency)
  cached      the concurrent leg again with the same cache: the server must see no request
Targets: speed-up >= 20x, cached rerun <= 1 s.

    python benchmarks/judge.py [--n 500] [--latency 0.1] [--concurrency 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safeproj.eval.judges import OpenAIJudge

MODEL = "bench-judge"
KEY_ENV = "SAFEPROJ_BENCH_JUDGE_KEY"


def serve(port_queue, latency: float) -> None:
    """Answer every chat completion with a valid judgment after `latency` seconds."""
    count = multiprocessing.Value("i", 0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # /stats: completions served and this process's CPU seconds
            self._send({"requests": count.value, "cpu_s": time.process_time()})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with count.get_lock():
                count.value += 1
            time.sleep(latency)
            message = {"role": "assistant", "content": "#thereason: benchmark\n#thescore: 1"}
            self._send({
                "id": "bench", "object": "chat.completion", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            })

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # the default backlog of 5 resets bursts of new connections
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever(poll_interval=0.05)


def server_stats(base: str) -> dict:
    with urllib.request.urlopen(base.replace("/v1", "/stats")) as r:
        return json.load(r)


def timed_judge(base: str, pairs, concurrency: int, cache: str | None) -> float:
    judge = OpenAIJudge(base, MODEL, api_key_env=KEY_ENV, concurrency=concurrency, cache_path=cache, progress=False)
    start = time.perf_counter()
    judged = judge.judge(pairs)
    elapsed = time.perf_counter() - start
    if len(judged) != len(pairs) or not all(j.score == 1.0 for j in judged):
        raise RuntimeError("benchmark judgments came back incomplete")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.1, help="server seconds per request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential-subset", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/judge.json")
    args = parser.parse_args()

    os.environ.setdefault(KEY_ENV, "benchmark-placeholder")
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports, args.latency), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    try:
        pairs = [(f"benchmark instruction {i}", f"benchmark response {i}") for i in range(args.n)]
        seq_pairs = [(f"sequential instruction {i}", "response") for i in range(args.sequential_subset)]
        timed_judge(base, [("warm-up", "x")], 1, None)  # SDK import and first connection
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(Path(tmp) / "judge.sqlite")
            server_before = server_stats(base)
            client_cpu = time.process_time()
            concurrent_s = timed_judge(base, pairs, args.concurrency, cache)
            client_cpu = time.process_time() - client_cpu
            server_cpu = server_stats(base)["cpu_s"] - server_before["cpu_s"]
            sequential_s = timed_judge(base, seq_pairs, 1, None)
            before = server_stats(base)["requests"]
            cached_s = timed_judge(base, pairs, args.concurrency, cache)
            cached_requests = server_stats(base)["requests"] - before
    finally:
        server.terminate()
        server.join()

    sequential_est = sequential_s * args.n / args.sequential_subset
    speedup = sequential_est / concurrent_s
    result = {
        "n": args.n,
        "latency_s": args.latency,
        "concurrency": args.concurrency,
        "concurrent_s": round(concurrent_s, 3),
        "sequential_subset": args.sequential_subset,
        "sequential_subset_s": round(sequential_s, 3),
        "sequential_est_s": round(sequential_est, 3),
        "speedup": round(speedup, 2),
        "concurrent_client_cpu_ms_per_request": round(1000 * client_cpu / args.n, 2),
        "concurrent_server_cpu_ms_per_request": round(1000 * server_cpu / args.n, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cached_rerun_s": round(cached_s, 4),
        "cached_rerun_server_requests": cached_requests,
        "ideal_speedup": args.concurrency,
        "targets": {"speedup_min": 20, "cached_rerun_max_s": 1.0},
        "pass": speedup >= 20 and cached_s <= 1.0 and cached_requests == 0,
        "note": f"sequential leg timed on {args.sequential_subset} judgments at concurrency 1 and scaled to n",
    }
    from safeproj.commands.eval import write_json  # after the fork: keeps torch out of the server

    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
