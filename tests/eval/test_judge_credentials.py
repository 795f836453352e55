"""Key hygiene: stripped and checked when the client is built, never in any log record at any level."""

from __future__ import annotations

import logging

import pytest

from helpers.evaluation import SECRET
from safeproj.eval.judges import JudgeError, OpenAIJudge
from safeproj.eval.judges.credentials import read_api_key, redact

FAST = {"backoff_base": 0.001, "backoff_max": 0.05, "max_retries": 1, "progress": False}


def _texts(caplog) -> list[str]:
    """Every rendering of every captured record: message, exception text, and the handler's output."""
    out = [caplog.text]
    for record in caplog.records:
        out.append(record.getMessage())
        out.append(record.exc_text or "")
        out.append(str(record.args))
    return out


@pytest.mark.parametrize("padded", [f"{SECRET}\n", f"  {SECRET} ", f"\t{SECRET}\r\n"])
def test_key_with_surrounding_whitespace_is_stripped(padded, judge_server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SAFEPROJ_PADDED_KEY", padded)
    judge = OpenAIJudge(judge_server.base_url, judge_server.model, api_key_env="SAFEPROJ_PADDED_KEY", **FAST)
    assert judge.judge([("a", "[[score=4]]")])[0].score == 4.0
    assert judge_server.auth_headers == [f"Bearer {SECRET}"]
    assert not any(SECRET in text for text in _texts(caplog))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (SECRET + "\u00e9", "non-ASCII"),
        ("sk-with inner-space", "non-ASCII"),
        ("sk-\x07bell", "control"),
        ("   \n", "is not set"),
    ],
)
def test_unusable_key_is_one_line_naming_the_variable(value, match, monkeypatch):
    monkeypatch.setenv("SAFEPROJ_BAD_KEY", value)
    with pytest.raises(JudgeError, match=match) as err:
        read_api_key("SAFEPROJ_BAD_KEY")
    message = str(err.value)
    assert "SAFEPROJ_BAD_KEY" in message and "\n" not in message
    assert not value.strip() or value.strip() not in message
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="SAFEPROJ_BAD_KEY", **FAST)
    with pytest.raises(JudgeError, match="SAFEPROJ_BAD_KEY"):
        judge.judge([("a", "b")])


def test_key_in_no_log_record_at_debug(judge_server, api_key, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(
        judge_server.base_url,
        judge_server.model,
        api_key_env=api_key,
        timeout=0.2,
        cache_path=str(tmp_path / "j.sqlite"),
        **FAST,
    )
    faults = ["[[429x1]] [[retry_after=0.01]]", "[[malformed]]", "[[500x9]]", "[[drop]]", "[[html]]", "[[timeoutx1]]"]
    judge.judge([(f"q{i}", f) for i, f in enumerate(faults)])
    with pytest.raises(JudgeError):
        OpenAIJudge(judge_server.base_url, "missing-model", api_key_env=api_key, **FAST).judge([("a", "b")])
    assert len(caplog.records) > 10  # the SDK and the HTTP library did log at debug level
    assert not any(SECRET in text for text in _texts(caplog))


def test_library_records_with_credentials_are_redacted(monkeypatch, caplog):
    monkeypatch.setenv("SAFEPROJ_REDACT_KEY", SECRET)
    read_api_key("SAFEPROJ_REDACT_KEY")  # registers the key and installs the redaction
    caplog.set_level(logging.DEBUG)
    transport = logging.getLogger("httpcore2.http11")
    transport.debug("send_request_headers.started headers=%s", [(b"Authorization", b"Bearer " + SECRET.encode())])
    transport.debug("request options: %s", {"headers": {"api-key": "another-token-123", "x-trace": "ok"}})
    logging.getLogger("some.library").info("Authorization: Bearer unrelated-token-456")
    try:
        raise ValueError(f"Illegal header value b'Bearer {SECRET}\\n'")
    except ValueError:
        logging.getLogger("h11").exception("protocol error")
    texts = _texts(caplog)
    assert not any(SECRET in t or "another-token-123" in t or "unrelated-token-456" in t for t in texts)
    assert "<redacted>" in caplog.text and "x-trace" in caplog.text  # the rest of each record survives
    assert "ValueError" in caplog.records[-1].exc_text


def test_redact_leaves_ordinary_text_alone():
    assert redact("judge request failed (RateLimitError); retry in 0.5 s") == (
        "judge request failed (RateLimitError); retry in 0.5 s"
    )
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer <redacted>"
