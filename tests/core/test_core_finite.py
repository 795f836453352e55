"""first_nonfinite names the first tensor with a NaN or an infinity and skips what cannot hold one."""

import torch

from safeproj.core.finite import first_nonfinite


def test_names_the_first_non_finite_tensor():
    good, nan, inf = torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")])
    assert first_nonfinite([("a", good), ("b", nan), ("c", inf)]) == "b"
    assert first_nonfinite([("a", good), ("c", inf)]) == "c"


def test_finite_missing_and_integer_tensors_pass():
    assert first_nonfinite([("a", torch.ones(2)), ("g", None), ("i", torch.arange(3))]) is None
    assert first_nonfinite([]) is None
