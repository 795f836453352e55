"""Bad input, table-driven: each case exits non-zero within seconds, with exactly one line on stderr that
names the culprit, before any model loads, and leaves no file that claims completion.

Cases run in-process through `safeproj.cli.main` (a subprocess costs seconds each); a `fit` case swaps in
the tiny model and a small data draw, so nothing it reaches is expensive.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from safeproj.cli import main

ROOT = Path(__file__).resolve().parents[1]
WANDB = ["fit", "--config", str(ROOT / "recipes/mixed.yaml"), "--model.model", "tiny", "--data.num_samples", "16",
         "--trainer.default_root_dir", "{tmp}/run"]  # fmt: skip
FIT = [*WANDB, "--trainer.logger", "false"]
ONLINE = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "NETRC": "{tmp}/absent-netrc"}
SECONDS = 10  # far below any model load, safety tuning or training step


@dataclass
class Case:
    name: str
    args: list[str]
    culprit: str  # must appear in the one line
    config: str | None = None  # YAML layered after the recipe (fit cases)
    env: dict[str, str] | None = None


def projection(**init_args) -> str:
    args = ", ".join(f"{k}: {v}" for k, v in {"subspace": "safety", **init_args}.items())
    return (
        f"trainer:\n  callbacks:\n    - class_path: safeproj.callbacks.OnlineProjection\n      init_args: {{{args}}}\n"
    )


def source(path: str) -> str:
    return f"data:\n  sources:\n    - {{path: {path}}}\n"


def utility(**init_args) -> str:
    args = ", ".join(f"{k}: {v}" for k, v in init_args.items())
    return f"trainer:\n  callbacks:\n    - class_path: safeproj.callbacks.UtilityEval\n      init_args: {{{args}}}\n"


# fmt: off
CASES = [
    # jsonargparse reports, reduced to the key, the value and the fix
    Case("frac above 1", FIT, "frac", projection(frac=1.5)),
    Case("eta zero", FIT, "eta", projection(eta=0)),
    Case("misspelt keep", FIT, "orthogonl", projection(keep="orthogonl")),
    Case("bare on key", FIT, 'write the key as "on"', "trainer:\n  callbacks:\n    - class_path: "
         "safeproj.callbacks.OnlineProjection\n      init_args:\n        subspace: safety\n        on: update\n"),
    Case("frac and eta", FIT, "frac or eta", projection(frac=0.5, eta=0.5)),
    Case("unknown selection", FIT, "topk", projection(selection="topk")),
    Case("misspelt callback argument", FIT, "fracc", projection(fracc=0.5)),
    Case("unknown callback class", FIT, "OnlineProjectionX",
         "trainer:\n  callbacks:\n    - class_path: safeproj.callbacks.OnlineProjectionX\n"),
    Case("unknown config key", [*FIT, "--model.no_such_key", "1"], "no_such_key"),
    Case("not an integer", [*FIT, "--trainer.max_steps", "abc"], "abc"),
    Case("missing config file", [*FIT, "--config", "{tmp}/absent.yaml"], "absent.yaml"),
    Case("lora rank zero", [*FIT, "--model.lora.r", "0"], "lora.r"),
    # subspace specs
    Case("missing basis file", FIT, "absent.safetensors", projection(subspace="{tmp}/absent.safetensors")),
    Case("unknown safety preset", FIT, "nope", projection(subspace="safety:nope")),
    Case("missing delta dirs", FIT, "{tmp}/tuned", projection(subspace="'{tmp}/tuned,{tmp}/base'")),
    Case("adapter dir without config", FIT, "adapter_model_only", projection(subspace="{tmp}/adapter_model_only")),
    Case("bad include regex", FIT, "include", projection(include="['(']")),
    # models
    Case("unknown model", [*FIT, "--model.model", "not-a-model"], "not-a-model"),
    Case("model dir without config.json", [*FIT, "--model.model", "{tmp}/no_config"], "config.json"),
    Case("truncated model weights", [*FIT, "--model.model", "{tmp}/truncated"], "model.safetensors"),
    Case("adapter as model", [*FIT, "--model.model", "{tmp}/adapter"], "LoRA adapter"),
    Case("hub model offline", [*FIT, "--model.model", "no-such-org/no-such-model"], "HF_HUB_OFFLINE"),
    Case("negative lr", [*FIT, "--model.lr", "-1"], "lr"),
    Case("warmup ratio above 1", [*FIT, "--model.warmup_ratio", "1.5"], "warmup_ratio"),
    # runs that would do nothing
    Case("max_steps 0", [*FIT, "--trainer.max_steps", "0"], "max_steps"),
    Case("no training batches", [*FIT, "--trainer.limit_train_batches", "0"], "limit_train_batches"),
    Case("truncated ckpt_path", [*FIT, "--ckpt_path", "{tmp}/truncated.ckpt"], "truncated.ckpt"),
    Case("missing ckpt_path", [*FIT, "--ckpt_path", "{tmp}/absent.ckpt"], "absent.ckpt"),
    # data
    Case("zero batch size", [*FIT, "--data.batch_size", "0"], "batch_size"),
    Case("non-UTF-8 data file", FIT, "latin1.jsonl", source("{tmp}/latin1.jsonl")),
    Case("missing data file", FIT, "absent.jsonl", source("{tmp}/absent.jsonl")),
    Case("rows lacking fields", FIT, "dropped 1", source("{tmp}/short.jsonl")),
    Case("unknown built-in set", FIT, "builtin:nope", source("builtin:nope")),
    Case("gsm8k without gold", FIT, "no_gold.jsonl line 1", utility(dataset="{tmp}/no_gold.jsonl")),
    Case("negative num_samples", FIT, "num_samples", utility(num_samples=-3)),
    Case("judge key unset", FIT, "SAFEPROJ_UNSET_KEY",
         "trainer:\n  callbacks:\n    - class_path: safeproj.callbacks.HarmEval\n      init_args:\n        judge:\n"
         "          class_path: safeproj.eval.judges.OpenAIJudge\n"
         "          init_args: {model: m, api_key_env: SAFEPROJ_UNSET_KEY}\n"),
    # W&B online without what it needs: said before the run, within seconds
    Case("wandb online without key", WANDB, "WANDB_API_KEY", env={**ONLINE, "WANDB_API_KEY": ""}),
    Case("wandb online unreachable", WANDB, "cannot be reached",
         env={**ONLINE, "WANDB_BASE_URL": "http://127.0.0.1:9"}),
    # command names
    Case("test is not offered", ["test", "--config", str(ROOT / "recipes/mixed.yaml")], "test_step"),
    Case("misspelt command", ["basic"], "basis"),
    # the other commands
    Case("basis without --out", ["basis", "--delta", "a,b"], "out"),
    Case("basis out not safetensors", ["basis", "--delta", "a,b", "--out", "{tmp}/basis.pt"], "basis.pt"),
    Case("basis frac above 1", ["basis", "--delta", "a,b", "--out", "{tmp}/b.safetensors", "--frac", "1.5"], "frac"),
    Case("basis unknown side", ["basis", "--delta", "a,b", "--out", "{tmp}/b.safetensors", "--side", "up"], "up"),
    Case("basis missing delta", ["basis", "--delta", "{tmp}/absent", "--out", "{tmp}/b.safetensors"], "absent"),
    Case("overlap without --b", ["overlap", "--a", "A"], "b"),
    Case("project unknown keep", ["project", "--run", "{tmp}", "--subspace", "x", "--keep", "sideways"], "sideways"),
    Case("eval model without config.json", ["eval", "--model", "{tmp}/no_config"], "config.json"),
    Case("eval adapter without config", ["eval", "--model", "{tmp}/adapter_model_only"], "adapter_config.json"),
    Case("eval truncated weights", ["eval", "--model", "{tmp}/truncated"], "model.safetensors"),
    Case("eval gsm8k without gold", ["eval", "--model", "tiny", "--harm", "false",
                                     "--utility_dataset", "{tmp}/no_gold.jsonl"], "no_gold.jsonl line 1"),
    Case("eval non-UTF-8 set", ["eval", "--model", "tiny", "--harm", "false",
                                "--utility_dataset", "{tmp}/latin1.jsonl"], "latin1.jsonl"),
    Case("eval zero samples", ["eval", "--model", "tiny", "--num_samples", "0"], "num_samples"),
    Case("eval judge key unset", ["eval", "--model", "tiny", "--judge_model", "m",
                                  "--judge_api_key_env", "SAFEPROJ_UNSET_KEY"], "SAFEPROJ_UNSET_KEY"),
    Case("judge missing file", ["judge", "{tmp}/absent.json"], "absent.json"),
    Case("prereq unknown preset", ["prereq", "nope"], "nope"),
    Case("sweep missing spec", ["sweep", "{tmp}/absent.yaml"], "absent.yaml"),
]
# fmt: on


@pytest.fixture(scope="module", autouse=True)
def _imported():
    # Import time is not the time to an error: the limit is on what the command does.
    import safeproj.commands.fit  # noqa: F401
    from safeproj.commands.dispatch import command_function

    for name in ("basis", "eval", "project", "overlap", "judge", "prereq", "sweep"):
        command_function(name)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Broken inputs on disk: truncated weights and checkpoint, incomplete directories, bad data files."""
    from safeproj.model.loading import tiny_dir

    tmp = tmp_path_factory.mktemp("bad-inputs")
    weights = (tiny_dir() / "model.safetensors").read_bytes()
    for name, files in {
        "truncated": {"config.json": b"{}", "model.safetensors": weights[: len(weights) // 2]},
        "no_config": {"model.safetensors": weights},
        "adapter": {"adapter_config.json": b"{}", "adapter_model.safetensors": weights},
        "adapter_model_only": {"adapter_model.safetensors": weights},
    }.items():
        (tmp / name).mkdir()
        for file, data in files.items():
            (tmp / name / file).write_bytes(data)
    (tmp / "truncated.ckpt").write_bytes(b"PK\x03\x04" + weights[:1000])
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9", "response": "ok"}\n'.encode("latin-1"))
    (tmp / "short.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    (tmp / "no_gold.jsonl").write_text('{"question": "2 + 2?", "answer": "It is 4"}\n')
    return tmp


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line(case, bad_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAFEPROJ_DEBUG", raising=False)
    monkeypatch.delenv("SAFEPROJ_UNSET_KEY", raising=False)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value.replace("{tmp}", str(tmp_path)))
    for name in (
        "truncated",
        "no_config",
        "adapter",
        "adapter_model_only",
        "truncated.ckpt",
        "latin1.jsonl",
        "short.jsonl",
        "no_gold.jsonl",
    ):
        (tmp_path / name).symlink_to(bad_files / name)
    if case.config is not None:
        layered = tmp_path / "case.yaml"
        layered.write_text(case.config.replace("{tmp}", str(tmp_path)))
        args += ["--config", str(layered)]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(args)
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    message = exc.value.code
    assert isinstance(message, str), f"exit code {message!r}, stderr: {captured.err}"
    lines = [line for line in (captured.err + message).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert case.culprit.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert seconds < SECONDS
    claims = [p for p in tmp_path.rglob("*") if p.name in ("summary.json", "b.safetensors", "checkpoint")]
    assert not claims


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("SAFEPROJ_DEBUG", "1")
    with pytest.raises(ValueError, match="nope"):
        main(["prereq", "nope"])
    monkeypatch.delenv("SAFEPROJ_DEBUG")
    with pytest.raises(ValueError, match="nope"):
        main(["prereq", "nope", "--debug"])


@pytest.mark.parametrize(
    ("args", "culprit"),
    [([*FIT, "--model.model", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
     ([*FIT, "--config", "{config}"], "beavertails-unsafe")],
    ids=["model", "dataset"],
)  # fmt: skip
def test_unreachable_hub_is_said_at_once(args, culprit, tmp_path, monkeypatch):
    # Online (HF_HUB_OFFLINE unset) with a hub that refuses connections: one line within seconds, not a minute
    # of retries, naming what to set.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    config = tmp_path / "hub.yaml"
    config.write_text("data:\n  sources:\n    - {path: beavertails-unsafe}\n")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{tmp}", str(tmp_path)).replace("{config}", str(config)) for a in args])
    assert time.perf_counter() - started < SECONDS
    message = str(exc.value.code)
    assert culprit in message and "cannot be reached" in message and "\n" not in message


def test_module_without_tokenizer_fails_before_training(tmp_path):
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from helpers.evaluation import TinyLM
    from safeproj.callbacks import UtilityEval

    class NoTokenizer(TinyLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = None
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return super().training_step(batch, batch_idx)

    module = NoTokenizer()
    trainer = L.Trainer(max_steps=2, callbacks=[UtilityEval(num_samples=1)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(MisconfigurationException, match=r"`\.tokenizer`"):
        trainer.fit(module)
    assert module.steps == 0


def test_the_installed_command_prints_one_line(tmp_path):
    # The same path outside pytest's capture: no warning, log record or usage text beside the line.
    import subprocess
    import sys

    config = tmp_path / "case.yaml"
    config.write_text(projection(keep="orthogonl"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in FIT]
    result = subprocess.run(
        [sys.executable, "-m", "safeproj.cli", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "safeproj fit: error: trainer.callbacks OnlineProjection.keep: 'orthogonl' is not one of parallel, orthogonal"
    ]
    assert not list(tmp_path.rglob("summary.json"))
