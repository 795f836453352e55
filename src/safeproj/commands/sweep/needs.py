"""What a sweep needs besides GPU time, read from its parsed cell configs: the hub models and datasets it will
download, the bases it will build (each once, then cached) and the calls its LLM judge will be asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safeproj.commands.sweep.estimate import BYTES_PER_PARAMETER
from safeproj.data.sources import ALIASES
from safeproj.model.hub import cached_checkpoint, is_hub_name, split_name
from safeproj.model.subspaces import alignment_pair, expand_spec

JUDGE_FREE = ("RefusalJudge",)  # judges that run locally, with no calls to pay for


@dataclass
class Needs:
    models: dict[str, bool] = field(default_factory=dict)  # hub model -> already in the cache
    datasets: set[str] = field(default_factory=set)
    bases: set[tuple] = field(default_factory=set)  # (delta spec, frac or eta, selection, side)
    judge_calls: int = 0
    judges: set[str] = field(default_factory=set)


def _callbacks(config: Any) -> dict[str, Any]:
    listed = config.trainer.get("callbacks") or []
    listed = listed if isinstance(listed, list) else [listed]
    return {cb.class_path.rsplit(".", 1)[-1]: cb.get("init_args") for cb in listed}


def _dataset(name: Any) -> str | None:
    """The hub dataset behind a source or evaluator dataset name, or None for built-in and local data."""
    if not isinstance(name, str):
        return None
    name = ALIASES.get(name, {}).get("path", name)
    return name if is_hub_name(name) else None


def _models_of(spec: str) -> list[str]:
    """The hub checkpoints a resolved delta spec reads."""
    if spec.startswith("alignment:"):
        return list(alignment_pair(spec.split(":", 1)[1]))
    if spec.startswith("safety:"):
        return [spec.split(":", 1)[1]]
    return [part.strip() for part in spec.split(",")]


def add_cell(needs: Needs, config: Any, runs: int) -> None:
    """Count one cell's needs over its `runs` seeds."""
    model = config.model.model
    callbacks = _callbacks(config)
    specs = []
    for name in ("OnlineProjection", "PosthocProjection"):
        args = callbacks.get(name)
        if args is None:
            continue
        spec = expand_spec(args.subspace, model)
        specs.append(spec)
        if name == "OnlineProjection":
            points = [(args.frac if args.eta is None else args.eta, args.selection)]
        else:
            points = [(frac, selection) for frac in args.fracs for selection in args.selections]
        needs.bases |= {(spec, x, selection, getattr(args, "side", "left")) for x, selection in points}
    for name in [model, *(m for spec in specs for m in _models_of(spec))]:
        if is_hub_name(name) and name not in needs.models:
            needs.models[name] = cached_checkpoint(name) is not None
    for source in config.data.get("sources") or []:
        needs.datasets |= {d for d in [_dataset(source.get("path"))] if d}
    for name in ("UtilityEval", "HarmEval"):
        args = callbacks.get(name)
        if args is not None:
            needs.datasets |= {d for d in [_dataset(args.get("dataset")), _dataset(args.get("fewshot_source"))] if d}
    harm = callbacks.get("HarmEval")
    judge = harm.get("judge") if harm is not None else None
    if judge is not None and judge.class_path.rsplit(".", 1)[-1] not in JUDGE_FREE:
        posthoc = callbacks.get("PosthocProjection")
        passes = int(bool(harm.at_train_end))
        if posthoc is not None:
            passes += len(posthoc.fracs) * len(posthoc.selections) + int(bool(posthoc.include_full))
        needs.judge_calls += runs * passes * harm.num_samples
        needs.judges.add(str((judge.get("init_args") or {}).get("model") or judge.class_path))


def format_needs(needs: Needs, parameters_b) -> list[str]:
    """Plan lines for downloads, bases and judge calls (upper bounds: a cached answer is not asked again)."""
    lines = []
    for model, cached in needs.models.items():
        size = parameters_b(model)
        gigabytes = f"≈ {size * BYTES_PER_PARAMETER:.1f} GB in bf16" if size is not None else "size unknown"
        lines.append(f"download: model {model} ({'in the cache' if cached else gigabytes})")
    lines += [f"download: dataset {split_name(name)[0]}" for name in sorted(needs.datasets)]
    if needs.bases:
        lines.append(
            f"bases: {len(needs.bases)} (reference × frac × selection), each built once on the CPU from the "
            "reference's exact per-tensor factorization and cached"
        )
    if needs.judge_calls:
        lines.append(
            f"judge calls: at most {needs.judge_calls:,} to {', '.join(sorted(needs.judges))} (one per scored "
            "reply; cached answers are not asked again)"
        )
    return lines
