"""Checks that run before anything expensive (safety tuning, model loading, data tokenization, basis
builds): model, subspace and dataset specs, and a parsed `fit`/`validate` config as a whole (those specs,
the callbacks' and the data module's own argument checks, a run that would make no optimizer step, a hub
or W&B server that does not answer). Each failure is one ValueError naming the config key, the bad value
and what to write instead. Under `planning()` nothing is downloaded or probed: what a run would still
fetch or need (a hub model not cached yet, an API key) is noted instead of failing."""

from __future__ import annotations

import contextlib
import netrc
import os
import socket
import threading
import warnings
import zipfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from safeproj.core.deltas import select_names
from safeproj.core.tensor_files import SafetensorsFiles
from safeproj.data.records import is_local, load_records
from safeproj.data.sources import load_pairs
from safeproj.eval.gsm8k import load_gsm8k
from safeproj.eval.harm import load_harmful_prompts
from safeproj.model.hub import HubModelMissing
from safeproj.model.loading import PRESETS, SAFETY_SUFFIX, PrerequisiteMissing
from safeproj.model.module import check_settings
from safeproj.model.subspaces import delta_source, expand_spec, safety_target

# Callback class name -> init args that hold subspace specs (a string, or a dict of name -> spec).
SUBSPACE_ARGUMENTS = {
    "OnlineProjection": ("subspace",),
    "PosthocProjection": ("subspace",),
    "SubspaceDrift": ("subspace",),
    "OverlapCallback": ("references",),
    "ActivationRecorder": ("basis",),
}
# Callback class name -> init args that hold a checkpoint (a preset, a directory or a safetensors file).
CHECKPOINT_ARGUMENTS = {"SafeLoRA": ("aligned", "base")}
# Callback class name -> how a local file given as its `dataset` is read (the reader the callback uses).
DATASET_READERS = {
    "UtilityEval": load_gsm8k,
    "HarmEval": load_harmful_prompts,
    "UtilityLikelihoodEval": load_records,
    "HarmLikelihoodEval": load_records,
}
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself
HUB_PROBE_SECONDS = 5.0  # how long a hub name may wait for huggingface.co before the run starts
WANDB_PROBE_SECONDS = 10.0  # how long WANDB_MODE=online may wait for the W&B server before the run starts
_PLAN_NOTES: ContextVar[list[str] | None] = ContextVar("plan_notes", default=None)


@contextlib.contextmanager
def planning() -> Iterator[list[str]]:
    """Checks that download and probe nothing; yields the notes of what the runs would still fetch or need."""
    notes: list[str] = []
    token = _PLAN_NOTES.set(notes)
    try:
        yield notes
    finally:
        _PLAN_NOTES.reset(token)


def _is_planning() -> bool:
    return _PLAN_NOTES.get() is not None


def _note(text: str) -> None:
    notes = _PLAN_NOTES.get()
    if text not in notes:
        notes.append(text)


def check_fit_config(cfg: Any, instantiated: Any) -> None:
    """Everything in a parsed fit/validate config that can be checked without loading a model.

    `cfg` is the subcommand's config; `instantiated` the same config with the callbacks and the data
    module's arguments built (their own argument checks have run), the model and trainer not.
    """
    model_name = cfg.model.model
    check_model_spec("model.model", model_name)
    try:
        check_settings(cfg.model.lr, cfg.model.warmup_ratio)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None
    check_steps(cfg.trainer)
    if cfg.get("ckpt_path"):
        check_ckpt_path(cfg.ckpt_path)
    callbacks = cfg.trainer.get("callbacks") or []
    for index, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
        check_callback(f"trainer.callbacks[{index}]", callback, model_name)
    check_data(instantiated.data)
    check_wandb_online(cfg.trainer.get("logger"))


def check_model_spec(key: str, name: str, adapters: bool = False) -> None:
    """A preset, a local Hugging Face checkpoint with readable weights (or, with `adapters`, a LoRA adapter
    directory), or a hub name available offline."""
    if name in PRESETS or (name.endswith(SAFETY_SUFFIX) and name.removesuffix(SAFETY_SUFFIX) in PRESETS):
        return
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        check_checkpoint_dir(key, path, adapters)
        return
    check_hub_model(key, name)


def check_checkpoint_dir(key: str, path: Path, adapters: bool = False) -> None:
    where = f"{key}={str(path)!r}"
    if not path.exists():
        raise ValueError(
            f"{where}: unknown model: not a preset ({', '.join(PRESETS)}, <preset>{SAFETY_SUFFIX}), "
            "an existing directory or a hub name 'org/name'"
        )
    if not path.is_dir():
        raise ValueError(f"{where} is a file; give the checkpoint directory that holds config.json")
    if (path / "adapter_model.safetensors").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(
            f"{where} holds adapter_model.safetensors but no adapter_config.json: copy the adapter's config"
        )
    is_adapter = (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    if is_adapter and not adapters:
        raise ValueError(f"{where} is a LoRA adapter: train from its base model and set model.lora instead")
    if not is_adapter and not (path / "config.json").is_file():
        raise ValueError(f"{where} is not a Hugging Face checkpoint directory (no config.json)")
    weights = [path / "adapter_model.safetensors"] if is_adapter else [path] if any(path.glob("*.safetensors")) else []
    for file in weights:
        try:
            SafetensorsFiles(file)
        except ValueError as err:
            raise ValueError(f"{key}: {err} (truncated or incomplete? copy or save it again)") from None


def check_weights_file(key: str, path: str) -> None:
    """A safetensors file that exists and whose header covers the file (a truncated copy does not)."""
    if not Path(path).is_file():
        raise ValueError(f"{key}={path!r}: no such file")
    try:
        SafetensorsFiles(path)
    except ValueError as err:
        raise ValueError(f"{key}: {err} (truncated or incomplete? copy or save it again)") from None


def check_hub_model(key: str, name: str) -> None:
    """A hub model is in the Hugging Face cache (offline), or the hub answers (else transformers would retry
    for about a minute before failing)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if _is_planning():
        if not cached:
            _note(f"hub model {name} is not cached: downloaded on first use")
        return
    if constants.HF_HUB_OFFLINE and not cached:
        raise ValueError(
            f"{key}={name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
            "forbids downloading it: unset HF_HUB_OFFLINE (with a network), or pass a local checkpoint directory"
        )
    if not constants.HF_HUB_OFFLINE:
        check_hub_reachable(key, name, cached)


def check_hub_reachable(key: str, name: str, cached: bool = False) -> None:
    """The Hugging Face hub answers within HUB_PROBE_SECONDS; if not, say which variable avoids the wait."""
    from huggingface_hub import constants

    parts = urlparse(constants.ENDPOINT)
    problem = _unreachable(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), HUB_PROBE_SECONDS)
    if problem is None:
        return
    if cached:
        raise ValueError(
            f"{key}={name!r}: the hub {constants.ENDPOINT} cannot be reached ({problem}); the cache has a copy: "
            "set HF_HUB_OFFLINE=1 to use it without waiting for the network"
        )
    raise ValueError(
        f"{key}={name!r}: the hub {constants.ENDPOINT} cannot be reached ({problem}) and the cache "
        f"({constants.HF_HUB_CACHE}) has no copy: connect, point HF_HOME at a cache that has it, or use a local path"
    )


def check_steps(trainer: Any) -> None:
    """A run must make at least one optimizer step, or it would finish with nothing done."""
    for key in ("max_steps", "max_epochs", "limit_train_batches"):
        if trainer.get(key) == 0:
            raise ValueError(f"trainer.{key}=0: the run would make no optimizer step; give a positive value")


def check_ckpt_path(path: str) -> None:
    if path in CKPT_KEYWORDS:
        return
    file = Path(path)
    if file.is_dir():
        return  # a sharded checkpoint, read by its strategy
    if not file.is_file():
        raise ValueError(f"ckpt_path={path!r}: no such file ({', '.join(CKPT_KEYWORDS)} name Lightning's own)")
    # torch.save writes a zip archive whose directory is at the end: a truncated copy has none.
    if not zipfile.is_zipfile(file):
        raise ValueError(f"ckpt_path={path!r} is not a complete checkpoint (truncated, or not written by Lightning)")


def check_callback(key: str, callback: Any, model_name: str) -> None:
    class_path = callback.get("class_path") if hasattr(callback, "get") else None
    if not class_path:
        return
    owner = class_path.rsplit(".", 1)[-1]
    args = callback.get("init_args") or {}
    where = f"{key} {owner}"
    patterns = {what: args.get(what) for what in ("include", "exclude")}
    for what, value in patterns.items():
        try:
            select_names([], **{what: value})
        except ValueError as err:
            raise ValueError(f"{where}.{what}: {err}") from None
    for name in SUBSPACE_ARGUMENTS.get(owner, ()):
        specs = args.get(name)
        if specs is None:
            continue
        items = specs.items() if hasattr(specs, "items") else [(None, specs)]
        for label, spec in items:
            arg = f"{where}.{name}" + (f".{label}" if label is not None else "")
            check_subspace_spec(arg, spec, model_name, patterns["include"], patterns["exclude"])
    for name in CHECKPOINT_ARGUMENTS.get(owner, ()):
        value = args.get(name)
        if value is not None and str(value).endswith(".safetensors"):
            check_weights_file(f"{where}.{name}", str(value))
        elif value is not None:
            check_model_spec(f"{where}.{name}", str(value))
    if owner in DATASET_READERS:
        check_dataset(f"{where}.dataset", args.get("dataset"), DATASET_READERS[owner])
    judge = args.get("judge")
    if judge is not None and str(judge.get("class_path", "")).endswith("OpenAIJudge"):
        check_judge_key(f"{where}.judge", (judge.get("init_args") or {}).get("api_key_env") or "OPENAI_API_KEY")


def check_judge_key(key: str, variable: str) -> None:
    """An LLM judge's key must be in the environment before the run, not found missing after training."""
    from safeproj.eval.judges.base import JudgeError
    from safeproj.eval.judges.credentials import read_api_key

    try:
        read_api_key(variable)
    except JudgeError as err:
        if _is_planning():
            _note(f"{variable} is not set: the judge needs it before the runs start")
            return
        raise ValueError(f"{key}: {err}") from None


def check_subspace_spec(key: str, spec: str, model_name: str, include=None, exclude=None) -> None:
    """A basis artifact, `safety`/`safety:<model>` (its start model available), or a delta spec whose files and
    headers are readable."""
    try:
        spec = expand_spec(spec, model_name)
        if spec.endswith(".safetensors"):
            if not Path(spec).is_file():
                raise ValueError(
                    f"basis file {spec} does not exist (make one with `safeproj basis --delta D --out {spec}`)"
                )
            SafetensorsFiles(spec)
        elif spec.startswith("safety:"):
            model = safety_target(spec)  # made before the run starts (`safeproj prereq`); here only its start
            if model not in PRESETS:
                check_model_spec(key, model)
        else:
            try:
                delta_source(spec, include, exclude, download=not _is_planning())
            except PrerequisiteMissing:
                pass  # a `<preset>-safety` checkpoint of the delta: made before the run starts, as `safety:` is
            except HubModelMissing:
                if not _is_planning():
                    raise
                _note(f"{spec}: its hub models are not all cached: downloaded on first use")
    except ValueError as err:
        raise ValueError(f"{key}={spec!r}: {err}") from None


def check_dataset(key: str, dataset: str | None, reader) -> None:
    """A local evaluation file is read now, as the callback will read it; built-in and hub names are checked
    by the callback."""
    if not isinstance(dataset, str) or dataset.startswith("builtin:") or not is_local(dataset):
        return
    try:
        reader(dataset)
    except ValueError as err:
        raise ValueError(f"{key}: {_with_file(err, dataset)}") from None


def check_data(data: Any) -> None:
    """Each local or built-in training source yields the examples the mixture draws from it."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from safeproj.data.datamodule import InstructionDataModule

    try:
        module = InstructionDataModule(**dict(data))
    except MisconfigurationException as err:
        raise ValueError(f"data.{err}") from None
    counts = module.mixture_counts().values()
    for index, (spec, count) in enumerate(zip(module.sources, counts)):
        if count == 0:
            continue
        if not (spec.path.startswith("builtin:") or is_local(spec.path)):
            _check_hub_dataset(f"data.sources[{index}]", spec.path)
            continue  # read when the run starts
        # Rows dropped on the way are reported by the real draw; here they explain a shortfall.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_pairs(spec, n=count)
            except ValueError as err:
                notes = "".join(f" ({_one_line(str(w.message))})" for w in caught)
                raise ValueError(f"data.sources[{index}]: {_with_file(err, spec.path)}{notes}") from None


def _check_hub_dataset(key: str, name: str) -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not _is_planning():
        check_hub_reachable(key, name)


def _with_file(err: BaseException, path: str) -> str:
    """The message of `err`, naming `path` if it does not already (a decode error names no file)."""
    if isinstance(err, UnicodeDecodeError):
        return f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8"
    message = _one_line(str(err))
    return message if path in message else f"{path}: {message}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def check_wandb_online(logger: Any) -> None:
    """With WANDB_MODE=online, a W&B key and a server that answers, found out within WANDB_PROBE_SECONDS
    (W&B itself would retry for minutes, then fail with a traceback)."""
    from safeproj.wandb import wandb_mode

    if wandb_mode() != "online" or "WandbLogger" not in str(getattr(logger, "class_path", "")) or _is_planning():
        return
    if (logger.get("init_args") or {}).get("offline"):
        return
    import wandb

    settings = wandb.Settings()
    settings.update_from_env_vars(dict(os.environ))
    url = settings.base_url
    parts = urlparse(url)
    if not (
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _netrc_has(parts.hostname)
    ):
        raise ValueError(
            "WANDB_MODE=online but no W&B API key is set: run `wandb login` or set WANDB_API_KEY, "
            "or set WANDB_MODE=offline and `wandb sync` the run later"
        )
    problem = _unreachable(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), WANDB_PROBE_SECONDS)
    if problem:
        raise ValueError(
            f"WANDB_MODE=online but the W&B server {url} cannot be reached ({problem}): "
            "set WANDB_MODE=offline and `wandb sync` the run later"
        )


def _netrc_has(host: str | None) -> bool:
    try:
        return host is not None and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _unreachable(host: str | None, port: int, seconds: float) -> str | None:
    """Why a TCP connection to host:port fails within `seconds` (name lookup included), or None if it opens."""
    outcome: dict[str, str] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            outcome["ok"] = ""
        except OSError as err:
            outcome["error"] = str(err) or type(err).__name__

    # A thread bounds the name lookup too, which has no timeout of its own.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(seconds)
    if "ok" in outcome:
        return None
    return outcome.get("error", f"no answer in {seconds:g} s")
