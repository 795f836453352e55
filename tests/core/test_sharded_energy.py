"""Energies and rows of row-sharded tensors (FSDP2's layout) equal the unsharded ones, without gathering a weight."""

import pytest
import torch

from helpers.ranks import two_rank_results
from helpers.sharded_cases import CASES, case_tensors
from safeproj.core.energy import energy_row
from safeproj.core.sharded import forward_needs_every_process
from safeproj.core.spectrum import squared_norm


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return two_rank_results("sharded_energy_worker.py", tmp_path_factory.mktemp("sharded_energy"))


@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_energy_equals_unsharded(two_ranks, name):
    X, W0, entry, _ = case_tensors(name)
    want = energy_row(X, entry)
    for ranks in two_ranks:  # every process gets the whole sums
        got = ranks[name]["energy"]
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert ranks[name]["norms"] == pytest.approx([squared_norm(X), squared_norm(W0)], rel=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_of_whole_and_sharded_starts_are_the_shards_rows(two_ranks, name):
    _, W0, _, _ = case_tensors(name)
    for key in ("rows_plain", "rows_dtensor"):
        assert torch.equal(torch.cat([ranks[name][key] for ranks in two_ranks]), W0)


def test_lora_rows_are_the_products_rows(two_ranks):
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g)
    torch.testing.assert_close(torch.cat([ranks["lora"] for ranks in two_ranks]), 0.5 * B @ A)


def test_a_start_of_another_shape_is_refused(two_ranks):
    assert "does not fit" in two_ranks[0]["misfit_error"]


def test_a_plain_module_runs_its_forward_alone():
    assert not forward_needs_every_process(torch.nn.Linear(2, 2))
