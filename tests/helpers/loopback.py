"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for judge tests.

What the server does with a request is written into the judged response text as directives.
`xK` means "the first K attempts of this pair"; without it a fault hits every attempt.
  [[score=V]]          answer "#thereason: scripted\\n#thescore: V" (default 3; V verbatim, e.g. 4.5)
  [[delay=S]]          wait S seconds before answering
  [[429xK]]            HTTP 429, with Retry-After from [[retry_after=V]] (V verbatim: "0.05", "soon";
                       "date+S" is an HTTP date S seconds ahead) and retry-after-ms from [[retry_after_ms=V]]
  [[quota]]            HTTP 429 with code "insufficient_quota"
  [[500xK]] [[400xK]]  HTTP 500 / 400
  [[timeoutxK]]        hang for `hang` seconds (past the client's timeout), then answer
  [[dropxK]]           close the connection without answering
  [[invalid_jsonxK]]   HTTP 200 whose body is not JSON
  [[htmlxK]]           HTTP 200 with an HTML page
  [[null_contentxK]]   a completion whose message content is null
  [[no_choicesxK]]     a completion with an empty choices list
  [[empty_bodyxK]]     HTTP 200 with the body {}
  [[malformed]]        every answer lacks "#thescore"
  [[malformed_once]]   the first answer lacks "#thescore", the format-reminder answer is valid
Attempts are counted per judged pair (the first user message), so retries and the format reminder
of one pair share a counter. `rate_limit` (requests per second, token bucket holding `burst`)
makes the whole server answer 429 beyond that rate, with retry-after-ms set to the time until the
next token when `retry_after_ms` is true.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_DIRECTIVE = re.compile(r"\[\[([a-z0-9_]+?)(?:=([^\]]*)|x(\d+))?\]\]")


def directives(text: str) -> dict[str, str | float]:
    """{name: value} of the [[...]] directives in `text`: the `=` value as text, the `xK` count as a
    number, or infinity (every attempt) when neither is given."""
    out: dict[str, str | float] = {}
    for name, value, count in _DIRECTIVE.findall(text):
        out[name] = value if value else (float(count) if count else math.inf)
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        self.server.owner.handle(self)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 resets bursts of new connections
    daemon_threads = True


class LoopbackJudgeServer:
    """Start with `start()` (or as a context manager); `base_url` ends in /v1."""

    def __init__(
        self,
        model: str = "judge-model",
        hang: float = 1.0,
        latency: float = 0.0,
        rate_limit: float | None = None,
        burst: float = 1.0,
        retry_after_ms: bool = True,
    ):
        self.model = model
        self.hang = hang
        self.latency = latency
        self.rate_limit = rate_limit
        self.burst = burst
        self.retry_after_ms = retry_after_ms
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rate_limited = 0
        self.attempts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.answered: set[str] = set()
        self.auth_headers: list[str] = []
        self.bodies: list[dict] = []
        self._tokens = burst
        self._refilled = time.monotonic()
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

    def attempts_for(self, fragment: str) -> int:
        """Attempts (requests) made for the pair whose judge message contains `fragment`."""
        return sum(n for pair, n in self.attempts.items() if fragment in pair)

    # ------------------------------------------------------------ requests

    def handle(self, h: _Handler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth_headers.append(h.headers.get("Authorization", ""))
            self.bodies.append(body)
        try:
            self._respond(h, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to answer
        finally:
            with self.lock:
                self.in_flight -= 1

    def _take_token(self) -> float | None:
        """None if the request is admitted under the rate limit, else seconds until the next token."""
        if self.rate_limit is None:
            return None
        with self.lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate_limit)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            self.rate_limited += 1
            return (1 - self._tokens) / self.rate_limit

    def _respond(self, h: _Handler, body: dict) -> None:
        if body.get("model") != self.model:
            error = {"message": f"model {body.get('model')} does not exist", "type": "invalid_request_error"}
            return self._send(h, 404, {"error": error})
        wait = self._take_token()
        if wait is not None:
            headers = {"retry-after-ms": f"{1000 * wait:.0f}"} if self.retry_after_ms else {}
            return self._send(h, 429, {"error": {"message": "rate limited", "type": "requests"}}, headers)
        messages = body["messages"]
        pair = messages[0]["content"]
        reminder = len(messages) > 1
        with self.lock:
            self.attempts[pair] += 1
            attempt = self.attempts[pair]
            self.times[pair].append(time.monotonic())
        d = directives(pair)
        hit = lambda name: attempt <= d.get(name, 0)  # noqa: E731
        if self.latency:
            time.sleep(self.latency)
        if hit("drop"):
            h.close_connection = True
            return None
        if hit("timeout"):
            time.sleep(self.hang)
            return self._send(h, 200, self._completion("#thereason: late\n#thescore: 1"))
        if "quota" in d:
            error = {"message": "quota exceeded", "type": "insufficient_quota", "code": "insufficient_quota"}
            return self._send(h, 429, {"error": error})
        if hit("429"):
            return self._send(
                h, 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, self._retry_after(d)
            )
        for status in (400, 500):
            if hit(str(status)):
                return self._send(h, status, {"error": {"message": f"scripted {status}", "type": "scripted"}})
        if hit("invalid_json"):
            return self._send_raw(h, 200, b'{"choices": [{"message": ', "application/json")
        if hit("html"):
            return self._send_raw(h, 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        if hit("empty_body"):
            return self._send(h, 200, {})
        if hit("no_choices"):
            return self._send(h, 200, {**self._completion(""), "choices": []})
        if hit("null_content"):
            return self._send(h, 200, self._completion(None))
        if "delay" in d:
            time.sleep(float(d["delay"]))
        malformed = "malformed" in d or ("malformed_once" in d and not reminder)
        text = "I think this is fine." if malformed else f"#thereason: scripted\n#thescore: {d.get('score', 3)}"
        with self.lock:
            self.answered.add(pair)
        return self._send(h, 200, self._completion(text))

    @staticmethod
    def _retry_after(d: dict) -> dict[str, str]:
        headers = {}
        if "retry_after" in d:
            value = str(d["retry_after"])
            if value.startswith("date+"):
                value = email.utils.formatdate(time.time() + float(value[5:]), usegmt=True)
            headers["Retry-After"] = value
        if "retry_after_ms" in d:
            headers["retry-after-ms"] = str(d["retry_after_ms"])
        return headers

    def _completion(self, text: str | None) -> dict:
        return {
            "id": "chatcmpl-loopback",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    @classmethod
    def _send(cls, h: _Handler, status: int, payload: dict, headers: dict | None = None) -> None:
        cls._send_raw(h, status, json.dumps(payload).encode(), "application/json", headers)

    @staticmethod
    def _send_raw(h: _Handler, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
