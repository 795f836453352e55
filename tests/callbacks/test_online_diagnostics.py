"""OnlineProjection's diagnostics: the share of each step's update it removed, and the basis it used."""

import hashlib
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from helpers.loggers import MemoryLogger, RecordingWandb
from helpers.projection import TinyLM, loader, random_basis, trainer
from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.core.names import parse_name
from safeproj.core.projector import project


def _removed_shares(basis, start: dict, stepped: dict, keep: str) -> dict[str, float]:
    """Direct computation: ‖u − P·u‖² / ‖u‖² of the unprojected step u, overall ("") and per module type."""
    removed: dict[str, float] = {}
    total: dict[str, float] = {}
    for name, entry in basis.entries.items():
        update = stepped[name] - start[name]
        module = parse_name(name)[1]
        for key in ("", module):
            removed[key] = removed.get(key, 0.0) + float((update - project(update, entry, keep)).square().sum())
            total[key] = total.get(key, 0.0) + float(update.square().sum())
    return {key: removed[key] / total[key] for key in total}


def _weights(module, names) -> dict[str, torch.Tensor]:
    params = dict(module.model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


@pytest.mark.parametrize("on", ["update", "grad"])
def test_removed_share_matches_a_direct_computation_on_the_first_step(tmp_path, on):
    # SGD: one step's update is −lr·g, so in both modes the share removed is that of the raw step.
    free = TinyLM(optimizer="sgd", lr=0.1)
    basis = random_basis(free.model, tmp_path / "b.safetensors", frac=0.25)
    start = _weights(free, basis.entries)
    trainer(tmp_path / "free", 1).fit(free, loader(1))
    expected = _removed_shares(basis, start, _weights(free, basis.entries), "orthogonal")
    assert 0.05 < expected[""] < 0.95  # a check that a wrong share (0 or 1) would fail

    logger = MemoryLogger()
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep="orthogonal", on=on, log_every_n_steps=1)
    trainer(tmp_path / "projected", 1, [cb], logger=logger).fit(TinyLM(optimizer="sgd", lr=0.1), loader(1))
    [(step, logged)] = logger.keyed("projection/removed_share")
    assert step == 1
    assert logged["projection/removed_share"] == pytest.approx(expected[""], rel=1e-4)
    for module, share in expected.items():
        if module:
            assert logged[f"projection/removed_share/{module}"] == pytest.approx(share, rel=1e-4, abs=1e-7)


def test_removed_share_is_logged_every_n_steps(tmp_path):
    logger = MemoryLogger()
    module = TinyLM(optimizer="adamw", lr=1e-2)
    random_basis(module.model, tmp_path / "b.safetensors", frac=0.5)
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep="parallel", on="update", log_every_n_steps=2)
    trainer(tmp_path, 5, [cb], logger=logger).fit(module, loader(5))
    records = logger.keyed("projection/removed_share")
    assert [step for step, _ in records] == [1, 3, 5]  # steps 0, 2 and 4, logged once they are taken
    assert all(0.0 < m["projection/removed_share"] < 1.0 for _, m in records)


class _Config(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


class ConfigRecordingWandb(RecordingWandb):
    """Also keeps what is stored in the W&B config."""

    def __init__(self):
        super().__init__()
        self.stored = _Config()

    @property
    def experiment(self):
        return SimpleNamespace(config=self.stored)


@pytest.mark.parametrize("keep, expected", [("parallel", 1.0), ("orthogonal", 0.0)])
def test_cumulative_share_shows_the_whole_update_inside_or_outside_the_subspace(tmp_path, keep, expected):
    logger = MemoryLogger()
    module = TinyLM(optimizer="adamw", lr=1e-2)
    random_basis(module.model, tmp_path / "b.safetensors", frac=0.5)
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep=keep, on="update", log_every_n_steps=2)
    trainer(tmp_path, 4, [cb], logger=logger).fit(module, loader(4))
    shares = [m["projection/cumulative_share"] for _, m in logger.keyed("projection/cumulative_share")]
    assert len(shares) == 2 and shares == pytest.approx([expected] * 2, abs=1e-5)


def test_basis_provenance_is_one_table_with_k_and_kept_energy_per_tensor(tmp_path):
    module = TinyLM()
    basis = random_basis(module.model, tmp_path / "b.safetensors", frac=0.25)
    wandb = ConfigRecordingWandb()
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), log_every_n_steps=0)
    trainer(tmp_path, 2, [cb], logger=wandb).fit(module, loader(2))
    columns, rows = wandb.tables["projection/basis"]
    table = {row[columns.index("tensor")]: dict(zip(columns, row)) for row in rows}
    assert set(table) == set(basis.entries)
    for name, entry in basis.entries.items():
        assert table[name]["k_left"] == entry.left.k and table[name]["k_right"] is None
        assert table[name]["energy_kept"] == pytest.approx(entry.energy_kept)
        assert table[name]["module"] == parse_name(name)[1]
    assert wandb.stored["projection.basis_file"] == str((tmp_path / "b.safetensors").resolve())
    assert (
        wandb.stored["projection.basis_sha256"] == hashlib.sha256((tmp_path / "b.safetensors").read_bytes()).hexdigest()
    )


def test_bad_log_every_n_steps_names_the_argument():
    with pytest.raises(MisconfigurationException, match="log_every_n_steps=-1"):
        OnlineProjection("x.safetensors", log_every_n_steps=-1)
