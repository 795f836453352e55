"""OnlineProjection: keep a run's update inside range(P_k) or its orthogonal complement, every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from safeproj.callbacks._options import basis_options, check_option, misconfigured
from safeproj.core.basis import Basis
from safeproj.core.names import parse_name
from safeproj.core.online import StepProjector
from safeproj.core.options import KEEPS, BasisSide, Keep, Selection
from safeproj.core.targets import Target, find_targets
from safeproj.model.subspaces import basis_file, expand_spec, resolve_basis
from safeproj.runs import content_sha256
from safeproj.wandb import log_table, update_config

Mode = Literal["update", "grad"]
MODES: tuple[str, ...] = get_args(Mode)


class OnlineProjection(Callback):
    """Projects every optimizer step onto P_k (keep="parallel") or P_k⊥ (keep="orthogonal").

    `on="update"` restores W ← W₀ + P(W − W₀) right after each optimizer step: exact for any optimizer,
    AdamW included (its element-wise scaling moves projected gradients out of the subspace). It keeps
    one copy of the projected weights (W₀, in the parameter's dtype and device). A resumed run takes
    its W₀ from the restored weights: they lie in W₀ + range(P), and any point of that affine subspace
    defines the same projection, so checkpoints need no copy of W₀. `on="grad"` projects gradients in
    `on_before_optimizer_step` (once per optimizer step, after accumulation and AMP unscaling, before
    clipping): exact for plain SGD, and needs no copy.

    LoRA: ΔW = s·B·A stays in range(P) when the left side projects B (P·B) and the right side projects
    A (A·Q); in update mode this needs no W₀ because B starts at zero. Both modes project the factors
    once at fit start (A starts random, and projected gradients alone would leave it so). P_k⊥ on both
    sides at once is not expressible on the factors and is refused.

    FSDP2 (weights as DTensors sharded by rows, see `SafeprojLM.configure_model`): each process keeps W₀
    for its own rows and projects its rows alone; the left side adds one all-reduce of the k×n product
    QᵀΔ per tensor and step, the right side none. No weight is gathered.

    Args:
        subspace: basis artifact, `safety:<preset>`, or a delta spec (see `safeproj.model.subspaces`).
        keep: "parallel" (P_k) or "orthogonal" (P_k⊥).
        on: "update" or "grad".
        frac, eta, selection, side, seed, include, exclude: how to build the basis from a delta
            (ignored when `subspace` is an artifact).
        log_every_n_steps: every this many optimizer steps, log `projection/removed_share` (the share of
            the step's update energy, ‖u − P·u‖²/‖u‖², that projection removed; of the gradient in grad
            mode) overall and per module type (`projection/removed_share/<type>`), and in update mode
            `projection/cumulative_share` (the run's whole update inside range(P): 1 for parallel, 0 for
            orthogonal); 0 turns it off. Each measured step holds one extra copy of the projected weights
            (update mode) while it runs.

    Logs once at fit start the table `projection/basis` (k and kept energy per tensor) and, in the W&B
    config, the basis file and its SHA-256 when `subspace` is a basis file.

    Raises:
        MisconfigurationException: on an unknown keep/on, or a basis that does not fit the model.
    """

    def __init__(
        self,
        subspace: str,
        keep: Keep = "orthogonal",
        on: Mode = "update",
        frac: float | None = None,
        eta: float | None = None,
        selection: Selection = "top",
        side: BasisSide = "left",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        log_every_n_steps: int = 10,
    ) -> None:
        check_option("OnlineProjection", "keep", keep, KEEPS)
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise MisconfigurationException(
                f"OnlineProjection log_every_n_steps={log_every_n_steps!r}: expected an integer >= 0"
            )
        self.log_every_n_steps = log_every_n_steps
        check_option("OnlineProjection", "on", on, MODES)
        self.subspace = subspace
        self.keep = keep
        self.on = on
        self.options = basis_options(
            "OnlineProjection",
            frac=frac,
            eta=eta,
            selection=selection,
            side=side,
            seed=seed,
            include=include,
            exclude=exclude,
        )
        self.basis: Basis | None = None
        self.targets: list[Target] = []
        # The per-tensor work (W₀, projections, energies of measured steps), made at fit start.
        self.projector: StepProjector | None = None
        self._hook = None
        self.projected_steps = 0
        self._resumed = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(subspace=self.subspace, keep=self.keep, on=self.on)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.basis is not None:
            return
        with misconfigured("OnlineProjection"):
            spec = expand_spec(self.subspace, getattr(pl_module, "model_name", None))
            self.basis = resolve_basis(spec, self.options, progress=trainer.is_global_zero)
            self.targets = find_targets(pl_module.model, self.basis)
        if self.options.side == "both" and self.keep == "orthogonal" and any(t.is_lora for t in self.targets):
            raise MisconfigurationException(
                "OnlineProjection: keep='orthogonal' with side='both' cannot be applied to LoRA factors; "
                "use side='left' or 'right'"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # configure_model (FSDP2) runs after setup and replaces the parameters: find them again.
        with misconfigured("OnlineProjection"):
            self.targets = find_targets(pl_module.model, self.basis)
        if self.on == "update" and len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"OnlineProjection needs exactly one optimizer, found {len(trainer.optimizers)}"
            )
        self.projector = StepProjector(self.basis, self.keep, self.targets)
        self.projector.move_factors_to_targets()
        n = sum((t.weight.numel() if not t.is_lora else t.lora_b.numel()) for t in self.targets)
        self._log_provenance(trainer)
        rank_zero_info(
            f"OnlineProjection: keep={self.keep} on={self.on} over {len(self.targets)} tensors "
            f"({n / 1e6:.1f}M values), basis {self.basis.nbytes() / 2**20:.1f} MiB"
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: under ModelParallelStrategy (FSDP2) Lightning restores a checkpoint after it.
        if self.on == "grad":
            # Projected gradients keep each factor's change in range, not its random start (LoRA's A):
            # project the factors once, so s·B·A starts, and stays, in the subspace.
            self.projector.project_lora_factors()
            return
        self.projector.keep_start(self._resumed, getattr(pl_module, "base_dir", None))
        self._hook = trainer.optimizers[0].register_step_post_hook(lambda *_: self._after_step())
        if not self._resumed:  # restored weights were projected when saved; again would round them anew
            # Start inside the subspace too (a LoRA B that is not zero).
            self.projector.project_weights()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        n = self.log_every_n_steps
        # Sharded energies are sums over every process's rows, so every process measures.
        measure = n > 0 and trainer.global_step % n == 0 and (trainer.is_global_zero or self.projector.sharded)
        if self.on == "grad":
            self.projector.project_grads(measure)
            self.projected_steps += 1
        elif measure:
            self.projector.snapshot()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self.projector.drop_snapshot()
        shares = self.projector.take_removed_shares()
        if shares is None:
            return
        overall, per_module = shares
        metrics = {"projection/removed_share": overall}
        metrics.update({f"projection/removed_share/{module}": share for module, share in per_module.items()})
        if self.on == "update":  # grad mode keeps no W₀, so its cumulative update is not at hand
            metrics["projection/cumulative_share"] = self.projector.cumulative_share()
        if not trainer.is_global_zero:
            return
        # Straight to the loggers: `pl_module.log` would drop values on steps Lightning does not log.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _after_step(self) -> None:
        self.projector.project_weights()
        self.projected_steps += 1

    def _log_provenance(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        rows = [
            {
                "tensor": name,
                "module": parse_name(name)[1],
                "shape": "x".join(map(str, e.shape)),
                "k_left": e.left.k if e.left is not None else None,
                "k_right": e.right.k if e.right is not None else None,
                "energy_kept": float(e.energy_kept),
            }
            for name, e in sorted(self.basis.entries.items())
        ]
        log_table(trainer.loggers, "projection/basis", rows)
        path = basis_file(self.basis)  # the artifact named, or the cache entry built from a delta spec
        if path is not None and Path(path).is_file():
            update_config(
                trainer.loggers, {"projection.basis_file": path, "projection.basis_sha256": content_sha256(path)}
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"projected_steps": self.projected_steps, "keep": self.keep, "on": self.on}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_train_start: this run continues a checkpoint.
        self.projected_steps = int(state_dict.get("projected_steps", 0))
        self._resumed = True
