"""Fixtures shared by the patchgen tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run tiny networks on one thread: as fast as two, and steady when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
