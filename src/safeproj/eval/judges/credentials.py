"""API keys: read from the environment, checked once, and kept out of every log record.

`read_api_key` strips the variable's value and refuses one an HTTP header cannot carry (a raw
UnicodeEncodeError or a misleading connection error after all retries is what happens otherwise).
It also installs, once per process, a log-record factory that redacts the key itself and anything
shaped like a credential header ("Bearer ...", "authorization: ...", "api-key: ...") from every
record at every level, whichever library emits it, including formatted exception text.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback

from safeproj.eval.judges.base import JudgeError

REDACTED = "<redacted>"
_CREDENTIAL = re.compile(
    r"(?i)(bearer\s+)[^\s'\",}\]]+"
    r"|((?:authorization|proxy-authorization|api-key|x-api-key|openai-api-key)['\"]?\s*[:=]\s*['\"]?(?:\w+\s+)?)"
    r"[^\s'\",}\]]+"
)
_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def read_api_key(variable: str) -> str:
    """The key held by environment variable `variable`, stripped; JudgeError (one line, naming the
    variable, never quoting the key) if it is unset, empty or not printable ASCII."""
    value = os.environ.get(variable, "")
    key = value.strip()
    if not key:
        raise JudgeError(
            f"environment variable {variable} is not set; the judge needs a key "
            "(any non-empty value works for servers without authentication)"
        )
    if not all(33 <= ord(c) <= 126 for c in key):
        raise JudgeError(
            f"environment variable {variable} holds a key with spaces, control or non-ASCII characters, "
            "which an HTTP header cannot carry; set it to the key alone"
        )
    with _lock:
        _secrets.add(key)
    _install_redaction()
    return key


def redact(text: str) -> str:
    """`text` with known keys and credential headers replaced by <redacted>."""
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return _CREDENTIAL.sub(lambda m: (m.group(1) or m.group(2)) + REDACTED, text)


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a record whose arguments do not fit its format: leave it to the handler
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = redact(text)
        if clean != text:  # handlers print exc_text when exc_info is gone
            record.exc_info, record.exc_text = None, clean
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _install_redaction() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
