import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The core tests use small matrices: one thread avoids thread-pool waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
