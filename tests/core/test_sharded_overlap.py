"""MSO tables, singular vectors and SafeLoRA products of row-sharded matrices (FSDP2's layout) equal the
unsharded ones, without gathering a matrix."""

import math

import pytest
import torch

from helpers.ranks import two_rank_results
from helpers.sharded_overlap_cases import ETAS, SHAPES, deltas, lora_factors
from safeproj.core.overlap import mso_tables
from safeproj.core.safelora import layer_similarity, safelora_projection
from safeproj.core.spectrum import factorize


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return two_rank_results("sharded_overlap_worker.py", tmp_path_factory.mktemp("sharded_overlap"))


def assert_rows_close(got: list[dict], want: list[dict], atol: float = 1e-5) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float) and not math.isnan(value):
                assert g[key] == pytest.approx(value, abs=atol), (w["name"], w["eta"], key)
            else:
                assert g[key] == value, key


@pytest.mark.parametrize("side", ["left", "right"])
def test_sharded_mso_tables_equal_unsharded(two_ranks, side):
    run, ref = deltas()
    want = mso_tables(run, {"ref": ref}, ETAS, side=side)["ref"]
    assert {r["name"] for r in want} == set(SHAPES)
    for ranks in two_ranks:  # every process gets the whole table
        # angle_deg in degrees: the two paths' float32 vectors differ in the last bits
        assert_rows_close(ranks["tables"][side]["ref"], want)


@pytest.mark.parametrize("name", list(SHAPES))
def test_row_factorization_gives_the_spectrum_and_left_vectors_rows(two_ranks, name):
    run, _ = deltas()
    U, S, _ = factorize(run.get(name))
    rows = []
    for ranks in two_ranks:
        start, spectrum, local = ranks["spectra"][name]
        torch.testing.assert_close(spectrum, S, rtol=1e-5, atol=1e-6)
        rows.append((start, local))
    got = torch.cat([local for _, local in sorted(rows, key=lambda r: r[0])]).float()
    signs = torch.sign((got * U).sum(0))  # singular vectors are defined up to sign
    torch.testing.assert_close(got * signs, U, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["safelora", "orthonormal"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_safelora_rows_and_similarities_equal_unsharded(two_ranks, name, variant):
    run, ref = deltas()
    delta = run.get(name)
    B, A = lora_factors(name)
    C = safelora_projection(ref.get(name), variant, frac=None, eta=0.9)
    for part, X in (("full", delta), ("lora", B)):
        got = torch.cat([ranks["safelora"][name, variant][part] for ranks in two_ranks])
        torch.testing.assert_close(got, C(X), rtol=1e-5, atol=1e-5)
    for ranks in two_ranks:
        result = ranks["safelora"][name, variant]
        assert result["cosine"] == pytest.approx(layer_similarity(C, delta), abs=1e-6)
        assert result["lora_cosine"] == pytest.approx(layer_similarity(C, B, A), abs=1e-6)
