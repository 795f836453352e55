"""Two-process DDP on CPU (gloo) gives identical weights on both ranks, equal to one process."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.projection import TinyLM, random_basis
from helpers.ranks import run_helper


def _run(out: Path, devices: int, basis: Path):
    out.mkdir()
    result = run_helper("ddp_worker.py", str(out), str(devices), str(basis), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_identical_and_equal_to_one_process(tmp_path):
    basis = tmp_path / "b.safetensors"
    random_basis(TinyLM().model, basis, frac=0.5)
    _run(tmp_path / "one", 1, basis)
    _run(tmp_path / "two", 2, basis)
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    rank0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5)
    start = TinyLM().model.state_dict()
    assert any(not torch.equal(single[n], start[n]) for n in single)
