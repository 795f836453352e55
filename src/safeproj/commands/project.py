"""`safeproj project`: post hoc projection of a saved run, scored variant by variant."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from safeproj.core.deltas import RunDelta
from safeproj.core.energy import Variant, check_grid
from safeproj.core.options import FRACS, KEEPS, SELECTIONS, BasisOptions, BasisSide, Keep, Selection, check_choice
from safeproj.core.targets import find_weights
from safeproj.core.variants import score_variants, write_variant_rows
from safeproj.model.subspaces import delta_source
from safeproj.runs import run_manifest


class _Holder(L.LightningModule):
    """What evaluators need of a module: `.model` and `.tokenizer`."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer


def load_run(run: str):
    """(model, tokenizer, base_dir, lora) of a finished run's checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = run_manifest(run)
    base = manifest.get("base")
    if manifest.get("lora"):
        from peft import PeftModel

        if not base:
            raise ValueError(f"LoRA run {run} does not name its base weights")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run, is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(run)
    return model, AutoTokenizer.from_pretrained(run), base, bool(manifest.get("lora"))


def project_command(
    run: str,
    subspace: str,
    fracs: list[float] = list(FRACS),
    selections: list[Selection] = list(SELECTIONS),
    keep: Keep = "parallel",
    side: BasisSide = "left",
    seed: int = 0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    utility: bool = True,
    harm: bool = True,
    num_samples: int = 16,
    utility_dataset: str = "builtin:useful-test",
    harm_dataset: str = "builtin:harmful-test",
    n_shot: int = 0,
    protocol: str = "chat",
    utility_max_new_tokens: int = 128,
    harm_max_new_tokens: int = 64,
    harm_chat_template: bool = True,
    batch_size: int = 8,
    out_dir: str | None = None,
) -> None:
    """Post hoc projection of a saved run: score W₀ + P·Δ_T for each frac × selection.

    Args:
        run: a finished run's checkpoint directory (with safeproj.json).
        subspace: reference delta spec or `safety:<preset>`.
        fracs: rank fractions.
        selections: top, random-k, random.
        keep: parallel (P_k Δ_T) or orthogonal (P_k⊥ Δ_T).
        side: left, right or both.
        seed: seed of the random selections.
        include: regexes of tensor names (default: attention and MLP projections).
        exclude: regexes of tensor names to leave out.
        utility: score each variant with UtilityEval.
        harm: score each variant with HarmEval.
        num_samples: prompts per evaluation.
        utility_dataset: GSM8k items: "builtin:useful-test", a local .jsonl, or "openai/gsm8k".
        harm_dataset: harmful prompts: "builtin:harmful-test", a local AdvBench .csv, or "walledai/AdvBench".
        n_shot: GSM8k exemplars per problem.
        protocol: GSM8k protocol, "chat" or "lm-eval" (the paper's: with --utility_dataset openai/gsm8k
            --num_samples 1319 --n_shot 1 --utility_max_new_tokens 256).
        utility_max_new_tokens: generation budget per math answer.
        harm_max_new_tokens: generation budget per harmful-prompt response (paper: 512).
        harm_chat_template: harmful prompts through the chat template; false feeds them as raw text (paper).
        batch_size: prompts per generation batch.
        out_dir: where posthoc.csv/json go (default `<run>/../posthoc`).
    """
    check_choice("keep", keep, KEEPS)
    options = BasisOptions(side=side, seed=seed, include=include, exclude=exclude)
    fracs, selections = check_grid(fracs, selections)
    # Built before the model loads: their own argument checks fail fast.
    evaluators = variant_evaluators(
        utility, harm, utility_dataset, harm_dataset, num_samples, n_shot, protocol,
        utility_max_new_tokens, harm_max_new_tokens, harm_chat_template, batch_size,
    )  # fmt: skip
    model, tokenizer, base, _ = load_run(run)
    source = delta_source(subspace, options.include, options.exclude)
    targets = find_weights(model, source.names())
    # The run's start is its base checkpoint; LoRA adapters start at B₀ = 0.
    start = RunDelta(targets, base, fresh_adapters=True)
    if start.held:
        raise ValueError(f"the run's base weights {base} lack {next(iter(start.held))} (or hold another shape)")
    variants = [Variant(f, s) for s in selections for f in fracs]
    out = Path(out_dir or Path(run).parent / "posthoc")
    holder = _Holder(model, tokenizer)
    rows = score_variants(
        holder, start, source, variants, keep, evaluators, work_dir=out, side=options.side, seed=options.seed
    )
    csv_path = write_variant_rows(rows, out)
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    print(f"wrote {csv_path}")
    settings = {"subspace": subspace, "keep": keep, "side": side, "seed": seed, "fracs": fracs}
    evaluation = {"num_samples": num_samples, "protocol": protocol, "harm_chat_template": harm_chat_template}
    _log_to_wandb(run, out, rows, {**settings, "selections": selections, **evaluation})


def variant_evaluators(
    utility: bool,
    harm: bool,
    utility_dataset: str,
    harm_dataset: str,
    num_samples: int,
    n_shot: int,
    protocol: str,
    utility_max_new_tokens: int,
    harm_max_new_tokens: int,
    harm_chat_template: bool,
    batch_size: int,
) -> list:
    """The evaluation callbacks that score each variant, with the command line's settings."""
    from safeproj.callbacks import HarmEval, UtilityEval

    evaluators = []
    if utility:
        evaluators.append(
            UtilityEval(
                dataset=utility_dataset,
                num_samples=num_samples,
                n_shot=n_shot,
                protocol=protocol,
                max_new_tokens=utility_max_new_tokens,
                batch_size=batch_size,
            )
        )
    if harm:
        evaluators.append(
            HarmEval(
                dataset=harm_dataset,
                num_samples=num_samples,
                max_new_tokens=harm_max_new_tokens,
                batch_size=batch_size,
                chat_template=harm_chat_template,
            )
        )
    return evaluators


def _log_to_wandb(run: str, out: Path, rows: list[dict], settings: dict) -> None:
    """A `job_type=project` W&B run in `out`, in the group of the run it projects (if it has a run.json)."""
    from safeproj.runs import find_run_info
    from safeproj.wandb import command_run, log_table

    found = find_run_info(run)
    with command_run("project", out, found[1] if found else None, {"run": run, **settings}) as loggers:
        log_table(loggers, "project/posthoc", rows)
