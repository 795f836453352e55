"""`safeproj sweep SPEC --plan`: every cell's config parsed and checked as its runs will be, with nothing
downloaded, run or written, then a table of cells, runs, training and generated tokens and estimated
GPU-hours for a GPU class (`estimate.py` holds the arithmetic and its assumptions)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeproj.commands.checks import planning
from safeproj.commands.prereq import safety_models_needed
from safeproj.commands.sweep.config import parse_cell
from safeproj.commands.sweep.estimate import (
    DECODE_STEP_OVERHEAD_S,
    Generation,
    GpuClass,
    Training,
    generation_seconds,
    gpu_class,
    training_seconds,
)
from safeproj.commands.sweep.needs import Needs, add_cell, format_needs
from safeproj.commands.sweep.spec import Cell, Sweep, load_spec
from safeproj.core.tensor_files import SafetensorsFiles
from safeproj.model.hub import cached_checkpoint, is_hub_name, split_name
from safeproj.model.loading import SAFETY_SUFFIX, safety_configs, tiny_model
from safeproj.runs import SAFETY_RECIPE, config_path, recipe_path

# Published parameter counts (billions) of models a plan may name before they are downloaded; a cached or
# local checkpoint is counted from its weights instead.
KNOWN_PARAMETERS_B = {
    "smollm2-135m": 0.135,
    "Qwen/Qwen2.5-1.5B-Instruct": 1.54,
    "Qwen/Qwen2.5-1.5B": 1.54,
    "Qwen/Qwen2.5-3B-Instruct": 3.09,
    "Qwen/Qwen2.5-3B": 3.09,
    "Qwen/Qwen2.5-7B-Instruct": 7.62,
    "Qwen/Qwen2.5-7B": 7.62,
    "meta-llama/Llama-3.2-1B-Instruct": 1.24,
    "meta-llama/Llama-3.2-1B": 1.24,
    "meta-llama/Llama-2-7b-chat-hf": 6.74,
    "meta-llama/Llama-2-7b-hf": 6.74,
}
PREREQUISITE = "prerequisite:"  # rows made once before the runs (`safeproj prereq`), not cells
EVALUATORS = ("UtilityEval", "HarmEval")  # the generating evaluators; likelihood metrics are forward passes


@dataclass
class PlannedCell:
    """One row of the plan: a cell (or a safety-tuning prerequisite) and its estimate per run."""

    name: str
    runs: int
    model: str
    parameters_b: float | None
    training: Training
    passes: list[Generation]
    gpu_hours_per_run: float | None

    @property
    def generated_tokens(self) -> int:
        return sum(p.tokens for p in self.passes)


def parameters_b(model: str) -> float | None:
    """Billions of parameters of a model: counted from a cached or local checkpoint, else the known table."""
    name = model.removesuffix(SAFETY_SUFFIX)
    if name == "tiny":
        return sum(p.numel() for p in tiny_model()[0].parameters()) / 1e9
    folder = cached_checkpoint(model) if is_hub_name(model) else Path(model) if Path(model).is_dir() else None
    if folder is not None:
        try:
            files = SafetensorsFiles(folder)
            return sum(math.prod(shape) for shape in files.shapes.values()) / 1e9
        except ValueError:
            pass
    return KNOWN_PARAMETERS_B.get(split_name(name)[0])


def training_of(config: Any) -> Training:
    """What a parsed fit config trains: examples after the validation split, epochs, step cap, batch, length."""
    data, trainer = config.data, config.trainer
    n_val = round(data.val_fraction * data.num_samples)
    if data.val_fraction > 0:
        n_val = min(max(n_val, 1), data.num_samples - 1)
    examples = data.num_samples - n_val
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    batch = data.batch_size * (trainer.accumulate_grad_batches or 1) * devices * (trainer.num_nodes or 1)
    max_steps = trainer.max_steps if trainer.max_steps is not None else -1
    epochs = trainer.max_epochs
    if epochs is None or epochs < 0:  # Lightning's defaults: 1000 epochs without a step cap, else the cap decides
        epochs = 1000 if max_steps < 0 else math.ceil(max_steps * batch / examples)
    return Training(examples, epochs, max_steps, batch, data.max_length)


def evaluation_passes(config: Any) -> list[Generation]:
    """The generating evaluation passes of one run: every post hoc variant plus the train-end evaluation."""
    callbacks = {cb.class_path.rsplit(".", 1)[-1]: cb.get("init_args") for cb in _callbacks(config)}
    posthoc = callbacks.get("PosthocProjection")
    variants = 0
    if posthoc is not None:
        variants = len(posthoc.fracs) * len(posthoc.selections) + int(bool(posthoc.include_full))
    passes = []
    for name in EVALUATORS:
        args = callbacks.get(name)
        if args is not None:
            count = variants + int(bool(args.at_train_end))
            passes += [Generation(args.num_samples, args.batch_size, args.max_new_tokens)] * count
    return passes


def validation_evaluations(config: Any) -> bool:
    """Whether an evaluator also runs at validation (not counted in the estimate)."""
    if config.trainer.get("limit_val_batches") == 0 or config.data.val_fraction == 0:
        return False
    return any(
        cb.class_path.endswith(EVALUATORS) and (cb.get("init_args") or {}).get("at_validation")
        for cb in _callbacks(config)
    )


def _callbacks(config: Any) -> list:
    listed = config.trainer.get("callbacks") or []
    return listed if isinstance(listed, list) else [listed]


def planned(name: str, runs: int, config: Any, gpu: GpuClass) -> PlannedCell:
    model = config.model.model
    size = parameters_b(model)
    training, passes = training_of(config), evaluation_passes(config)
    hours = None
    if size is not None:
        hours = (training_seconds(training, size, gpu) + generation_seconds(passes, size, gpu)) / 3600
    return PlannedCell(name, runs, model, size, training, passes, hours)


def safety_tuning_cell(model: str) -> Cell:
    """The prerequisite run that safety-tunes `model`, as a cell (parsed like the sweep's own)."""
    configs = [config_path(name) for name in safety_configs(model)]
    return Cell("safety-tune", recipe_path(SAFETY_RECIPE), configs, {"model.model": model})


def plan_sweep(
    spec: str | os.PathLike, out_dir: str | os.PathLike | None = None, seeds=None, gpu: str = "a100-80gb"
) -> tuple[list[PlannedCell], list[str]]:
    """Every cell parsed and checked without downloads, with its estimate; (rows, notes). Prints the table."""
    target = gpu_class(gpu)
    sweep = load_spec(spec, seeds)
    out = Path(out_dir or Path("runs") / "sweeps" / sweep.name).resolve()
    rows: list[PlannedCell] = []
    needs = Needs()
    with planning() as notes:
        configs = {cell.name: parse_cell(cell, sweep, out) for cell in sweep.cells}
        needed: list[str] = []
        for cell in sweep.cells:
            needed += safety_models_needed(configs[cell.name].as_dict())
        for model in dict.fromkeys(needed):
            prerequisite = safety_tuning_cell(model)
            one_seed = dataclasses.replace(sweep, seeds=sweep.seeds[:1])
            config = parse_cell(prerequisite, one_seed, out)
            rows.append(planned(f"{PREREQUISITE} safety-tune {model}", 1, config, target))
            add_cell(needs, config, 1)
    for cell in sweep.cells:
        config = configs[cell.name]
        rows.append(planned(cell.name, len(sweep.seeds), config, target))
        add_cell(needs, config, len(sweep.seeds))
        if validation_evaluations(config):
            notes.append(f"{cell.name}: evaluations at validation are not counted")
    print(format_plan(rows, notes, sweep, target, format_needs(needs, parameters_b)))
    return rows, notes


def format_plan(rows: list[PlannedCell], notes: list[str], sweep: Sweep, gpu: GpuClass, needs: list[str] = ()) -> str:
    header = ("cell", "runs", "model", "params", "steps", "train tokens", "eval passes", "gen tokens", "GPU-h/run")
    table = [header]
    for row in rows:
        table.append(
            (
                row.name,
                str(row.runs),
                row.model,
                f"{row.parameters_b:.2f}B" if row.parameters_b is not None else "?",
                f"{row.training.steps:,}",
                f"{row.training.tokens / 1e6:,.1f}M",
                str(len(row.passes)),
                f"{row.generated_tokens / 1e6:,.2f}M",
                f"{row.gpu_hours_per_run:.2f}" if row.gpu_hours_per_run is not None else "?",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in table]
    known = [r for r in rows if r.gpu_hours_per_run is not None]
    total = sum(r.gpu_hours_per_run * r.runs for r in known)
    runs = sum(r.runs for r in rows if not r.name.startswith(PREREQUISITE))
    cells = len(sweep.cells)
    lines += [
        "",
        f"{cells} cells × {len(sweep.seeds)} seeds = {runs} runs; about {total:,.1f} GPU-hours on {gpu.name}"
        + ("" if len(known) == len(rows) else " (rows marked ? not counted: unknown model size)"),
        f"assumed {gpu.name}: training {gpu.train_tokens_per_s_per_billion:,.0f} tokens/s ÷ billions of parameters; "
        f"greedy decoding {DECODE_STEP_OVERHEAD_S * 1e3:.0f} ms + one weight read per step "
        "(safeproj.commands.sweep.estimate). Upper bounds: every example max_length tokens, every answer "
        "max_new_tokens; not in the GPU-hours: downloads, basis builds and judge calls, listed below.",
        *needs,
        *(f"note: {note}" for note in notes),
        "nothing was run, downloaded or written (plan)",
    ]
    return "\n".join(lines)
