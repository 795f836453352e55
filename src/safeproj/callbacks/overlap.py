"""OverlapCallback: at train end, the Mode Subspace Overlap of the run's own update with reference subspaces."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from typing_extensions import override

from safeproj.commands.overlap import (
    ETAS,
    SIDES,
    Subspaces,
    SpectrumCache,
    aggregate,
    check_etas,
    load_subspaces,
    mso_tables,
    plot_mso_vs_eta,
    plot_ratio_heatmap,
    write_rows,
)
from safeproj.core.targets import Target, model_weights
from safeproj.core.deltas import DeltaSource, select_names

_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


class RunDelta(DeltaSource):
    """The update of a training run, W_now − W_start, one tensor at a time (fp32, CPU).

    Plain weights are diffed against a start copy (in memory or read from a safetensors directory);
    LoRA pairs give scale·B·A − scale·B₀·A₀ (B₀ = 0 for a fresh adapter), the merged ΔW.
    """

    kind = "run"

    def __init__(
        self,
        targets: dict[str, Target],
        start: dict[str, torch.Tensor],
        start_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.targets, self.start, self.start_dir = targets, start, start_dir
        self._files = _safetensors_index(start_dir) if start_dir else {}
        self._names = list(targets)
        for name, t in targets.items():
            self._shapes[name] = tuple(t.lora_b.shape[:1] + t.lora_a.shape[1:]) if t.is_lora else tuple(t.weight.shape)

    def _start(self, name: str) -> torch.Tensor:
        if name in self.start:
            return self.start[name]
        with safe_open(str(self._files[name]), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    @torch.no_grad()
    def _compute(self, name: str) -> torch.Tensor:
        t = self.targets[name]
        if t.is_lora:
            b0, a0 = self.start[name + "::B"], self.start[name + "::A"]
            now = t.delta_weight().cpu()
            return now - t.scaling * (b0.float() @ a0.float())
        return t.weight.detach().float().cpu() - self._start(name).float()

    def _describe(self) -> dict:
        return {"kind": self.kind, "start_dir": self.start_dir, "tensors": len(self._names)}


def _safetensors_index(directory: str) -> dict[str, Path]:
    """Tensor name -> file, over the safetensors files of a Hugging Face directory."""
    index = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                index[key] = file
    return index


def _start_dir_covers(directory: str, targets: dict[str, Target]) -> bool:
    """Whether a directory holds every plain target with the same shape (so no copy is needed)."""
    try:
        index = _safetensors_index(directory)
        for name, t in targets.items():
            if t.is_lora:
                continue
            if name not in index:
                return False
            with safe_open(str(index[name]), framework="pt", device="cpu") as f:
                if tuple(f.get_slice(name).get_shape()) != tuple(t.weight.shape):
                    return False
    except (OSError, ValueError):
        return False
    return True


class OverlapCallback(Callback):
    """Compares the run's update Δ_T = W_end − W_start with reference subspaces by Mode Subspace Overlap.

    At train end (rank zero), for each reference and each η, MSO(Δ_T, Δ_ref; η) is computed per tensor
    (one SVD per tensor and delta for the whole η grid), then:
    - the rows go to `<out_dir>/<ref>.csv` and, with a WandbLogger, a W&B table `overlap/<ref>/table`;
    - MSO-vs-η lines with the random baseline and a layer × η heatmap of MSO/baseline are written as
      PNG and sent as W&B images `overlap/<ref>/plots`;
    - model-level scalars `overlap/<ref>/{mso,baseline,ratio}@<η>` go to every attached logger.

    W_start comes from the module's `base_dir` (a safetensors directory of the starting weights, as
    SafeprojLM exposes) when it holds every compared tensor; otherwise the compared weights are copied
    to CPU at train start (one copy of those tensors, kept in the callback's checkpoint state so a
    resumed run still measures from the true start). LoRA modules use the merged ΔW = scale·B·A.
    Tensor names are the plain Hugging Face names (`model.`/PEFT prefixes and `.base_layer` removed).

    Args:
        references: label → reference subspace: a delta spec (`TUNED,BASE`, adapter or run dir,
            `safety:<preset>`) or a basis artifact (`.safetensors`) that keeps its spectrum.
            Labels name files and metric keys: letters, digits, `_`, `.`, `-`.
        etas: energy shares η in (0, 1].
        include: regexes of tensor names (default: attention and MLP projections of decoder blocks).
        exclude: regexes of tensor names to leave out.
        side: "left" (output side, the paper's choice) or "right".
        out_dir: where tables and plots go; default `<default_root_dir>/overlap`.

    Raises:
        MisconfigurationException: on empty or badly named references, η outside (0, 1], an unknown
            side, a reference that cannot be read, or a model sharing no trainable tensor with it.
    """

    def __init__(
        self,
        references: dict[str, str],
        etas: list[float] = list(ETAS),
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        side: str = "left",
        out_dir: str | None = None,
    ) -> None:
        if not isinstance(references, dict) or not references:
            raise MisconfigurationException("OverlapCallback references: give at least one {label: subspace spec}")
        for label, spec in references.items():
            if not isinstance(label, str) or not _LABEL.fullmatch(label):
                raise MisconfigurationException(
                    f"OverlapCallback reference label {label!r}: use letters, digits, '_', '.', '-'"
                )
            if not isinstance(spec, str) or not spec:
                raise MisconfigurationException(f"OverlapCallback reference {label!r}: spec must be a non-empty string")
        try:
            self.etas = check_etas(etas)
        except ValueError as err:
            raise MisconfigurationException(f"OverlapCallback {err}") from None
        if side not in SIDES:
            raise MisconfigurationException(f"OverlapCallback side={side!r}: expected one of {SIDES}")
        self.references = dict(references)
        self.include, self.exclude, self.side, self.out_dir = include, exclude, side, out_dir
        self.tables: dict[str, list[dict]] = {}
        self._sources: dict[str, Subspaces] = {}
        self._targets: dict[str, Target] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._start_dir: str | None = None
        self._restored: dict[str, torch.Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(references=sorted(self.references.items()), side=self.side)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if "FSDP" in type(trainer.strategy).__name__:
            raise MisconfigurationException("OverlapCallback reads whole weights on rank zero; FSDP shards them")
        if not isinstance(getattr(pl_module, "model", None), torch.nn.Module):
            raise MisconfigurationException(
                "OverlapCallback needs the LightningModule's Hugging Face model at `.model`"
            )
        for label, spec in self.references.items():
            try:
                self._sources[label] = load_subspaces(spec, self.include, self.exclude)
            except (ValueError, FileNotFoundError) as err:
                raise MisconfigurationException(f"OverlapCallback reference {label!r} ({spec}): {err}") from None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights, _ = model_weights(pl_module.model)
        wanted = set()
        for source in self._sources.values():
            wanted.update(source.names())
        # Only weights that can move: frozen ones have a zero update, which spans no subspace.
        names = [
            n
            for n in select_names(list(weights), self.include, self.exclude)
            if n in wanted and (weights[n].is_lora or weights[n].weight.requires_grad)
        ]
        if not names:
            raise MisconfigurationException(
                "OverlapCallback: the model has no trainable tensor in common with the references "
                f"({', '.join(self.references)}); check include/exclude"
            )
        self._targets = {n: weights[n] for n in names}
        if not trainer.is_global_zero:
            return
        # A resumed run measures from the original start, restored from the checkpoint.
        restored, self._restored = self._restored or {}, None
        start: dict[str, torch.Tensor] = {}
        for name, t in self._targets.items():
            if t.is_lora:
                for part, factor in (("::B", t.lora_b), ("::A", t.lora_a)):
                    start[name + part] = restored.get(name + part, factor.detach().to("cpu", copy=True))
        base_dir = getattr(pl_module, "base_dir", None)
        plain = {n: t for n, t in self._targets.items() if not t.is_lora}
        self._start_dir = None
        if plain and isinstance(base_dir, str) and _start_dir_covers(base_dir, plain):
            self._start_dir = base_dir
        else:
            for name, t in plain.items():
                start[name] = restored[name] if name in restored else t.weight.detach().to("cpu", copy=True)
        self._start = start

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self._targets:
            return
        run = RunDelta(self._targets, self._start, self._start_dir)
        cache = SpectrumCache(side=self.side)
        # References may cover more tensors than the run trains (LoRA on a few modules): compare the shared ones.
        self.tables = mso_tables(
            run, self._sources, self.etas, side=self.side, cache=cache, progress=True, warn_unshared=False
        )
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "overlap")
        step = trainer.global_step
        from safeproj.wandb import log_images, log_table

        metrics: dict[str, float] = {}
        for label, rows in self.tables.items():
            if not rows:
                continue
            write_rows(rows, out / f"{label}.csv")
            plots = [plot_mso_vs_eta(rows, out / f"{label}_mso_vs_eta.png", title=f"MSO: run update vs {label}")]
            heat = plot_ratio_heatmap(rows, out / f"{label}_ratio_heatmap.png", title=f"MSO / baseline: run vs {label}")
            if heat is not None:
                plots.append(heat)
            log_table(trainer.loggers, f"overlap/{label}/table", rows, step=step)
            log_images(trainer.loggers, f"overlap/{label}/plots", [str(p) for p in plots], step=step)
            for row in aggregate(rows, "model"):
                for key in ("mso", "baseline", "ratio"):
                    metrics[f"overlap/{label}/{key}@{row['eta']:g}"] = row[key]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        mid = self.etas[len(self.etas) // 2]
        summary = ", ".join(
            f"{label} {metrics[key]:.2f} ({len({r['name'] for r in self.tables[label]})} tensors)"
            for label in self.tables
            if (key := f"overlap/{label}/ratio@{mid:g}") in metrics
        )
        rank_zero_info(f"OverlapCallback: MSO/baseline at η={mid:g}: {summary} -> {out}")
        self._start = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        # A resume needs the start to measure the whole run's update: the LoRA factors always, the
        # plain weights only when no start directory holds them.
        start = {k: v for k, v in self._start.items() if self._start_dir is None or "::" in k}
        return {"start": start, "start_dir": self._start_dir}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        start = state_dict.get("start") or {}
        self._restored = start if start else None
