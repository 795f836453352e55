"""The recipes run end to end through the CLI on the tiny preset: checkpoint, W&B run, projection."""

import itertools
import json
from pathlib import Path

import pytest

from safeproj.cli import main
from safeproj.core.deltas import CheckpointDelta
from safeproj.core.options import BasisOptions
from safeproj.core.projector import project
from safeproj.model.subspaces import resolve_basis

ROOT = Path(__file__).resolve().parents[1]


def _fit(recipe: str, root: Path, *extra: str) -> Path:
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / f"{recipe}.yaml"),
            "--model.model",
            "tiny-safety",
            "--model.lr",
            "3e-3",
            "--data.num_samples",
            "48",
            "--data.max_length",
            "192",
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
            *extra,
        ]
    )
    return root / "checkpoint"


@pytest.mark.slow
def test_mixed_recipe_projects_every_update_out_of_the_safety_subspace(tmp_path):
    ckpt = _fit("mixed", tmp_path)
    manifest = json.loads((ckpt / "safeproj.json").read_text())
    assert manifest["model"] == "tiny-safety" and manifest["global_step"] == 4
    # The run's update W_end − W_start has no component in range(P_k) of Δ_S (frac 0.25, as the recipe says).
    basis = resolve_basis("safety:tiny", BasisOptions(frac=0.25), progress=False)
    update = CheckpointDelta(str(ckpt), manifest["base"])
    moved = 0
    for name, delta in update:
        if name in basis.entries and delta.norm() > 0:
            moved += 1
            inside = project(delta, basis.entries[name], "parallel")
            assert float(inside.norm() / delta.norm()) < 1e-4, name
    assert moved > 0
    # An offline W&B run holds the loss curve, the resolved config, the recipe group and the checkpoint path.
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    raw = runs[0].read_bytes()
    for needle in (
        b"train/loss",
        b"val/loss",
        b"checkpoint_dir",
        b"builtin:harmful",
        b"OnlineProjection",
        b"mixed",
        b"utility/",
        b"harm/",
    ):
        assert needle in raw, needle
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.slow
def test_parallel_recipe_scores_every_variant(tmp_path):
    ckpt = _fit("parallel_harmful", tmp_path)
    rows = json.loads((tmp_path / "posthoc" / "posthoc.json").read_text())
    assert next(r["variant"] for r in rows) == "full"
    assert len(rows) == 1 + 5 * 3
    top = [r["energy_kept"] for r in sorted(rows[1:], key=lambda r: r["frac"]) if r["selection"] == "top"]
    # The share of the run's update kept by P_k grows with k; the full variant keeps all of it.
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(top)) and 0 < top[0] < top[-1] <= 1
    assert rows[0]["energy_kept"] == pytest.approx(1.0)
    for row in rows:
        assert any(k.startswith("utility/") for k in row) and any(k.startswith("harm/") for k in row)
    assert ckpt.is_dir()
