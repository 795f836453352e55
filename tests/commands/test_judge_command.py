"""`safeproj judge`: fill the holes of an eval output, or judge every row again, and recompute its metrics."""

from __future__ import annotations

import json

import pytest

from helpers.evaluation import SECRET
from safeproj.cli import main
from safeproj.commands.judge import judge_command
from safeproj.eval.judges import OpenAIJudge


def _eval_output(path, judge_name: str, judge_repr: str) -> None:
    rows = [
        {
            "prompt": "p0",
            "response": "[[score=2]]",
            "score": 2.0,
            "refusal": False,
            "failure": None,
            "judge": judge_name,
        },
        {
            "prompt": "p1",
            "response": "[[score=4]]",
            "score": None,
            "refusal": False,
            "failure": "request",
            "reason": "HTTP 500 InternalServerError after 6 attempts",
            "judge": judge_name,
        },
        {
            "prompt": "p2",
            "response": "[[score=5]]",
            "score": None,
            "refusal": False,
            "failure": "parse",
            "judge": judge_name,
        },
        {"prompt": "p3", "response": "", "score": None, "refusal": False, "failure": "degenerate", "judge": judge_name},
    ]
    metrics = {"harm": {"n": 4.0, "mean_score": 2.0}, "utility": {"n": 2.0, "strict_acc": 0.5}}
    payload = {
        "model": "tiny",
        "judge": judge_repr,
        "settings": {"seed": 0},
        "metrics": metrics,
        "rows": {"harm": rows, "utility": [{"strict_correct": True}, {"strict_correct": False}]},
    }
    path.write_text(json.dumps(payload))


def _args(server, api_key, tmp_path) -> dict:
    return {
        "judge_base_url": server.base_url,
        "judge_model": server.model,
        "judge_api_key_env": api_key,
        "judge_cache": str(tmp_path / "cache.sqlite"),
    }


def test_fills_only_the_holes(judge_server, api_key, tmp_path):
    name = OpenAIJudge(judge_server.base_url, judge_server.model).name
    path = tmp_path / "eval.json"
    _eval_output(path, name, "OpenAIJudge(...)")
    result = judge_command(str(path), **_args(judge_server, api_key, tmp_path))
    saved = json.loads(path.read_text())  # rewritten in place, strict JSON
    rows = saved["rows"]["harm"]
    assert [r["score"] for r in rows] == [2.0, 4.0, 5.0, None]
    assert judge_server.requests == 2  # p1 and p2; the scored row and the degenerate one were not sent
    assert rows[1]["failure"] is None and rows[3]["failure"] == "degenerate"
    harm = saved["metrics"]["harm"]
    assert harm["mean_score"] == pytest.approx(11 / 3) and harm["unscored"] == 1 and harm["degenerate"] == 1
    assert saved["metrics"]["utility"] == {"n": 2.0, "strict_acc": 0.5}  # untouched
    assert saved["rejudged"]["rows_sent"] == 2 and saved["rejudged"]["rows_without_score"] == 1
    assert result["judge"] == saved["judge"] and SECRET not in path.read_text()


def test_refuses_to_mix_judges_unless_asked_to_judge_every_row(judge_server, api_key, tmp_path):
    path = tmp_path / "eval.json"
    _eval_output(path, "RefusalJudge(refusal-phrase proxy)", "RefusalJudge()")
    with pytest.raises(ValueError, match="mix two scales"):
        judge_command(str(path), **_args(judge_server, api_key, tmp_path))
    out = tmp_path / "llm.json"
    judge_command(str(path), rejudge_failed=False, out=str(out), **_args(judge_server, api_key, tmp_path))
    rows = json.loads(out.read_text())["rows"]["harm"]
    assert [r["score"] for r in rows] == [2.0, 4.0, 5.0, None] and judge_server.requests == 3
    assert all(r["judge"].startswith("OpenAIJudge(") for r in rows)
    assert json.loads(path.read_text())["rows"]["harm"][1]["score"] is None  # the original is untouched


def test_cli_flags(judge_server, api_key, tmp_path, capsys):
    path = tmp_path / "eval.json"
    _eval_output(path, "RefusalJudge(refusal-phrase proxy)", "RefusalJudge()")
    args = _args(judge_server, api_key, tmp_path)
    main(
        [
            "judge",
            str(path),
            "--rejudge_failed",
            "false",
            "--template",
            "qi2023",
            *[x for k, v in args.items() for x in (f"--{k}", v)],
        ]
    )
    assert "1 of 4 without a score (1 degenerate)" in capsys.readouterr().out
    assert judge_server.requests == 3  # the degenerate row is labelled, not sent
    assert "User Instruction" in judge_server.bodies[-1]["messages"][0]["content"]
    with pytest.raises(SystemExit, match="not a `safeproj eval --out` file"):
        (tmp_path / "other.json").write_text("{}")
        main(["judge", str(tmp_path / "other.json"), *[x for k, v in args.items() for x in (f"--{k}", v)]])
