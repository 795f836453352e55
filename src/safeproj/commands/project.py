"""`safeproj project`: post hoc projection of a saved run, scored variant by variant."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from safetensors import safe_open

from safeproj.callbacks.posthoc_projection import FRACS, SELECTIONS, SubspaceGrid, Variant, run_variants, write_variant_rows
from safeproj.core.targets import find_weights
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


def read_tensors(directory: str, names) -> dict:
    """Named tensors from a Hugging Face directory's safetensors files, one file open at a time."""
    wanted, found = set(names), {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    found[key] = f.get_tensor(key)
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"{directory} has no tensor {sorted(missing)[0]}")
    return found


def project_command(
    run: str,
    subspace: str,
    fracs: list[float] = list(FRACS),
    selections: list[str] = list(SELECTIONS),
    keep: str = "parallel",
    side: str = "left",
    seed: int = 0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    utility: bool = True,
    harm: bool = True,
    num_samples: int = 16,
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
        out_dir: where posthoc.csv/json go (default `<run>/../posthoc`).
    """
    from safeproj.callbacks.evaluation import HarmEval, UtilityEval

    model, tokenizer, base, lora = load_run(run)
    source = delta_source(subspace, include, exclude)
    targets = find_weights(model, source.names())
    initial = {} if lora else read_tensors(base, [t.name for t in targets if not t.is_lora])
    grid = SubspaceGrid(source, [t.name for t in targets], side=side, seed=seed)
    evaluators = []
    if utility:
        evaluators.append(UtilityEval(num_samples=num_samples))
    if harm:
        evaluators.append(HarmEval(num_samples=num_samples))
    variants = [Variant(f, s) for s in selections for f in fracs]
    rows = list(run_variants(_Holder(model, tokenizer), targets, initial, grid, variants, keep, evaluators))
    out = Path(out_dir or Path(run).parent / "posthoc")
    csv_path = write_variant_rows(rows, out)
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    print(f"wrote {csv_path}")


