"""The one place that knows W&B: an offline-by-default logger and config/table/image/artifact helpers."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

# Seconds between writes of an offline run's records to its `.wandb` file: a killed run loses at most this much
# history (W&B's default is 15 s).
FLUSH_SECONDS = 2.0
# Callbacks whose init args are the run's projection settings, first match wins.
PROJECTION_CALLBACKS = ("OnlineProjection", "PosthocProjection")
PROJECTION_KEYS = ("subspace", "keep", "on", "frac", "eta", "selection", "side")


def wandb_mode() -> str:
    """`WANDB_MODE` as the user set it; offline when unset (there may be no server to reach)."""
    return os.environ.get("WANDB_MODE", "offline").strip().lower() or "offline"


def new_run_id() -> str:
    """A fresh W&B run id (stored in the run directory, so a resumed run continues the same W&B run).

    It starts with a letter: an all-hex id such as `92e40428` reads back from YAML as a number.
    """
    return "r" + secrets.token_hex(4)


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline unless `WANDB_MODE=online` (or `offline=False`) says otherwise.

    The CLI fills `name`, `group`, `job_type`, `tags` and `id` from the run (see `safeproj.commands.fit`).
    Lightning's hyperparameter autolog is ignored: `LoggedSaveConfig` stores the resolved config once.

    Args:
        project: W&B project.
        save_dir: where run folders go (`<save_dir>/wandb/offline-run-*`); the CLI sets the run directory.
        offline: None follows `WANDB_MODE`.
        group: the experiment cell; all seeds of a cell share it.
        tags: extra tags; the CLI adds the recipe and projection settings.
        name: the run name.
        id: the W&B run id; a resumed run passes the id of the run it continues.
        job_type: train, eval, overlap, project, activations or report.
        resume: W&B resume mode ("allow", "must"); set when a run continues from a checkpoint.
    """

    def __init__(
        self,
        project: str = "safeproj",
        save_dir: str = "runs",
        offline: bool | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        id: str | None = None,
        job_type: str | None = None,
        resume: str | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = wandb_mode() != "online"
        if job_type is not None:
            kwargs["job_type"] = job_type
        if resume is not None:
            kwargs["resume"] = resume
        if kwargs.get("settings") is None:  # LightningCLI passes an explicit None
            kwargs["settings"] = _settings()
        super().__init__(
            project=project, save_dir=save_dir, offline=offline, group=group, tags=tags, name=name, id=id, **kwargs
        )
        # Lightning always passes `anonymous`, which current wandb only answers with a deprecation warning.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        # The folder is made when the run starts, not when the logger is built (a parse check builds one).
        if self._experiment is None:
            os.makedirs(self.save_dir, exist_ok=True)
        return _LightningWandbLogger.experiment.fget(self)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        # Lightning sends the module's flat hparams here at fit start; they would overwrite the nested
        # `model` section of the resolved config with the model's name and add flat duplicates.
        return None


def _settings():
    import wandb

    return wandb.Settings(x_transaction_log_flush_interval=FLUSH_SECONDS)


def wandb_loggers(loggers: Sequence[Logger]) -> list[_LightningWandbLogger]:
    return [lg for lg in loggers if isinstance(lg, _LightningWandbLogger)]


def csv_fallback(save_dir: str) -> CSVLogger:
    """Used instead of W&B when `WANDB_MODE=disabled`."""
    return CSVLogger(save_dir=save_dir, name="csv")


def projection_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The init args of the run's projection callback (`on` is "posthoc" for PosthocProjection), {} without one."""
    callbacks = ((config.get("trainer") or {}).get("callbacks")) or []
    for wanted in PROJECTION_CALLBACKS:
        for entry in callbacks:
            if isinstance(entry, Mapping) and str(entry.get("class_path", "")).rsplit(".", 1)[-1] == wanted:
                args = dict(entry.get("init_args") or {})
                if wanted == "PosthocProjection":
                    args["on"] = "posthoc"
                return {k: args.get(k) for k in PROJECTION_KEYS}
    return {}


def flat_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The documented flat config keys people filter and group on (README, "Comparing runs in W&B").

    `projection.{subspace,keep,on,frac,eta,selection,side}` ("none" for `on` in an unprojected run),
    `data.mixture` (`path=weight` joined by `+`), `model.name` and `seed`.
    """
    flat: dict[str, Any] = {f"projection.{k}": v for k, v in projection_settings(config).items()}
    flat.setdefault("projection.on", "none")
    sources = (config.get("data") or {}).get("sources") or []
    flat["data.mixture"] = (
        "+".join(f"{s.get('path')}={s.get('weight', 1.0)}" for s in sources if isinstance(s, Mapping)) or None
    )
    model = config.get("model") or {}
    flat["model.name"] = model.get("model") if isinstance(model, Mapping) else model
    flat["seed"] = config.get("seed_everything")
    return flat


@rank_zero_only
def push_config(loggers: Sequence[Logger], config: Mapping[str, Any]) -> None:
    """Store the full resolved config (nested) and its flat documented keys in each W&B run."""
    update_config(loggers, {**dict(config), **flat_keys(config)})


@rank_zero_only
def update_config(loggers: Sequence[Logger], values: Mapping[str, Any]) -> None:
    """Set W&B config keys (allowed to change: a resumed run stores them again)."""
    for logger in wandb_loggers(loggers):
        logger.experiment.config.update(dict(values), allow_val_change=True)


@rank_zero_only
def update_summary(loggers: Sequence[Logger], values: Mapping[str, Any]) -> None:
    """Set W&B summary keys (values shown once per run, not as series)."""
    for logger in wandb_loggers(loggers):
        for key, value in values.items():
            logger.experiment.summary[key] = value


@rank_zero_only
def log_reference(
    loggers: Sequence[Logger], name: str, kind: str, path: str | os.PathLike, metadata: Mapping[str, Any]
) -> None:
    """A file or directory as a W&B artifact by reference (nothing uploaded; works offline)."""
    import wandb

    target = Path(path).resolve()
    for logger in wandb_loggers(loggers):
        artifact = wandb.Artifact(name=_artifact_name(name), type=kind, metadata=dict(metadata))
        artifact.add_reference(target.as_uri(), name=target.name if target.is_file() else None)
        logger.experiment.log_artifact(artifact)


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, `-`, `_` and `.` only."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


@rank_zero_only
def log_table(loggers: Sequence[Logger], key: str, rows: Sequence[Mapping[str, Any]], step: int | None = None) -> None:
    """Rows of dicts as a W&B table (columns from the first row)."""
    if not rows:
        return
    columns = list(rows[0].keys())
    data = [[_cell_value(row.get(c)) for c in columns] for row in rows]
    for logger in wandb_loggers(loggers):
        logger.log_table(key=key, columns=columns, data=data, step=step)


@contextmanager
def command_run(
    job_type: str,
    save_dir: str | os.PathLike,
    reads: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Iterator[list[Logger]]:
    """A W&B run of its own for a standalone command (`job_type` eval, overlap, project, activations, report).

    `reads` is the `run.json` of a run the command reads (`safeproj.runs.find_run_info`): the command's run
    joins its project and group, so its tables sit beside the runs they describe. Yields the loggers to pass
    to `log_table` and friends: none when `WANDB_MODE=disabled`.
    """
    if wandb_mode() == "disabled":
        yield []
        return
    import wandb

    reads = dict(reads or {})
    group = reads.get("group")
    os.makedirs(save_dir, exist_ok=True)
    # A run of its own even if another W&B run is active in this process (Lightning's logger would reuse it).
    run = wandb.init(
        project=reads.get("project") or "safeproj",
        dir=str(save_dir),
        group=group,
        name="-".join(p for p in (job_type, (group or "").replace("/", "-"), new_run_id()) if p),
        job_type=job_type,
        tags=[job_type],
        id=new_run_id(),
        mode="online" if wandb_mode() == "online" else "offline",
        config={**dict(config or {}), "reads": reads.get("name")},
        settings=_settings(),
        reinit="create_new",
    )
    logger = WandbLogger(save_dir=str(save_dir), experiment=run)
    try:
        yield [logger]
    finally:
        logger.experiment.finish()


def split_intervals(metrics: Mapping[str, float]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scalars without their `*_ci_low`/`*_ci_high` bounds, and one table row per metric that has them.

    Bounds go into a table (`metric`, `value`, `ci_low`, `ci_high`) instead of two extra series per metric.
    """
    bounds = ("_ci_low", "_ci_high")
    scalars = {k: v for k, v in metrics.items() if not k.endswith(bounds)}
    rows = [
        {"metric": k, "value": v, "ci_low": metrics[f"{k}_ci_low"], "ci_high": metrics.get(f"{k}_ci_high")}
        for k, v in scalars.items()
        if f"{k}_ci_low" in metrics
    ]
    return scalars, rows


@rank_zero_only
def log_images(loggers: Sequence[Logger], key: str, paths: Sequence[str], step: int | None = None) -> None:
    """PNG files as W&B images."""
    if not paths:
        return
    for logger in wandb_loggers(loggers):
        logger.log_image(key=key, images=[str(p) for p in paths], step=step)


def _cell_value(value: Any) -> Any:
    """A tensor or numpy scalar as its Python value; the rest as is.

    Not `safeproj.io.plain_float`: a W&B cell keeps ints, bools, strings and NaN as they are.
    """
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
