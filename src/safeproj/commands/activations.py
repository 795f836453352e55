"""`safeproj activations`: record and analyse the activations of any model, outside training."""

from __future__ import annotations

from safeproj.core.activations import DEFAULT_ETAS, analyse_recordings, recorded_steps, summary_table, write_report
from safeproj.callbacks.activation_recorder import (
    DEFAULT_PROMPT_SETS,
    POSITIONS,
    STORAGE_DTYPES,
    check_prompt_set_names,
    context_length,
    decoder_layers,
    pad_token_id,
    prepare_prompt_sets,
    record_step,
    resolve_layers,
)


def activations_command(
    model: str,
    out_dir: str = "runs/activations",
    layers: list[int | float] | None = None,
    prompt_sets: dict[str, str] | None = None,
    num_prompts: int = 32,
    position: str = "last",
    basis: str | None = None,
    etas: list[float] | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    shard_size: int = 1024,
    harmful_set: str = "harmful",
    useful_set: str = "useful",
    seed: int = 0,
    step: int = 0,
    record: bool = True,
) -> dict[str, list[dict]]:
    """Record activations of harmful and useful prompts and compare them layer by layer.

    Writes `out_dir/step_{step}/` shards, then analyses every complete recording in `out_dir`
    (so recording a base model as step 0 and its fine-tuned checkpoint as step N, or pointing at a
    training run's activation folder, compares before with after): `analysis.json`,
    `mso_vs_eta.png`, `probe_by_layer.png`, a printed summary table; returns the analysis rows.

    Args:
        model: a preset (`tiny`, `smollm2-135m`), a local checkpoint directory or a hub name.
        out_dir: output folder.
        layers: decoder layer indices or shares of depth in [0, 1]; default the 65–90 % band.
        prompt_sets: name → spec (`builtin:harmful-test`, a .json/.jsonl/.csv file, `org/name[@split][#field]`).
        num_prompts: prompts per set.
        position: "last", "mean" or "assistant".
        basis: a weight basis (artifact or delta spec) to compare the difference-of-means direction with.
        etas: energy shares for the activation MSO; default 0.1 … 0.9.
        batch_size: prompts per forward pass.
        dtype: storage dtype of the shards, "float32" or "bfloat16".
        shard_size: rows per shard file.
        harmful_set: the prompt set treated as harmful.
        useful_set: the prompt set treated as useful.
        seed: seed of the built-in prompt sets and of the probe split.
        step: the label of this recording (e.g. a checkpoint's global step).
        record: False analyses what `out_dir` already holds without loading `model`.
    """
    from safeproj.model.loading import load_model

    prompt_sets = dict(DEFAULT_PROMPT_SETS if prompt_sets is None else prompt_sets)
    check_prompt_set_names(prompt_sets)
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    for name in (harmful_set, useful_set):
        if name not in prompt_sets:
            raise ValueError(f"{name!r} is not among prompt_sets {sorted(prompt_sets)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    etas = list(DEFAULT_ETAS if etas is None else etas)

    if record:
        lm, tokenizer = load_model(model)
        indices = resolve_layers(layers, len(decoder_layers(lm)))
        encoded = prepare_prompt_sets(tokenizer, prompt_sets, num_prompts, position, context_length(lm), seed)
        result = record_step(
            lm,
            encoded,
            indices,
            out_dir,
            step,
            position=position,
            pad_id=pad_token_id(tokenizer),
            batch_size=batch_size,
            shard_size=shard_size,
            dtype=dtype,
        )
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
    report = analyse_recordings(
        out_dir, steps=steps, etas=etas, basis=weight_basis, harmful_set=harmful_set, useful_set=useful_set, seed=seed
    )
    files = write_report(report, out_dir)
    print(summary_table(report, eta=0.5 if 0.5 in etas else etas[len(etas) // 2]))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return report
