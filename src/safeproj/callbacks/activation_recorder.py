"""ActivationRecorder: residual-stream activations of fixed prompt sets, recorded during training.

At train start, every `every_n_steps` optimizer steps and at train end, the prompt sets go through
the model with forward hooks on chosen decoder layers (`safeproj.model.activations`) and are
streamed to `out_dir/step_{step}/` (`safeproj.model.recordings`). At train end the recordings are
analysed (`safeproj.core.activations`) and the tables and figures logged.

Rank zero records and writes. Under FSDP2 a forward is a collective, so the other ranks run the same
forwards on the same prompts in the same batches, and discard what they capture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from safeproj.callbacks._sharding import shards_weights
from safeproj.core.activations import check_probe_sizes, check_test_size
from safeproj.core.sharded import forward_needs_every_process
from safeproj.model.activations import (
    EncodedPrompt,
    context_length,
    decoder_layers,
    pad_token_id,
    prepare_prompt_sets,
    resolve_layers,
)
from safeproj.model.recordings import RecordingOptions, StepRecord, record_step, run_recording_forwards


class ActivationRecorder(Callback):
    """Records residual-stream activations of fixed prompt sets before, during and after training.

    Args:
        out_dir: where `step_{step}/` folders, plots and `analysis.json` go; default
            `<trainer.default_root_dir>/activations`.
        layers: decoder layer indices (int) or shares of depth (float in [0, 1]); default the
            65–90 % band of depth.
        prompt_sets: name → prompt-set spec (see `safeproj.data.prompts`); default harmful and benign
            requests of the same form, from acts no built-in training set uses.
        num_prompts: prompts taken from each set.
        position: "last" prompt token, "mean" over the prompt's tokens, or "assistant" (mean over
            the tokens of the chat template's generation prompt).
        every_n_steps: also record every N optimizer steps; 0 records only at train start and end.
        batch_size: prompts per forward pass.
        shard_size: rows per shard file; at most this many rows are held in memory per layer.
        dtype: storage dtype, "float32" or "bfloat16".
        analyse: analyse the recordings at train end (tables, plots, W&B).
        etas: energy shares for the activation MSO.
        basis: a basis artifact or delta spec (see `safeproj.model.subspaces.resolve_basis`;
            a delta spec is built with its default options, top half of the spectrum, left side)
            to compare the difference-of-means direction with the o_proj / down_proj subspace.
        harmful_set / benign_set: the two prompt sets the analysis contrasts.
        probe_test_size: share of each set held out to score the linear probe (its n is logged); whole acts
            are held out where the prompt set names them (the built-in requests do).
        seed: for the built-in prompt sets and the probe split.

    Raises:
        MisconfigurationException: on a bad argument, a layer index outside the model, an empty
            prompt set, or a prompt longer than the model's context.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        layers: list[int | float] | None = None,
        prompt_sets: dict[str, str] | None = None,
        num_prompts: int = 128,
        position: str = "last",
        every_n_steps: int = 0,
        batch_size: int = 8,
        shard_size: int = 1024,
        dtype: str = "float32",
        analyse: bool = True,
        etas: list[float] | None = None,
        basis: str | None = None,
        harmful_set: str = "harmful",
        benign_set: str = "benign",
        probe_test_size: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        try:
            self.options = RecordingOptions(
                prompt_sets=prompt_sets,
                layers=layers,
                num_prompts=num_prompts,
                position=position,
                batch_size=batch_size,
                shard_size=shard_size,
                dtype=dtype,
            )
            check_test_size(probe_test_size)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise MisconfigurationException(f"every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        if etas is not None and (not etas or any(not 0.0 < float(e) <= 1.0 for e in etas)):
            raise MisconfigurationException(f"etas must be a non-empty list of values in (0, 1], got {etas!r}")
        self.prompt_sets = self.options.prompt_sets
        if analyse and (harmful_set not in self.prompt_sets or benign_set not in self.prompt_sets):
            raise MisconfigurationException(
                f"analyse=True contrasts harmful_set={harmful_set!r} with benign_set={benign_set!r}, "
                f"but prompt_sets has {sorted(self.prompt_sets)}"
            )
        self.out_dir = out_dir
        self.every_n_steps = every_n_steps
        self.analyse = analyse
        self.etas = [float(e) for e in etas] if etas is not None else None
        self.basis = basis
        self.harmful_set = harmful_set
        self.benign_set = benign_set
        self.probe_test_size = float(probe_test_size)
        self.seed = seed
        self.recorded_steps: list[int] = []
        self.last_record: StepRecord | None = None
        self._layer_indices: list[int] = []
        self._encoded: dict[str, list[EncodedPrompt]] = {}
        self._dir: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(out_dir=self.out_dir, prompt_sets=sorted(self.prompt_sets.items()))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model, tokenizer = _model_and_tokenizer(pl_module)
        options = self.options
        try:
            self._layer_indices = resolve_layers(options.layers, len(decoder_layers(model)))
            self._encoded = prepare_prompt_sets(
                tokenizer, self.prompt_sets, options.num_prompts, options.position, context_length(model), self.seed
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if shards_weights(trainer):
            _check_same_on_every_rank(self._encoded, self._layer_indices)
        if self.analyse:
            sizes = (len(self._encoded[self.harmful_set]), len(self._encoded[self.benign_set]))
            try:
                check_probe_sizes(*sizes, self.probe_test_size)
            except ValueError as err:
                raise MisconfigurationException(f"analyse=True: {err}") from None
        if self.basis is not None and self.basis.endswith(".safetensors") and not Path(self.basis).is_file():
            raise MisconfigurationException(f"basis file {self.basis} does not exist")
        self._pad_id = pad_token_id(tokenizer)
        self._dir = Path(self.out_dir) if self.out_dir is not None else Path(trainer.default_root_dir) / "activations"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Micro-batches of one accumulation window share a global_step; record each step once.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)
        if self.analyse and trainer.is_global_zero:
            self._analyse(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recorded_steps": list(self.recorded_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recorded_steps = [int(s) for s in state_dict.get("recorded_steps", [])]

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step in self.recorded_steps or self._dir is None:
            return
        self.recorded_steps.append(step)
        model, _ = _model_and_tokenizer(pl_module)
        options = self.options
        if trainer.is_global_zero:  # one process writes the recording
            self.last_record = record_step(
                model, self._encoded, self._layer_indices, self._dir, step, position=options.position,
                pad_id=self._pad_id, batch_size=options.batch_size, shard_size=options.shard_size,
                dtype=options.dtype, progress=trainer.progress_bar_callback is not None,
            )  # fmt: skip
        elif forward_needs_every_process(model):  # rank zero's forwards need every process; nothing is kept
            run_recording_forwards(
                model, self._encoded, self._layer_indices, pad_id=self._pad_id, batch_size=options.batch_size,
                dtype=options.dtype,
            )  # fmt: skip

    def _analyse(self, trainer: Trainer) -> None:
        from safeproj import wandb as sp_wandb
        from safeproj.core.activations import DEFAULT_ETAS
        from safeproj.core.options import BasisOptions
        from safeproj.model.recordings import analyse_recordings, write_report
        from safeproj.model.subspaces import resolve_basis

        try:
            basis = resolve_basis(self.basis, BasisOptions()) if self.basis is not None else None
            report = analyse_recordings(
                self._dir, steps=sorted(self.recorded_steps), etas=self.etas or DEFAULT_ETAS, basis=basis,
                harmful_set=self.harmful_set, benign_set=self.benign_set, seed=self.seed,
                probe_test_size=self.probe_test_size,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as err:
            # The recordings are on disk; a failed analysis should not fail a finished training run.
            rank_zero_warn(
                f"activation analysis skipped ({err}); "
                f"rerun with `safeproj activations --record false --out_dir {self._dir}`"
            )
            return
        files = write_report(report, self._dir)
        rank_zero_info(f"Activation analysis written to {self._dir}")
        for key in ("mso", "layers", "changes"):
            sp_wandb.log_table(trainer.loggers, f"activations/{key}", report[key])
        for name, path in files.items():
            if path.suffix == ".png":
                sp_wandb.log_images(trainer.loggers, f"activations/{name}", [str(path)])


def _model_and_tokenizer(pl_module: LightningModule):
    model = getattr(pl_module, "model", None)
    tokenizer = getattr(pl_module, "tokenizer", None)
    if not isinstance(model, nn.Module) or tokenizer is None:
        raise MisconfigurationException(
            "ActivationRecorder needs a LightningModule with .model and .tokenizer; "
            f"{type(pl_module).__name__} lacks them"
        )
    return model, tokenizer


def _check_same_on_every_rank(encoded: dict[str, list[EncodedPrompt]], layers: list[int]) -> None:
    """ValueError on every rank unless all ranks encoded the same prompts and picked the same layers: under
    FSDP2 they run the same forward calls in step, and a difference would leave some waiting for ever."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    plan = {"layers": layers, "sets": {name: [[e.ids, e.positions] for e in rows] for name, rows in encoded.items()}}
    digest = hashlib.sha256(json.dumps(plan).encode()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise ValueError(
            f"ActivationRecorder: ranks {differ} encoded other prompts or layers than rank 0; under FSDP2 every "
            "rank runs the same recording forwards, so the prompt sets must be the same files on every rank"
        )
