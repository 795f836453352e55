"""SafeprojLM: any Hugging Face causal LM as a LightningModule, full fine-tuning or LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

from safeproj.model.hf_checkpoint import is_sharded_model, save_gathered_checkpoint, save_hf_checkpoint
from safeproj.model.loading import load_model, resolve


@dataclass
class LoraSettings:
    """LoRA through peft; ΔW = (alpha / r)·B·A with B starting at zero."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (scaling = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def check_settings(lr: float, warmup_ratio: float) -> None:
    """ValueError naming the setting unless lr > 0 and warmup_ratio is in [0, 1) (the CLI checks before loading)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")


class SafeprojLM(L.LightningModule):
    """Fine-tunes a causal LM on batches of `input_ids`, `attention_mask`, `labels`.

    Args:
        model: a preset (`tiny`, `smollm2-135m`, `smollm2-135m-safety`), a local directory or a hub name.
        lora: LoRA settings; None trains every weight.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of optimizer steps with linear warmup before the cosine decay.
        betas: AdamW betas.
        seed: seed for models built in code (the `tiny` preset).
        checkpoint_dir: where the final Hugging Face checkpoint goes; default `<default_root_dir>/checkpoint`.
        trust_remote_code: passed to transformers; off unless you trust the model's code.
        gradient_checkpointing: trade compute for activation memory.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        lora: LoraSettings | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.02,
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int = 0,
        checkpoint_dir: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_settings(lr, warmup_ratio)
        # Explicit values: frame inspection would mix in the arguments of an enclosing SafeprojLM
        # (a preset safety-tuned on first use is built inside another module's __init__).
        self.save_hyperparameters(
            {
                "model": model,
                "lora": lora,
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_ratio": warmup_ratio,
                "betas": tuple(betas),
                "seed": seed,
                "checkpoint_dir": checkpoint_dir,
                "trust_remote_code": trust_remote_code,
                "gradient_checkpointing": gradient_checkpointing,
            }
        )
        self.model_name = model
        self.model, self.tokenizer = load_model(model, trust_remote_code=trust_remote_code, seed=seed)
        # Where the starting weights live on disk, so a run's update W_end − W_start can be read back.
        self.base_dir: str | None = _weights_dir(resolve(model, seed=seed))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(self.model, config)
        # from_pretrained returns eval mode, and Lightning keeps submodules' modes: dropout would stay off.
        self.model.train()
        self.checkpoint_path: str | None = None
        # The recipe's name for the run's safeproj.json; the command line sets it, plain Python leaves None.
        self.recipe: str | None = None

    @property
    def is_lora(self) -> bool:
        return self.hparams.lora is not None

    @override
    def configure_model(self) -> None:
        """Shards the model with FSDP2 under a device mesh (`ModelParallelStrategy`); otherwise does nothing.

        Each decoder block, then the root, becomes its own FSDP2 unit: parameters turn into DTensors
        sharded by rows over the data-parallel processes. Calling it again leaves sharded modules alone.
        """
        mesh = _data_parallel_mesh(self)
        if mesh is None:
            return
        if not isinstance(self.model, FSDPModule):
            shard_blocks_and_root(self.model, mesh)

    @override
    def forward(self, **batch):
        return self.model(**batch)

    @override
    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(self.hparams.warmup_ratio * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def setup(self, stage: str) -> None:
        # A resumed run (or a rerun in the same folder) finds its start where the first run wrote it, before
        # callbacks read it (OnlineProjection's W₀). Rank zero decides for all: every process takes one path.
        if stage == "fit" and self.base_dir is None:
            initial = self._initial_dir()
            written = (initial / "config.json").is_file() if self.trainer.is_global_zero else None
            if self.trainer.strategy.broadcast(written):
                self.base_dir = str(initial.resolve())

    @override
    def on_fit_start(self) -> None:
        if self.base_dir is None:
            # Built-in or hub weights without a plain local copy: keep the start for later diffs.
            target = self._initial_dir()
            if is_sharded_model(self.model):  # every process joins the gathers
                save_gathered_checkpoint(
                    self.model, self.tokenizer, target, self.trainer.is_global_zero, base_only=True
                )
            elif self.trainer.is_global_zero:
                save_hf_checkpoint(
                    _base_model(self.model), self.tokenizer, target, state_dict=_base_state_dict(self.model)
                )
            self.trainer.strategy.barrier("safeproj-initial")
            self.base_dir = str(target.resolve())

    def _initial_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "initial"

    @override
    def on_train_end(self) -> None:
        target = Path(self.hparams.checkpoint_dir or Path(self.trainer.default_root_dir) / "checkpoint")
        manifest = {
            "model": self.model_name,
            "base": self.base_dir,
            "lora": self.is_lora,
            "recipe": self.recipe,
            "global_step": int(self.trainer.global_step),
        }
        if is_sharded_model(self.model):  # gathered one tensor at a time by every process, written by rank zero
            save_gathered_checkpoint(self.model, self.tokenizer, target, self.trainer.is_global_zero, manifest)
        elif self.trainer.is_global_zero:
            save_hf_checkpoint(self.model, self.tokenizer, target, manifest=manifest)
        if self.trainer.is_global_zero:
            rank_zero_info(f"Saved checkpoint to {target}")
        self.checkpoint_path = str(target)
        _record_checkpoint(self.trainer, str(target))


def shard_blocks_and_root(model, mesh) -> None:
    """FSDP2 over `mesh`: each decoder block (the model's `_no_split_modules`) its own unit, then the root."""
    blocks = set(getattr(_base_model(model), "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks and not isinstance(module, FSDPModule):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _data_parallel_mesh(module: L.LightningModule):
    """The mesh FSDP2 shards over: the strategy's data-parallel dimension, or None without a device mesh."""
    mesh = getattr(module, "device_mesh", None)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "SafeprojLM shards with FSDP2 only: set ModelParallelStrategy(data_parallel_size=<processes>, "
            f"tensor_parallel_size=1), got tensor_parallel_size={mesh['tensor_parallel'].size()}"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def _weights_dir(path: str) -> str | None:
    p = Path(path)
    if p.is_dir() and (any(p.glob("*.safetensors")) or (p / "adapter_config.json").is_file()):
        return str(p.resolve())
    return None


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The plain Hugging Face state dict of a PEFT-wrapped model, adapters left out; None for a plain model."""
    if not hasattr(model, "get_base_model"):
        return None
    return {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.get_base_model().state_dict().items()
        if "lora_" not in name
    }


@rank_zero_only
def _record_checkpoint(trainer, path: str) -> None:
    """The checkpoint's absolute path in every logger; in W&B also a model artifact by reference with its hash."""
    from safeproj.runs import content_sha256
    from safeproj.wandb import log_reference, update_config, update_summary, wandb_loggers

    path = str(Path(path).resolve())
    wandb = wandb_loggers(trainer.loggers)
    if wandb:
        digest = content_sha256(path)
        update_config(wandb, {"checkpoint_dir": path})
        update_summary(wandb, {"checkpoint_dir": path, "checkpoint_sha256": digest})
        name = f"checkpoint-{wandb[0].experiment.id}"
        log_reference(wandb, name, "model", path, {"sha256": digest, "global_step": int(trainer.global_step)})
    for logger in trainer.loggers:
        if logger not in wandb:
            logger.log_hyperparams({"checkpoint_dir": path})
