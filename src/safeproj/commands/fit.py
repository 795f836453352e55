"""`safeproj fit` / `lightning fit`: LightningCLI over SafeprojLM and InstructionDataModule."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

from safeproj.commands import TRAINER_COMMANDS
from safeproj.commands.checks import check_fit_config
from safeproj.model.checkpoint_io import atomic_distributed_saves, with_atomic_checkpoints


def recipe_name(configs: list[str]) -> str | None:
    """The stem of the last `--config` that is not a preset (`configs/<kind>/<name>.yaml`), None without one."""
    recipes = [Path(c) for c in configs if Path(c).parent.parent.name != "configs"]
    return recipes[-1].stem if recipes else None


class LoggedSaveConfig(SaveConfigCallback):
    """Saves `config.yaml` as LightningCLI does, stores the resolved config in W&B and writes `run.json`.

    `run.json` (name, group, recipe, W&B id) lets a run resumed from a checkpoint under the run directory
    continue the same directory and the same W&B run.
    """

    run_info: dict | None = None

    @override
    def save_config(self, trainer, pl_module, stage) -> None:
        from safeproj.runs import write_run_info
        from safeproj.wandb import push_config

        push_config(trainer.loggers, self.config.as_dict())
        if self.run_info is not None:
            write_run_info(trainer.default_root_dir, self.run_info)


class SafeprojCLI(LightningCLI):
    """LightningCLI with the recipe name as W&B group and tag, and a CSV logger when W&B is disabled.

    Only `fit` and `validate` are offered (SafeprojLM has no test or predict step). A parse failure
    raises ArgumentError instead of printing usage, and the parsed config is checked (specs, files,
    arguments; `safeproj.commands.checks`) before any preset is made or model loaded.
    """

    def __init__(self, *args, **kwargs) -> None:
        from safeproj.data.datamodule import InstructionDataModule
        from safeproj.model.module import SafeprojLM

        kwargs.setdefault("save_config_callback", LoggedSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Errors raise, so the command line can say them in one line (jsonargparse would print usage).
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("exit_on_error", False)
        for name in TRAINER_COMMANDS:
            parser_kwargs[name] = {"exit_on_error": False, **parser_kwargs.get(name, {})}
        super().__init__(SafeprojLM, InstructionDataModule, *args, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINER_COMMANDS}

    @override
    def parse_arguments(self, parser, args) -> None:
        # As LightningCLI does, without its warning about `args` beside sys.argv: `safeproj` passes both.
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        self.check_config()

    def check_config(self) -> None:
        """Every spec, file and argument of the parsed config, before any preset is made or model loaded."""
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        parser = self._subcommand_parsers[subcommand] if subcommand else self.parser
        # Callbacks and data arguments are built here only for their own checks; the model is not.
        check_fit_config(cfg, parser.instantiate(cfg, instantiate_groups=False))

    @override
    def _instantiate_trainer(self, config: dict, callbacks: list):
        from safeproj.callbacks.progress import ProgressLog, step_progress_bar

        # Progress everywhere: a step-bounded bar on a terminal, a line every N steps in a log file.
        listed = config.get("callbacks") or []
        given = [*(listed if isinstance(listed, list) else [listed]), *callbacks]
        if not any(isinstance(cb, ProgressLog) for cb in given):
            callbacks = [*callbacks, ProgressLog()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(cb, ProgressBar) for cb in given):
            callbacks = [*callbacks, step_progress_bar()]
        config["plugins"] = with_atomic_checkpoints(config.get("plugins"))
        trainer = super()._instantiate_trainer(config, callbacks)
        atomic_distributed_saves(trainer.strategy)
        return trainer

    @override
    def before_instantiate_classes(self) -> None:
        """Name the run and give it its own directory, W&B name, group, job type, tags and id.

        Without `trainer.default_root_dir` a run goes to `runs/<recipe>/<run-name>/`; with it, that folder
        is the run directory. Either way the logger writes there too. A run resumed with `--ckpt_path`
        from under a run directory continues that directory and its W&B run.
        """
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        identity = _run_identity(cfg)
        cfg.trainer.default_root_dir = identity["dir"]
        logger = cfg.trainer.get("logger")
        if logger is not None and hasattr(logger, "init_args") and "WandbLogger" in str(logger.class_path):
            args = logger.init_args
            args.save_dir = identity["dir"]
            args.name = args.get("name") or identity["name"]
            args.group = args.get("group") or identity["group"]
            args.job_type = args.get("job_type") or "train"
            args.id = identity["wandb_id"]
            if identity["resumed"]:
                args.resume = "allow"
            args.tags = list(dict.fromkeys([*(args.get("tags") or []), *identity["tags"]]))
            identity.update(name=args.name, group=args.group, project=args.get("project"))
        self._identity = identity

    @override
    def instantiate_classes(self) -> None:
        from safeproj.commands.prereq import ensure_safety_models, safety_models_needed

        # Made before any class is built, so the module and callbacks find them in the cache.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        ensure_safety_models(safety_models_needed(cfg.as_dict()))
        super().instantiate_classes()
        if hasattr(self.model, "recipe"):
            self.model.recipe = recipe_name([str(c) for c in (cfg.get("config") or [])])

    @override
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from safeproj.wandb import csv_fallback, wandb_loggers, wandb_mode

        if wandb_mode() == "disabled" and wandb_loggers(trainer.loggers):
            trainer.loggers = [csv_fallback(trainer.default_root_dir)]
        if trainer.loggers and not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks):
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        identity = getattr(self, "_identity", None)
        if identity is not None:
            for cb in trainer.callbacks:
                if isinstance(cb, LoggedSaveConfig):
                    cb.run_info = {k: identity.get(k) for k in ("name", "group", "recipe", "project", "wandb_id")}
            # Here, after any prerequisite run made in this process, and before fit launches other ranks.
            os.environ[_RUN_ENV] = json.dumps({"pid": os.getpid(), "identity": identity})
        return trainer


# Set by the process that names a run, so the ranks a DDP launcher starts (its children) join that run.
_RUN_ENV = "SAFEPROJ_RUN"


def _run_identity(cfg) -> dict:
    """Name, directory, group, tags and W&B id of the run `cfg` describes (see `before_instantiate_classes`)."""
    from safeproj.runs import default_run_dir, find_run_info, run_name
    from safeproj.wandb import new_run_id, projection_settings

    plain = cfg.as_dict()
    recipe = recipe_name([str(c) for c in (plain.get("config") or [])]) or "fit"
    settings = projection_settings(plain)
    label = _projection_label(settings)
    model = (plain.get("model") or {}).get("model")
    seed = plain.get("seed_everything")
    inherited = os.environ.get(_RUN_ENV)
    # LOCAL_RANK > 0 only in the ranks a launcher started (not in a prerequisite run this process starts).
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0" and json.loads(inherited)["pid"] == os.getppid():
        return json.loads(inherited)["identity"]
    ckpt = plain.get("ckpt_path")
    found = find_run_info(Path(ckpt).parent) if ckpt and Path(str(ckpt)).exists() else None
    name = found[1]["name"] if found else run_name(recipe, f"{model}-{label}" if model else label, seed)
    explicit = plain["trainer"].get("default_root_dir")
    run_dir = explicit or (str(found[0]) if found else str(default_run_dir(recipe, name)))
    tags = [recipe, *(f"{k}={v}" for k, v in settings.items() if k != "subspace" and v is not None)]
    identity = {
        "name": name,
        "dir": str(Path(run_dir).resolve()),  # absolute, so the paths a run records stay true wherever it is read
        "recipe": recipe,
        "group": found[1].get("group") if found else "/".join(str(p) for p in (recipe, model, label) if p),
        "tags": tags or [recipe],
        "wandb_id": (found[1].get("wandb_id") if found else None) or new_run_id(),
        "resumed": found is not None,
    }
    return identity


def _projection_label(settings: dict) -> str:
    """`orthogonal-top-frac0.25` (keep, selection, frac or eta; `posthoc-` first for post hoc), `unprojected`."""
    if not settings:
        return "unprojected"
    amount = f"frac{settings['frac']}" if settings.get("frac") is not None else f"eta{settings.get('eta')}"
    parts = ["posthoc"] if settings.get("on") == "posthoc" else []
    if settings.get("keep"):
        parts.append(settings["keep"])
    parts += [settings.get("selection") or "top", amount]
    return "-".join(str(p) for p in parts)
