"""Row-sharded projection (FSDP2's layout) equals the unsharded one, with uneven and empty shards, without gathering."""

import pytest
import torch

from helpers.ranks import two_rank_results
from helpers.sharded_cases import CASES, case_tensors
from safeproj.core.projector import project
from safeproj.core.sharded import project_left_rows, project_right_rows, project_rows


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return two_rank_results("sharded_worker.py", tmp_path_factory.mktemp("sharded"))


@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_projection_equals_unsharded(two_ranks, name):
    X, _, entry, keep = case_tensors(name)
    want = project(X, entry, keep)
    starts = [ranks[name][0] for ranks in two_ranks]
    m = X.shape[0]
    assert starts == [0, (m + 1) // 2]  # FSDP2's split: ceil(m / 2) rows on rank 0
    projected = torch.cat([ranks[name][1] for ranks in two_ranks])
    in_place = torch.cat([ranks[name][2] for ranks in two_ranks])
    torch.testing.assert_close(projected, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_place, want, rtol=0, atol=1e-5)


def test_column_sharding_is_refused(two_ranks):
    assert "Shard(0)" in two_ranks[0]["column_error"]


def test_rows_of_one_process_equal_unsharded():
    X, _, entry, keep = case_tensors("both_sides")
    torch.testing.assert_close(project_rows(X, 0, entry, keep, lambda t: t), project(X, entry, keep))


def test_factor_projections_need_fitting_rows():
    _, _, entry, _ = case_tensors("both_sides")
    with pytest.raises(ValueError, match="do not fit"):
        project_left_rows(torch.ones(3, 6), 5, entry.left, "parallel", lambda t: t)
    with pytest.raises(ValueError, match="do not fit"):
        project_right_rows(torch.ones(3, 5), entry.right, "parallel")
    with pytest.raises(ValueError, match="unknown keep"):
        project_rows(torch.ones(3, 6), 0, entry, "sideways", lambda t: t)
