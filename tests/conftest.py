"""Fixtures of every test folder: one torch thread, and the environment of a lone in-process run."""

from __future__ import annotations

import pytest
import torch

from tests.testutil import lone_env


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine run far faster on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lone_process(monkeypatch):
    """No launcher variables, DeepSpeed on the CPU, offline; the process group shut down afterwards."""
    from pretrain.engine import shutdown

    lone_env(monkeypatch)
    yield
    shutdown()
