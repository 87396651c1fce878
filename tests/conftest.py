"""One hypothesis profile for every machine, CI included (a profile that drew fixed examples only in CI would
hide a property that fails one fresh draw in ten), and fixtures for test modules that train small models.
A failing draw prints the blob that reproduces it."""

import socket

import pytest
from hypothesis import settings

settings.register_profile("grpo-ma", deadline=None, print_blob=True)
settings.load_profile("grpo-ma")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module (use it with pytest.mark.usefixtures): the tiny models gain nothing
    from more, and on a shared CPU OpenMP threads that wait for each other make every step many times
    slower. OMP_NUM_THREADS tells grpo_ma.train to keep this thread count."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
