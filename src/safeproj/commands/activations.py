"""`safeproj activations`: record and analyse the activations of any model, outside training."""

from __future__ import annotations

from pathlib import Path

from safeproj.core.activations import DEFAULT_ETAS, check_test_size
from safeproj.data.prompts import load_prompt_groups
from safeproj.model.activations import context_length, decoder_layers, pad_token_id, prepare_prompt_sets, resolve_layers
from safeproj.model.recordings import (
    RecordingOptions,
    analyse_recordings,
    record_step,
    recorded_steps,
    summary_table,
    write_report,
)


def activations_command(
    model: str,
    out_dir: str = "runs/activations",
    layers: list[int | float] | None = None,
    prompt_sets: dict[str, str] | None = None,
    num_prompts: int = 128,
    position: str = "last",
    basis: str | None = None,
    etas: list[float] | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    shard_size: int = 1024,
    harmful_set: str = "harmful",
    benign_set: str = "benign",
    probe_test_size: float = 0.5,
    seed: int = 0,
    step: int = 0,
    record: bool = True,
) -> dict[str, list[dict]]:
    """Record activations of harmful and benign prompts and compare them layer by layer.

    Writes `out_dir/step_{step}/` shards, then analyses every complete recording in `out_dir`
    (so recording a base model as step 0 and its fine-tuned checkpoint as step N, or pointing at a
    training run's activation folder, compares before with after): `analysis.json`,
    `mso_vs_eta.png`, `probe_by_layer.png`, a printed summary table; returns the analysis rows.

    Args:
        model: a preset (`tiny`, `smollm2-135m`), a local checkpoint directory or a hub name.
        out_dir: output folder.
        layers: decoder layer indices or shares of depth in [0, 1]; default the 65–90 % band.
        prompt_sets: name → spec (`builtin:harmful-test`, a .json/.jsonl/.csv file, `org/name[@split][#field]`);
            default harmful and benign requests of the same form (`builtin:harmful-test`, `builtin:benign-test`).
        num_prompts: prompts per set.
        position: "last", "mean" or "assistant".
        basis: a weight basis (artifact or delta spec) to compare the difference-of-means direction with.
        etas: energy shares for the activation MSO; default 0.1 … 0.9.
        batch_size: prompts per forward pass.
        dtype: storage dtype of the shards, "float32" or "bfloat16".
        shard_size: rows per shard file.
        harmful_set: the prompt set treated as harmful.
        benign_set: the prompt set contrasted with it.
        probe_test_size: share of each set held out to score the linear probe, as whole acts where the
            prompt set names them (the built-in requests do).
        seed: seed of the built-in prompt sets and of the probe split.
        step: the label of this recording (e.g. a checkpoint's global step).
        record: False analyses what `out_dir` already holds without loading `model`; a recording that keeps
            no prompt groups takes them from `prompt_sets`, `num_prompts` and `seed`, which must then be the
            ones it was recorded with.
    """
    from safeproj.model.loading import load_model

    options = RecordingOptions(
        prompt_sets=prompt_sets,
        layers=layers,
        num_prompts=num_prompts,
        position=position,
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=dtype,
    )
    for name in (harmful_set, benign_set):
        if name not in options.prompt_sets:
            raise ValueError(f"{name!r} is not among prompt_sets {sorted(options.prompt_sets)}")
    check_test_size(probe_test_size)
    etas = list(DEFAULT_ETAS if etas is None else etas)

    if record:
        lm, tokenizer = load_model(model)
        indices = resolve_layers(options.layers, len(decoder_layers(lm)))
        encoded = prepare_prompt_sets(
            tokenizer, options.prompt_sets, options.num_prompts, options.position, context_length(lm), seed
        )
        result = record_step(
            lm, encoded, indices, out_dir, step, position=options.position, pad_id=pad_token_id(tokenizer),
            batch_size=options.batch_size, shard_size=options.shard_size, dtype=options.dtype,
        )  # fmt: skip
        del lm
        print(f"{result.bytes_written} bytes of activations in {result.directory}")
    steps = recorded_steps(out_dir)
    if not steps:
        raise ValueError(f"no complete recordings in {out_dir}")
    weight_basis = None
    if basis is not None:
        from safeproj.core.options import BasisOptions
        from safeproj.model.subspaces import resolve_basis

        weight_basis = resolve_basis(basis, BasisOptions())
    # Recordings made before prompt groups were kept get them from the prompt sets they were made from
    # (those encoded here already carry them).
    if record:
        groups = {name: [e.group for e in rows] for name, rows in encoded.items() if all(e.group for e in rows)}
    else:
        groups = _prompt_groups(options.prompt_sets, options.num_prompts, seed)
    report = analyse_recordings(
        out_dir, steps=steps, etas=etas, basis=weight_basis, harmful_set=harmful_set, benign_set=benign_set,
        seed=seed, probe_test_size=probe_test_size, prompt_groups=groups,
    )  # fmt: skip
    files = write_report(report, out_dir)
    print(summary_table(report, eta=0.5 if 0.5 in etas else etas[len(etas) // 2]))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    _log_to_wandb(model if record else None, out_dir, report, files, {"steps": steps, "etas": etas, "basis": basis})
    return report


def _prompt_groups(prompt_sets: dict[str, str], num_prompts: int, seed: int) -> dict[str, list[str]]:
    """The groups of every prompt set that has them."""
    found = {name: load_prompt_groups(spec, num_prompts, seed) for name, spec in prompt_sets.items()}
    return {name: groups for name, groups in found.items() if groups is not None}


def _log_to_wandb(model: str | None, out_dir: str, report: dict, files: dict, settings: dict) -> None:
    """A `job_type=activations` W&B run in `out_dir`, in the group of the run that holds `model` or `out_dir`."""
    from safeproj.runs import find_run_info
    from safeproj.wandb import command_run, log_images, log_table

    paths = [p for p in (model, out_dir) if p is not None and Path(p).exists()]
    found = next((f for f in map(find_run_info, paths) if f is not None), None)
    with command_run("activations", out_dir, found[1] if found else None, {"model": model, **settings}) as loggers:
        for key, rows in report.items():
            log_table(loggers, f"activations/{key}", rows)
        log_images(loggers, "activations/plots", [str(p) for p in files.values() if str(p).endswith(".png")])
