"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for judge tests.

What the server does with a request is written into the judged response text as directives:
  [[score=N]]        answer "#thereason: ... #thescore: N" (default score 3)
  [[delay=S]]        wait S seconds before answering
  [[429xK]]          the first K attempts get HTTP 429 (with Retry-After from [[retry_after=S]])
  [[500xK]]          the first K attempts get HTTP 500
  [[400xK]]          the first K attempts get HTTP 400 (not retryable)
  [[timeoutxK]]      the first K attempts hang for `hang` seconds (past the client's timeout)
  [[malformed]]      every answer lacks "#thescore"
  [[malformed_once]] the first answer lacks "#thescore", the format-reminder answer is valid
  [[drop]]           close the connection without answering
Attempts are counted per judged pair (the first user message), so retries and the format
reminder of one pair share a counter.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_DIRECTIVE = re.compile(r"\[\[(\w+?)(?:=([\d.]+)|x(\d+))?\]\]")


def directives(text: str) -> dict[str, float]:
    """{name: value} of the [[...]] directives in `text` (value 1 when none is given)."""
    out = {}
    for name, value, count in _DIRECTIVE.findall(text):
        out[name] = float(value or count or 1)
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        self.server.owner.handle(self)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 resets bursts of new connections
    daemon_threads = True


class LoopbackJudgeServer:
    """Start with `start()` (or as a context manager); `base_url` ends in /v1."""

    def __init__(self, model: str = "judge-model", hang: float = 1.0, latency: float = 0.0):
        self.model = model
        self.hang = hang
        self.latency = latency
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.attempts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.answered: set[str] = set()
        self.auth_headers: list[str] = []
        self.httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> LoopbackJudgeServer:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> LoopbackJudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    # ------------------------------------------------------------ requests

    def handle(self, h: _Handler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth_headers.append(h.headers.get("Authorization", ""))
        try:
            self._respond(h, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to answer
        finally:
            with self.lock:
                self.in_flight -= 1

    def _respond(self, h: _Handler, body: dict) -> None:
        if body.get("model") != self.model:
            error = {"message": f"model {body.get('model')} does not exist", "type": "invalid_request_error"}
            return self._send(h, 404, {"error": error})
        messages = body["messages"]
        pair = messages[0]["content"]
        reminder = len(messages) > 1
        with self.lock:
            self.attempts[pair] += 1
            attempt = self.attempts[pair]
            self.times[pair].append(time.monotonic())
        d = directives(pair)
        if self.latency:
            time.sleep(self.latency)
        if "drop" in d:
            h.close_connection = True
            return None
        if attempt <= d.get("timeout", 0):
            time.sleep(self.hang)
            return self._send(h, 200, self._completion("#thereason: late\n#thescore: 1"))
        if attempt <= d.get("429", 0):
            headers = {"Retry-After": str(d["retry_after"])} if "retry_after" in d else {}
            return self._send(h, 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, headers)
        if attempt <= d.get("400", 0):
            return self._send(h, 400, {"error": {"message": "context too long", "type": "invalid_request_error"}})
        if attempt <= d.get("500", 0):
            return self._send(h, 500, {"error": {"message": "boom", "type": "server_error"}})
        if "delay" in d:
            time.sleep(d["delay"])
        malformed = "malformed" in d or ("malformed_once" in d and not reminder)
        text = "I think this is fine." if malformed else f"#thereason: scripted\n#thescore: {int(d.get('score', 3))}"
        with self.lock:
            self.answered.add(pair)
        return self._send(h, 200, self._completion(text))

    def _completion(self, text: str) -> dict:
        return {
            "id": "chatcmpl-loopback",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    @staticmethod
    def _send(h: _Handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
