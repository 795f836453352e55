"""Finding non-finite values (NaN, ±inf) in a run's loss, gradients and weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


class NonFiniteError(ValueError):
    """Training produced a NaN or an infinity; the message names the step and the tensor."""


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, None when all are finite.

    One device sync for the whole set: the per-tensor flags are stacked before they are read. A sharded
    tensor (DTensor) is checked on this process's shard only: no collective, so callers agree across ranks.
    """
    names, flags = [], []
    for name, tensor in named:
        if tensor is None or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        names.append(name)
        flags.append(torch.isfinite(tensor.detach()).all())
    if not flags:
        return None
    finite = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None
