"""SafeprojLM.configure_model: FSDP2 per decoder block and at the root under a device mesh, a no-op without one."""

from types import SimpleNamespace

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from safeproj.model.module import SafeprojLM


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_without_a_mesh_nothing_changes():
    module = SafeprojLM("tiny")
    before = {n: p for n, p in module.model.named_parameters()}
    module.configure_model()
    assert {n: p for n, p in module.model.named_parameters()} == before
    assert not any(isinstance(m, FSDPModule) for m in module.model.modules())


def test_blocks_and_root_sharded_once(one_process_group):
    module = SafeprojLM("tiny")
    module._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    module.configure_model()
    params = dict(module.model.named_parameters())
    module.configure_model()  # again: nothing re-wrapped, the same parameters
    assert dict(module.model.named_parameters()) == params
    units = [name for name, m in module.model.named_modules() if isinstance(m, FSDPModule)]
    assert units == ["", "model.layers.0", "model.layers.1"]
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())


def test_tensor_parallel_mesh_is_refused():
    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):  # a sub-mesh: only its size is read
            return SimpleNamespace(size=lambda: 2 if name == "tensor_parallel" else 1)

    module = SafeprojLM("tiny")
    module._device_mesh = Mesh()
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        module.configure_model()
