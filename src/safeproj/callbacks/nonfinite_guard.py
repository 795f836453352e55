"""NonFiniteGuard: a NaN or an infinity in the loss, the gradients or the weights ends the run as failed."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from safeproj.core.finite import NonFiniteError, first_nonfinite


class NonFiniteGuard(Callback):
    """Stops training at the first non-finite loss, gradient or weight, naming the step and the tensor.

    Start weights (fresh or restored from a checkpoint) are checked in `on_train_start`. The loss of each
    micro-batch and the gradients are checked before the optimizer step, so the weights stay finite; the
    trainable weights are checked after it. The guard raises `NonFiniteError`: the module's `on_train_end`
    never runs, so no final checkpoint is written, and the guard runs before every `ModelCheckpoint`
    (Lightning orders those last), so no checkpoint of the failed step replaces the last finite one.
    `RunSummary` records the run as `"failed"` with the reason. Under fp16 with a GradScaler a non-finite
    loss or gradient is the scaler's business (it skips the step), so only the weights are checked.
    Across processes (DDP, FSDP2, where each process checks only its rows) every check is one decision:
    all processes raise together, with the same message, so none is left waiting in a collective.
    """

    def __init__(self) -> None:
        self._bad_loss: bool = False
        self._checked_step: int = -1
        self._weights_bad: bool = False

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: under ModelParallelStrategy (FSDP2) Lightning restores a checkpoint after it.
        name = first_nonfinite(pl_module.named_parameters())
        reason = None if name is None else f"non-finite start weight {name} at step {trainer.global_step}"
        reason = _agreed(trainer, reason)
        if reason is not None:
            self._weights_bad = True
            raise NonFiniteError(reason + ": refusing to train from it")
        self._checked_step = trainer.global_step
        self._bad_loss = False

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not _scaled(trainer) and not self._bad_loss:
            self._bad_loss = not bool(torch.isfinite(loss.detach()).all())

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        step = trainer.global_step + 1
        if _scaled(trainer):
            return
        grad = first_nonfinite((n, p.grad) for n, p in pl_module.named_parameters() if p.requires_grad)
        reason = None
        if self._bad_loss:
            reason = f"non-finite loss at step {step}"
        elif grad is not None:
            reason = f"non-finite gradient of {grad} at step {step}"
        self._bad_loss = False
        reason = _agreed(trainer, reason)
        if reason is not None:
            raise NonFiniteError(reason + _HINT)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:  # accumulating, or the step was skipped
            return
        self._checked_step = trainer.global_step
        name = first_nonfinite((n, p) for n, p in pl_module.named_parameters() if p.requires_grad)
        reason = _agreed(
            trainer, None if name is None else f"non-finite weight {name} after step {trainer.global_step}"
        )
        if reason is not None:
            self._weights_bad = True
            raise NonFiniteError(reason + _HINT)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not (isinstance(exception, NonFiniteError) and self._weights_bad):
            return
        # A ModelCheckpoint(save_on_exception=True) would now save the non-finite weights over a finite checkpoint.
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "save_on_exception", False):
                callback.save_on_exception = False
                rank_zero_info("NonFiniteGuard: no checkpoint on exception, the weights are not finite")


_HINT = " (training diverged: lower the learning rate or check the data; the last finite checkpoint is kept)"


def _agreed(trainer: Trainer, reason: str | None) -> str | None:
    """One decision for all processes: the first process's reason (by rank) when any has one, else None.

    A rank raising alone would leave the others waiting in their next collective. The common case costs
    one small all-reduce; the reasons themselves are gathered only when something is wrong.
    """
    if not trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
        return None
    if trainer.world_size == 1:
        return reason
    reasons: list[str | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(reasons, reason)
    return next(r for r in reasons if r is not None)


def _scaled(trainer: Trainer) -> bool:
    """Whether an fp16 GradScaler skips non-finite steps itself."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None
