"""The one place that knows W&B: an offline-by-default logger and config/table/image helpers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only


def wandb_mode() -> str:
    """`WANDB_MODE` as the user set it; offline when unset (there may be no server to reach)."""
    return os.environ.get("WANDB_MODE", "offline").strip().lower() or "offline"


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline unless `WANDB_MODE=online` (or `offline=False`) says otherwise.

    Args:
        project: W&B project.
        save_dir: where run folders go (`<save_dir>/wandb/offline-run-*`).
        offline: None follows `WANDB_MODE`.
        group: runs of one recipe share a group (the CLI fills it from the recipe name).
        tags: extra tags; the CLI adds the recipe name.
    """

    def __init__(
        self,
        project: str = "safeproj",
        save_dir: str = "runs",
        offline: bool | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = wandb_mode() != "online"
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            project=project, save_dir=save_dir, offline=offline, group=group, tags=tags, name=name, **kwargs
        )


def wandb_loggers(loggers: Sequence[Logger]) -> list[_LightningWandbLogger]:
    return [lg for lg in loggers if isinstance(lg, _LightningWandbLogger)]


def csv_fallback(save_dir: str) -> CSVLogger:
    """Used instead of W&B when `WANDB_MODE=disabled`."""
    return CSVLogger(save_dir=save_dir, name="csv")


@rank_zero_only
def push_config(loggers: Sequence[Logger], config: Mapping[str, Any]) -> None:
    """Store the full resolved config in each W&B run (LightningCLI only saves a YAML file)."""
    for logger in wandb_loggers(loggers):
        logger.experiment.config.update(dict(config), allow_val_change=True)


@rank_zero_only
def log_table(loggers: Sequence[Logger], key: str, rows: Sequence[Mapping[str, Any]], step: int | None = None) -> None:
    """Rows of dicts as a W&B table (columns from the first row)."""
    if not rows:
        return
    columns = list(rows[0].keys())
    data = [[_plain(row.get(c)) for c in columns] for row in rows]
    for logger in wandb_loggers(loggers):
        logger.log_table(key=key, columns=columns, data=data, step=step)


@rank_zero_only
def log_images(loggers: Sequence[Logger], key: str, paths: Sequence[str], step: int | None = None) -> None:
    """PNG files as W&B images."""
    if not paths:
        return
    for logger in wandb_loggers(loggers):
        logger.log_image(key=key, images=[str(p) for p in paths], step=step)


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
